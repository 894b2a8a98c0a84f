"""Learn a small byte-level BPE vocabulary in CLIP's layout, for models trained from scratch.

The result is written as ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``), so
``load_tokenizer`` and transformers' ``CLIPTokenizer`` read it exactly like a public
checkpoint's. Text goes through the tokenizer's own cleaning, pre-tokenisation and byte
mapping, so the learned merges apply to what ``ClipTokenizer`` sees.

Vocabulary layout, as CLIP's: the 256 byte symbols (id 0 is ``"!"``), the same with the
``</w>`` word-end marker, one token per merge in merge order, then ``<|startoftext|>`` and
``<|endoftext|>``. End-of-text therefore has the largest id, which OWL and legacy CLIP pool
at (argmax of the ids), and no query starts with the pad id 0 (queries start with BOS).
Every byte has a token, so any text encodes; unseen words just split into smaller pieces.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from clip_perception.model.tokenizer import (
    _BYTE_ENCODER,
    _BYTE_TRANSLATION,
    _PATTERN,
    BOS_TOKEN,
    EOS_TOKEN,
    ClipTokenizer,
    clean_text,
    load_tokenizer,
)

END_OF_WORD = "</w>"
PAD_TOKEN = "!"  # id 0, as OWL-ViT's tokenizer names it

Word = tuple[str, ...]
Merge = tuple[str, str]


def _words(texts: Iterable[str]) -> Counter[Word]:
    """Pre-tokens as symbol tuples (last symbol carries ``</w>``), counted over ``texts``."""
    counts: Counter[Word] = Counter()
    for text in texts:
        for piece in _PATTERN.findall(clean_text(text)):
            mapped = piece.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)
            counts[(*mapped[:-1], mapped[-1] + END_OF_WORD)] += 1
    return counts


def _merge_word(word: Word, pair: Merge) -> Word:
    """Replace every non-overlapping occurrence of ``pair`` in ``word``, left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_bpe(texts: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[Merge]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair,
    so the result does not depend on iteration order), until ``num_merges`` merges or no pair
    occurs ``min_frequency`` times."""
    words = _words(texts)
    merges: list[Merge] = []
    while len(merges) < num_merges:
        pairs: Counter[Merge] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        merged: Counter[Word] = Counter()
        for word, count in words.items():
            merged[_merge_word(word, best)] += count
        words = merged
    return merges


def build_vocab(merges: list[Merge]) -> dict[str, int]:
    """CLIP's vocabulary layout for these merges (see the module docstring)."""
    symbols = list(_BYTE_ENCODER.values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))  # two merges may spell one token: ids stay dense
    return vocab


def write_tokenizer(
    folder: str | Path, merges: list[Merge], context_length: int
) -> ClipTokenizer:
    """Write vocab.json, merges.txt and tokenizer_config.json; return the tokenizer read back."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_tokenizer_config(out, context_length)
    return load_tokenizer(out, context_length=context_length)


def write_tokenizer_config(folder: Path, context_length: int) -> None:
    """The special tokens, named as transformers' CLIPTokenizer and ``load_tokenizer`` expect."""
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": context_length,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                  encoding="utf-8")


def train_tokenizer(
    texts: Iterable[str], folder: str | Path, num_merges: int, context_length: int,
    min_frequency: int = 2,
) -> ClipTokenizer:
    """Learn merges from ``texts`` and write the tokenizer files into ``folder``."""
    merges = learn_bpe(texts, num_merges, min_frequency)
    return write_tokenizer(folder, merges, context_length)
