"""Tiny checkpoint folders the engine can load: a transformers model plus a BPE vocabulary.

``model_fixtures`` writes only the model; the engine also reads ``vocab.json`` +
``merges.txt``. The vocabulary here fits the tiny models' 64 ids: every letter with and without
the end-of-word marker, "." and "-", ``!`` as id 0 (OWL's pad), BOS at 62 and EOS at 63, the
largest id, because OWL pools the text at argmax(input_ids). With no merges a word is spelled
letter by letter, so queries of a few short words fit the 16-token context.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from model_fixtures import VOCAB, save_tiny_clip, save_tiny_owlv2, save_tiny_owlvit

SAVERS = {"v1": save_tiny_owlvit, "v2": save_tiny_owlv2, "clip": save_tiny_clip}


def write_tiny_tokenizer(folder: Path) -> None:
    symbols = [*string.ascii_lowercase, ".", "-"]
    tokens = ["!"] + symbols + [s + "</w>" for s in symbols]
    assert len(tokens) <= VOCAB - 2, "BOS and EOS must keep the two largest ids"
    vocab = {token: i for i, token in enumerate(tokens)}
    vocab.update({"<|startoftext|>": VOCAB - 2, "<|endoftext|>": VOCAB - 1})
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


@dataclass(frozen=True)
class TinyCheckpoint:
    path: Path
    reference: torch.nn.Module  # the transformers model saved at ``path``, in eval mode


def tiny_checkpoint(folder: Path, kind: str, **overrides: object) -> TinyCheckpoint:
    """Save a tiny ``kind`` ("v1", "v2" or "clip") checkpoint with a tokenizer into ``folder``."""
    reference = SAVERS[kind](folder, **overrides)
    write_tiny_tokenizer(folder)
    return TinyCheckpoint(folder, reference)


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """HxWx3 uint8 image with smooth structure (random noise makes every patch alike)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 8, 1), max(width // 8, 1), 3))
    image = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width]
    pad = ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0))
    return np.pad(image, pad, mode="edge").astype(np.uint8)
