"""OWL-ViT (v1) and OWLv2 open-vocabulary detectors on top of the CLIP towers.

The per-frame path is ``image_features`` (vision tower + heads, no text tower) followed by
``class_logits`` against query embeddings cached from ``encode_text`` / ``embed_image_query``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .clip import l2_normalize
from .config import ModelConfig
from .towers import TextTower, VisionTower

# The reference normalises class and query embeddings with this epsilon in the class head.
_CLASS_NORM_EPS = 1e-6


@dataclass
class OwlOutput:
    logits: torch.Tensor  # (B, P, Q)
    pred_boxes: torch.Tensor  # (B, P, 4) normalised cx, cy, w, h
    objectness_logits: torch.Tensor | None  # (B, P); None for OWL-ViT v1


@dataclass
class OwlImageFeatures:
    class_embeds: torch.Tensor  # (B, P, D) normalised with the reference's +1e-6
    logit_shift: torch.Tensor  # (B, P, 1)
    logit_scale: torch.Tensor  # (B, P, 1), elu(.) + 1 already applied
    boxes: torch.Tensor  # (B, P, 4) normalised cx, cy, w, h
    objectness_logits: torch.Tensor | None  # (B, P); None for OWL-ViT v1


@dataclass
class ImageQuery:
    embedding: torch.Tensor  # (D,) as fed to class_logits (unnormalised, like the reference)
    box_index: int  # patch whose box was chosen
    box: torch.Tensor  # (4,) that patch's box, cx, cy, w, h normalised


def compute_box_bias(rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, 4) logit-space prior: box centre at the patch's grid corner, size one patch.

    Mirrors the reference's ``compute_box_bias`` (including the +1e-4 terms and the use of the
    cell's bottom-right corner, (i + 1) / n, as its "centre").
    """
    xs = torch.arange(1, cols + 1, dtype=torch.float32)
    ys = torch.arange(1, rows + 1, dtype=torch.float32)
    xx, yy = torch.meshgrid(xs, ys, indexing="xy")  # (rows, cols) each
    coords = torch.stack((xx / cols, yy / rows), dim=-1).view(-1, 2)  # (rows*cols, 2) row-major
    coords = coords.clip(0.0, 1.0)
    coord_bias = torch.log(coords + 1e-4) - torch.log1p(-coords + 1e-4)
    size = torch.empty_like(coord_bias)
    size[:, 0], size[:, 1] = 1.0 / cols, 1.0 / rows
    size_bias = torch.log(size + 1e-4) - torch.log1p(-size + 1e-4)
    return torch.cat([coord_bias, size_bias], dim=-1)  # (rows*cols, 4)


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x0, y0, x1, y1."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def region_iou(region: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of one xyxy region (4,) against boxes (P, 4) xyxy -> (P,), (P,)."""
    wh = (torch.minimum(region[2:], boxes[:, 2:]) - torch.maximum(region[:2], boxes[:, :2]))
    inter = wh.clamp(min=0).prod(dim=-1)  # (P,)
    union = _area(region) + _area(boxes) - inter
    return inter / union, union


