"""Tiny, randomly initialised reference (transformers) checkpoints for tests.

Each ``save_tiny_*`` builds a reference model, redraws every parameter (so zero biases and unit
LayerNorm weights cannot hide a wrong key mapping), writes it with ``save_pretrained`` (or as a
``pytorch_model.bin`` state dict) and returns the reference model in eval mode.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from clip_perception.bench_contenders import randomize_weights

# Small vocabulary: ids [1, VOCAB - 3] are words, VOCAB - 2 is BOS, VOCAB - 1 (the largest id,
# as in the CLIP vocabulary) is EOS, 0 pads (OWL convention: a padded query is all zeros).
VOCAB = 64

TINY_TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 16, "hidden_act": "quick_gelu",
    "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1, "pad_token_id": 0,
}
TINY_VISION: dict[str, Any] = {
    "hidden_size": 48, "intermediate_size": 56, "num_hidden_layers": 2,
    "num_attention_heads": 3, "image_size": 64, "patch_size": 16, "hidden_act": "quick_gelu",
}


def _merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(override or {})
    return out


def _save(model: torch.nn.Module, path: str | os.PathLike[str], weights: str) -> None:
    path = Path(path)
    model.save_pretrained(path)
    if weights == "bin":
        # transformers 5 always writes safetensors; write the legacy pickle format by hand.
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    elif weights != "safetensors":
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")


def _build(
    config_cls: type, model_cls: type, path: str | os.PathLike[str], text_defaults: dict,
    overrides: dict[str, Any],
) -> torch.nn.Module:
    seed = overrides.pop("seed", 0)
    weights = overrides.pop("weights", "safetensors")
    text = _merge(text_defaults, overrides.pop("text_config", None))
    vision = _merge(TINY_VISION, overrides.pop("vision_config", None))
    overrides.setdefault("projection_dim", text["hidden_size"])
    torch.manual_seed(seed)
    config = config_cls(text_config=text, vision_config=vision, **overrides)
    model = model_cls(config).eval()
    randomize_weights(model, seed + 1)
    _save(model, path, weights)
    return model


def save_tiny_owlvit(path: str | os.PathLike[str], **overrides: Any) -> torch.nn.Module:
    """OwlViTForObjectDetection. Overrides: text_config / vision_config dicts (merged into the
    tiny defaults), seed, weights ('safetensors' | 'bin'), any top-level config field."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    return _build(OwlViTConfig, OwlViTForObjectDetection, path, TINY_TEXT, overrides)


def save_tiny_owlv2(path: str | os.PathLike[str], **overrides: Any) -> torch.nn.Module:
    """Owlv2ForObjectDetection; same overrides as :func:`save_tiny_owlvit`."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    return _build(Owlv2Config, Owlv2ForObjectDetection, path, TINY_TEXT, overrides)


def save_tiny_clip(path: str | os.PathLike[str], **overrides: Any) -> torch.nn.Module:
    """CLIPModel; same overrides. Text context defaults to 16 tokens, projection to 24."""
    from transformers import CLIPConfig, CLIPModel

    overrides.setdefault("projection_dim", 24)
    return _build(CLIPConfig, CLIPModel, path, TINY_TEXT, overrides)


def make_input_ids(
    rows: int, length: int, vocab: int = VOCAB, padded_rows: tuple[int, ...] = (),
    seed: int = 0,
) -> torch.Tensor:
    """(rows, length) ids as a tokenizer would make them: BOS, 1..length-2 random words, EOS
    (the vocabulary's largest id), zero padding; rows listed in ``padded_rows`` are all zero."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        if row in padded_rows:
            continue
        words = int(torch.randint(1, length - 1, (1,), generator=gen))
        ids[row, 0] = vocab - 2
        ids[row, 1 : words + 1] = torch.randint(1, vocab - 2, (words,), generator=gen)
        ids[row, words + 1] = vocab - 1
    return ids


def make_pixels(batch: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(batch, 3, H, W) normalised-looking random pixel values."""
    height, width = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=gen)
