"""A running detector_node under churn, as real processes over DDS: a vocabulary storm (200
swaps through the service, the topic and the parameter at once) while four cameras stream,
a camera that stops and restarts, and subscribers that come and go, all without restarting
the node."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from engine_fixtures import tiny_checkpoint
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from reliability_fixtures import RELIABLE, CameraStreamer, accounted_for, latest_values
from ros_harness import NodeProcess, Probe, call_service, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import String

from clip_perception.msg import DetectionArray, Vocabulary
from clip_perception.srv import SetQueries

SWAPS = 200
TOPICS = [f"/storm{i}/image_raw" for i in range(4)]
WORDS = ["mug", "person", "forklift", "pallet", "door", "cable", "box", "cart", "helmet"]
# Every ~/vocabulary message ever published, in order (deep, so a burst loses nothing here).
VOCABULARY_LOG = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
CALL_TIMEOUT_S = 60.0  # a service that does not answer in this time is deadlocked


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("owl"), "v1").path


def start(owl_dir: Path, folder: Path, ros_context: Any, topics: list[str]):
    node = NodeProcess("detector_node", {
        "model": str(owl_dir), "device": "cpu", "image_topics": topics, "queries": ["mug"],
        "score_threshold": 0.0, "max_detections": 5, "max_batch": len(topics)}, folder)
    return node, Probe(ros_context)


def call(client: Any, request: Any) -> Any:
    return call_service(client, request, CALL_TIMEOUT_S)


def queries_parameter(queries: list[str]) -> SetParameters.Request:
    value = ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY,
                           string_array_value=queries)
    return SetParameters.Request(parameters=[Parameter(name="queries", value=value)])


def storm_plan(seed: int) -> dict[str, list[list[str]]]:
    """SWAPS vocabularies dealt to the three channels; words repeat, so some swaps hit the
    embedding cache (the fastest, most race-prone path) and one in ten is invalid."""
    rng = random.Random(seed)
    plan: dict[str, list[list[str]]] = {"service": [], "topic": [], "parameter": []}
    for _ in range(SWAPS):
        queries = rng.sample(WORDS, rng.randint(1, 4))
        if rng.random() < 0.1:
            queries = queries[:1] * 2  # duplicate: rejected, vocabulary unchanged
        plan[rng.choice(list(plan))].append(queries)
    return plan


def test_vocabulary_storm_while_four_cameras_stream(owl_dir, tmp_path, ros_context):
    node, probe = start(owl_dir, tmp_path, ros_context, TOPICS)
    cameras = CameraStreamer(probe.node, TOPICS, 30.0)
    try:
        published = probe.collect(Vocabulary, "/clip_detector/vocabulary", VOCABULARY_LOG)
        results = [probe.collect(DetectionArray, f"{t}/detections", RELIABLE) for t in TOPICS]
        service = probe.node.create_client(SetQueries, "/clip_detector/set_queries")
        parameters = probe.node.create_client(SetParameters, "/clip_detector/set_parameters")
        topic = probe.node.create_publisher(String, "/clip_detector/queries", RELIABLE)
        wait_for(lambda: published, 60, "the start-up vocabulary", node)
        assert service.wait_for_service(timeout_sec=30)
        assert parameters.wait_for_service(timeout_sec=30)
        wait_for(lambda: topic.get_subscription_count(), 30, "the ~/queries subscription", node)
        wait_for(lambda: all(p.get_subscription_count() for p in cameras.publishers), 30,
                 "the camera subscriptions", node)
        cameras.start()

        plan = storm_plan(seed=7)
        outcomes: dict[str, list[Any]] = {k: [] for k in plan}
        senders = {
            "service": lambda q: call(service, SetQueries.Request(queries=q)),
            "parameter": lambda q: call(parameters, queries_parameter(q)).results[0],
            "topic": lambda q: topic.publish(String(data=", ".join(q))),
        }

        def send_all(channel: str) -> None:
            for queries in plan[channel]:
                outcomes[channel].append(senders[channel](queries))
                time.sleep(0.01)  # a storm, yet every channel interleaves with the others

        threads = [threading.Thread(target=send_all, args=(c,)) for c in plan]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT_S * 5)
            assert not thread.is_alive(), "a sender is stuck: the node stopped answering"
        assert sum(len(o) for o in outcomes.values()) == SWAPS

        # Service answers: success naming the version made of the queries asked for (a later
        # swap may already be active), or a reason and no change.
        made = {v.version: list(v.queries) for v in published}
        for queries, response in zip(plan["service"], outcomes["service"], strict=True):
            if len(set(queries)) < len(queries):
                assert not response.success and "duplicate" in response.message
            else:
                assert response.success, response.message
                assert made.get(response.vocabulary_version) == queries, (queries, response)
                assert list(response.active_queries) == queries
        for queries, result in zip(plan["parameter"], outcomes["parameter"], strict=True):
            assert result.successful == (len(set(queries)) == len(queries)), result.reason

        # The topic's last message is applied last among the topic's; then one final swap
        # through the parameter (the asynchronous path) must be the vocabulary in effect.
        last_topic = plan["topic"][-1]
        if len(set(last_topic)) == len(last_topic):
            wait_for(lambda: any(list(v.queries) == last_topic for v in published), 60,
                     "the last ~/queries vocabulary", node)
        final = ["helmet", "final-check"]
        assert call(parameters, queries_parameter(final)).results[0].successful
        wait_for(lambda: list(published[-1].queries) == final, 60, "the final vocabulary", node)
        final_version = published[-1].version
        wait_for(lambda: all(r and r[-1].vocabulary_version == final_version for r in results),
                 60, "detections with the final vocabulary on every camera", node)
        check_versions(published, results)
        print(f"\nstorm: {SWAPS} swaps ({', '.join(f'{k} {len(v)}' for k, v in plan.items())})"
              f", {len(published)} versions announced, "
              f"{sum(len(r) for r in results)} DetectionArrays checked")
        assert node.alive(), node.output()
        assert "Traceback" not in node.output(), node.output()
    finally:
        cameras.stop()
        probe.close()
        assert node.stop() == 0, node.output()


def check_versions(published: list[Vocabulary], results: list[list[DetectionArray]]) -> None:
    versions = [v.version for v in published]
    assert versions == sorted(set(versions)), "~/vocabulary went back or repeated a version"
    assert versions == list(range(1, versions[-1] + 1)), "a version was never announced"
    queries = {v.version: set(v.queries) for v in published}
    for bucket in results:
        assert len(bucket) > 10, "a camera got (almost) no detections during the storm"
        for msg in bucket:
            assert msg.vocabulary_version in queries, msg.vocabulary_version
            assert {d.query for d in msg.detections} <= queries[msg.vocabulary_version]
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in bucket]
        assert stamps == sorted(stamps), "a camera's results went back in time"


def test_camera_restart_and_subscribers_that_come_and_go(owl_dir, tmp_path, ros_context):
    node, probe = start(owl_dir, tmp_path, ros_context, ["/cam"])
    camera = CameraStreamer(probe.node, ["/cam"], 30.0)
    try:
        diagnostics = probe.collect(DiagnosticArray, "/diagnostics")
        wait_for(lambda: camera.publishers[0].get_subscription_count(), 60,
                 "the camera subscription", node)
        first = probe.collect(DetectionArray, "/cam/detections", RELIABLE)
        camera.start()
        wait_for(lambda: len(first) >= 5, 60, "detections from the first camera run", node)

        # The driver exits: the node notices the silence in diagnostics and keeps running.
        camera.stop()
        probe.node.destroy_publisher(camera.publishers[0])
        wait_for(lambda: latest_values_message(diagnostics, "camera /cam").startswith(
            "no frames for"), 30, "diagnostics reporting the silent camera", node)

        # The driver restarts in a new process: here a context of its own, which is a new
        # DDS participant with a new writer whose sequence numbers start again at 1.
        driver_context = rclpy.Context()
        rclpy.init(context=driver_context)
        restarted = Probe(driver_context, name="restarted_camera")
        again = CameraStreamer(restarted.node, ["/cam"], 30.0)
        try:
            wait_for(lambda: again.publishers[0].get_subscription_count(), 30,
                     "the node matching the restarted camera", node)
            seen = len(first)
            again.start()
            wait_for(lambda: len(first) >= seen + 5, 60, "detections after the restart", node)
            wait_for(lambda: not latest_values_message(diagnostics, "camera /cam").startswith(
                "no frames"), 30, "diagnostics seeing the camera again", node)

            # A detections subscriber leaves and another comes: it is served at once.
            probe.node.destroy_subscription(
                next(s for s in probe.node.subscriptions if s.topic_name == "/cam/detections"))
            later = probe.collect(DetectionArray, "/cam/detections", RELIABLE)
            wait_for(lambda: len(later) >= 5, 60, "detections for a new subscriber", node)

            # The annotated image is drawn while someone watches, and only then.
            annotated = probe.collect(Image, "/cam/detections/image", RELIABLE)
            wait_for(lambda: len(annotated) >= 3, 60, "annotated images", node)
            probe.node.destroy_subscription(next(
                s for s in probe.node.subscriptions if s.topic_name == "/cam/detections/image"))
            drawn = annotated_count(diagnostics, node)
            settled = len(later) + 30  # ~1 s of frames after the subscriber left
            wait_for(lambda: len(later) >= settled, 60, "frames after the viewer left", node)
            stopped = annotated_count(diagnostics, node)
            more = len(later) + 30
            wait_for(lambda: len(later) >= more, 60, "more frames without a viewer", node)
            assert annotated_count(diagnostics, node) == stopped >= drawn
            back = probe.collect(Image, "/cam/detections/image", RELIABLE)
            wait_for(lambda: len(back) >= 3, 60, "annotated images for a returning viewer",
                     node)
            again.stop()
            # The new driver's sequence numbers restart at 1: no phantom losses from that.
            since = probe.node.get_clock().now().to_msg()
            wait_for(lambda: accounted_for(latest_values(diagnostics, "camera /cam", since)),
                     30, "diagnostics accounting for every frame", node)
            values = latest_values(diagnostics, "camera /cam", since)
            assert int(values["frames_received"]) + int(values["frames_lost_before_node"]) <= (
                camera.sent[0] + again.sent[0])
        finally:
            again.stop()
            restarted.close()
            rclpy.shutdown(context=driver_context)
        assert node.alive() and "Traceback" not in node.output(), node.output()
    finally:
        camera.stop()
        probe.close()
        assert node.stop() == 0, node.output()


def latest_values_message(diagnostics: list[DiagnosticArray], name_suffix: str) -> str:
    statuses = [s for a in list(diagnostics) for s in a.status if s.name.endswith(name_suffix)]
    return statuses[-1].message if statuses else ""


def annotated_count(diagnostics: list[DiagnosticArray], node: NodeProcess) -> int:
    """The node's count of annotated images, from a diagnostics message newer than now."""
    seen = len(diagnostics)
    wait_for(lambda: len(diagnostics) > seen + 1, 10, "fresh diagnostics", node)
    return int(latest_values(diagnostics, "camera /cam")["annotated_images_published"])
