"""Synthetic scene generator, compositional split, video frames and COCO writing/reading."""

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from clip_perception.train.coco import load_coco, write_synthetic_coco
from clip_perception.train.synthetic import (
    COLORS,
    DEFAULT_SCENE,
    DEFAULT_SPLIT,
    SHAPES,
    SplitSpec,
    generate_crop,
    generate_scene,
    generate_scenes,
    make_caption,
    make_video_frames,
)

SMALL = replace(DEFAULT_SCENE, width=128, height=128)
# No lighting, blur or noise: object pixels keep (shaded) palette colours.
CLEAN = replace(DEFAULT_SCENE, brightness=(1.0, 1.0), contrast=(1.0, 1.0), color_cast=0.0,
                gamma=(1.0, 1.0), blur_prob=0.0, noise_std=(0.0, 0.0))


def _same(a, b) -> bool:
    """Same pixels and annotations (scenes also compare captions)."""
    return (a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
            and getattr(a, "caption", None) == getattr(b, "caption", None))


def test_same_seed_gives_identical_scenes():
    for config in (SMALL, DEFAULT_SCENE):
        for index in range(3):
            assert _same(generate_scene(5, index, config=config),
                         generate_scene(5, index, config=config))
    assert generate_crop(5, 2).image.tobytes() == generate_crop(5, 2).image.tobytes()


def test_different_seed_index_or_split_gives_different_scenes():
    base = generate_scene(5, 0, config=SMALL)
    assert not _same(base, generate_scene(6, 0, config=SMALL))
    assert not _same(base, generate_scene(5, 1, config=SMALL))
    assert not _same(base, generate_scene(5, 0, "val", config=SMALL))


@pytest.mark.parametrize("config", [SMALL, DEFAULT_SCENE], ids=["128x128", "640x480"])
def test_annotations_are_valid(config):
    n = 150 if config is SMALL else 20
    occluded = 0
    for scene in generate_scenes(n, 1, "test", config=config):
        assert scene.image.shape == (config.height, config.width, 3)
        assert scene.image.dtype == np.uint8 and scene.objects
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= config.width and 0 <= y0 < y1 <= config.height
            f0, f1, f2, f3 = obj.full_box
            assert f0 <= x0 and f1 <= y0 and x1 <= f2 and y1 <= f3
            assert obj.category == f"{obj.color} {obj.shape}"
            assert obj.category in DEFAULT_SPLIT.categories
            assert 0 < obj.area <= (x1 - x0) * (y1 - y0)
            assert 1 - config.max_occlusion <= obj.visible_fraction <= 1
            occluded += obj.visible_fraction < 1
        left_to_right = sorted(scene.objects, key=lambda o: o.box[0])
        assert scene.caption == make_caption([o.category for o in left_to_right])
    assert occluded > 0, "occlusion never happened"


def test_boxes_contain_object_coloured_pixels():
    palette = np.array(list(COLORS.values()), np.float32)  # (C, 3)
    names = list(COLORS)
    for scene in generate_scenes(40, 2, "test", config=replace(CLEAN, width=320, height=240)):
        for obj in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in obj.box)
            pixels = scene.image[y0:y1, x0:x1].reshape(-1, 3).astype(np.float32)  # (P, 3)
            dist = np.linalg.norm(pixels[:, None] - palette[None], axis=2)  # (P, C)
            own = names.index(obj.color)
            match = (dist.argmin(1) == own) & (dist[:, own] < 70)
            assert match.sum() >= 0.3 * obj.area, (obj, match.sum())


def test_caption_wording():
    assert make_caption(["red circle", "blue cross", "red circle", "orange ring"]) == (
        "a photo of two red circles, a blue cross and an orange ring")
    assert make_caption(["blue cross", "blue cross"]) == "a photo of two blue crosses"
    assert make_caption(["white star"]) == "a photo of a white star"
    crop = generate_crop(0, 3, size=48)
    assert crop.image.shape == (48, 48, 3)
    assert crop.caption in (f"a {crop.category}", f"an {crop.category}")


def test_compositional_split():
    unseen = set(DEFAULT_SPLIT.unseen_categories)
    assert len(unseen) >= 4
    train = [o.category for s in generate_scenes(300, 0, "train", config=SMALL)
             for o in s.objects]
    val = [o.category for s in generate_scenes(100, 0, "val", config=SMALL) for o in s.objects]
    test = [o.category for s in generate_scenes(100, 0, "test", config=SMALL) for o in s.objects]
    assert not unseen & set(train) and not unseen & set(val)
    train_colors = {c.split()[0] for c in train}
    train_shapes = {c.split()[1] for c in train}
    for color, shape in DEFAULT_SPLIT.unseen_pairs:
        assert color in train_colors and shape in train_shapes
    assert set(COLORS) == train_colors and set(SHAPES) == train_shapes
    assert unseen & set(test) and set(test) - unseen  # both unseen and seen pairs


def test_specs_reject_bad_values():
    with pytest.raises(ValueError, match="not compositional"):
        SplitSpec(unseen_pairs=tuple(("red", s) for s in SHAPES))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SplitSpec(unseen_pairs=(("red", "circle"),), shapes=("square", "star"))
    with pytest.raises(ValueError, match="colours must come from"):
        SplitSpec(colors=("pink", "red"))
    with pytest.raises(ValueError, match="do not fit"):
        replace(DEFAULT_SCENE, width=12, height=12)


