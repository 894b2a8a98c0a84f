"""detector_node as a real process over real DDS, fed from the test rosbag.

The expectations come from the engine run offline on the same frames: what the node
publishes must be what the engine computes, with the camera's header and pixel-space boxes.
"""

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
from clip_perception.detector import load_detector
from clip_perception.image_messages import image_to_rgb
from clip_perception.msg import DetectionArray, Vocabulary
from clip_perception.srv import SetQueries

BAG = Path(__file__).resolve().parent / "data" / "cameras_bag"
TOPICS = ["/front/image_raw", "/side/image_raw"]
QUERIES = ["red", "blue", "green"]
BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("owl"), "v1").path


@pytest.fixture
def detector(owl_dir, tmp_path, ros_context):
    node = NodeProcess("detector_node", {
        "model": str(owl_dir), "device": "cpu", "image_topics": TOPICS,
        "queries": QUERIES, "score_threshold": 0.0, "max_detections": 20, "max_batch": 2,
    }, tmp_path)
    probe = Probe(ros_context)
    yield node, probe
    probe.close()
    assert node.stop() == 0, node.output()


def stamped(bucket, nanosec):
    return [m for m in bucket if m.header.stamp.nanosec == nanosec]


def test_detections_match_the_engine_offline(detector, owl_dir):
    node, probe = detector
    vocabulary = probe.collect(Vocabulary, "/clip_detector/vocabulary", LATCHED)
    results = [probe.collect(DetectionArray, f"{t}/detections") for t in TOPICS]
    publishers = [probe.node.create_publisher(Image, t, BEST_EFFORT) for t in TOPICS]
    wait_for(lambda: vocabulary, 60, "the start-up vocabulary on ~/vocabulary", node)
    assert list(vocabulary[-1].queries) == QUERIES and vocabulary[-1].version == 1
    wait_for(lambda: all(p.get_subscription_count() for p in publishers), 30,
             "the node's camera subscriptions", node)

    frames = list(read_frames(BAG))
    for frame in frames:  # one at a time, so the latest-frame policy drops none
        bucket = results[TOPICS.index(frame.topic)]
        publish_until(publishers[TOPICS.index(frame.topic)], ros_image(frame.msg),
                      lambda b=bucket, n=frame.msg.header.stamp.nanosec: stamped(b, n), 60,
                      f"detections for {frame.topic}", node)

    engine = load_detector(owl_dir, device="cpu", score_threshold=0.0, max_detections=20)
    engine.set_queries(QUERIES)
    for frame in frames:
        # A frame re-sent while discovery settled gives identical results; check them all.
        got = stamped(results[TOPICS.index(frame.topic)], frame.msg.header.stamp.nanosec)
        assert got, f"no detections for a {frame.topic} frame"
        for msg in got:
            check_message(msg, frame, engine)
    engine.close()


def check_message(msg: DetectionArray, frame, engine) -> None:
    assert msg.header.frame_id == frame.msg.header.frame_id
    assert msg.header.stamp.sec == frame.msg.header.stamp.sec
    assert (msg.image_width, msg.image_height) == (frame.msg.width, frame.msg.height)
    assert msg.vocabulary_version == 1
    expected = engine.detect([image_to_rgb(frame.msg)])[0]
    assert len(msg.detections) == len(expected) > 0
    boxes = np.array([[d.center_x, d.center_y, d.size_x, d.size_y]
                      for d in msg.detections])
    np.testing.assert_allclose(boxes, expected.center_size(), atol=1e-3)
    np.testing.assert_allclose([d.score for d in msg.detections], expected.scores,
                               atol=1e-5)
    assert [d.query for d in msg.detections] == expected.labels
    assert [d.query_index for d in msg.detections] == expected.query_indices.tolist()


def test_vocabulary_swaps_through_service_topic_and_parameter(detector):
    node, probe = detector
    vocabulary = probe.collect(Vocabulary, "/clip_detector/vocabulary", LATCHED)
    front = probe.collect(DetectionArray, "/front/image_raw/detections")
    camera = probe.node.create_publisher(Image, "/front/image_raw", BEST_EFFORT)
    queries_topic = probe.node.create_publisher(String, "/clip_detector/queries", 10)
    frame = ros_image(next(read_frames(BAG, ["/front/image_raw"])).msg)
    wait_for(lambda: vocabulary, 60, "the start-up vocabulary", node)

    # Service: success with the new version, and success=false with a reason for bad input.
    ok = probe.call(SetQueries, "/clip_detector/set_queries",
                    SetQueries.Request(queries=["a circle", "a star"], thresholds=[0.2, 0.3]))
    assert ok.success, ok.message
    assert ok.vocabulary_version == 2 and list(ok.active_queries) == ["a circle", "a star"]
    for bad, reason in [
        (SetQueries.Request(queries=[]), "must not be empty"),
        (SetQueries.Request(queries=["a", " "]), "non-empty"),
        (SetQueries.Request(queries=["a", "b"], thresholds=[0.5]), "thresholds"),
        (SetQueries.Request(queries=["a"], thresholds=[1.5]), "[0, 1]"),
        (SetQueries.Request(queries=["a"], templates=["a photo"]), "{}"),
        (SetQueries.Request(queries=["a", "A"]), "duplicate"),
    ]:
        response = probe.call(SetQueries, "/clip_detector/set_queries", bad)
        assert not response.success and reason in response.message, response.message
        assert response.vocabulary_version == 2  # unchanged

    # Topic: comma-separated, applied in the background, announced on ~/vocabulary.
    queries_topic.publish(String(data="a square, a ring\na cross"))
    wait_for(lambda: vocabulary[-1].version == 3, 60, "vocabulary v3 from ~/queries", node)
    assert list(vocabulary[-1].queries) == ["a square", "a ring", "a cross"]

    # Parameter: set through the parameter service, as `ros2 param set` does.
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters
    value = ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY,
                           string_array_value=["a triangle"])
    result = probe.call(SetParameters, "/clip_detector/set_parameters",
                        SetParameters.Request(parameters=[Parameter(name="queries",
                                                                    value=value)]))
    assert result.results[0].successful, result.results[0].reason
    wait_for(lambda: vocabulary[-1].version == 4, 60, "vocabulary v4 from the parameter", node)
    assert list(vocabulary[-1].queries) == ["a triangle"]
    bad_value = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=2.0)
    result = probe.call(SetParameters, "/clip_detector/set_parameters",
                        SetParameters.Request(parameters=[Parameter(name="score_threshold",
                                                                    value=bad_value)]))
    assert not result.results[0].successful
    assert "score_threshold" in result.results[0].reason

    # Frames after the swaps carry the newest version.
    publish_until(camera, frame, lambda: front, 60, "detections after the swaps", node)
    assert front[-1].vocabulary_version == 4
    assert {d.query for d in front[-1].detections} <= {"a triangle"}
