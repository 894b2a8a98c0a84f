"""CLIP byte-level BPE tokenizer (the text side of CLIP, OWL-ViT and OWLv2).

Runtime dependencies are ``ftfy`` and ``regex`` only. Two vocabulary layouts are read:

* a Hugging Face checkpoint folder with ``vocab.json`` + ``merges.txt`` (optionally
  ``tokenizer_config.json`` / ``special_tokens_map.json`` for the special tokens and
  ``config.json`` for ``text_config.max_position_embeddings``, the default context length:
  16 for OWL-ViT/OWLv2, 77 for CLIP);
* OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` merges file (or a folder holding it), from which
  the vocabulary is rebuilt exactly as OpenAI CLIP and open_clip do.

Encoding follows OpenAI CLIP / open_clip ``SimpleTokenizer`` with ``clean="lower"``: ftfy,
``html.unescape`` twice, whitespace collapse, lower case, the CLIP pre-tokenisation regex,
byte-to-unicode mapping and BPE. Sequences are ``[bos] + tokens + [eos]``, padded with the pad
id; a sequence longer than the context is cut to the context length and its last slot is set
back to eos (open_clip's truncation, equal to Hugging Face's ``truncation=True``).

Deliberate difference from open_clip: a literal special-token string typed in a query (e.g.
``"<start_of_text>"``) is tokenised as ordinary text, never turned into a control token.
Known difference from transformers 5's ``CLIPTokenizer`` (a ``tokenizers`` backend): it uses
NFC instead of ftfy and does not unescape HTML, so raw text with entities or mojibake can
tokenise differently there; on already-clean text the ids are identical (tested).
"""

from __future__ import annotations

import gzip
import html
import json
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import ftfy
import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's merges file holds far more merges than the model used; CLIP keeps the first
# 49152 - 256 - 2 of them (vocab = 256 bytes x2 + merges + 2 specials = 49408).
_OPENAI_NUM_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77
# CLIP's pre-tokeniser: contractions, letter runs, single digits, other non-space runs.
_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode character table (256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_ENCODER = _bytes_to_unicode()
# str.translate table over latin-1 code points: encoding a word then becomes C-speed
# ``word.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)``.
_BYTE_TRANSLATION = {b: c for b, c in _BYTE_ENCODER.items()}
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, double HTML unescape, whitespace collapse, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


@dataclass
class TokenizedText:
    """A tokenised batch: ids ``(N, L)``, attention mask ``(N, L)`` and per-row truncation."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]


class ClipTokenizer:
    """CLIP BPE tokenizer; call it on a string or a list of strings to get ``(N, L)`` ids."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str | None = EOS_TOKEN,
        pad_id: int = 0,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = 65536,
    ) -> None:
        for name, token in (("bos", bos_token), ("eos", eos_token)):
            if token not in vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id = self.encoder[bos_token]
        self.eos_id = self.encoder[eos_token]
        self.unk_id = self.encoder.get(unk_token) if unk_token is not None else None
        self.pad_id = int(pad_id)
        self.context_length = int(context_length)
        self.vocab_size = max(self.encoder.values()) + 1
        # Per-instance caches: BPE per pre-token, and whole-text encoding, since detectors
        # re-tokenise the same vocabularies over and over.
        self._bpe_cached = lru_cache(maxsize=cache_size)(self._bpe)
        self._encode_cached = lru_cache(maxsize=cache_size)(self._encode_uncached)

    # ---------------------------------------------------------------- BPE core
    def _bpe(self, token: str) -> tuple[str, ...]:
        """Apply the merges to one byte-encoded pre-token; the last symbol carries ``</w>``."""
        word = (*token[:-1], token[-1] + "</w>")
        ranks = self.bpe_ranks
        while len(word) > 1:
            # The lowest-ranked adjacent pair is merged everywhere in the word, left to right.
            best = min(pairwise(word), key=lambda pair: ranks.get(pair, 1 << 62))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        encoder = self.encoder
        for piece in _PATTERN.findall(clean_text(text)):
            mapped = piece.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)
            for sub in self._bpe_cached(mapped):
                token_id = encoder.get(sub, self.unk_id)
                if token_id is None:
                    raise KeyError(f"token {sub!r} not in vocabulary and no unk token set")
                ids.append(token_id)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos and without truncation."""
        return list(self._encode_cached(text))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Best-effort inverse of ``encode`` (special and pad ids are dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.bos_id, self.eos_id, self.pad_id}
        text = "".join(self.decoder.get(i, "") for i in ids if i not in skip)
        # "</w>" marks a word end; each word's symbols map back to bytes.
        words = [
            bytes(_BYTE_DECODER[c] for c in word if c in _BYTE_DECODER)
            for word in text.split("</w>")
        ]
        return b" ".join(words).decode("utf-8", errors="replace").strip()

    # ---------------------------------------------------------------- batches
    def encode_batch(
        self, texts: list[str] | str, context_length: int | None = None
    ) -> TokenizedText:
        """Tokenise, add bos/eos, truncate (keeping eos) and pad to ``context_length``."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (bos + eos), got {length}")
        input_ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)  # (N, L)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)  # (N, L)
        truncated: list[bool] = []
        for row, text in enumerate(texts):
            body = self._encode_cached(text)
            cut = len(body) + 2 > length
            if cut:
                body = body[: length - 2]
            ids = (self.bos_id, *body, self.eos_id)
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            truncated.append(cut)
        return TokenizedText(input_ids, attention_mask, truncated)

    def __call__(self, texts: list[str] | str, context_length: int | None = None) -> torch.Tensor:
        """Token ids ``(N, L)`` as a LongTensor (see ``encode_batch`` for truncation flags)."""
        return self.encode_batch(texts, context_length).input_ids


