"""Training frames in memory, as the detector sees them, and batched crop-and-resize.

Both stages read a COCO dataset into a :class:`FrameBank`: every frame mapped to the OWL
model's square input frame (stretched as OWL-ViT's preprocessor does, or padded for OWLv2),
stored a little larger than the model input so zoomed-in crops stay sharp. Boxes are kept in
[0, 1] units of that square frame, i.e. in the geometry the detector predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.ops import roi_align
from tqdm import tqdm

from clip_perception.model.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from clip_perception.train.coco import CocoDataset

_MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)  # (1, 3, 1, 1)
_STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)  # (1, 3, 1, 1)
# Stored frame side / model input side: room for zoomed-in crops without upsampling much.
STORE_RATIO = 1.25


@dataclass(frozen=True)
class FrameBank:
    """Frames in the model's square frame, with their annotations."""

    frames: torch.Tensor  # (N, 3, C, C) uint8
    boxes: list[torch.Tensor]  # per frame (G, 4) xyxy in [0, 1] of the square frame
    labels: list[torch.Tensor]  # per frame (G,) int64 index into names
    names: list[str]  # categories with at least one box, in the dataset's order

    def objects(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All objects: frame index (M,), box (M, 4) and label (M,)."""
        frame = torch.cat([torch.full((len(b),), i) for i, b in enumerate(self.boxes)])
        return frame, torch.cat(self.boxes), torch.cat(self.labels)


def _to_square(rgb: np.ndarray, side: int, pad: bool) -> tuple[np.ndarray, float, float]:
    """The frame as the model sees it, side x side, and the (x, y) pixel -> [0, 1] scales."""
    height, width = rgb.shape[:2]
    if pad:  # OWLv2: bottom/right zero padding to a square first
        big = max(height, width)
        rgb = cv2.copyMakeBorder(rgb, 0, big - height, 0, big - width, cv2.BORDER_CONSTANT)
        height = width = big
    resized = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    return resized, 1.0 / width, 1.0 / height


def build_frame_bank(dataset: CocoDataset, image_size: int, pad: bool = False) -> FrameBank:
    """Read every frame of ``dataset`` for a model with ``image_size`` input."""
    names = sorted({label for image in dataset.images for label in image.labels},
                   key=dataset.categories.index)
    if not names:
        raise ValueError(f"{dataset.annotation_file}: no annotated objects to train on")
    index = {name: i for i, name in enumerate(names)}
    side = round(image_size * STORE_RATIO)
    frames, boxes, labels = [], [], []
    for image in tqdm(dataset.images, desc="loading frames", unit="img", mininterval=5.0):
        square, sx, sy = _to_square(image.read_rgb(), side, pad)
        frames.append(square)
        scale = torch.tensor([sx, sy, sx, sy])  # (4,)
        boxes.append(torch.from_numpy(image.boxes).reshape(-1, 4) * scale)  # (G, 4)
        labels.append(torch.tensor([index[n] for n in image.labels], dtype=torch.long))
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # (N,3,C,C)
    return FrameBank(stacked, boxes, labels, names)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) float in 0..255 -> CLIP-normalised model input."""
    return (pixels / 255.0 - _MEAN) / _STD


def crop_resize(frames: torch.Tensor, regions: torch.Tensor, size: int,
                flip: torch.Tensor) -> torch.Tensor:
    """Crop ``regions`` (B, 4) xyxy in [0, 1] of uint8 ``frames`` (B, 3, C, C), resize each to
    ``size`` and mirror where ``flip`` (B,) is True -> normalised (B, 3, size, size).

    roi_align averages several samples per output pixel when shrinking, so downscaling is
    antialiased like the deployment preprocessing; outside the frame it reads zeros.
    """
    boxes = regions.float() * frames.shape[-1]  # (B, 4) pixels
    rois = torch.cat([torch.arange(len(boxes)).unsqueeze(1).float(), boxes], 1)  # (B, 5)
    out = roi_align(frames.float(), rois, output_size=size, spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)  # (B, 3, size, size)
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)  # (B, 3, size, size)
    return normalize(out)
