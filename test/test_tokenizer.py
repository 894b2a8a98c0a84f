"""Parity of clip_perception.model.tokenizer with open_clip and transformers (no downloads).

* open_clip route: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` shipped inside open_clip, compared
  with ``open_clip.tokenizer.SimpleTokenizer`` on 1,200 seeded strings at context 77 and 16,
  padded ids and truncation flags exactly.
* transformers route: a ``vocab.json`` + ``merges.txt`` written from the same gz merges the way
  HF's conversion does (``#version`` header, 48,894 merges, byte symbols, ``</w>`` symbols,
  merged symbols, then ``<|startoftext|>`` 49406 / ``<|endoftext|>`` 49407), loaded by both
  ``CLIPTokenizer`` and ``load_tokenizer``. transformers 5 pads with its pad token (49407) and
  truncates the body to ``L - 2`` before adding bos/eos; open_clip and we pad with 0 and cut to
  ``L`` then set the last slot to eos, which gives the same unpadded ids. So we compare HF's
  unpadded ``truncation=True, max_length=L`` ids with our row up to its attention mask. HF 5 uses
  NFC instead of ftfy and skips ``html.unescape``, so its input is our cleaned text, restricted
  to texts where that cleaning is a fixed point (>= 98% of the corpus, asserted).
"""

from __future__ import annotations

import json
import random
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from clip_perception.model.tokenizer import (
    ClipTokenizer,
    _load_openai_bpe,
    clean_text,
    load_tokenizer,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
BPE_GZ = Path(open_clip_tokenizer.default_bpe())

_WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "robot", "gripper", "mug", "red", "blue",
    "bottle", "person", "chair", "table", "cup", "screwdriver", "banana", "traffic", "light",
]
_PIECES = [
    "naïve", "café", "Crème brûlée", "São Paulo", "Zürich", "ñandú", "straße", "ÉCOLE",
    "東京", "漢字テスト", "한국어", "ひらがな", "Ελληνικά", "Ωμέγα ΣΊΣΥΦΟΣ", "русский", "עברית",
    "العربية", "हिन्दी", "ภาษาไทย", "🙂", "👍🏽", "🐈‍⬛", "🇯🇵", "❤️", "e\u0301", "A\u030a",
    "&amp;", "&#39;", "&lt;b&gt;", "&quot;", "&nbsp;", "&#x27;", "&amp;amp;", "&amp;amp;amp;",
    "cafÃ©", "donâ€™t", "12345", "3.14", "1,000", "0", "2nd", "x86_64", "!!!", "?!", "...",
    "---", "(*&^%)", "[]{}", "@#$", "«»", "—", "…", "'s", "'t", "'re", "'ve", "'m", "'ll",
    "'d", "'S", "'LL", "it's", "they're", "I'VE", "we'll", "you'd", "don't", "CamelCase",
    "MiXeD", "UPPER", "   ", "\t", "\n\n", "\u3000", "\xa0", "\u200b", "a-b_c", "e-mail",
]
_SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", " \u3000 "]


def _random_text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.01:
        return ""
    n = rng.randint(120, 400) if roll > 0.94 else rng.randint(1, 14)  # long: truncation
    parts = []
    for _ in range(n):
        pool = _WORDS if rng.random() < 0.45 else _PIECES
        parts.append(rng.choice(pool))
        parts.append(rng.choice(_SEPARATORS))
    text = "".join(parts)
    return text.upper() if rng.random() < 0.05 else text


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(1234)
    return ["", "   ", "a photo of a cat"] + [_random_text(rng) for _ in range(1200)]


@pytest.fixture(scope="module")
def gz_tokenizer() -> ClipTokenizer:
    return load_tokenizer(BPE_GZ)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vocab.json + merges.txt as transformers' conversion of the OpenAI gz produces them."""
    folder = tmp_path_factory.mktemp("clip_hf")
    vocab, merges = _load_openai_bpe(BPE_GZ)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "\n".join(f"{a} {b}" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines + "\n", encoding="utf-8")
    return folder


