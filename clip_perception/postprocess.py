"""Per-patch scores to final detections: best query, thresholds, NMS, top-k.

The order follows transformers' ``post_process_object_detection`` for OWL-ViT/OWLv2 (every
patch predicts one box; its class is the query with the highest logit and its score that
logit's sigmoid), extended with per-query thresholds, NMS and a detection cap, which the
reference leaves to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms


@dataclass(frozen=True)
class PatchScores:
    """Best query per patch. scores: (B, P) in [0, 1]; query_indices: (B, P) int64."""

    scores: Tensor
    query_indices: Tensor


@dataclass(frozen=True)
class Selection:
    """Detections kept for one image, sorted by descending score.

    boxes: (N, 4) float32 xyxy pixels; scores: (N,) float32; query_indices: (N,) int64.
    """

    boxes: Tensor
    scores: Tensor
    query_indices: Tensor


def best_query_per_patch(
    logits: Tensor, objectness_logits: Tensor | None = None
) -> PatchScores:
    """Max over queries of sigmoid(logits), optionally weighted by objectness.

    logits: (B, P, Q) class logits. objectness_logits: (B, P) OWLv2 objectness logits or None.
    With objectness the score is sigmoid(class) * sigmoid(objectness): the OWLv2 objectness
    head is trained class-agnostically to tell whether a patch's box covers any object, so the
    product reads as P(object) * P(query | object) (the YOLO factorisation). It stays in
    [0, 1], so thresholds keep their meaning, and the class evidence still decides the label,
    which ranking by objectness alone would throw away.
    """
    assert logits.ndim == 3, f"logits must be (B, P, Q), got {tuple(logits.shape)}"
    # The max is taken on logits (sigmoid is monotonic) and in fp32 so that fp16/bf16 runs
    # threshold the same numbers as fp32 runs up to the model's own rounding.
    best_logits, query_indices = logits.float().max(dim=-1)  # (B, P), (B, P)
    scores = torch.sigmoid(best_logits)  # (B, P)
    if objectness_logits is not None:
        assert objectness_logits.shape == scores.shape
        scores = scores * torch.sigmoid(objectness_logits.float())  # (B, P)
    return PatchScores(scores=scores, query_indices=query_indices)


def select_detections(
    boxes: Tensor,
    patch_scores: PatchScores,
    thresholds: Tensor,
    nms_iou: float,
    class_agnostic: bool,
    max_detections: int,
) -> list[Selection]:
    """Threshold, NMS and cap the per-patch predictions of a batch, one Selection per image.

    boxes: (B, P, 4) xyxy in each image's source pixels, clipped (NMS runs in the frame the
    caller sees; boxes of zero area after clipping are dropped). thresholds: (Q,) per-query
    score thresholds. NMS is class-aware (boxes of different queries never suppress each
    other) unless ``class_agnostic``.
    """
    b, p, _ = boxes.shape
    assert patch_scores.scores.shape == (b, p) and thresholds.ndim == 1
    assert 0.0 <= nms_iou <= 1.0 and max_detections >= 0
    scores = patch_scores.scores.flatten()  # (B*P,)
    queries = patch_scores.query_indices.flatten()  # (B*P,)
    image_ids = torch.arange(b, device=boxes.device).repeat_interleave(p)  # (B*P,)
    thresholds = thresholds.to(device=scores.device, dtype=scores.dtype)
    flat_boxes = boxes.reshape(b * p, 4)  # (B*P, 4)
    # OWLv2 predicts over the padded square: a box wholly in the padding clips to zero area.
    nonempty = (flat_boxes[:, 2] > flat_boxes[:, 0]) & (flat_boxes[:, 3] > flat_boxes[:, 1])
    candidates = torch.nonzero((scores >= thresholds[queries]) & nonempty).squeeze(1)  # (C,)

    num_queries = thresholds.shape[0]
    groups = image_ids[candidates]  # (C,) one NMS group per image ...
    if not class_agnostic:
        groups = groups * num_queries + queries[candidates]  # (C,) ... or per (image, query)
    # float64: batched_nms separates groups by offsetting boxes by group * max coordinate; in
    # float32 those offsets (up to B * Q * image width) would eat the boxes' precision.
    keep = batched_nms(
        flat_boxes[candidates].double(), scores[candidates].double(), groups, nms_iou
    )  # (K,)
    kept = candidates[keep]  # (K,) sorted by descending score, as batched_nms returns
    # One device-to-host copy for the whole batch; the per-image split is cheap on the CPU.
    kept_boxes = flat_boxes[kept].float().cpu()  # (K, 4)
    kept_scores = scores[kept].float().cpu()  # (K,)
    kept_queries = queries[kept].cpu()  # (K,)
    kept_images = image_ids[kept].cpu()  # (K,)

    selections = []
    for image in range(b):
        rows = torch.nonzero(kept_images == image).squeeze(1)[:max_detections]  # (N,)
        selections.append(
            Selection(
                boxes=kept_boxes[rows], scores=kept_scores[rows], query_indices=kept_queries[rows]
            )
        )
    return selections
