"""SIGINT and SIGTERM stop a detector_node cleanly within 2 s while a batch and a vocabulary
encode are both in flight (a B/32-sized model on CPU: seconds per batch, minutes for the
encode), as a robot's launch system stops it: exit status 0, no traceback, one line saying
what was abandoned."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from reliability_fixtures import RELIABLE, CameraStreamer, b32_checkpoint
from ros_harness import NodeProcess, Probe, wait_for

from clip_perception.msg import DetectionArray, Vocabulary
from clip_perception.srv import SetQueries

STOP_LIMIT_S = 2.0  # the requirement; the node's own budget is 1.5 s
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
# 300 queries x the 80 CLIP prompts: 24,000 prompts through a 12-layer text tower on a CPU,
# minutes of work, so the encode is certainly running when the signal arrives.
BIG_VOCABULARY = SetQueries.Request(queries=[f"thing {i}" for i in range(300)],
                                    templates=["clip80"])


@pytest.fixture(scope="module")
def b32_dir(tmp_path_factory) -> Path:
    return b32_checkpoint(tmp_path_factory.getbasetemp() / "b32")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_stop_within_2_s_with_inference_and_encode_in_flight(b32_dir, tmp_path, ros_context,
                                                              signal_number):
    node = NodeProcess("detector_node", {
        "model": str(b32_dir), "device": "cpu", "image_topics": ["/stop/image_raw"],
        "queries": ["a mug"], "publish_annotated": False}, tmp_path)
    probe = Probe(ros_context)
    camera = CameraStreamer(probe.node, ["/stop/image_raw"], 10.0)
    try:
        vocabulary = probe.collect(Vocabulary, "/clip_detector/vocabulary", LATCHED)
        results = probe.collect(DetectionArray, "/stop/image_raw/detections", RELIABLE)
        wait_for(lambda: vocabulary, 120, "the start-up vocabulary", node)
        wait_for(lambda: camera.publishers[0].get_subscription_count(), 30,
                 "the camera subscription", node)
        camera.start()
        # Frames keep coming, so once one batch is out the next one is already running.
        wait_for(lambda: results, 120, "the first detections", node)
        client = probe.node.create_client(SetQueries, "/clip_detector/set_queries")
        assert client.wait_for_service(timeout_sec=30)
        answer = client.call_async(BIG_VOCABULARY)
        time.sleep(1.5)  # the request is across (localhost) and being encoded
        assert not answer.done(), "the encode finished before the stop: nothing in flight"

        start = time.monotonic()
        node.proc.send_signal(signal_number)
        wait_for(lambda: not node.alive(), 10, "the node to exit")
        took = time.monotonic() - start
        output = node.output()
        assert took < STOP_LIMIT_S, f"stopping took {took:.2f} s\n{output}"
        assert node.proc.returncode == 0, output
        assert "Traceback" not in output, output
        assert "abandoned the inference or vocabulary encode in flight" in output, output
        assert "vocabulary v2" not in output  # the encode did not finish first
        print(f"\n{signal.Signals(signal_number).name}: stopped in {took:.2f} s")
    finally:
        camera.stop()
        probe.close()
        node.stop()
