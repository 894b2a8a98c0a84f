"""GPU out-of-memory during a batch: the batch is split and retried, a warning is logged
once, diagnostics say so. On a CPU the path is exercised by injecting the exception: into
``infer_with_split`` directly, and into the engine of a detector node built in this process
(a real node and a real tiny model; only ``detect`` is wrapped to fail on large batches).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticStatus
from engine_fixtures import random_image, tiny_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from std_msgs.msg import Header

from clip_perception.batching import infer_with_split
from clip_perception.ros import messages
from clip_perception.ros.detector_node import DetectorNode
from clip_perception.ros.diagnostics import engine_status

settings.register_profile("oom_splits", max_examples=200, deadline=None)
settings.register_profile("oom_splits_long", max_examples=20_000, deadline=None)
SPLITS = settings.get_profile(
    "oom_splits_long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "oom_splits")
OOM = torch.cuda.OutOfMemoryError
CAMERAS = ["/oom0", "/oom1", "/oom2", "/oom3"]


def fits(capacity: int, calls: list[int]):
    """An inference function for batches of at most ``capacity`` items (doubles them)."""
    def infer(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > capacity:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return [2 * x for x in items]
    return infer


@settings(SPLITS)
@given(st.integers(1, 64), st.integers(1, 64))
def test_split_until_it_fits_results_in_order(batch, capacity):
    calls: list[int] = []
    splits: list[int] = []
    items = list(range(batch))
    results = infer_with_split(fits(capacity, calls), items, lambda n, _: splits.append(n))
    assert results == [2 * x for x in items]
    assert all(n > capacity for n in splits)  # only batches that failed were split
    assert sum(1 for n in calls if n <= capacity) == len(calls) - len(splits)
    assert not splits if batch <= capacity else splits[0] == batch


def test_a_single_item_that_does_not_fit_raises():
    with pytest.raises(OOM):
        infer_with_split(fits(0, []), [1])
    with pytest.raises(OOM):  # halves down to single items, then gives up
        infer_with_split(fits(0, []), [1, 2, 3])


def test_other_errors_are_not_split():
    calls: list[int] = []

    def broken(items: list[int]) -> list[int]:
        calls.append(len(items))
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        infer_with_split(broken, [1, 2, 3, 4])
    assert calls == [4]


@pytest.fixture
def node(tmp_path) -> Iterator[DetectorNode]:
    model = tiny_checkpoint(tmp_path / "owl", "v1").path
    context_args = ["--ros-args", "-p", f"model:={model}", "-p", "device:=cpu",
                    "-p", f"image_topics:=[{','.join(CAMERAS)}]", "-p", "queries:=[red,blue]",
                    "-p", "max_batch:=4", "-p", "score_threshold:=0.0"]
    rclpy.init(args=context_args)
    detector = DetectorNode()
    yield detector
    detector.close(timeout=5.0)
    detector.destroy_node()
    rclpy.shutdown()


def frame(seed: int) -> object:
    return messages.to_image(random_image(32, 48, seed), Header(frame_id="oom"))


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_node_splits_oom_batches_warns_once_and_reports(node, monkeypatch, capfd):
    detect = node.engine.detect
    release = threading.Event()
    sizes: list[int] = []

    def detect_on_a_small_gpu(images):
        sizes.append(len(images))
        if len(sizes) == 1:
            release.wait(10)  # hold the first batch while every camera queues a frame
        if len(images) > 1:
            raise OOM("CUDA out of memory. Tried to allocate 3.00 GiB (injected)")
        return detect(images)

    monkeypatch.setattr(node.engine, "detect", detect_on_a_small_gpu)
    for round_ in range(2):
        release.clear()
        sizes.clear()
        node.slots.put(0, frame(0))
        wait_until(lambda: sizes)  # the worker holds a batch of one
        for camera in range(len(CAMERAS)):
            node.slots.put(camera, frame(camera + 1))
        release.set()
        wait_until(lambda r=round_: sum(c.published for c in node.cameras) == 5 * (r + 1))
        assert sizes == [1, 4, 2, 1, 1, 2, 1, 1]  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1

    assert [c.published for c in node.cameras] == [4, 2, 2, 2]
    assert all(c.failed == 0 for c in node.cameras)
    assert node.oom_splits == 6 and node.failed_batches == 0
    status = engine_status("clip_detector", node.engine_figures())
    values = {kv.key: kv.value for kv in status.values}
    assert values["oom_batch_splits"] == "6"
    assert status.level == DiagnosticStatus.WARN and "out of memory" in status.message
    time.sleep(0.2)  # rcutils writes the log line from the worker thread
    logged = capfd.readouterr().err
    assert logged.count("GPU out of memory on a batch of 4") == 1, logged


def test_node_counts_a_failed_batch_and_keeps_serving(node, monkeypatch):
    detect = node.engine.detect
    failures = iter([RuntimeError("injected engine failure")])

    def flaky(images):
        for error in failures:
            raise error
        return detect(images)

    monkeypatch.setattr(node.engine, "detect", flaky)
    node.slots.put(1, frame(1))
    wait_until(lambda: node.failed_batches == 1)
    assert node.cameras[1].failed == 1 and "injected" in node.note
    node.slots.put(1, frame(2))
    wait_until(lambda: node.cameras[1].published == 1)
    assert node.note == ""


def test_engine_status_without_splits_is_ok(node):
    status = engine_status("clip_detector", node.engine_figures())
    assert status.level == DiagnosticStatus.OK
    assert {kv.key: kv.value for kv in status.values}["oom_batch_splits"] == "0"
