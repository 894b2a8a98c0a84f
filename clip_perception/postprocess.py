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
    keep = _grouped_nms(flat_boxes[candidates], scores[candidates], groups, nms_iou)  # (K,)
    kept = candidates[keep]  # (K,) sorted by descending score
    # One device-to-host copy (one synchronisation) for the whole batch: float64 holds the
    # float32 boxes and scores and the integer ids exactly. The per-image split is on the CPU.
    packed = torch.cat([
        flat_boxes[kept].double(), scores[kept, None].double(),
        queries[kept, None].double(), image_ids[kept, None].double(),
    ], dim=1).cpu()  # (K, 7)
    kept_boxes = packed[:, :4].float()  # (K, 4)
    kept_scores = packed[:, 4].float()  # (K,)
    kept_queries = packed[:, 5].long()  # (K,)
    kept_images = packed[:, 6].long()  # (K,)

    selections = []
    for image in range(b):
        rows = torch.nonzero(kept_images == image).squeeze(1)[:max_detections]  # (N,)
        selections.append(
            Selection(
                boxes=kept_boxes[rows], scores=kept_scores[rows], query_indices=kept_queries[rows]
            )
        )
    return selections


# Above this many boxes torchvision's ``batched_nms`` on CUDA loops over the groups in Python.
_CUDA_BATCHED_NMS_MAX_BOXES = 5000
# Most (group, box, box) IoUs ``padded_group_nms`` may hold: about 4 float64 temporaries of
# that size are alive at once, so 4M pairs cap it near 130 MB of GPU memory.
_PADDED_NMS_MAX_PAIRS = 1 << 22


def _grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou: float) -> Tensor:
    """Indices kept by NMS within each group, by descending score (float64 boxes: group
    offsets in ``batched_nms`` reach B * Q * image width, beyond float32's precision).

    torchvision's ``batched_nms``, except for many boxes on CUDA: there it loops over the
    groups in Python with a synchronisation each (160 at 16 frames x 10 queries), and its
    one-call alternative scans a mask over all boxes sequentially in one thread block (4.8 ms
    of GPU time for 16 frames x 576 patches on an H200). ``padded_group_nms`` gives the same
    result; on the H200 (docs/benchmarks.md) it cut the decoding of 16 frames x 576 boxes from
    8.1-10.0 to 4.9-6.1 ms, but cost 0.6 ms more than one ``batched_nms`` call at 576 boxes.
    Groups so unequal that its padded IoU tensor would exceed the memory cap keep
    ``batched_nms``.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes, scores = boxes.double(), scores.double()
    if boxes.is_cuda and boxes.shape[0] > _CUDA_BATCHED_NMS_MAX_BOXES:
        counted = GroupSizes.count(groups)  # the two synchronisations of this path
        if len(counted.sizes) * counted.widest ** 2 <= _PADDED_NMS_MAX_PAIRS:
            return padded_group_nms(boxes, scores, groups, iou, counted)
    return batched_nms(boxes, scores, groups, iou)


@dataclass(frozen=True)
class GroupSizes:
    """Boxes per occupied group, in ascending group order, and the largest count."""

    sizes: Tensor  # (G,) on the boxes' device
    widest: int

    @classmethod
    def count(cls, groups: Tensor) -> GroupSizes:
        """From group ids (C,): reads the mask's size and the width back to the host."""
        counts = torch.bincount(groups)  # (max group + 1,)
        sizes = counts[counts > 0]  # (G,)
        return cls(sizes, int(sizes.max()))


def padded_group_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou: float,
    counted: GroupSizes | None = None,
) -> Tensor:
    """Greedy NMS within groups, vectorised across groups; the result of ``batched_nms``.

    boxes (C, 4) xyxy, scores (C,), groups (C,) non-negative int; ``counted``: the groups'
    sizes, if the caller has them (else counted here). Returns kept indices (K,) by descending
    score. Each group's boxes, best first, fill one row of a (G, W, 4) tensor, so
    IoUs are computed within groups only (G x W x W, not C x C). Greedy NMS keeps box i iff no
    kept box ranked above i in its group overlaps it by IoU > ``iou``; that rule, applied to the
    whole keep mask at once and repeated until nothing changes, settles rank by rank and stops
    at its one fixed point, the greedy answer (typically in 2 to 4 rounds).
    """
    count = boxes.shape[0]
    order = torch.argsort(scores, descending=True, stable=True)  # (C,) best first ...
    order = order[torch.argsort(groups[order], stable=True)]  # (C,) ... within each group
    counted = counted or GroupSizes.count(groups)
    sizes, width = counted.sizes, counted.widest
    row = torch.repeat_interleave(
        torch.arange(len(sizes), device=boxes.device), sizes, output_size=count
    )  # (C,) group row of each sorted box
    column = torch.arange(count, device=boxes.device) - (torch.cumsum(sizes, 0) - sizes)[row]
    padded = boxes.new_zeros((len(sizes), width, 4))  # (G, W, 4)
    padded[row, column] = boxes[order]
    valid = torch.zeros((len(sizes), width), dtype=torch.bool, device=boxes.device)  # (G, W)
    valid[row, column] = True

    # IoU as torchvision's kernel computes it (float64 here): no +1 on widths, overlap
    # clamped at 0, inter / (area_i + area_j - inter).
    x0, y0, x1, y1 = padded.unbind(-1)  # each (G, W)
    inter = (torch.minimum(x1[:, :, None], x1[:, None, :])
             - torch.maximum(x0[:, :, None], x0[:, None, :])).clamp_(min=0)  # (G, W, W)
    inter *= (torch.minimum(y1[:, :, None], y1[:, None, :])
              - torch.maximum(y0[:, :, None], y0[:, None, :])).clamp_(min=0)  # (G, W, W)
    area = (x1 - x0) * (y1 - y0)  # (G, W)
    overlaps = inter / (area[:, :, None] + area[:, None, :] - inter)  # (G, W, W)
    above = torch.ones(width, width, dtype=torch.bool, device=boxes.device).tril(-1)  # j < i
    # suppressors[g, i, j]: box j of group g ranks above box i and overlaps it too much.
    suppressors = (overlaps > iou) & above & valid[:, None, :]  # (G, W, W)
    keep = valid
    while True:
        updated = valid & ~(suppressors & keep[:, None, :]).any(dim=-1)  # (G, W)
        if torch.equal(updated, keep):
            break
        keep = updated
    kept = order[keep[row, column]]  # (K,) in group order
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]  # (K,)
