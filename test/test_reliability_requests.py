"""Operators type anything: vocabulary requests fuzzed in-process against the engine's
validation and ``OpenVocabDetector.set_queries`` on a tiny checkpoint, and against the node's
own request limits and topic parsing.

Property: a request either succeeds with the documented normalisation (queries stripped,
thresholds as floats, one unit-norm embedding per query, version + 1) or raises
VocabularyError with a reason and leaves the active vocabulary untouched (the same object).
The expectation is computed here from the documented rules, not by calling the validators.

Hypothesis runs the "vocabulary_requests" profile (400 cases per property);
HYPOTHESIS_PROFILE=long selects "vocabulary_requests_long" (50x as many).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from engine_fixtures import tiny_checkpoint
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from clip_perception.detector import OpenVocabDetector, load_detector
from clip_perception.ros import params as P
from clip_perception.templates import NAMED_TEMPLATES
from clip_perception.vocabulary import VocabularyError

settings.register_profile("vocabulary_requests", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("vocabulary_requests_long",
                          settings.get_profile("vocabulary_requests"), max_examples=20_000)
FUZZ = settings.get_profile(
    "vocabulary_requests_long" if os.environ.get("HYPOTHESIS_PROFILE") == "long"
    else "vocabulary_requests")

# Text an operator might send: anything (controls, format marks, lone surrogates), right-to-
# left scripts with direction overrides, emoji, whitespace, and 10 kB strings.
ANY_TEXT = st.text(max_size=30)
RTL = st.text(st.sampled_from("\u05d0\u05d1\u05e9\u0627\u0644\u0639\u200f\u202e\u202c "),
              min_size=1, max_size=20)
EMOJI = st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1,
                max_size=10)
CONTROL = st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=8)
LONG = st.builds(lambda piece, n: (piece * n)[:10_240], st.text(min_size=1, max_size=8),
                 st.integers(2_000, 10_240))
TEXT = st.one_of(ANY_TEXT, RTL, EMOJI, CONTROL, ANY_TEXT.map(lambda t: f"  {t}\t\n"),
                 st.sampled_from(["a mug", "A MUG", "a  mug", "{}", "a {} b"]))
QUERY_LISTS = st.one_of(
    st.lists(TEXT, max_size=6),
    st.lists(st.one_of(TEXT, LONG), min_size=1, max_size=3),
    st.lists(st.one_of(TEXT, st.none(), st.integers(), st.binary(max_size=4)), max_size=4),
    st.tuples(TEXT, TEXT), TEXT, st.none(), st.integers())
NUMBERS = st.one_of(st.floats(), st.floats(0, 1), st.integers(-2, 2), st.booleans(),
                    st.none(), st.text(max_size=3), st.sampled_from([0.0, 1.0, -0.0, 1e-300]))
THRESHOLDS = st.one_of(st.none(), st.lists(NUMBERS, max_size=7), st.text(max_size=3),
                       st.floats())
TEMPLATE_TEXT = st.builds(lambda a, n, b: a + "{}" * n + b, TEXT, st.integers(0, 3), TEXT)
TEMPLATES = st.one_of(st.none(), st.sampled_from(["clip7", "clip80", "CLIP7", "", "{}"]),
                      ANY_TEXT, st.lists(TEMPLATE_TEXT, max_size=3))


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()


@st.composite
def requests(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    """A well-formed request, then as often as not one part replaced by anything at all, so
    acceptances and every kind of rejection are both frequent."""
    queries = draw(st.lists(st.one_of(TEXT, LONG).filter(str.strip), min_size=1, max_size=6,
                            unique_by=_folded))
    thresholds = draw(st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=len(queries),
                                                    max_size=len(queries))))
    templates = draw(st.one_of(st.none(), st.just("clip7"), st.lists(
        st.builds(lambda a, b: f"{a}{{}}{b}", ANY_TEXT, ANY_TEXT), min_size=1, max_size=3)))
    broken = draw(st.sampled_from(["nothing", "queries", "thresholds", "templates"]))
    if broken == "queries":
        queries = draw(QUERY_LISTS)
    elif broken == "thresholds":
        thresholds = draw(THRESHOLDS)
    elif broken == "templates":
        templates = draw(TEMPLATES)
    return queries, thresholds, templates


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> OpenVocabDetector:
    path = tiny_checkpoint(tmp_path_factory.mktemp("owl"), "v1").path
    engine = load_detector(path, device="cpu")
    engine.set_queries(["a mug"])
    yield engine
    engine.close()


def expected_queries(queries: Any) -> tuple[str, ...] | None:
    """The documented normalisation, or None when the queries must be rejected."""
    if isinstance(queries, str) or not isinstance(queries, Sequence) or not queries:
        return None
    if not all(isinstance(q, str) and q.strip() for q in queries):
        return None
    folded = [_folded(q) for q in queries]  # duplicates: the same once folded
    return tuple(q.strip() for q in queries) if len(set(folded)) == len(folded) else None


def expected_thresholds(thresholds: Any, count: int) -> tuple[float | None, ...] | None:
    if thresholds is None:
        return (None,) * count
    if isinstance(thresholds, str) or not isinstance(thresholds, Sequence):
        return None
    if len(thresholds) != count:
        return None
    ok = all(not isinstance(t, bool) and isinstance(t, (int, float)) and 0 <= t <= 1
             for t in thresholds)  # NaN fails the comparison
    return tuple(float(t) for t in thresholds) if ok else None


def expected_template_count(templates: Any) -> int | None:
    if templates is None:
        return 1
    if isinstance(templates, str):
        return len(NAMED_TEMPLATES[templates]) if templates in NAMED_TEMPLATES else None
    if not isinstance(templates, Sequence) or not templates:
        return None
    ok = all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    return len(templates) if ok else None


@settings(FUZZ)
@given(requests())
@example((["a mug", "A  MUG "], None, None))  # duplicate after folding
@example((["a mug"], [math.nan], None))
@example((["a mug"], [math.inf], None))
@example((["a mug"], [-0.1], None))
@example((["a mug"], [0.5], ["a photo of {}", "{} {}"]))
@example((["a mug"], None, ["no placeholder"]))
@example((["\u202ea mug\u200f", "🤖", "x" * 10_240], [0.0, 1.0, 0.5], "clip7"))
def test_set_queries_succeeds_normalised_or_rejects_unchanged(detector, request_parts):
    queries, thresholds, templates = request_parts
    before = detector.vocabulary
    cleaned = expected_queries(queries)
    limits = None if cleaned is None else expected_thresholds(thresholds, len(cleaned))
    valid = limits is not None and expected_template_count(templates) is not None
    event("accepted" if valid else "rejected")
    try:
        version = detector.set_queries(queries, thresholds, templates)
    except VocabularyError as error:
        assert not valid, f"rejected a valid request: {error}"
        assert str(error).strip()
        assert detector.vocabulary is before  # untouched, not merely equal
        return
    assert valid, "accepted a request the documentation rejects"
    vocabulary = detector.vocabulary
    assert version == vocabulary.version == before.version + 1
    assert vocabulary.queries == vocabulary.labels == cleaned
    assert vocabulary.thresholds == limits
    embeddings = vocabulary.embeddings.float()  # (Q, D)
    assert embeddings.shape[0] == len(cleaned) and torch.isfinite(embeddings).all()
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(cleaned)), atol=1e-4)
    for warning in vocabulary.warnings:
        assert "truncated" in warning


def test_thousands_of_random_unicode_queries(detector):
    rng = random.Random(3)
    alphabet = "abc xyz\u05d0\u0627😀\u202e\t-."
    queries, seen = [], set()
    while len(queries) < 3000:
        query = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))).strip()
        folded = _folded(query)
        if query and folded not in seen:  # duplicates are rejected: tested above
            queries.append(query)
            seen.add(folded)
    before = detector.vocabulary.version
    assert detector.set_queries(queries) == before + 1
    assert detector.vocabulary.labels == tuple(queries)
    boxes = detector.detect([np.zeros((32, 32, 3), np.uint8)])[0]
    assert boxes.query_indices.max(initial=0) < len(queries)


@settings(FUZZ)
@given(st.lists(st.one_of(TEXT, LONG), max_size=5), st.lists(TEMPLATE_TEXT, max_size=3),
       st.integers(0, 2 * P.MAX_QUERIES))
def test_node_limits_reject_what_would_exhaust_the_node(queries, templates, padding):
    """The node's own bounds, applied before the engine: count, length and prompt total."""
    queries = queries + [f"q{i}" for i in range(padding)]
    problem = P.vocabulary_limits_problem(queries, templates)
    too_long = any(len(t.strip()) > P.MAX_TEXT_CHARS for t in [*queries, *templates])
    prompts = len(queries) * max(len(templates), 1)
    well_formed = all(t.count("{}") == 1 for t in templates) or not templates
    must_reject = (len(queries) > P.MAX_QUERIES or too_long
                   or (well_formed and prompts > P.MAX_PROMPTS))
    assert (problem is not None) == must_reject, problem
    if problem:
        assert "at most" in problem


def test_prompt_limit_counts_named_template_sets():
    queries = [f"q{i}" for i in range(P.MAX_PROMPTS // 80 + 1)]
    assert "prompts" in P.vocabulary_limits_problem(queries, ["clip80"])
    assert P.vocabulary_limits_problem(queries[:-1], ["clip80"]) is None


@settings(FUZZ)
@given(st.text(st.sampled_from("ab ,\n\t\u202e😀"), max_size=40))
def test_topic_text_splits_into_clean_queries(text):
    queries = P.split_queries(text)
    for query in queries:
        assert query == query.strip() and query and "," not in query and "\n" not in query
    kept = "".join("".join(queries).split())
    assert kept == "".join(text.replace(",", "").split())  # nothing but separators is lost


def test_warnings_in_answers_and_logs_are_bounded():
    from clip_perception.ros.vocabulary_channels import summary

    warnings = [f"query {'x' * 900!r} exceeded the model's text context and was truncated"
                for _ in range(4000)]
    text = summary(warnings)
    assert len(text) < 1000 and "3997 more" in text
    assert summary([]) == ""
