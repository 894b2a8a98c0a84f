"""Training losses: CLIP's symmetric contrastive loss, and OWL-ViT's set-prediction loss
(Hungarian matching, sigmoid focal classification, L1 + generalised IoU boxes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as _torchvision_focal

from clip_perception.train.recipe import DetectionLossWeights

_EPS = 1e-8


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric cross-entropy over the (N, N) scaled cosine similarities of N image-text pairs.

    Embeddings are (N, D), L2-normalised. ``positives`` (N, N) bool marks every caption j that
    describes image i (it must include the diagonal): CLIP's one-hot target would push two
    crops of one category, or a crop and a caption naming only its colour, apart, so each
    image's target is spread evenly over its positive captions, and each caption's over its
    positive images. Without it the target is the diagonal, CLIP's loss exactly.
    """
    logits = logit_scale * image_embeds @ text_embeds.t()  # (N, N): image rows, text columns
    if positives is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    match = positives.to(logits.dtype)  # (N, N)
    per_image = -(match * F.log_softmax(logits, dim=1)).sum(1) / match.sum(1)  # (N,)
    per_text = -(match.t() * F.log_softmax(logits.t(), dim=1)).sum(1) / match.sum(0)  # (N,)
    return 0.5 * (per_image.mean() + per_text.mean())


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Summed RetinaNet focal loss of independent sigmoids (torchvision's implementation)."""
    return _torchvision_focal(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")


@dataclass(frozen=True)
class BoxTargets:
    """Ground truth of one image: category indices into the query list, cxcywh boxes in [0, 1]."""

    labels: torch.Tensor  # (G,) int64
    boxes: torch.Tensor  # (G, 4)


@dataclass
class DetectionLosses:
    loss: torch.Tensor  # weighted sum, the one minimised
    focal: torch.Tensor
    l1: torch.Tensor
    giou: torch.Tensor
    objectness: torch.Tensor | None  # OWLv2 only

    def as_dict(self) -> dict[str, torch.Tensor]:
        parts = {"loss": self.loss, "focal": self.focal, "l1": self.l1, "giou": self.giou}
        if self.objectness is not None:
            parts["objectness"] = self.objectness
        return parts


def match_cost(
    logits: torch.Tensor, boxes: torch.Tensor, target: BoxTargets, w: DetectionLossWeights
) -> torch.Tensor:
    """(P, G) cost of assigning each of P predictions to each of G objects: the focal loss a
    positive saves over a negative for the object's query, plus L1 and -GIoU of the boxes.

    logits (P, Q), boxes (P, 4) cxcywh.
    """
    prob = logits[:, target.labels].sigmoid()  # (P, G)
    pos = w.focal_alpha * (1 - prob) ** w.focal_gamma * -(prob + _EPS).log()
    neg = (1 - w.focal_alpha) * prob**w.focal_gamma * -(1 - prob + _EPS).log()
    l1 = torch.cdist(boxes, target.boxes, p=1)  # (P, G)
    giou = generalized_box_iou(
        box_convert(boxes, "cxcywh", "xyxy"), box_convert(target.boxes, "cxcywh", "xyxy")
    )  # (P, G)
    return w.class_weight * (pos - neg) + w.l1_weight * l1 - w.giou_weight * giou


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, target: BoxTargets, w: DetectionLossWeights
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment minimising :func:`match_cost`, each object taking ``w.matches_per_object``
    predictions (one-to-one for 1): (prediction indices, object indices), each (M,), sorted by
    prediction index."""
    count = len(target.labels)
    if count == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = match_cost(logits.float(), boxes.float(), target, w)  # (P, G)
    copies = cost.repeat(1, w.matches_per_object)  # (P, G * k): column j is object j % G
    rows, cols = linear_sum_assignment(copies.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols % count,
                                                                     dtype=torch.long)


def detection_losses(
    logits: torch.Tensor, boxes: torch.Tensor, targets: list[BoxTargets],
    w: DetectionLossWeights, objectness_logits: torch.Tensor | None = None,
) -> DetectionLosses:
    """OWL-ViT's loss for a batch: logits (B, P, Q), boxes (B, P, 4) cxcywh, one target per
    image. Every (patch, query) logit is a focal-loss sigmoid: 1 for a matched patch at its
    object's query, 0 everywhere else (unmatched patches are background). Matched boxes get
    L1 + GIoU. All terms are normalised by the number of matches in the batch, as in DETR.
    """
    class_targets = torch.zeros_like(logits)  # (B, P, Q)
    matched_pred, matched_gt = [], []
    for b, target in enumerate(targets):
        pred_idx, gt_idx = hungarian_match(logits[b], boxes[b], target, w)
        class_targets[b, pred_idx, target.labels[gt_idx]] = 1.0
        matched_pred.append(boxes[b, pred_idx])
        matched_gt.append(target.boxes[gt_idx])
    pred = torch.cat(matched_pred)  # (M, 4)
    num_matches = max(1, len(pred))
    gt = torch.cat(matched_gt).to(pred.dtype)  # (M, 4)
    focal = sigmoid_focal_loss(logits, class_targets, w.focal_alpha, w.focal_gamma) / num_matches
    l1 = F.l1_loss(pred, gt, reduction="sum") / num_matches
    giou = generalized_box_iou_loss(
        box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"), reduction="sum"
    ) / num_matches
    loss = w.class_weight * focal + w.l1_weight * l1 + w.giou_weight * giou
    objectness = None
    if objectness_logits is not None:
        # OWLv2's objectness: is this patch matched to any object (class-agnostic).
        is_object = class_targets.amax(dim=-1)  # (B, P)
        objectness = sigmoid_focal_loss(
            objectness_logits, is_object, w.focal_alpha, w.focal_gamma) / num_matches
        loss = loss + w.class_weight * objectness
    return DetectionLosses(loss, focal, l1, giou, objectness)
