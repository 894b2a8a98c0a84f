"""draw_detections and contact_sheet: where pixels change, where they don't, and validation."""

import time

import cv2
import numpy as np
import pytest

from clip_perception.annotate import PALETTE, contact_sheet, draw_detections

H, W = 480, 640
GREY = 90  # no palette colour is grey (90, 90, 90)


def canvas(height=H, width=W):
    return np.full((height, width, 3), GREY, np.uint8)


def draw(boxes, labels=None, scores=None, query_indices=None, image=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)  # (N, 4)
    n = len(boxes)
    labels = [f"thing{i}" for i in range(n)] if labels is None else labels
    scores = np.linspace(0.9, 0.5, n) if scores is None else np.asarray(scores)
    return draw_detections(canvas() if image is None else image, boxes, labels, scores,
                           query_indices)


def test_box_edges_take_the_query_colour_and_far_pixels_stay():
    out = draw([[100, 150, 300, 350]], ["cat"], [0.87], np.array([3]))
    colour = PALETTE[3]
    for x, y in [(100, 250), (300, 250), (200, 350), (150, 150)]:  # left, right, bottom, top
        np.testing.assert_array_equal(out[y, x], colour)
    for x, y in [(200, 250), (600, 20), (20, 460), (630, 470)]:  # interior and far away
        np.testing.assert_array_equal(out[y, x], [GREY] * 3)
    # Only the box outline and its tag changed: nothing left of, right of or below the box.
    changed = np.any(out != GREY, axis=2)  # (H, W)
    assert not changed[:, :95].any() and not changed[:, 306:].any()
    assert not changed[356:].any()


def test_colours_follow_query_indices():
    boxes = [[10, 100, 60, 150], [100, 100, 150, 150], [200, 100, 250, 150]]
    out = draw(boxes, query_indices=np.array([0, 1, 21]))  # 21 wraps around to colour 1
    np.testing.assert_array_equal(out[125, 10], PALETTE[0])
    np.testing.assert_array_equal(out[125, 100], PALETTE[1])
    np.testing.assert_array_equal(out[125, 200], PALETTE[1])


def test_without_query_indices_equal_labels_share_a_colour():
    boxes = [[10, 100, 60, 150], [100, 100, 150, 150], [200, 100, 250, 150]]
    out = draw(boxes, labels=["dog", "cup", "dog"])
    np.testing.assert_array_equal(out[125, 10], PALETTE[0])
    np.testing.assert_array_equal(out[125, 100], PALETTE[1])
    np.testing.assert_array_equal(out[125, 200], PALETTE[0])


def test_palette_colours_are_distinct():
    diffs = np.abs(PALETTE[:, None].astype(int) - PALETTE[None]).sum(-1)  # (20, 20)
    assert (diffs + np.eye(len(PALETTE), dtype=int) * 999).min() > 30


def tag_above_box(label, score, height=H, margin=5):
    """The tag of a box mid-image: the changed pixels more than `margin` rows above the box."""
    y1 = height // 2
    out = draw([[200, y1, 400, y1 + 40]], [label], [score], np.array([0]), canvas(height))
    changed = np.any(out != GREY, axis=2)  # (height, W)
    changed[y1 - margin:] = False
    rows, cols = np.nonzero(changed)
    assert rows.size, "the tag should sit above a box that has room for it"
    return out[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]  # (h, w, 3)


def assert_shows(out, tag):
    """`tag` appears exactly in `out`: find the best match (its float score is not exactly 0
    even then) and compare pixels."""
    y, x = np.unravel_index(
        cv2.matchTemplate(out, tag, cv2.TM_SQDIFF).argmin(),
        (out.shape[0] - tag.shape[0] + 1, out.shape[1] - tag.shape[1] + 1))
    np.testing.assert_array_equal(out[y: y + tag.shape[0], x: x + tag.shape[1]], tag)


@pytest.mark.parametrize("box", [
    [0, 0, 120, 80],  # top-left corner: no room above
    [560, 0, 640, 80],  # top-right corner: tag wider than the box
    [630, 200, 640, 260],  # thin box at the right edge
    [0, 400, 50, 480],  # bottom-left corner
    [0, 0, 640, 480],  # the whole image
    [-50, -80, 700, 10],  # beyond the image on three sides
])
def test_tags_stay_whole_inside_the_image(box):
    # The top of the tag (clear of the box line under it) must show unclipped.
    tag = tag_above_box("traffic cone", 0.87)
    assert_shows(draw([box], ["traffic cone"], [0.87], np.array([0])), tag)


@pytest.mark.parametrize("height,box", [
    (16, [20, 8, 300, 15]), (16, [600, 0, 640, 16]),  # room for a tag, not above the box
    (8, [20, 2, 300, 7]),  # less than a tag high: the tag's top shows
])
def test_tags_in_short_images(height, box):
    # Images with a short side under 240 px share the smallest style, with 1 px lines, so the
    # rows above a box on a 200 px canvas are the whole tag.
    tag = tag_above_box("cone", 0.5, height=200, margin=0)
    assert tag.shape[0] > 8  # so the 8 px image cuts it
    assert_shows(draw([box], ["cone"], [0.5], np.array([0]), canvas(height)), tag[:height])


