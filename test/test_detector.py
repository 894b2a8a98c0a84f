"""OpenVocabDetector end to end on tiny random OWL-ViT / OWLv2 checkpoints saved by
transformers: results, batching, reference parity of boxes, exemplars, concurrency, int8."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import TinyCheckpoint, random_image, tiny_checkpoint
from torchvision.ops import box_iou
from transformers import Owlv2ImageProcessor, OwlViTImageProcessor

from clip_perception.detections import Detections
from clip_perception.detector import OpenVocabDetector, load_detector
from clip_perception.model import load_tokenizer
from clip_perception.model.boxes import pixels_to_input_boxes
from clip_perception.vocabulary import NoVocabularyError, VocabularyError

QUERIES = ["cat", "dog", "red car"]
SIZES = [(48, 80), (100, 60), (64, 64), (48, 80)]  # non-square both ways, repeated size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyCheckpoint]:
    return {kind: tiny_checkpoint(tmp_path_factory.mktemp(kind), kind) for kind in ("v1", "v2")}


def _detector(checkpoint: TinyCheckpoint, **settings) -> OpenVocabDetector:
    detector = load_detector(checkpoint.path, device="cpu", **settings)
    detector.set_queries(QUERIES)
    return detector


def _images(seed: int = 0) -> list[np.ndarray]:
    return [random_image(h, w, seed + i) for i, (h, w) in enumerate(SIZES)]


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_detections_are_typed_sorted_and_inside_the_image(checkpoints, kind: str) -> None:
    detector = _detector(checkpoints[kind], score_threshold=0.3)
    results = detector.detect(_images())
    assert len(results) == len(SIZES)
    for result, size in zip(results, SIZES, strict=True):
        assert isinstance(result, Detections) and result.image_size == size
        assert result.vocabulary_version == 1 and len(result) > 0
        assert result.boxes.dtype == np.float32 and result.boxes.shape == (len(result), 4)
        assert result.labels == [QUERIES[i] for i in result.query_indices]
        assert (np.diff(result.scores) <= 0).all() and (result.scores >= 0.3).all()
        h, w = size
        assert (result.boxes >= 0).all() and (result.boxes[:, [0, 2]] <= w).all()
        assert (result.boxes[:, [1, 3]] <= h).all()
        assert (result.boxes[:, 2:] > result.boxes[:, :2]).all()


def test_detect_without_vocabulary_raises(checkpoints) -> None:
    detector = load_detector(checkpoints["v1"].path, device="cpu")
    with pytest.raises(NoVocabularyError, match="set_queries"):
        detector.detect(_images())


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_batch_equals_single_and_is_deterministic(checkpoints, kind: str) -> None:
    detector = _detector(checkpoints[kind], score_threshold=0.05)
    images = _images(seed=10)
    batched = detector.detect(images)
    assert all(len(r) for r in batched)
    for image, together in zip(images, batched, strict=True):
        (alone,) = detector.detect([image])
        assert alone.labels == together.labels
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=1e-3)
        np.testing.assert_allclose(alone.scores, together.scores, atol=1e-5)
    again = detector.detect(images)
    for first, second in zip(batched, again, strict=True):
        assert np.array_equal(first.boxes, second.boxes)
        assert np.array_equal(first.scores, second.scores)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_boxes_match_transformers_post_processing(checkpoints, kind: str) -> None:
    """Same model, same pixel values: our detections equal the reference post-processing
    (v1: target size (H, W); v2: the padded square), clipped to the image, no NMS."""
    checkpoint = checkpoints[kind]
    detector = _detector(checkpoint, score_threshold=0.1, nms_iou=1.0, max_detections=1000)
    image = random_image(40, 90, seed=3)
    (ours,) = detector.detect([image])
    pixel_values = detector.preprocessor([image]).pixel_values
    ids = load_tokenizer(checkpoint.path)(QUERIES, context_length=16)  # (Q, 16)
    with torch.no_grad():
        outputs = checkpoint.reference(input_ids=ids, pixel_values=pixel_values)
    h, w = image.shape[:2]
    processor, target = (
        (OwlViTImageProcessor(), (h, w)) if kind == "v1"
        else (Owlv2ImageProcessor(), (max(h, w), max(h, w)))
    )
    ref = processor.post_process_object_detection(outputs, threshold=0.1, target_sizes=[target])[0]
    boxes = ref["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = ref["scores"][inside].argsort(descending=True)
    assert len(ours) == int(inside.sum()) > 3
    np.testing.assert_allclose(ours.boxes, boxes[inside][order].numpy(), atol=1e-3)
    np.testing.assert_allclose(ours.scores, ref["scores"][inside][order].numpy(), atol=1e-5)
    assert ours.query_indices.tolist() == ref["labels"][inside][order].tolist()
    if kind == "v2":
        assert not bool(inside.all()), "expected predictions over the padding to be dropped"


def test_per_query_thresholds_override_the_default(checkpoints) -> None:
    detector = _detector(checkpoints["v1"], score_threshold=0.0)
    assert len(set(detector.detect(_images())[0].labels)) > 1
    detector.set_queries(QUERIES, thresholds=[1.0, 0.0, 1.0])
    for result in detector.detect(_images()):
        assert set(result.labels) == {"dog"} and result.vocabulary_version == 2
    # The default applies to queries without their own threshold, also after a change of it
    # between frames (the thresholds are kept per vocabulary version and default).
    detector.set_queries(QUERIES)
    assert len(set(detector.detect(_images())[0].labels)) > 1
    detector.update_settings(score_threshold=1.0)
    for result in detector.detect(_images()):
        assert len(result) == 0 and result.vocabulary_version == 3


def test_class_agnostic_nms_leaves_no_overlaps_across_labels(checkpoints) -> None:
    aware = _detector(checkpoints["v1"], score_threshold=0.0, nms_iou=0.3)
    agnostic = _detector(checkpoints["v1"], score_threshold=0.0, nms_iou=0.3,
                         class_agnostic_nms=True)
    for a, b in zip(aware.detect(_images()), agnostic.detect(_images()), strict=True):
        iou = box_iou(torch.from_numpy(b.boxes), torch.from_numpy(b.boxes)).fill_diagonal_(0)
        assert float(iou.max()) <= 0.3 and len(b) <= len(a)


def test_rank_by_objectness(checkpoints) -> None:
    with pytest.raises(ValueError, match="OWLv2"):
        load_detector(checkpoints["v1"].path, device="cpu", rank_by_objectness=True)
    detector = _detector(checkpoints["v2"], rank_by_objectness=True, score_threshold=0.0,
                         nms_iou=1.0, max_detections=1000)
    image = random_image(64, 64, seed=5)  # square: no padding, every patch is kept
    (result,) = detector.detect([image])
    with torch.no_grad():
        features = detector.owl.image_features(detector.preprocessor([image]).pixel_values)
        logits = detector.owl.class_logits(features, detector.vocabulary.embeddings)  # (1, P, Q)
    expected = logits.sigmoid().amax(-1) * features.objectness_logits.sigmoid()  # (1, P)
    np.testing.assert_allclose(result.scores, expected[0].sort(descending=True).values,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_exemplar_query_joins_the_vocabulary(checkpoints, kind: str) -> None:
    detector = _detector(checkpoints[kind], score_threshold=0.5)
    image = random_image(48, 80, seed=7)
    box = (8.0, 6.0, 40.0, 30.0)
    version = detector.add_image_query("widget", image, box=box, threshold=0.0)
    vocabulary = detector.vocabulary
    assert version == 2 and vocabulary.labels == (*QUERIES, "widget")
    pre = detector.preprocessor
    region = pixels_to_input_boxes(box, (48, 80), pre.mode, input_size=pre.image_size)
    with torch.no_grad():
        expected = detector.owl.embed_image_query(pre([image]).pixel_values, region)
    assert torch.allclose(vocabulary.embeddings[-1], F.normalize(expected, dim=-1), atol=1e-6)
    # The exemplar's own patch matches it perfectly, so it is found in its image.
    (result,) = detector.detect([image])
    assert "widget" in result.labels and result.vocabulary_version == 2
    assert detector.add_image_query("thing", image, append=False) == 3
    assert detector.vocabulary.labels == ("thing",)


@pytest.mark.parametrize(
    ("image", "box", "error"),
    [
        (np.zeros((20, 30, 3), np.float32), None, ValueError),
        (np.zeros((20, 30), np.uint8), None, ValueError),
        (np.zeros((20, 30, 3), np.uint8), (10, 10, 5, 20), VocabularyError),
        (np.zeros((20, 30, 3), np.uint8), (0, 0, 31, 20), VocabularyError),
        (np.zeros((20, 30, 3), np.uint8), (0, 0, 10), VocabularyError),
        (np.zeros((20, 30, 3), np.uint8), (0, 0, float("nan"), 10), VocabularyError),
    ],
)
def test_bad_exemplars_leave_the_vocabulary_unchanged(checkpoints, image, box, error) -> None:
    detector = _detector(checkpoints["v1"])
    before = detector.vocabulary
    with pytest.raises(error):
        detector.add_image_query("widget", image, box=box)
    with pytest.raises(VocabularyError):
        detector.add_image_query("  ", np.zeros((20, 30, 3), np.uint8))
    assert detector.vocabulary is before


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "empty batch"),
        (np.zeros((20, 30, 3), np.uint8), "list of HxWx3"),
        (None, "list of HxWx3"),
        ([np.zeros((20, 30, 3), np.float32)], "uint8"),
        ([np.zeros((20, 30), np.uint8)], "HxWx3"),
        ([np.zeros((20, 30, 4), np.uint8)], "HxWx3"),
        ([np.zeros((3, 20, 30), np.uint8)], "HxWx3"),
        ([np.zeros((0, 30, 3), np.uint8)], "empty image"),
    ],
)
def test_bad_images_raise(checkpoints, images, message: str) -> None:
    detector = _detector(checkpoints["v1"])
    with pytest.raises(ValueError, match=message):
        detector.detect(images)


def test_bad_load_requests_raise(checkpoints) -> None:
    path = checkpoints["v1"].path
    for precision in ("fp16", "bf16"):
        with pytest.raises(ValueError, match="GPU-only"):
            load_detector(path, device="cpu", precision=precision)
    with pytest.raises(ValueError, match="unknown precision"):
        load_detector(path, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="device"):
        load_detector(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_detector(path, device="cuda:0")
    with pytest.raises(TypeError, match="score_treshold"):
        load_detector(path, device="cpu", score_treshold=0.2)
    for bad in ({"score_threshold": 1.5}, {"nms_iou": -0.1}, {"max_detections": -1},
                {"templates": "clip5"}):
        with pytest.raises(ValueError):
            load_detector(path, device="cpu", **bad)


def test_templates_setting_is_the_default_for_set_queries(checkpoints) -> None:
    detector = load_detector(checkpoints["v1"].path, device="cpu", templates="clip7")
    detector.set_queries(["cat"])
    assert detector.stats.prompts_encoded == 7
    detector.set_queries(["dog"], templates=["{}"])
    assert detector.stats.prompts_encoded == 8


def test_swaps_are_atomic_under_concurrent_detection(checkpoints) -> None:
    detector = load_detector(checkpoints["v1"].path, device="cpu", score_threshold=0.0)
    vocabularies = [["cat"], ["dog", "car", "bird"], ["fox", "owl", "cow", "pig", "hen"]]
    version_labels = {detector.set_queries(vocabularies[0]): vocabularies[0]}
    stop = threading.Event()

    def swapper() -> None:
        # Bursts of queued async updates, each burst awaited: swaps land while frames run.
        for burst in range(20):
            frames = len(results)
            while len(results) == frames and detecting.is_alive():
                time.sleep(0.001)  # let at least one frame finish between bursts
            pending = [(detector.set_queries_async(vocabularies[(burst + k) % 3]),
                        vocabularies[(burst + k) % 3]) for k in range(3)]
            for future, chosen in pending:
                version_labels[future.result()] = chosen

    def detect_loop() -> None:
        while not stop.is_set():
            results.extend(detector.detect(images))

    images, results = _images()[:2], []
    detecting = threading.Thread(target=detect_loop)
    detecting.start()
    swapper()
    stop.set()
    detecting.join(timeout=60)
    assert set(version_labels) == set(range(1, 62))
    seen = {r.vocabulary_version for r in results}
    assert len(seen) > 2, f"the detector observed too few swaps: {seen}"
    for result in results:
        labels = version_labels[result.vocabulary_version]
        assert result.labels == [labels[i] for i in result.query_indices]
        assert int(result.query_indices.max()) < len(labels)


def test_int8_agrees_with_fp32(checkpoints) -> None:
    fp32 = _detector(checkpoints["v1"], score_threshold=0.0)
    int8 = _detector(checkpoints["v1"], score_threshold=0.0, precision="int8")
    assert int8.placement.precision == "int8"
    assert not any(type(m) is torch.nn.Linear for m in int8.owl.modules())
    matched = []
    for seed in range(3):
        image = random_image(64, 96, seed)
        (a,), (b,) = fp32.detect([image]), int8.detect([image])
        ious = box_iou(torch.from_numpy(a.boxes[:10]), torch.from_numpy(b.boxes))  # (10, N)
        matched += (ious.amax(dim=1) >= 0.9).tolist()
    assert sum(matched) >= 0.8 * len(matched)
