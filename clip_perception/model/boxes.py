"""Boxes between the model input frame and source-image pixels, for every preprocessing mode.

The model predicts normalised cx, cy, w, h in its square input; ``boxes_to_pixels`` maps them
to xyxy pixels of each source image, ``pixels_to_input_boxes`` maps a pixel region the other
way (for image-guided queries). ``boxes_to_pixels`` equals ``post_process_object_detection``
scaled by ``target_sizes`` (v1: the image size; v2: the padded square size) to float32
precision, then is clipped to the image.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Mode = Literal["stretch", "pad", "clip"]


def clip_resize_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """HF's shortest-edge resize: the short side becomes E, the long side int(E * long/short)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def _frame(
    image_size: tuple[int, int], mode: Mode, input_size: int | None, shortest_edge: int | None
) -> tuple[float, float, float, float]:
    """Affine map of the model input frame: source_px = normalised * scale + offset, per axis."""
    height, width = image_size
    if mode == "stretch":
        return float(width), float(height), 0.0, 0.0
    if mode == "pad":
        side = float(max(height, width))
        return side, side, 0.0, 0.0
    if mode == "clip":
        if input_size is None:
            raise ValueError("mode 'clip' needs input_size (the crop side)")
        edge = shortest_edge or input_size
        new_h, new_w = clip_resize_shape(height, width, edge)
        top, left = int((new_h - input_size) / 2.0), int((new_w - input_size) / 2.0)
        sx, sy = width / new_w, height / new_h  # resized px -> source px
        return input_size * sx, input_size * sy, left * sx, top * sy
    raise ValueError(f"unknown mode {mode!r}; expected 'stretch', 'pad' or 'clip'")


@functools.lru_cache(maxsize=64)
def _frame_table(
    sizes: tuple[tuple[int, int], ...], mode: Mode, input_size: int | None,
    shortest_edge: int | None, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """(B, 3, 4) scale, offset and upper bound per image. Cached: a camera's frame size rarely
    changes, and on a GPU a new table is a host-to-device copy per batch. Read only."""
    rows = []
    for h, w in sizes:
        sx, sy, ox, oy = _frame((h, w), mode, input_size, shortest_edge)
        rows.append([[sx, sy, sx, sy], [ox, oy, ox, oy], [w, h, w, h]])
    return torch.tensor(rows, dtype=dtype, device=device)  # (B, 3, 4)


def _frame_tensor(
    boxes: torch.Tensor,
    image_size: tuple[int, int] | Sequence[tuple[int, int]],
    mode: Mode,
    input_size: int | None,
    shortest_edge: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, offset, upper) as (..., 1, 4) tensors broadcasting against ``boxes`` (..., 4)."""
    single = isinstance(image_size[0], (int, np.integer))
    sizes = [image_size] if single else list(image_size)
    if len(sizes) > 1 and (boxes.dim() != 3 or boxes.shape[0] != len(sizes)):
        raise ValueError(f"{len(sizes)} image sizes need boxes shaped (B={len(sizes)}, P, 4)")
    key = tuple((int(h), int(w)) for h, w in sizes)
    table = _frame_table(key, mode, input_size, shortest_edge, boxes.dtype, boxes.device)
    if boxes.dim() == 3:
        scale, offset, upper = table.unsqueeze(2).unbind(1)  # each (B, 1, 4)
    else:
        scale, offset, upper = table[0].unbind(0)  # each (4,)
    return scale, offset, upper


def boxes_to_pixels(
    boxes: torch.Tensor,
    image_size: tuple[int, int] | Sequence[tuple[int, int]],
    mode: Mode,
    *,
    input_size: int | None = None,
    shortest_edge: int | None = None,
    clip: bool = True,
) -> torch.Tensor:
    """Normalised cxcywh boxes (N, 4) or (B, P, 4) -> xyxy pixels in the source image(s).

    ``image_size`` is the source (H, W), or one (H, W) per batch row for (B, P, 4) boxes.
    stretch scales x by W and y by H; pad scales both by max(H, W) (the padded square, as
    OWLv2's post-processing with padded ``target_sizes``); results are clipped to the image.
    """
    if boxes.shape[-1] != 4 or boxes.dim() not in (2, 3):
        raise ValueError(f"boxes must be (N, 4) or (B, P, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    scale, offset, upper = _frame_tensor(boxes, image_size, mode, input_size, shortest_edge)
    cx, cy, w, h = boxes.unbind(-1)
    # Same arithmetic order as transformers' center_to_corners_format then * target size, so
    # stretch/pad results are bit-identical to its post-processing.
    corners = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    pixels = corners * scale
    if mode == "clip":
        pixels = pixels + offset
    if clip:
        pixels = torch.minimum(pixels.clamp(min=0), upper)
    return pixels


def pixels_to_input_boxes(
    boxes_xyxy: torch.Tensor | Sequence[float] | Sequence[Sequence[float]],
    image_size: tuple[int, int],
    mode: Mode,
    *,
    input_size: int | None = None,
    shortest_edge: int | None = None,
) -> torch.Tensor:
    """Pixel xyxy box(es) (4,) or (N, 4) in the source image -> normalised xyxy in the input.

    For image-guided (exemplar) queries: the region is matched against predicted boxes, which
    live in the model input frame (the padded square for OWLv2). Clamped to [0, 1].
    """
    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32)
    if boxes.shape[-1] != 4 or boxes.dim() not in (1, 2):
        raise ValueError(f"boxes must be (4,) or (N, 4), got {tuple(boxes.shape)}")
    sx, sy, ox, oy = _frame(image_size, mode, input_size, shortest_edge)
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    offset = torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype, device=boxes.device)
    return ((boxes - offset) / scale).clamp(0.0, 1.0)
