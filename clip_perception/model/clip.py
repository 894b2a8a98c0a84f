"""CLIP dual encoder for zero-shot classification (and contrastive training)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .towers import TextTower, VisionTower


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 over the last dim (no epsilon, as the reference's towers)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


@dataclass
class ClipOutput:
    logits_per_image: torch.Tensor  # (B, N) scaled cosine similarities
    image_embeds: torch.Tensor  # (B, D) normalised
    text_embeds: torch.Tensor  # (N, D) normalised


class ClipModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family != "clip":
            raise ValueError(f"ClipModel cannot be built from {cfg.architecture}")
        self.config = cfg
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        # Stored as log(scale), the trained parameter; ``logit_scale`` gives the multiplier.
        self.log_logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init_value)))

    @property
    def logit_scale(self) -> torch.Tensor:
        """Scalar multiplier applied to cosine similarities (exp already applied)."""
        return self.log_logit_scale.exp()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D) L2-normalised image embeddings."""
        hidden = self.vision(pixel_values)  # (B, 1 + P, Dv)
        pooled = self.vision.post_norm(hidden[:, 0])  # (B, Dv): class token
        return l2_normalize(self.visual_projection(pooled))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, D) L2-normalised text embeddings."""
        return l2_normalize(self.text_projection(self.text(input_ids)))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> ClipOutput:
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids)
        logits = image @ text.t() * self.logit_scale  # (B, N)
        return ClipOutput(logits_per_image=logits, image_embeds=image, text_embeds=text)

    def reset_buffers(self) -> None:
        """No computed buffers; present so loaders can treat both model classes alike."""
