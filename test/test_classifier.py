"""ZeroShotClassifier on a tiny random CLIP checkpoint saved by transformers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import TinyCheckpoint, random_image, tiny_checkpoint

from clip_perception.classifier import ZeroShotClassifier, load_classifier
from clip_perception.detections import Classification
from clip_perception.model import load_tokenizer
from clip_perception.vocabulary import NoVocabularyError, VocabularyError

LABELS = ["cat", "dog", "red car"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return tiny_checkpoint(tmp_path_factory.mktemp("clip"), "clip")


@pytest.fixture
def classifier(checkpoint: TinyCheckpoint) -> Iterator[ZeroShotClassifier]:
    clf = load_classifier(checkpoint.path, device="cpu")
    yield clf
    clf.close()


def _images() -> list[np.ndarray]:
    return [random_image(48, 80, 0), random_image(100, 60, 1), random_image(64, 64, 2)]


def test_probabilities_equal_the_reference_softmax(
    classifier: ZeroShotClassifier, checkpoint: TinyCheckpoint
) -> None:
    assert classifier.set_labels(LABELS) == 1
    images = _images()
    result = classifier.classify(images)
    assert isinstance(result, Classification)
    assert result.labels == LABELS and result.vocabulary_version == 1
    assert result.probs.shape == (3, 3) and result.probs.dtype == np.float32
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-6)
    pixel_values = classifier.preprocessor(images).pixel_values
    ids = load_tokenizer(checkpoint.path)(LABELS, context_length=16)  # (L, 16)
    with torch.no_grad():
        logits = checkpoint.reference(input_ids=ids, pixel_values=pixel_values).logits_per_image
    np.testing.assert_allclose(result.probs, logits.softmax(-1).numpy(), atol=1e-5)
    assert [label for label, _ in result.top1()] == [LABELS[i] for i in logits.argmax(-1)]


def test_labels_share_the_vocabulary_machinery(classifier: ZeroShotClassifier) -> None:
    classifier.set_labels(LABELS, templates="clip7")
    assert classifier.stats.prompts_encoded == 21
    classifier.set_labels(["bird"], templates="clip7")
    classifier.set_labels(LABELS, templates="clip7")
    assert classifier.stats.prompts_encoded == 28 and classifier.stats.text_encodes == 2
    assert classifier.set_labels_async(["cat"]).result() == 4
    before = classifier.vocabulary
    for bad in ([], ["cat", "CAT"], ["  "]):
        with pytest.raises(VocabularyError):
            classifier.set_labels(bad)
    with pytest.raises(VocabularyError, match="exactly one"):
        classifier.set_labels(["cat"], templates=["no slot"])
    assert classifier.vocabulary is before


def test_exemplars_define_a_label_by_its_mean_image_embedding(
    classifier: ZeroShotClassifier,
) -> None:
    classifier.set_labels(LABELS)
    exemplars = _images()[:2]
    with torch.no_grad():
        embeds = F.normalize(
            classifier.clip.encode_image(classifier.preprocessor(exemplars).pixel_values), dim=-1
        )  # (2, D)
    expected = F.normalize(embeds.mean(dim=0), dim=-1)
    # An existing label keeps its place and gets the prototype ...
    assert classifier.add_exemplars("dog", exemplars) == 2
    vocabulary = classifier.vocabulary
    assert vocabulary.labels == tuple(LABELS)
    assert torch.allclose(vocabulary.embeddings[1], expected, atol=1e-6)
    # ... a new label is appended, and both are used by classify.
    assert classifier.add_exemplars("widget", exemplars[:1]) == 3
    assert classifier.vocabulary.labels == (*LABELS, "widget")
    assert torch.allclose(classifier.vocabulary.embeddings[3], embeds[0], atol=1e-6)
    result = classifier.classify(exemplars[:1])
    assert result.labels[int(result.probs[0].argmax())] == "widget"  # cosine 1 with itself
    before = classifier.vocabulary
    with pytest.raises(ValueError, match="empty batch"):
        classifier.add_exemplars("dog", [])
    with pytest.raises(ValueError, match="uint8"):
        classifier.add_exemplars("dog", [np.zeros((8, 8, 3), np.float64)])
    with pytest.raises(VocabularyError):
        classifier.add_exemplars("", exemplars)
    assert classifier.vocabulary is before


def test_classify_errors(classifier: ZeroShotClassifier) -> None:
    with pytest.raises(NoVocabularyError):
        classifier.classify(_images())
    classifier.set_labels(LABELS)
    with pytest.raises(ValueError, match="empty batch"):
        classifier.classify([])
    with pytest.raises(ValueError, match="HxWx3"):
        classifier.classify([np.zeros((8, 8), np.uint8)])


def test_int8_classifier_ranks_like_fp32(
    classifier: ZeroShotClassifier, checkpoint: TinyCheckpoint
) -> None:
    int8 = load_classifier(checkpoint.path, device="cpu", precision="int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.clip.modules())
    for clf in (classifier, int8):
        clf.set_labels(LABELS)
    fp32_probs, int8_probs = classifier.classify(_images()).probs, int8.classify(_images()).probs
    np.testing.assert_allclose(int8_probs, fp32_probs, atol=0.1)
    int8.close()
