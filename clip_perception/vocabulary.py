"""Query vocabularies shared by the detector and the classifier.

A ``Vocabulary`` is immutable: ``detect``/``classify`` read the active one with a single
attribute load and use only that object, so a concurrent update can never mix two versions.
Every update (text queries, image exemplars) runs on one background worker thread, in
submission order, so versions increase by exactly one per successful change and a failed
update leaves the active vocabulary untouched. On CUDA the worker encodes on its own stream,
so the frame path keeps running on the default stream with the previous vocabulary.

Text prompts are embedded through a bounded LRU cache keyed by (model identity, prompt), so
switching back to a known vocabulary runs no text encoder at all.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_perception.model.tokenizer import ClipTokenizer, TokenizedText
from clip_perception.templates import NAMED_TEMPLATES

Templates = str | Sequence[str] | None
# How an embedding-only update joins the vocabulary: ``append`` adds a query, ``replace``
# makes it the only query, ``upsert`` replaces the query with the same label or appends.
JoinMode = Literal["append", "replace", "upsert"]


class VocabularyError(ValueError):
    """A vocabulary request was rejected; the active vocabulary is unchanged."""


class NoVocabularyError(RuntimeError):
    """Inference was asked for before any vocabulary was set."""


@dataclass(frozen=True)
class Vocabulary:
    """One immutable vocabulary version.

    queries: the text each query was built from (the label for image exemplars).
    labels: the name reported for each query.
    thresholds: per-query score thresholds; None means the owner's default.
    embeddings: (Q, D) L2-normalised query embeddings on the model device, in model dtype.
    version: 1 for the first vocabulary, +1 for every successful change.
    warnings: what the caller should know about this vocabulary (e.g. truncated queries).
    """

    queries: tuple[str, ...]
    labels: tuple[str, ...]
    thresholds: tuple[float | None, ...]
    embeddings: Tensor
    version: int
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        q = len(self.queries)
        assert len(self.labels) == q and len(self.thresholds) == q and q > 0
        assert self.embeddings.ndim == 2 and self.embeddings.shape[0] == q
        assert self.version >= 0

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class EncoderStats:
    """Counters for tests and diagnostics (written by the vocabulary worker thread only)."""

    text_encodes: int = 0  # calls into the text encoder (one per batch of uncached prompts)
    prompts_encoded: int = 0
    cache_hits: int = 0  # prompts served from the embedding cache


@dataclass(frozen=True)
class CachedPrompt:
    embedding: Tensor  # (D,) L2-normalised, float32, on the model device
    truncated: bool


class EmbeddingCache:
    """Thread-safe bounded LRU of prompt embeddings keyed by (model identity, prompt)."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], CachedPrompt] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> CachedPrompt | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, str], item: CachedPrompt) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class TextEncoder:
    """How a model turns prompts into embeddings.

    model_key: identity of the model and its numerics (cache key component).
    tokenize: prompts -> TokenizedText at the model's context length.
    encode: (N, L) token ids on ``device`` -> (N, D) embeddings.
    """

    model_key: str
    tokenize: Callable[[list[str]], TokenizedText]
    encode: Callable[[Tensor], Tensor]
    device: torch.device
    batch_size: int = 256


# ------------------------------------------------------------------ validation
def _canonical(text: str) -> str:
    # The CLIP tokenizer collapses whitespace and lower-cases, so these spell the same query.
    return " ".join(text.split()).casefold()


def validate_label(label: object) -> str:
    if not isinstance(label, str) or not label.strip():
        raise VocabularyError(f"label must be a non-empty string, got {label!r}")
    return label.strip()


def validate_queries(queries: object) -> tuple[str, ...]:
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise VocabularyError(f"queries must be a list of strings, got {type(queries).__name__}")
    if not queries:
        raise VocabularyError("queries must not be empty")
    stripped = []
    for i, query in enumerate(queries):
        if not isinstance(query, str) or not query.strip():
            raise VocabularyError(f"query {i} must be a non-empty string, got {query!r}")
        stripped.append(query.strip())
    seen: dict[str, str] = {}
    for query in stripped:
        if _canonical(query) in seen:
            raise VocabularyError(
                f"duplicate query {query!r} (same as {seen[_canonical(query)]!r} after "
                "whitespace and case folding)"
            )
        seen[_canonical(query)] = query
    return tuple(stripped)