# -------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: object) -> str | None:
    """Special tokens are stored as plain strings or as ``{"content": ...}`` dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_openai_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocabulary from OpenAI's merges file, as OpenAI CLIP/open_clip do."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; only the first _OPENAI_NUM_MERGES merges are used.
    merges = [tuple(line.split()) for line in lines[1 : _OPENAI_NUM_MERGES + 1] if line.strip()]
    symbols = list(_BYTE_ENCODER.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def _load_hf_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with (folder / "vocab.json").open(encoding="utf-8") as f:
        vocab = json.load(f)
    merges: list[tuple[str, str]] = []
    with (folder / "merges.txt").open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"malformed merge line in {folder / 'merges.txt'}: {line!r}")
            merges.append((parts[0], parts[1]))
    return vocab, merges


def load_tokenizer(path: str | Path, context_length: int | None = None) -> ClipTokenizer:
    """Load a tokenizer from a checkpoint folder (vocab.json + merges.txt) or a BPE .gz file.

    ``context_length`` overrides the default, which is ``config.json``'s
    ``text_config.max_position_embeddings`` (16 for OWL, 77 for CLIP), else the tokenizer
    config's ``model_max_length`` when it is a real limit, else 77.
    """
    path = Path(path)
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab, merges = _load_hf_bpe(path)
        folder = path
    elif path.is_dir() and (path / OPENAI_BPE_FILE).is_file():
        vocab, merges = _load_openai_bpe(path / OPENAI_BPE_FILE)
        folder = path
    elif path.is_file():
        vocab, merges = _load_openai_bpe(path)
        folder = None
    else:
        raise FileNotFoundError(
            f"{path}: expected a folder with vocab.json + merges.txt, or {OPENAI_BPE_FILE}"
        )

    specials: dict[str, object] = {}
    length = DEFAULT_CONTEXT_LENGTH
    if folder is not None:
        # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        tok_config = _read_json(folder / "tokenizer_config.json")
        specials = {**_read_json(folder / "special_tokens_map.json"), **tok_config}
        max_len = tok_config.get("model_max_length")
        if isinstance(max_len, int) and 2 <= max_len <= 4096:
            length = max_len
        text_config = _read_json(folder / "config.json").get("text_config") or {}
        if isinstance(text_config.get("max_position_embeddings"), int):
            length = text_config["max_position_embeddings"]
    bos = _token_content(specials.get("bos_token")) or BOS_TOKEN
    eos = _token_content(specials.get("eos_token")) or EOS_TOKEN
    unk = _token_content(specials.get("unk_token")) or EOS_TOKEN
    pad = _token_content(specials.get("pad_token"))
    # Pad with 0 unless the checkpoint names a pad token (OWL-ViT's "!" is id 0 anyway).
    pad_id = vocab.get(pad, 0) if pad is not None else 0
    return ClipTokenizer(
        vocab,
        merges,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk if unk in vocab else None,
        pad_id=pad_id,
        context_length=context_length if context_length is not None else length,
    )
