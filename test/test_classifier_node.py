"""classifier_node as a real process over DDS: zero-shot labels per frame for two cameras,
label swaps through the service, the topic and the parameter, equal to the engine offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import tiny_checkpoint
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import NodeProcess, Probe, publish_until, ros_image, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import String

from clip_perception.bag_io import read_frames
from clip_perception.classifier import load_classifier
from clip_perception.image_messages import image_to_rgb
from clip_perception.msg import Classification, Vocabulary
from clip_perception.srv import SetQueries

BAG = Path(__file__).resolve().parent / "data" / "cameras_bag"
TOPICS = ["/front/image_raw", "/side/image_raw"]
LABELS = ["red", "green", "blue"]
BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("clip"), "clip").path


def test_classifications_match_the_engine_and_labels_swap(clip_dir, tmp_path, ros_context):
    node = NodeProcess("classifier_node", {
        "model": str(clip_dir), "device": "cpu", "image_topics": TOPICS, "labels": LABELS,
        "templates": ["a photo of {}", "{}"]}, tmp_path)
    probe = Probe(ros_context)
    try:
        vocabulary = probe.collect(Vocabulary, "/clip_classifier/vocabulary", LATCHED)
        results = [probe.collect(Classification, f"{t}/classification") for t in TOPICS]
        cameras = [probe.node.create_publisher(Image, t, BEST_EFFORT) for t in TOPICS]
        wait_for(lambda: vocabulary, 60, "the start-up labels", node)
        assert list(vocabulary[-1].queries) == LABELS
        assert list(vocabulary[-1].templates) == ["a photo of {}", "{}"]

        engine = load_classifier(clip_dir, device="cpu")
        engine.set_labels(LABELS, templates=["a photo of {}", "{}"])
        frames = [f for f in read_frames(BAG)][:4]  # two frames of each camera
        for frame in frames:
            bucket = results[TOPICS.index(frame.topic)]
            nanosec = frame.msg.header.stamp.nanosec
            publish_until(cameras[TOPICS.index(frame.topic)], ros_image(frame.msg),
                          lambda b=bucket, n=nanosec: [m for m in b
                                                       if m.header.stamp.nanosec == n],
                          60, f"a classification for {frame.topic}", node)
            msg = next(m for m in bucket if m.header.stamp.nanosec == nanosec)
            expected = engine.classify([image_to_rgb(frame.msg)])
            assert msg.header.frame_id == frame.msg.header.frame_id
            assert list(msg.labels) == LABELS and msg.vocabulary_version == 1
            assert sum(msg.scores) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(msg.scores, expected.probs[0], atol=1e-5)
        engine.close()

        response = probe.call(SetQueries, "/clip_classifier/set_queries",
                              SetQueries.Request(queries=["a kitchen", "a corridor"]))
        assert response.success and response.vocabulary_version == 2, response.message
        response = probe.call(SetQueries, "/clip_classifier/set_queries",
                              SetQueries.Request(queries=["a", "b"], thresholds=[0.1, 0.2]))
        assert not response.success and "no thresholds" in response.message
        probe.node.create_publisher(String, "/clip_classifier/queries", 10).publish(
            String(data="indoors, outdoors"))
        wait_for(lambda: vocabulary[-1].version == 3, 60, "labels v3 from ~/queries", node)
        assert list(vocabulary[-1].queries) == ["indoors", "outdoors"]
    finally:
        probe.close()
        assert node.stop() == 0, node.output()