def region_giou(region: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of one xyxy region (4,) against boxes (P, 4) -> (P,)."""
    iou, union = region_iou(region, boxes)
    wh = torch.maximum(region[2:], boxes[:, 2:]) - torch.minimum(region[:2], boxes[:, :2])
    hull = wh.clamp(min=0).prod(dim=-1)  # (P,)
    return iou - (hull - union) / hull


def select_query_box(
    boxes: torch.Tensor, class_embeds: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """The reference's one-shot selection rule; returns a 0-dim index tensor.

    boxes (P, 4) cx, cy, w, h; class_embeds (P, D) unnormalised; region (4,) xyxy.
    IoU with the region (GIoU if every IoU is 0), keep boxes within 80% of the best, then take
    the one least similar to the image's mean class embedding (the most distinctive object).
    """
    corners = center_to_corners(boxes.float())  # (P, 4)
    scores, _ = region_iou(region, corners)
    if bool((scores == 0).all()):
        scores = region_giou(region, corners)
    best = scores.max()
    keep = scores >= best * 0.8
    if not bool(keep.any()):
        # All GIoUs negative: 0.8 * max lies above max and the reference selects nothing
        # (and then fails); take the box closest to the region instead.
        keep = scores == best
    mean = class_embeds.mean(dim=0)  # (D,)
    sims = class_embeds @ mean  # (P,)
    sims = sims.masked_fill(~keep, float("inf"))
    return sims.argmin()  # first minimum, like argmin over the reference's ascending subset


class ClassHead(nn.Module):
    """Per-patch class embedding plus a learned logit shift and scale."""

    def __init__(self, vision_width: int, query_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_width, query_dim)
        self.shift = nn.Linear(vision_width, 1)
        self.scale = nn.Linear(vision_width, 1)
        self.elu = nn.ELU()


class MLPHead(nn.Module):
    """Three linear layers with exact (erf) GELU between them (box and objectness heads)."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.act(self.fc0(x)))))


class OwlModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.is_owl:
            raise ValueError(f"OwlModel cannot be built from {cfg.architecture}")
        self.config = cfg
        vw = cfg.vision.hidden_size
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.visual_projection = nn.Linear(vw, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        # Image-level contrastive temperature (log scale); unused by detection, kept for training.
        self.log_logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init_value)))
        self.merge_norm = nn.LayerNorm(vw, eps=cfg.vision.layer_norm_eps)
        self.class_head = ClassHead(vw, cfg.query_dim)
        self.box_head = MLPHead(vw, 4)
        self.objectness_head = MLPHead(vw, 1) if cfg.is_v2 else None
        side = cfg.num_patches_side
        self.register_buffer("box_bias", compute_box_bias(side, side), persistent=False)
        self._bias_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def reset_buffers(self) -> None:
        """Recompute derived buffers (after building on the meta device or changing dtype)."""
        side = self.config.num_patches_side
        device = self.log_logit_scale.device
        self.box_bias = compute_box_bias(side, side).to(device)
        self._bias_cache.clear()

    def _box_bias(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        side = self.config.num_patches_side
        if (rows, cols) == (side, side) and self.box_bias.device == device:
            return self.box_bias
        key = (rows, cols, device)
        if key not in self._bias_cache:
            self._bias_cache[key] = compute_box_bias(rows, cols).to(device)
        return self._bias_cache[key]

    # ----------------------------------------------------------------- image path
    def feature_map(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> per-patch features (B, P, Dv) and the patch grid (rows, cols)."""
        grid = self.vision.grid(pixel_values.shape[-2], pixel_values.shape[-1])
        tokens = self.vision.post_norm(self.vision(pixel_values))  # (B, 1 + P, Dv)
        # Each patch token is modulated by the class token, then re-normalised.
        return self.merge_norm(tokens[:, 1:] * tokens[:, :1]), grid

    def _boxes(self, fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(..., P, Dv) -> (..., P, 4) boxes cx, cy, w, h in [0, 1]."""
        bias = self._box_bias(*grid, fmap.device).to(fmap.dtype)  # (P, 4)
        return torch.sigmoid(self.box_head(fmap) + bias)

    def _objectness(self, fmap: torch.Tensor) -> torch.Tensor:
        # The reference detaches: objectness training must not move the backbone.
        return self.objectness_head(fmap.detach())[..., 0]  # (..., P)

    def features_from_map(
        self, fmap: torch.Tensor, grid: tuple[int, int]
    ) -> OwlImageFeatures:
        """Apply the class, box and (v2) objectness heads to a (B, P, Dv) feature map."""
        head = self.class_head
        embeds = head.proj(fmap)  # (B, P, D)
        norm = torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)  # (B, P, 1)
        embeds = embeds / (norm + _CLASS_NORM_EPS)
        return OwlImageFeatures(
            class_embeds=embeds,
            logit_shift=head.shift(fmap),
            logit_scale=head.elu(head.scale(fmap)) + 1,
            boxes=self._boxes(fmap, grid),
            objectness_logits=(
                self._objectness(fmap) if self.objectness_head is not None else None
            ),
        )

    def image_features(self, pixel_values: torch.Tensor) -> OwlImageFeatures:
        """Everything per frame that does not depend on the queries."""
        return self.features_from_map(*self.feature_map(pixel_values))

    # ----------------------------------------------------------------- queries
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(Q, L) token ids -> (Q, D) L2-normalised query embeddings."""
        return l2_normalize(self.text_projection(self.text(input_ids)))

    def class_logits(
        self,
        features: OwlImageFeatures,
        query_embeds: torch.Tensor,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, P, Q) for queries (Q, D) shared by the batch or (B, Q, D) per image.

        query_mask (Q,) or (B, Q): False marks padding; those logits become the dtype minimum.
        """
        image = features.class_embeds
        query = query_embeds.to(image.dtype)
        query = query / (torch.linalg.vector_norm(query, dim=-1, keepdim=True) + _CLASS_NORM_EPS)
        sims = image @ query.transpose(-1, -2)  # (B, P, Q)
        logits = (sims + features.logit_shift) * features.logit_scale
        if query_mask is not None:
            mask = query_mask.to(device=logits.device, dtype=torch.bool)
            if mask.dim() > 1:
                mask = mask.unsqueeze(-2)  # (B, 1, Q): same mask for every patch
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> OwlOutput:
        """Reference-shaped call: ``input_ids`` is (B*Q, L), Q queries per image; rows whose
        first token is 0 are padding and get the dtype's minimum logit."""
        batch = pixel_values.shape[0]
        if input_ids.dim() != 2 or input_ids.shape[0] % batch:
            raise ValueError(
                f"input_ids must be (B*Q, L) for B={batch} images, got {tuple(input_ids.shape)}"
            )
        features = self.image_features(pixel_values)
        queries = self.encode_text(input_ids)  # (B*Q, D)
        queries = queries.reshape(batch, -1, queries.shape[-1])  # (B, Q, D)
        mask = input_ids.reshape(batch, queries.shape[1], -1)[..., 0] > 0  # (B, Q)
        return OwlOutput(
            logits=self.class_logits(features, queries, mask),
            pred_boxes=features.boxes,
            objectness_logits=features.objectness_logits,
        )

    def image_query(
        self, pixel_values: torch.Tensor, region: Sequence[float] | torch.Tensor | None = None
    ) -> ImageQuery:
        """Pick the predicted box that best represents ``region`` in a (1, 3, S, S) image.

        region: normalised x0, y0, x1, y1 in the model input frame; None is the whole image for
        OWL-ViT (the reference's (0, 0, 1, 1)) and the most object-like box for OWLv2 (the v2
        reference uses argmax objectness). With an explicit region both use the IoU rule.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
            raise ValueError(f"expected one image (1, 3, H, W), got {tuple(pixel_values.shape)}")
        fmap, grid = self.feature_map(pixel_values)
        fmap = fmap[0]  # (P, Dv)
        embeds = self.class_head.proj(fmap)  # (P, D) unnormalised, as the reference feeds it
        boxes = self._boxes(fmap, grid)  # (P, 4)
        if region is None and self.objectness_head is not None:
            index = self._objectness(fmap).argmax()
        else:
            target = torch.as_tensor(
                (0.0, 0.0, 1.0, 1.0) if region is None else region,
                dtype=torch.float32,
                device=fmap.device,
            ).flatten()  # (4,) from any 4-element input
            if target.numel() != 4 or not bool((target[2:] > target[:2]).all()):
                raise ValueError(f"region must be x0, y0, x1, y1 with x1 > x0, y1 > y0: {region}")
            index = select_query_box(boxes, embeds.float(), target)
        return ImageQuery(embedding=embeds[index], box_index=int(index), box=boxes[index])

    def embed_image_query(
        self, pixel_values: torch.Tensor, region: Sequence[float] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """(D,) one-shot query embedding for ``class_logits`` (see :meth:`image_query`)."""
        return self.image_query(pixel_values, region).embedding
