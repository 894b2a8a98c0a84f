"""Vocabulary validation, templates, ensembling, cache, versions and background updates,
on a tiny random OWL-ViT checkpoint saved by transformers."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import tiny_checkpoint

from clip_perception.detector import OpenVocabDetector, load_detector
from clip_perception.model import load_owl, load_tokenizer
from clip_perception.templates import CLIP7, CLIP80
from clip_perception.vocabulary import (
    TextEncoder,
    VocabularyError,
    VocabularyStore,
    resolve_templates,
)


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("owlvit"), "v1").path


@pytest.fixture
def detector(owl_dir: Path) -> Iterator[OpenVocabDetector]:
    det = load_detector(owl_dir, device="cpu")
    yield det
    det.close()


def _hand_ensemble(owl_dir: Path, queries: list[str], templates: list[str]) -> torch.Tensor:
    """(Q, D): per query, the renormalised mean of its normalised prompt embeddings."""
    owl, tok = load_owl(owl_dir), load_tokenizer(owl_dir)
    rows = []
    for query in queries:
        ids = tok([t.replace("{}", query) for t in templates], context_length=16)  # (T, L)
        with torch.no_grad():
            prompts = F.normalize(owl.encode_text(ids), dim=-1)  # (T, D)
        rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(rows)


def test_named_template_sets_are_the_clip_papers() -> None:
    assert len(CLIP7) == 7 and len(CLIP80) == 80 and len(set(CLIP80)) == 80
    assert set(CLIP7) <= set(CLIP80)
    assert all(t.count("{}") == 1 for t in CLIP80)
    assert resolve_templates("clip7") == CLIP7 and resolve_templates(None) == ("{}",)
    assert resolve_templates(["a {}", "{} b"]) == ("a {}", "{} b")


@pytest.mark.parametrize(
    ("queries", "thresholds", "templates", "message"),
    [
        ([], None, None, "empty"),
        ("cat", None, None, "list of strings"),
        (["cat", "   "], None, None, "query 1"),
        (["cat", ""], None, None, "query 1"),
        (["cat", 3], None, None, "query 1"),
        (["cat", " Cat "], None, None, "duplicate"),
        (["red  car", "red car"], None, None, "duplicate"),
        (["cat", "dog"], [0.5], None, "one per query"),
        (["cat"], [1.5], None, r"\[0, 1\]"),
        (["cat"], [-0.1], None, r"\[0, 1\]"),
        (["cat"], [math.nan], None, r"\[0, 1\]"),
        (["cat"], [True], None, "number"),
        (["cat"], None, ["a {} and {}"], "exactly one"),
        (["cat"], None, ["no slot"], "exactly one"),
        (["cat"], None, "clip5", "unknown template set"),
        (["cat"], None, [], "non-empty"),
    ],
)
def test_bad_requests_raise_and_leave_the_vocabulary_unchanged(
    detector: OpenVocabDetector, queries, thresholds, templates, message: str
) -> None:
    version = detector.set_queries(["cat", "dog"], thresholds=[0.2, 0.3])
    before, encodes = detector.vocabulary, detector.stats.text_encodes
    with pytest.raises(VocabularyError, match=message):
        detector.set_queries(queries, thresholds, templates)
    with pytest.raises(VocabularyError, match=message):
        detector.set_queries_async(queries, thresholds, templates)
    assert detector.vocabulary is before and before.version == version
    assert detector.stats.text_encodes == encodes
    assert detector.set_queries(["bird"]) == version + 1  # failures consumed no version


def test_queries_are_stripped_and_thresholds_kept(detector: OpenVocabDetector) -> None:
    detector.set_queries(["  cat ", "dog\n"], thresholds=[0.25, 1])
    vocabulary = detector.vocabulary
    assert vocabulary.queries == ("cat", "dog") and vocabulary.labels == ("cat", "dog")
    assert vocabulary.thresholds == (0.25, 1.0)
    assert vocabulary.embeddings.shape == (2, 32)


def test_template_ensembling_equals_hand_computed_mean(
    detector: OpenVocabDetector, owl_dir: Path
) -> None:
    templates = ["a {}", "{} here", "the big {}."]
    detector.set_queries(["cat", "red car"], templates=templates)
    expected = _hand_ensemble(owl_dir, ["cat", "red car"], templates)
    assert torch.allclose(detector.vocabulary.embeddings, expected, atol=1e-6)
    assert detector.stats.prompts_encoded == 6
    # Without templates a query's embedding is its own normalised text embedding.
    detector.set_queries(["cat"])
    assert torch.allclose(
        detector.vocabulary.embeddings, _hand_ensemble(owl_dir, ["cat"], ["{}"]), atol=1e-6
    )


def test_named_templates_encode_every_prompt_once(detector: OpenVocabDetector) -> None:
    detector.set_queries(["cat", "dog"], templates="clip80")
    assert detector.stats.prompts_encoded == 160
    assert detector.stats.text_encodes == 1  # 160 prompts fit one text-encoder batch
    assert torch.allclose(detector.vocabulary.embeddings.norm(dim=-1), torch.ones(2))


def test_switching_back_to_a_known_vocabulary_encodes_nothing(
    detector: OpenVocabDetector,
) -> None:
    detector.set_queries(["cat", "dog"], templates="clip7")
    first = detector.vocabulary.embeddings
    detector.set_queries(["car"], templates="clip7")
    encodes, prompts = detector.stats.text_encodes, detector.stats.prompts_encoded
    assert encodes == 2
    detector.set_queries(["cat", "dog"], templates="clip7")
    assert detector.stats.text_encodes == encodes and detector.stats.prompts_encoded == prompts
    assert detector.stats.cache_hits >= 14
    assert torch.equal(detector.vocabulary.embeddings, first)
    # A partly known vocabulary encodes only the new prompts.
    detector.set_queries(["cat", "car", "bird"], templates="clip7")
    assert detector.stats.prompts_encoded == prompts + 7


def test_cache_is_bounded_lru(owl_dir: Path) -> None:
    detector = load_detector(owl_dir, device="cpu", cache_size=2)
    detector.set_queries(["cat", "dog"])
    detector.set_queries(["dog", "car"])  # "cat" is least recently used and is evicted
    detector.set_queries(["dog"])
    assert detector.stats.prompts_encoded == 3
    detector.set_queries(["cat"])
    assert detector.stats.prompts_encoded == 4
    detector.close()


def test_overlong_queries_are_truncated_with_a_warning(detector: OpenVocabDetector) -> None:
    detector.set_queries(["cat", "a very long query that cannot fit"])
    warnings = detector.vocabulary.warnings
    assert len(warnings) == 1 and "a very long query that cannot fit" in warnings[0]
    assert "truncated" in warnings[0]
    detector.set_queries(["cat"], templates=["{}", "a photo of the large {}."])
    assert detector.vocabulary.warnings == (
        "1 of 2 prompts of query 'cat' exceeded the model's text context and was truncated",
    )
    detector.set_queries(["cat"])
    assert detector.vocabulary.warnings == ()


def test_updates_run_in_background_in_submission_order(owl_dir: Path) -> None:
    owl, tok = load_owl(owl_dir), load_tokenizer(owl_dir)
    gate = threading.Event()

    def gated_encode(ids: torch.Tensor) -> torch.Tensor:
        assert gate.wait(timeout=30), "test gate never opened"
        return owl.encode_text(ids)

    store = VocabularyStore(
        TextEncoder("tiny", lambda texts: tok.encode_batch(texts, 16), gated_encode,
                    torch.device("cpu")),
        torch.float32,
    )
    first = store.set_text_async(["cat"], None, None)
    second = store.set_text_async(["dog", "car"], [0.5, 0.6], None)
    assert store.active is None and not first.done()  # encoding blocks only the worker
    gate.set()
    assert second.result(timeout=30) == 2 and first.result() == 1
    assert store.active.labels == ("dog", "car") and store.active.version == 2
    store.close()
