"""Pre-LayerNorm transformer encoder shared by the vision and text towers.

One implementation for both towers: the text tower only differs by running it causally.
Attention goes through ``scaled_dot_product_attention`` so the fused kernels are used on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import EncoderConfig


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI CLIP and OWL-ViT were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        # Inference: one temporary instead of three (same operations, same bits); each MLP
        # activation is B*N*4D floats, and fresh allocations of that size cost page faults.
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


def make_activation(name: str) -> nn.Module:
    """The activation named by a config's ``hidden_act``, numerically as in transformers."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()  # exact erf form
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unsupported activation {name!r}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and an output projection.

    The checkpoint stores q, k and v as three Linears; one (3D, D) GEMM instead of three (D, D)
    ones reads the input once and is one op instead of three (each op is a barrier for the
    CPU threads, which costs most on a busy machine). The state dict keeps the checkpoint
    layout: ``q.weight`` ... ``v.bias`` are split from ``qkv`` when saving and fused into it when
    loading, so checkpoints, ``load_state_dict`` and training code see the three projections.
    """

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, then k, then v
        self.out = nn.Linear(width, width)
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)  # (B,N,3,H,Dh)
        # (3, B, H, N, Dh): SDPA wants heads before tokens; strided views, no copy.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # Default SDPA scale is head_dim ** -0.5, the reference's scale.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, H, N, Dh)
        y = y.transpose(1, 2).reshape(batch, tokens, width)  # (B, N, D): merge heads
        return self.out(y)


def _split_qkv(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict
) -> None:
    """state_dict hook: ``qkv.{weight,bias}`` -> ``{q,k,v}.{weight,bias}`` (checkpoint keys)."""
    for name in ("weight", "bias"):
        if f"{prefix}qkv.{name}" not in state_dict:  # int8: quantised Linears pack weights
            continue
        fused = state_dict.pop(f"{prefix}qkv.{name}")  # (3D, D) or (3D,)
        for part, tensor in zip("qkv", fused.chunk(3), strict=True):
            state_dict[f"{prefix}{part}.{name}"] = tensor  # (D, D) or (D,) row block


def _fuse_qkv(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """load_state_dict pre-hook: concatenate ``{q,k,v}.*`` into ``qkv.*`` when all are given
    (otherwise leave them, so strict loading reports the missing checkpoint keys)."""
    for name in ("weight", "bias"):
        keys = [f"{prefix}{part}.{name}" for part in "qkv"]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}qkv.{name}"] = torch.cat([state_dict.pop(k) for k in keys])


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Pre-LN layers; ``gradient_checkpointing`` trades compute for memory in training."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, causal, use_reentrant=False)
            else:
                x = layer(x, causal=causal)
        return x