def test_tags_in_narrow_images_start_at_the_left_edge():
    tag = tag_above_box("traffic cone", 0.87, height=200, margin=0)
    assert tag.shape[1] > 60  # so the 60 px wide image cuts it
    out = draw([[10, 100, 50, 150]], ["traffic cone"], [0.87], np.array([0]), canvas(200, 60))
    assert_shows(out, tag[:, :60])


def test_higher_scores_are_drawn_on_top():
    box = [100, 200, 300, 300]
    tag = tag_above_box("cat", 0.9)
    assert_shows(draw([box, box], ["cat", "dog"], [0.9, 0.2], np.array([0, 0])), tag)
    assert_shows(draw([box, box], ["dog", "cat"], [0.2, 0.9], np.array([0, 0])), tag)


def test_input_is_not_modified():
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    before = image.copy()
    out = draw([[10, 10, 200, 200], [300, 50, 500, 400]], image=image)
    np.testing.assert_array_equal(image, before)
    assert not np.shares_memory(out, image) and (out != image).any()


def test_no_detections_returns_an_unchanged_copy():
    image = canvas()
    out = draw_detections(image, np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32),
                          np.zeros(0, np.int64))
    np.testing.assert_array_equal(out, image)
    assert out is not image and out.dtype == np.uint8


def test_non_contiguous_input():
    image = canvas()[::-1, :, ::-1]  # negative strides
    out = draw([[100, 150, 300, 350]], image=image)
    assert out.shape == (H, W, 3) and (out != GREY).any()


@pytest.mark.parametrize("kwargs", [
    dict(rgb=np.zeros((H, W), np.uint8)),
    dict(rgb=np.zeros((H, W, 4), np.uint8)),
    dict(rgb=np.zeros((H, W, 3), np.float32)),
    dict(rgb=np.zeros((0, W, 3), np.uint8)),
    dict(boxes_xyxy=np.zeros((2, 3))),
    dict(boxes_xyxy=np.zeros(8)),
    dict(boxes_xyxy=np.array([[0, 0, np.nan, 10], [0, 0, 5, 5]])),
    dict(labels=["a"]),
    dict(scores=np.zeros(3)),
    dict(query_indices=np.zeros(3, np.int64)),
    dict(query_indices=np.zeros(2, np.float32)),
])
def test_bad_shapes_raise_value_error(kwargs):
    args = dict(rgb=canvas(), boxes_xyxy=np.zeros((2, 4)), labels=["a", "b"],
                scores=np.zeros(2), query_indices=np.zeros(2, np.int64))
    with pytest.raises(ValueError):
        draw_detections(**{**args, **kwargs})


def test_fifty_boxes_on_a_vga_frame_are_fast():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    corner = rng.uniform(0, 600, (50, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(10, 200, (50, 2))], axis=1)  # (50, 4)
    labels = [f"object {i % 7}" for i in range(50)]
    scores, queries = rng.uniform(0, 1, 50), np.arange(50) % 7
    times = []
    for _ in range(20):
        start = time.perf_counter()
        draw_detections(image, boxes, labels, scores, queries)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.005  # about 1 ms on one core; the best of 20 ignores CI noise


def test_contact_sheet_tiles_row_by_row():
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in [(60, 80), (120, 80), (30, 160), (40, 40), (90, 60)]]
    sheet = contact_sheet(frames, columns=2, tile_width=40)
    # Scaled heights 30, 60, 8, 40, 60: tiles are 60 high, 3 rows of 2 columns.
    assert sheet.shape == (180, 80, 3) and sheet.dtype == np.uint8
    np.testing.assert_array_equal(
        sheet[:30, :40], cv2.resize(frames[0], (40, 30), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(sheet[60:100, 40:80], frames[3])  # same size: unchanged
    assert not sheet[30:60, :40].any()  # below a short tile: black
    assert not sheet[120:, 40:].any()  # the missing sixth tile: black


def test_contact_sheet_with_fewer_images_than_columns():
    frame = np.full((10, 20, 3), 7, np.uint8)
    sheet = contact_sheet([frame], columns=4, tile_width=40)
    assert sheet.shape == (20, 40, 3) and (sheet == 7).all()


@pytest.mark.parametrize("images,columns,tile_width", [
    ([], 2, 40),
    ([np.zeros((10, 10, 3), np.uint8)], 0, 40),
    ([np.zeros((10, 10, 3), np.uint8)], 2, 0),
    ([np.zeros((10, 10), np.uint8)], 2, 40),
])
def test_contact_sheet_validates(images, columns, tile_width):
    with pytest.raises(ValueError):
        contact_sheet(images, columns, tile_width)
