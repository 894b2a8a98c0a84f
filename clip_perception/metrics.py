"""Recall of detections against ground-truth boxes, split into seen and unseen categories.

Used by the demo (what the node published) and by the tests of the bundled model (what the
engine computes offline); AP figures come from pycocotools in ``train/evaluate.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from clip_perception.train.synthetic import DEFAULT_SPLIT

# (category, x1, y1, x2, y2) in pixels
Box = tuple[str, float, float, float, float]


@dataclass(frozen=True)
class Recall:
    seen: float  # fraction of ground-truth objects of seen categories found (NaN if none)
    unseen: float  # the same for colour-shape pairs held out of training
    per_query: dict[str, float]


def recall_at_iou(truth: Mapping[int, Sequence[Box]], found: Mapping[int, Sequence[Box]],
                  iou: float = 0.5, unseen: Sequence[str] = DEFAULT_SPLIT.unseen_categories,
                  ) -> Recall:
    """An object counts as found when a detection of its category overlaps it by >= ``iou``
    (each detection matches at most one object, greedily by overlap). Frames missing from
    ``found`` count as frames with no detections."""
    hits: dict[str, list[bool]] = {}
    for frame, objects in truth.items():
        detections = list(found.get(frame, ()))
        for category in {o[0] for o in objects}:
            gt = [o[1:] for o in objects if o[0] == category]
            det = [d[1:] for d in detections if d[0] == category]
            hits.setdefault(category, []).extend(_matched(gt, det, iou))
    per_query = {c: float(np.mean(h)) for c, h in sorted(hits.items())}
    held_out = set(unseen)

    def pooled(names: set[str]) -> float:
        values = [v for c in names for v in hits[c]]
        return float(np.mean(values)) if values else float("nan")

    return Recall(seen=pooled(set(hits) - held_out), unseen=pooled(set(hits) & held_out),
                  per_query=per_query)


def _matched(gt: list[tuple[float, ...]], det: list[tuple[float, ...]], iou: float) -> list[bool]:
    if not det:
        return [False] * len(gt)
    overlaps = box_iou(torch.tensor(gt, dtype=torch.float64),
                       torch.tensor(det, dtype=torch.float64))  # (G, D)
    found = []
    used: set[int] = set()
    for row in overlaps:
        order = [int(j) for j in torch.argsort(row, descending=True) if int(j) not in used]
        if order and row[order[0]] >= iou:
            used.add(order[0])
            found.append(True)
        else:
            found.append(False)
    return found