def validate_threshold(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VocabularyError(f"{where} must be a number in [0, 1], got {value!r}")
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise VocabularyError(f"{where} must be in [0, 1], got {value!r}")
    return float(value)


def validate_thresholds(thresholds: object, count: int) -> tuple[float | None, ...]:
    if thresholds is None:
        return (None,) * count
    if isinstance(thresholds, str) or not isinstance(thresholds, Sequence):
        raise VocabularyError(f"thresholds must be a list of numbers, got {thresholds!r}")
    if len(thresholds) != count:
        raise VocabularyError(
            f"got {len(thresholds)} thresholds for {count} queries; give one per query"
        )
    return tuple(validate_threshold(t, f"threshold {i}") for i, t in enumerate(thresholds))


def resolve_templates(templates: Templates) -> tuple[str, ...]:
    """None -> ("{}",) (query as is); "clip7"/"clip80" -> the CLIP paper's sets; else a list
    of strings, each with exactly one ``{}``."""
    if templates is None:
        return ("{}",)
    if isinstance(templates, str):
        if templates not in NAMED_TEMPLATES:
            raise VocabularyError(
                f"unknown template set {templates!r}: use one of {sorted(NAMED_TEMPLATES)} "
                "or a list of strings containing '{}'"
            )
        return NAMED_TEMPLATES[templates]
    if not isinstance(templates, Sequence) or not templates:
        raise VocabularyError("templates must be None, a set name or a non-empty list")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise VocabularyError(f"template {template!r} must contain exactly one '{{}}'")
    return tuple(templates)


# ------------------------------------------------------------------ store
def text_vocabulary_store(
    tokenizer: ClipTokenizer, encode: Callable[[Tensor], Tensor], context_length: int,
    device: torch.device, dtype: torch.dtype, model_key: str, cache_size: int = 4096,
    batch_size: int = 256,
) -> VocabularyStore:
    """The store a model's text tower feeds: prompts tokenised at the model's context length
    and encoded by ``encode``, cached per (model_key, prompt)."""
    encoder = TextEncoder(
        model_key=model_key,
        tokenize=lambda texts: tokenizer.encode_batch(texts, context_length=context_length),
        encode=encode, device=device, batch_size=batch_size,
    )
    return VocabularyStore(encoder, dtype, EmbeddingCache(cache_size))


class VocabularyStore:
    """Holds the active vocabulary and applies updates on a background worker."""

    def __init__(
        self, encoder: TextEncoder, dtype: torch.dtype, cache: EmbeddingCache | None = None
    ) -> None:
        self.encoder = encoder
        self.dtype = dtype
        self.cache = EmbeddingCache() if cache is None else cache
        self.stats = EncoderStats()
        self._active: Vocabulary | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocabulary")
        self._stream: torch.cuda.Stream | None = None

    @property
    def active(self) -> Vocabulary | None:
        """The current vocabulary (one atomic reference read)."""
        return self._active

    def require(self) -> Vocabulary:
        vocabulary = self._active
        if vocabulary is None:
            raise NoVocabularyError("no vocabulary set: call set_queries/set_labels first")
        return vocabulary

    def set_text_async(
        self, queries: Sequence[str], thresholds: Sequence[float] | None, templates: Templates
    ) -> Future[int]:
        """Validate now (raising VocabularyError), encode and swap in the background."""
        cleaned = validate_queries(queries)
        limits = validate_thresholds(thresholds, len(cleaned))
        prompt_set = resolve_templates(templates)

        def build(_: Vocabulary | None) -> Vocabulary:  # text replaces the whole vocabulary
            return self._build_text(cleaned, limits, prompt_set)

        return self._worker.submit(self._apply, build)

    def add_embedding_async(
        self,
        label: str,
        compute: Callable[[], Tensor],
        threshold: float | None,
        mode: JoinMode,
    ) -> Future[int]:
        """Join one embedding computed by ``compute`` (on the worker) under ``label``."""
        name = validate_label(label)
        limit = None if threshold is None else validate_threshold(threshold, "threshold")

        def build(current: Vocabulary | None) -> Vocabulary:
            embedding = F.normalize(compute().float().reshape(1, -1), dim=-1)  # (1, D)
            entry = Vocabulary((name,), (name,), (limit,), embedding, version=0)
            if current is None or mode == "replace":
                return entry
            if mode == "upsert" and name in current.labels:
                row = current.labels.index(name)
                embeddings = current.embeddings.clone()  # (Q, D), never mutate a published one
                embeddings[row] = embedding[0].to(embeddings.dtype)
                return Vocabulary(current.queries, current.labels, current.thresholds,
                                  embeddings, 0, current.warnings)
            return _concat(current, entry)

        return self._worker.submit(self._apply, build)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # ---------------------------------------------------------- worker side
    def _apply(self, build: Callable[[Vocabulary | None], Vocabulary]) -> int:
        current = self._active
        with torch.inference_mode(), self._stream_context():
            if self._stream is not None:
                # Inputs prepared by the caller (e.g. exemplar pixels) come from the default
                # stream; order this stream after them.
                self._stream.wait_stream(torch.cuda.default_stream(self.encoder.device))
            draft = build(current)
            embeddings = draft.embeddings.to(self.encoder.device, self.dtype)  # (Q, D)
            if self._stream is not None:
                # Publish only finished embeddings, and keep their memory from being reused by
                # this stream while frames on the default stream may still read them.
                self._stream.synchronize()
                embeddings.record_stream(torch.cuda.default_stream(self.encoder.device))
        version = (0 if current is None else current.version) + 1
        self._active = Vocabulary(draft.queries, draft.labels, draft.thresholds, embeddings,
                                  version, draft.warnings)
        return version

    def _stream_context(self) -> contextlib.AbstractContextManager:
        if self.encoder.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.encoder.device)
        return torch.cuda.stream(self._stream)

    def _build_text(
        self, queries: tuple[str, ...], thresholds: tuple[float | None, ...],
        templates: tuple[str, ...],
    ) -> Vocabulary:
        # str.replace, not str.format: queries and templates may contain other braces.
        prompts = [[t.replace("{}", q) for t in templates] for q in queries]
        flat = [p for group in prompts for p in group]
        embeddings, truncated = self.embed_prompts(flat)  # (Q*T, D), Q*T flags
        t = len(templates)
        # Prompt ensembling (CLIP paper, Sec. 3.1.4): mean of the normalised prompt embeddings
        # of one query, renormalised.
        per_query = embeddings.view(len(queries), t, -1)  # (Q, T, D)
        ensembled = F.normalize(per_query.mean(dim=1), dim=-1)  # (Q, D)
        warnings = []
        for i, query in enumerate(queries):
            cut = sum(truncated[i * t:(i + 1) * t])
            if cut:
                what = "query" if t == 1 else f"{cut} of {t} prompts of query"
                warnings.append(
                    f"{what} {query!r} exceeded the model's text context and was truncated"
                )
        return Vocabulary(queries, queries, thresholds, ensembled, 0, tuple(warnings))

    def embed_prompts(self, prompts: list[str]) -> tuple[Tensor, list[bool]]:
        """(N, D) normalised fp32 embeddings of ``prompts`` and their truncation flags,
        encoding only prompts missing from the cache. Worker thread only."""
        found: dict[str, CachedPrompt] = {}
        for prompt in dict.fromkeys(prompts):
            item = self.cache.get((self.encoder.model_key, prompt))
            if item is not None:
                found[prompt] = item
        self.stats.cache_hits += sum(p in found for p in prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        for chunk in _chunks(missing, self.encoder.batch_size):
            tokens = self.encoder.tokenize(chunk)
            encoded = self.encoder.encode(tokens.input_ids.to(self.encoder.device))  # (n, D)
            encoded = F.normalize(encoded.float(), dim=-1)  # (n, D)
            self.stats.text_encodes += 1
            self.stats.prompts_encoded += len(chunk)
            for prompt, row, cut in zip(chunk, encoded, tokens.truncated, strict=True):
                # clone: a cached row must not keep its whole chunk's storage alive. Kept
                # locally too: a request larger than the cache may evict its own prompts.
                found[prompt] = CachedPrompt(row.clone(), bool(cut))
                self.cache.put((self.encoder.model_key, prompt), found[prompt])
        stacked = torch.stack([found[p].embedding for p in prompts])  # (N, D)
        return stacked, [found[p].truncated for p in prompts]


def _concat(first: Vocabulary, second: Vocabulary) -> Vocabulary:
    embeddings = torch.cat(
        [first.embeddings, second.embeddings.to(first.embeddings)], dim=0
    )  # (Q1 + Q2, D)
    return Vocabulary(first.queries + second.queries, first.labels + second.labels,
                      first.thresholds + second.thresholds, embeddings, 0,
                      first.warnings + second.warnings)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