def test_standard_vocabulary_facts(gz_tokenizer: ClipTokenizer) -> None:
    assert (gz_tokenizer.bos_id, gz_tokenizer.eos_id, gz_tokenizer.pad_id) == (49406, 49407, 0)
    assert gz_tokenizer.vocab_size == 49408
    assert gz_tokenizer.context_length == 77
    ids = gz_tokenizer(["a photo of a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[1, :3].tolist() == [49406, 49407, 0]
    assert gz_tokenizer("one string").shape == (1, 77)


@pytest.mark.parametrize("context_length", [77, 16])
def test_open_clip_parity(
    gz_tokenizer: ClipTokenizer, corpus: list[str], context_length: int
) -> None:
    reference = open_clip_tokenizer.SimpleTokenizer()
    expected = reference(corpus, context_length=context_length)
    batch = gz_tokenizer.encode_batch(corpus, context_length=context_length)
    assert batch.input_ids.shape == (len(corpus), context_length)
    rows = zip(corpus, batch.input_ids, expected, strict=True)
    mismatched = [t for t, a, b in rows if not torch.equal(a, b)]
    assert not mismatched, mismatched[:5]
    lengths = [len(reference.encode(t)) + 2 for t in corpus]
    assert batch.truncated == [n > context_length for n in lengths]
    assert batch.attention_mask.sum(1).tolist() == [min(n, context_length) for n in lengths]
    assert sum(batch.truncated) >= 40  # the long strings really exercise truncation
    # Truncated rows keep the end token in the last slot.
    cut = torch.tensor(batch.truncated)
    assert (batch.input_ids[cut, -1] == 49407).all()


@pytest.mark.parametrize("context_length", [77, 16])
def test_transformers_parity(hf_folder: Path, corpus: list[str], context_length: int) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_folder))
    ours = load_tokenizer(hf_folder)
    cleaned = [clean_text(t) for t in corpus]
    usable = [
        x for x in cleaned if clean_text(x) == x and unicodedata.normalize("NFC", x) == x
    ]
    assert len(usable) >= 0.98 * len(corpus)
    expected = hf(usable, truncation=True, max_length=context_length)["input_ids"]
    full = hf(usable)["input_ids"]
    batch = ours.encode_batch(usable, context_length=context_length)
    for row, (text, ref) in enumerate(zip(usable, expected, strict=True)):
        n = int(batch.attention_mask[row].sum())
        assert batch.input_ids[row, :n].tolist() == ref, text
        assert (batch.input_ids[row, n:] == 0).all()
        assert batch.truncated[row] == (len(full[row]) > context_length)


def test_hf_folder_configs(hf_folder: Path, tmp_path: Path) -> None:
    """config.json sets the default context; tokenizer_config.json sets the pad token."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    assert load_tokenizer(tmp_path).context_length == 77
    owl_config = {"model_type": "owlvit", "text_config": {"max_position_embeddings": 16}}
    (tmp_path / "config.json").write_text(json.dumps(owl_config))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": {"content": "!"}, "model_max_length": 16})
    )
    owl = load_tokenizer(tmp_path)
    assert (owl.context_length, owl.pad_id, owl.bos_id, owl.eos_id) == (16, 0, 49406, 49407)
    assert owl("a photo of a cat").shape == (1, 16)
    assert load_tokenizer(tmp_path, context_length=77).context_length == 77
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    assert load_tokenizer(tmp_path).pad_id == 49407


def _write_tiny_vocab(folder: Path) -> None:
    """A hand-made BPE whose specials sit at ids 0-2, far from the standard 49406/49407."""
    symbols = list("lowenrst")
    tokens = ["<|startoftext|>", "<|endoftext|>", "<pad>", *symbols]
    tokens += [s + "</w>" for s in symbols]
    merges = [("l", "o"), ("lo", "w"), ("e", "r</w>"), ("low", "er</w>"), ("lo", "w</w>")]
    tokens += ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))


def test_custom_small_vocabulary(tmp_path: Path) -> None:
    _write_tiny_vocab(tmp_path)
    tok = load_tokenizer(tmp_path, context_length=8)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == len(vocab)
    ids = tok(["Lower low", "lowz"])
    assert ids[0].tolist() == [0, vocab["lower</w>"], vocab["low</w>"], 1, 2, 2, 2, 2]
    # "z" is not in the vocabulary: it maps to the unk token (<|endoftext|> by default).
    assert ids[1].tolist() == [0, vocab["low"], 1, 1, 2, 2, 2, 2]
    batch = tok.encode_batch("low " * 10)
    assert batch.truncated == [True] and batch.input_ids[0, -1].item() == 1
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in ["lower low", "lowz", "slow newer rows", "low " * 10]:
        n = int(tok.encode_batch(text).attention_mask.sum())
        assert hf(text, truncation=True, max_length=8)["input_ids"] == tok(text)[0, :n].tolist()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="bos token"):
        ClipTokenizer({"a</w>": 0}, [])
    tok = load_tokenizer(BPE_GZ)
    with pytest.raises(ValueError, match="context_length"):
        tok("x", context_length=1)


def test_special_token_text_is_not_a_control_token(gz_tokenizer: ClipTokenizer) -> None:
    ids = gz_tokenizer("<|endoftext|> <start_of_text>")[0].tolist()
    assert ids.count(49407) == 1 and ids.count(49406) == 1


def test_decode_round_trip(gz_tokenizer: ClipTokenizer) -> None:
    assert gz_tokenizer.decode(gz_tokenizer("A Photo of  a CAT")[0]) == "a photo of a cat"


def test_throughput(gz_tokenizer: ClipTokenizer) -> None:
    """Thousands of distinct queries: cold (uncached) rate well above 1k queries/s."""
    rng = random.Random(7)
    queries = [
        f"a photo of a {rng.choice(_WORDS)} {rng.choice(_WORDS)} number {i}" for i in range(3000)
    ]
    tok = load_tokenizer(BPE_GZ)  # fresh caches
    start = time.perf_counter()
    ids = tok(queries, context_length=16)
    elapsed = time.perf_counter() - start
    assert ids.shape == (3000, 16)
    assert elapsed < 3.0, f"{elapsed:.2f}s for 3000 queries"
