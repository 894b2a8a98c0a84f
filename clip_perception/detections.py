"""Typed results handed from the engine to its callers (ROS nodes, CLI, benchmarks).

Everything here is plain numpy on the CPU so that callers never touch torch tensors or
devices; the arrays are owned by the result (no views into model buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Detections for one image, computed with one vocabulary version.

    boxes: (N, 4) float32 xyxy in source-image pixels, clipped to the image.
    scores: (N,) float32 in [0, 1], sorted descending.
    query_indices: (N,) int64 index into the vocabulary the result was computed with.
    labels: N label strings, ``labels[i]`` is the vocabulary label of ``query_indices[i]``.
    vocabulary_version: version of the vocabulary used (see ``Vocabulary.version``).
    image_size: (H, W) of the source image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    query_indices: np.ndarray
    labels: list[str]
    vocabulary_version: int
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.labels)
        assert self.boxes.shape == (n, 4) and self.boxes.dtype == np.float32
        assert self.scores.shape == (n,) and self.scores.dtype == np.float32
        assert self.query_indices.shape == (n,) and self.query_indices.dtype == np.int64

    def __len__(self) -> int:
        return len(self.labels)

    def center_size(self) -> np.ndarray:
        """(N, 4) float64 boxes as centre x, centre y, width, height (the message layout)."""
        boxes = self.boxes.astype(np.float64)  # (N, 4) xyxy
        return np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2,
                               boxes[:, 2:] - boxes[:, :2]], axis=1)  # (N, 4)


@dataclass(frozen=True)
class Classification:
    """Zero-shot classification of a batch of images against one label vocabulary.

    probs: (B, L) float32, each row a softmax distribution over ``labels``.
    labels: the L label strings, in column order.
    vocabulary_version: version of the label vocabulary used.
    """

    probs: np.ndarray
    labels: list[str]
    vocabulary_version: int

    def __post_init__(self) -> None:
        assert self.probs.ndim == 2 and self.probs.shape[1] == len(self.labels)
        assert self.probs.dtype == np.float32

    def top1(self) -> list[tuple[str, float]]:
        """Best label and its probability for each image."""
        best = self.probs.argmax(axis=1)
        return [(self.labels[j], float(self.probs[i, j])) for i, j in enumerate(best)]
