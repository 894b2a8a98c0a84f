"""The detector on a CUDA device: CUDA-graph replay against eager, batches, threads, and the
GPU result against the CPU one. Runs only where CUDA exists (the GPU check in
docs/benchmarks.md runs it); CI machines have no GPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from engine_fixtures import random_image, tiny_checkpoint
from torchvision.ops import box_iou

from clip_perception.detections import Detections
from clip_perception.detector import OpenVocabDetector, load_detector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUERIES = ["cat", "dog", "red car"]
SIZES = [(48, 80), (100, 60), (64, 64), (48, 80)]


@pytest.fixture(scope="module", params=["v1", "v2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param).path


def _detector(path, device: str, precision: str, **settings) -> OpenVocabDetector:
    detector = load_detector(path, device=device, precision=precision, score_threshold=0.0,
                             **settings)
    detector.set_queries(QUERIES)
    return detector


def _images(seed: int = 0) -> list[np.ndarray]:
    return [random_image(h, w, seed + i) for i, (h, w) in enumerate(SIZES)]


def _same(a: list[Detections], b: list[Detections]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.scores, y.scores)
        np.testing.assert_array_equal(x.query_indices, y.query_indices)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_graph_replay_equals_eager(checkpoint, precision: str) -> None:
    graphed = _detector(checkpoint, "cuda", precision)
    eager = _detector(checkpoint, "cuda", precision, cuda_graphs=False)
    try:
        for seed in range(3):  # later calls replay the graphs captured by the first
            images = _images(seed)
            _same(graphed.detect(images), eager.detect(images))
            _same(graphed.detect(images[:1]), eager.detect(images[:1]))
        assert graphed._graphed is not None and eager._graphed is None
        assert sorted(shape[0] for shape in graphed._graphed.captured_shapes) == [1, 4]
        assert len(graphed.detect(images)[0].boxes) > 0  # threshold 0: something to compare
    finally:
        graphed.close()
        eager.close()


def test_concurrent_callers_get_their_own_frames(checkpoint) -> None:
    detector = _detector(checkpoint, "cuda", "bf16")
    batches = [_images(seed)[:2] for seed in range(4)]
    expected = [detector.detect(batch) for batch in batches]
    results: dict[int, list[list[Detections]]] = {i: [] for i in range(len(batches))}

    def worker(i: int) -> None:
        for _ in range(20):
            results[i].append(detector.detect(batches[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, runs in results.items():
            assert len(runs) == 20
            for run in runs:
                _same(run, expected[i])
    finally:
        detector.close()


def test_gpu_fp32_finds_the_cpu_boxes(checkpoint) -> None:
    gpu = _detector(checkpoint, "cuda", "fp32")
    cpu = _detector(checkpoint, "cpu", "fp32")
    try:
        for ours, reference in zip(gpu.detect(_images()), cpu.detect(_images()), strict=True):
            assert len(ours.boxes) == len(reference.boxes) > 0
            overlaps = box_iou(torch.from_numpy(ours.boxes), torch.from_numpy(reference.boxes))
            # Same order up to near-ties: each GPU box has its CPU twin.
            assert (overlaps.max(dim=1).values > 0.99).float().mean() > 0.95
            np.testing.assert_allclose(np.sort(ours.scores), np.sort(reference.scores),
                                       atol=1e-3)
    finally:
        gpu.close()
        cpu.close()


def test_switching_graphs_off_and_on(checkpoint) -> None:
    detector = _detector(checkpoint, "cuda", "bf16")
    try:
        images = _images()
        graphed = detector.detect(images)
        detector.update_settings(cuda_graphs=False)
        assert detector._graphed is None
        _same(detector.detect(images), graphed)
        detector.update_settings(cuda_graphs=True)
        _same(detector.detect(images), graphed)
    finally:
        detector.close()
