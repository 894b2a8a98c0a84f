"""Draw detections onto RGB images and tile frames into contact sheets.

ROS-free: the detector node publishes these images and the CLI writes them to disk. All
inputs and outputs are (H, W, 3) uint8 RGB; inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

# Kelly's colours of maximum contrast (without white and black), in his order, so that the
# first queries get the most distinct colours. RGB. Query i is drawn in PALETTE[i % 20].
PALETTE = np.array([
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32),
    (206, 162, 98), (129, 112, 102), (0, 125, 52), (246, 118, 142), (0, 83, 138),
    (255, 122, 92), (83, 55, 122), (255, 142, 0), (179, 40, 81), (244, 200, 0),
    (127, 24, 13), (147, 170, 0), (89, 51, 21), (241, 58, 19), (35, 44, 22),
], dtype=np.uint8)  # (20, 3)

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_detections(
    rgb: np.ndarray,
    boxes_xyxy: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray,
    query_indices: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``rgb`` with a box and a "label 0.87" tag per detection.

    rgb: (H, W, 3) uint8. boxes_xyxy: (N, 4) pixel corners, clipped to the image. labels: N
    strings. scores: (N,). query_indices: (N,) ints choosing each box's colour; when None,
    detections with the same label share a colour. Line width and font scale follow the image
    size; tags sit above their box, shifted to stay inside the image (an image less than one
    tag high shows the tag's top). Higher scores are drawn last, so they end up on top.
    """
    _check_rgb(rgb, "rgb")
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(labels)
    if boxes.shape != (n, 4) or scores.shape != (n,):
        raise ValueError(f"{n} labels need (N, 4) boxes and (N,) scores, got "
                         f"{boxes.shape} and {scores.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError("boxes must be finite")
    if query_indices is None:
        # Distinct labels in order of first appearance take the palette's colours in turn.
        label_ids: dict[str, int] = {}
        colour_ids = np.array([label_ids.setdefault(label, len(label_ids)) for label in labels],
                              dtype=np.int64)  # (N,)
    else:
        colour_ids = np.asarray(query_indices)
        if colour_ids.shape != (n,) or not np.issubdtype(colour_ids.dtype, np.integer):
            raise ValueError(f"query_indices must be (N,) = ({n},) ints, got "
                             f"{colour_ids.shape} {colour_ids.dtype}")

    out = rgb.copy()  # C-contiguous and writable, as cv2's drawing functions need
    height, width = out.shape[:2]
    short_side = min(height, width)
    # About 2 px lines and 0.6 font scale (13 px caps) on a 640x480 frame.
    line = max(1, round(short_side / 240))
    font_scale = min(max(short_side / 800, 0.3), 2.0)
    text_thickness = max(1, round(font_scale * 1.5))
    pad = max(1, line)

    # Corners rounded to pixels and clipped (cv2 clips too, but the tag placement needs them).
    corners = np.rint(boxes).clip(0, [width - 1, height - 1] * 2).astype(np.int64)  # (N, 4)
    colours = PALETTE[colour_ids % len(PALETTE)]  # (N, 3)
    order = np.argsort(scores, kind="stable")
    for i in order:  # every box first, so no box line crosses a tag
        x1, y1, x2, y2 = corners[i].tolist()
        cv2.rectangle(out, (x1, y1), (x2, y2), colours[i].tolist(), line)
    for i in order:
        text = f"{labels[i]} {scores[i]:.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, font_scale, text_thickness)
        tag_w, tag_h = text_w + 2 * pad, text_h + baseline + 2 * pad
        x1, y1 = corners[i, :2].tolist()
        # Above the box; at the image's top edge instead, over the box, when there is no room.
        top = max(0, y1 - tag_h)
        left = max(0, min(x1, width - tag_w))
        colour = colours[i].tolist()
        cv2.rectangle(out, (left, top), (left + tag_w - 1, top + tag_h - 1), colour, cv2.FILLED)
        # Black text on light colours, white on dark (ITU-R BT.601 luma).
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luma > 140 else (255, 255, 255)
        cv2.putText(out, text, (left + pad, top + pad + text_h), _FONT, font_scale, ink,
                    text_thickness, cv2.LINE_AA)
    return out


def contact_sheet(images: Sequence[np.ndarray], columns: int, tile_width: int) -> np.ndarray:
    """Tile RGB frames row by row into one (rows * tile_h, cols * tile_width, 3) uint8 image.

    Each frame is scaled to ``tile_width`` keeping its aspect ratio; tile_h is the tallest
    scaled frame, shorter ones are top-aligned on black. cols = min(columns, len(images)).
    """
    if len(images) == 0:  # not `not images`, which is ambiguous for an (N, H, W, 3) array
        raise ValueError("contact_sheet needs at least one image")
    if columns < 1 or tile_width < 1:
        raise ValueError(f"columns and tile_width must be >= 1, got {columns}, {tile_width}")
    tiles = []
    for k, image in enumerate(images):
        _check_rgb(image, f"images[{k}]")
        h, w = image.shape[:2]
        size = (tile_width, max(1, round(h * tile_width / w)))  # cv2 sizes are (w, h)
        # INTER_AREA averages when shrinking (no aliasing); it is nearest-like when enlarging.
        interpolation = cv2.INTER_AREA if w > tile_width else cv2.INTER_LINEAR
        tiles.append(cv2.resize(image, size, interpolation=interpolation))
    cols = min(columns, len(tiles))
    tile_h = max(tile.shape[0] for tile in tiles)
    sheet = np.zeros((math.ceil(len(tiles) / cols) * tile_h, cols * tile_width, 3), np.uint8)
    for k, tile in enumerate(tiles):
        row, col = divmod(k, cols)
        y, x = row * tile_h, col * tile_width
        sheet[y: y + tile.shape[0], x: x + tile_width] = tile
    return sheet


def _check_rgb(image: np.ndarray, name: str) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{name} must be a non-empty (H, W, 3) uint8 RGB image, got {shape}")
