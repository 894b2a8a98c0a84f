"""CLIP-style vision (ViT) and causal text towers built on the shared :class:`Encoder`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig, VisionConfig
from .transformer import Encoder


class VisionTower(nn.Module):
    """Patch conv (no bias) + class token + positions, pre-LN, encoder; ``post_norm`` is exposed
    but not applied, because CLIP normalises only the class token while OWL normalises all tokens.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width, side = cfg.hidden_size, cfg.num_patches_side
        # The patch "conv" has stride == kernel, so it is one GEMM over flattened patches: a
        # Linear (C*p*p -> D) is faster than the conv on CPU and is int8-quantisable. The state
        # dict keeps the checkpoint's conv layout (D, C, p, p) through the two hooks below.
        self.patch_embed = nn.Linear(cfg.num_channels * cfg.patch_size**2, width, bias=False)
        self.register_state_dict_post_hook(_patch_weight_to_conv)
        self.register_load_state_dict_pre_hook(_patch_weight_from_conv)
        self.class_embed = nn.Parameter(torch.randn(width) * width**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(side * side + 1, width) * 0.02)
        self.pre_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) the conv produces for an input of this size."""
        return height // self.cfg.patch_size, width // self.cfg.patch_size

    def position_embeddings(self, rows: int, cols: int) -> torch.Tensor:
        """(1 + rows*cols, D) positions; bicubic-resized from the trained grid when it differs,
        as the reference's ``interpolate_pos_encoding=True`` does."""
        side = self.cfg.num_patches_side
        if (rows, cols) == (side, side):
            return self.pos_embed
        width = self.pos_embed.shape[-1]
        cls_pos, patch_pos = self.pos_embed[:1], self.pos_embed[1:]
        grid = patch_pos.reshape(1, side, side, width).permute(0, 3, 1, 2)  # (1, D, S, S)
        # Interpolate in float32: bicubic is not implemented for half types on every device.
        grid = F.interpolate(
            grid.float(), size=(rows, cols), mode="bicubic", align_corners=False
        ).to(patch_pos.dtype)  # (1, D, rows, cols)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(rows * cols, width)  # (rows*cols, D)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + P, D) last hidden states (class token first), pre post_norm."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.num_channels:
            raise ValueError(
                f"pixel_values must be (B, {self.cfg.num_channels}, H, W), "
                f"got {tuple(pixel_values.shape)}"
            )
        rows, cols = self.grid(pixel_values.shape[-2], pixel_values.shape[-1])
        batch, channels, p = pixel_values.shape[0], self.cfg.num_channels, self.cfg.patch_size
        # Like the conv, drop remainder rows/cols; the reshape copy gathers each patch (pos_embed
        # has the model dtype even after int8 quantisation replaced the patch Linear).
        x = pixel_values[:, :, : rows * p, : cols * p].to(self.pos_embed.dtype)
        x = x.reshape(batch, channels, rows, p, cols, p)  # (B, C, rows, p, cols, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p): the conv weight's order
        x = x.reshape(batch, rows * cols, channels * p * p)  # (B, P, C*p*p), row-major grid
        patches = self.patch_embed(x)  # (B, P, D)
        cls = self.class_embed.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1) + self.position_embeddings(rows, cols)
        return self.encoder(self.pre_norm(x))


def _patch_weight_to_conv(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict
) -> None:
    """state_dict hook: the (D, C*p*p) patch Linear weight in the checkpoint's conv layout."""
    key = f"{prefix}patch_embed.weight"
    if key in state_dict:  # absent once int8 quantisation has packed the weight
        cfg = module.cfg
        p = cfg.patch_size
        state_dict[key] = state_dict[key].view(-1, cfg.num_channels, p, p)  # (D, C, p, p)


def _patch_weight_from_conv(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """load_state_dict pre-hook: a conv-layout (D, C, p, p) weight flattened to (D, C*p*p)."""
    key = f"{prefix}patch_embed.weight"
    if key in state_dict and state_dict[key].dim() == 4:
        state_dict[key] = state_dict[key].flatten(1)  # (D, C*p*p) in (C, p, p) order


class TextTower(nn.Module):
    """Token + position embeddings, causal encoder, final LayerNorm at the pooled token."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(
            torch.randn(cfg.max_position_embeddings, cfg.hidden_size) * 0.01
        )
        self.encoder = Encoder(cfg)
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N,) position whose hidden state represents the sequence."""
        if self.cfg.pool_token_id is None:
            # EOS has the largest id in the CLIP vocabulary; ties pick the first, like the ref.
            return input_ids.argmax(dim=-1)
        # First EOS (pad may equal EOS); rows without one fall back to 0, like the reference.
        return (input_ids == self.cfg.pool_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, D) pooled hidden state (before the projection)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (N, L), got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds the text context length "
                f"{self.cfg.max_position_embeddings}"
            )
        x = self.token_embed(input_ids) + self.pos_embed[:length]  # (N, L, D)
        x = self.encoder(x, causal=True)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = x[rows, self.pool_index(input_ids).to(x.device)]  # (N, D)
        # LayerNorm is per token, so normalising only the pooled token equals the reference.
        return self.final_norm(pooled)