def test_coco_round_trip_and_pycocotools(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    coco_eval = pytest.importorskip("pycocotools.cocoeval")
    path = write_synthetic_coco(tmp_path / "ds", 6, (96, 64), seed=4, split="test")
    config = replace(DEFAULT_SCENE, width=96, height=64)
    scenes = list(generate_scenes(6, 4, "test", config=config))

    api = coco_api.COCO(str(path))
    assert len(api.getImgIds()) == 6
    assert len(api.getAnnIds()) == sum(len(s.objects) for s in scenes)
    assert len(api.getCatIds()) == len(DEFAULT_SPLIT.categories)
    # The ground truth scored as detections is perfect under the official evaluation.
    dets = [{**a, "score": 1.0} for a in api.loadAnns(api.getAnnIds())]
    evaluation = coco_eval.COCOeval(api, api.loadRes(dets), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)

    for source in (path, path.parent):
        dataset = load_coco(source)
        assert dataset.categories == DEFAULT_SPLIT.categories
        assert len(dataset) == 6
        for image, scene in zip(dataset.images, scenes, strict=True):
            assert (image.width, image.height) == (96, 64)
            assert np.array_equal(image.read_rgb(), scene.image)  # PNG is lossless
            assert image.labels == [o.category for o in scene.objects]
            np.testing.assert_allclose(image.boxes, [o.box for o in scene.objects])


def test_load_coco_tolerates_minimal_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}],
            "categories": [{"id": 3, "name": "mug"}, {"id": 1, "name": "cup"}],
            "annotations": [{"image_id": 7, "category_id": 3, "bbox": [1, 2, 3, 4]},
                            {"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5],
                             "iscrowd": 1},
                            {"image_id": 8, "category_id": 1, "bbox": [0, 0, 0, 5]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    dataset = load_coco(tmp_path / "instances.json")
    assert dataset.categories == ["cup", "mug"]
    first, second = dataset.images
    assert first.path == tmp_path / "a.png" and first.width is None
    np.testing.assert_array_equal(first.boxes, [[1, 2, 4, 6]])
    assert first.labels == ["mug"]
    assert second.boxes.shape == (0, 4) and second.labels == []  # crowd and empty box skipped
    del coco["annotations"]
    (tmp_path / "info.json").write_text(json.dumps(coco))
    assert len(load_coco(tmp_path / "info.json")) == 2


_GOOD = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}],
         "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda c: "{not json", "not valid JSON"),
    (lambda c: [c], "not a JSON object"),
    (lambda c: {**c, "images": None}, "'images' must be a list"),
    (lambda c: {"annotations": [], "categories": c["categories"]}, "'images' must be a list"),
    (lambda c: {**c, "images": [{"id": 1}]}, r"images\[0\] has no 'file_name'"),
    (lambda c: {**c, "categories": [{"id": 1, "name": "x"}, {"id": 1, "name": "y"}]},
     "repeats id 1"),
    (lambda c: {**c, "annotations": [{"image_id": 1, "category_id": 1}]},
     r"annotations\[0\] has no 'bbox'"),
    (lambda c: {**c, "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 1, 2]}]},
     "is not \\[x, y, w, h\\]"),
    (lambda c: {**c, "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 2]}]},
     "negative size"),
    (lambda c: {**c, "annotations": [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]},
     "unknown category_id 9"),
    (lambda c: {**c, "annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]},
     "unknown image_id 2"),
    (lambda c: {**c, "annotations": [{"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1]}]},
     "'image_id' is '1'"),
])
def test_malformed_coco_raises_clear_error(tmp_path, mutate, problem):
    path = tmp_path / "bad.json"
    content = mutate(_GOOD)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=problem) as info:
        load_coco(path)
    assert str(path) in str(info.value)


def test_video_frames_move_smoothly_and_are_deterministic():
    width, height, fps = 160, 120, 10.0
    frames = make_video_frames(30, width, height, seed=3, fps=fps, n_objects=3)
    again = make_video_frames(30, width, height, seed=3, fps=fps, n_objects=3)
    assert all(_same(a, b) for a, b in zip(frames, again, strict=True))
    assert [f.stamp for f in frames] == pytest.approx([i / fps for i in range(30)])
    assert not _same(frames[0], make_video_frames(1, width, height, seed=4, n_objects=3)[0])

    tracks: dict[int, list[tuple[int, float, float]]] = {}
    for frame in frames:
        assert frame.image.shape == (height, width, 3)
        assert len({o.category for o in frame.objects}) == len(frame.objects)
        for obj in frame.objects:
            x0, y0, x1, y1 = obj.full_box
            tracks.setdefault(obj.track_id, []).append((frame.index, (x0 + x1) / 2,
                                                        (y0 + y1) / 2))
    assert None not in tracks and len(tracks) == 3
    total = 0.0
    for track in tracks.values():
        for (i, xa, ya), (j, xb, yb) in itertools.pairwise(track):
            step = math.hypot(xb - xa, ya - yb) / (j - i)
            assert step <= 0.05 * width, "objects must not jump between frames"
            total += step
    assert total > 0.2 * width, "objects must move"
