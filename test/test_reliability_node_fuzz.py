"""Malformed images and vocabulary requests sent to a running detector_node over DDS: it stays
up, answers every request (success with the normalised queries, or success=false with a
reason and the vocabulary unchanged) and keeps publishing correct detections for the good
frames that follow, while it accounts for every frame in /diagnostics.

Hypothesis runs the "node_fuzz" profile (100 images, 80 requests: each case is a round trip
through DDS); HYPOTHESIS_PROFILE=long selects "node_fuzz_long" (20x as many).
"""

from __future__ import annotations

import array
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from engine_fixtures import random_image, tiny_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from reliability_fixtures import BEST_EFFORT, RELIABLE, accounted_for, latest_values
from ros_harness import NodeProcess, Probe, publish_until, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from test_reliability_requests import (
    LONG,
    TEMPLATE_TEXT,
    TEXT,
    expected_queries,
    expected_template_count,
    expected_thresholds,
)

from clip_perception.detector import OpenVocabDetector, load_detector
from clip_perception.image_messages import SUPPORTED_ENCODINGS, ImageConversionError, image_to_rgb
from clip_perception.msg import DetectionArray, Vocabulary
from clip_perception.ros import params as P
from clip_perception.srv import SetQueries

settings.register_profile("node_fuzz", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("node_fuzz_long", settings.get_profile("node_fuzz"),
                          max_examples=2_000)
FUZZ = settings.get_profile(
    "node_fuzz_long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "node_fuzz")
QUERIES = ["red", "blue"]
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
GOOD = random_image(40, 60, 9)  # (40, 60, 3)


class Running:
    """One node for the whole module (each case is a round trip, not a restart)."""

    def __init__(self, model: Path, folder: Path, context: Any) -> None:
        self.node = NodeProcess("detector_node", {
            "model": str(model), "device": "cpu", "image_topics": ["/fuzz"],
            "queries": QUERIES, "score_threshold": 0.0, "max_detections": 10}, folder)
        self.probe = Probe(context)
        self.results = self.probe.collect(DetectionArray, "/fuzz/detections", RELIABLE)
        self.vocabulary = self.probe.collect(Vocabulary, "/clip_detector/vocabulary", LATCHED)
        self.diagnostics = self.probe.collect(DiagnosticArray, "/diagnostics")
        self.camera = self.probe.node.create_publisher(Image, "/fuzz", BEST_EFFORT)
        self.service = self.probe.node.create_client(SetQueries, "/clip_detector/set_queries")
        wait_for(lambda: self.vocabulary, 60, "the start-up vocabulary", self.node)
        wait_for(lambda: self.camera.get_subscription_count(), 30, "the subscription",
                 self.node)
        assert self.service.wait_for_service(timeout_sec=30)
        self.next_stamp = 1
        self.bad_sent = 0  # malformed frames published
        self.decodable_sent = 0  # fuzzed frames that happened to be well-formed
        self.good_sent = 0  # good frames whose detections came back

    def stamp(self) -> Header:
        self.next_stamp += 1
        return Header(stamp=Time(sec=5, nanosec=self.next_stamp), frame_id="fuzz")

    def good_frame_round_trip(self) -> DetectionArray:
        """Publish a good frame until its detections come back; return them."""
        msg = Image(header=self.stamp(), height=40, width=60, encoding="rgb8", step=180,
                    data=array.array("B", GOOD.tobytes()))
        nanosec = msg.header.stamp.nanosec
        found = lambda: [m for m in self.results if m.header.stamp.nanosec == nanosec]  # noqa: E731
        publish_until(self.camera, msg, found, 30, "detections for a good frame", self.node)
        self.good_sent += 1
        return found()[0]

    def call(self, request: SetQueries.Request) -> SetQueries.Response:
        future = self.service.call_async(request)
        deadline = time.monotonic() + 60
        while not future.done():
            assert time.monotonic() < deadline and self.node.alive(), self.node.output()
            time.sleep(0.005)
        return future.result()


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("owl"), "v1").path


@pytest.fixture(scope="module")
def running(owl_dir, tmp_path_factory) -> Iterator[Running]:
    context = rclpy.Context()  # the module's own: the node outlives single tests
    rclpy.init(context=context)
    state = Running(owl_dir, tmp_path_factory.mktemp("node"), context)
    yield state
    state.probe.close()
    code = state.node.stop()
    rclpy.shutdown(context=context)
    assert code == 0, state.node.output()


@pytest.fixture(scope="module")
def engine(owl_dir) -> Iterator[OpenVocabDetector]:
    detector = load_detector(owl_dir, device="cpu", score_threshold=0.0, max_detections=10)
    yield detector
    detector.close()


def malformed_images() -> st.SearchStrategy[Image]:
    """Any field values: unknown and known encodings, sizes from 0 to 2^32 - 1, steps that
    do not match, too little or too much data, odd endianness."""
    sizes = st.one_of(st.integers(0, 80), st.sampled_from([2**31 - 1, 2**32 - 1, 65535]))
    return st.builds(
        lambda encoding, height, width, step, bigendian, data: Image(
            height=height, width=width, encoding=encoding, is_bigendian=bigendian,
            step=step, data=array.array("B", data)),
        st.one_of(st.sampled_from(sorted(SUPPORTED_ENCODINGS)),
                  st.text(st.characters(codec="ascii", exclude_characters="\x00"),
                          max_size=12)),
        sizes, sizes, st.one_of(st.integers(0, 400), st.integers(0, 2**32 - 1)),
        st.integers(0, 1), st.binary(max_size=20_000))


def decodes(msg: Image) -> bool:
    try:
        image_to_rgb(msg)
    except ImageConversionError:
        return False
    return True


@settings(FUZZ)
@given(malformed_images())
def test_malformed_images_then_good_frames(running, engine, bad):
    if engine.vocabulary is None:
        engine.set_queries(QUERIES)
    bad.header = running.stamp()
    valid = decodes(bad)
    event("decodes" if valid else "malformed")
    running.bad_sent += not valid
    running.decodable_sent += valid
    running.camera.publish(bad)
    # Let the node take the bad frame before the good one replaces it in its depth-1 queue,
    # so that the decoder sees it (a replaced frame would only be counted as lost).
    time.sleep(0.03)
    got = running.good_frame_round_trip()
    expected = engine.detect([GOOD])[0]
    assert got.vocabulary_version == 1
    assert [d.query for d in got.detections] == expected.labels
    np.testing.assert_allclose([d.score for d in got.detections], expected.scores, atol=1e-5)
    boxes = np.array([[d.center_x, d.center_y, d.size_x, d.size_y] for d in got.detections])
    np.testing.assert_allclose(boxes, expected.center_size(), atol=1e-3)


def test_every_frame_is_accounted_for(running):
    """Runs after the image fuzz: received = dropped + malformed + failed + published."""
    since = running.probe.node.get_clock().now().to_msg()

    def values() -> dict[str, str]:  # from diagnostics made after every frame was sent
        return latest_values(running.diagnostics, "camera /fuzz", since)

    wait_for(lambda: accounted_for(values()), 30, "diagnostics accounting for every frame",
             running.node)
    v = values()
    sent = running.bad_sent + running.good_sent + running.decodable_sent
    assert int(v["frames_published"]) >= running.good_sent
    assert int(v["frames_malformed"]) <= running.bad_sent
    # Nothing vanishes: a frame is received or counted as lost (the last one sent, a good
    # frame, was received, so sequence gaps cover every loss before it). Re-sent good
    # frames (publish_until) count as sent too, hence >=.
    assert int(v["frames_received"]) + int(v["frames_lost_before_node"]) >= sent
    # Most bad frames really reached the decoder (the rest were replaced while queued).
    assert int(v["frames_malformed"]) >= 0.5 * running.bad_sent
    assert int(v["frames_failed"]) == 0
    assert running.node.alive() and "Traceback" not in running.node.output()


def ros_safe(text: str) -> str:
    """What a ROS string can carry: no NUL (C strings end there), no lone surrogates."""
    return "".join(c for c in text if c != "\x00" and not 0xD800 <= ord(c) <= 0xDFFF)


DDS_TEXT = st.one_of(TEXT, LONG).map(ros_safe)
FLOAT32 = st.floats(width=32)  # NaN, infinities, negatives, > 1 and [0, 1] alike


@st.composite
def service_requests(draw: st.DrawFn) -> SetQueries.Request:
    """A well-formed request, then as often as not one part replaced by anything at all."""
    queries = draw(st.lists(TEXT.map(ros_safe).filter(str.strip), min_size=1, max_size=6,
                            unique_by=lambda q: " ".join(q.split()).casefold()))
    thresholds = draw(st.one_of(st.just([]), st.lists(
        st.floats(0, 1, width=32), min_size=len(queries), max_size=len(queries))))
    templates = draw(st.one_of(st.just([]), st.just(["clip7"]), st.lists(
        st.builds(lambda a, b: ros_safe(f"{a}{{}}{b}"), TEXT, TEXT), min_size=1, max_size=3)))
    broken = draw(st.sampled_from(["nothing", "queries", "thresholds", "templates"]))
    if broken == "queries":
        queries = draw(st.lists(DDS_TEXT, max_size=6))
    elif broken == "thresholds":
        thresholds = draw(st.lists(FLOAT32, max_size=7))
    elif broken == "templates":
        templates = draw(st.one_of(st.sampled_from([["clip80"], ["nope"], ["CLIP7"]]),
                                   st.lists(TEMPLATE_TEXT.map(ros_safe), max_size=3)))
    return SetQueries.Request(queries=queries, thresholds=thresholds, templates=templates)


def expected_outcome(request: SetQueries.Request) -> tuple[str, ...] | None:
    """The normalised queries a request must produce, or None when it must be rejected."""
    queries, templates = list(request.queries), list(request.templates)
    cleaned = expected_queries(queries)
    if cleaned is None or P.vocabulary_limits_problem(queries, templates) is not None:
        return None
    thresholds = [float(t) for t in request.thresholds] or None
    if expected_thresholds(thresholds, len(cleaned)) is None:
        return None
    if expected_template_count(P.template_setting(templates)) is None:
        return None
    return cleaned


@settings(FUZZ, max_examples=int(FUZZ.max_examples * 0.8))
@given(service_requests())
def test_random_requests_over_dds(running, sent):
    before = running.vocabulary[-1]
    cleaned = expected_outcome(sent)
    event("accepted" if cleaned is not None else "rejected")
    response = running.call(sent)
    assert response.message.strip() and len(response.message) < 2000
    if cleaned is None:
        assert not response.success, response
        assert response.vocabulary_version == before.version
    else:
        assert response.success, response.message
        assert response.vocabulary_version == before.version + 1
        assert tuple(response.active_queries) == cleaned
        wait_for(lambda: running.vocabulary[-1].version == response.vocabulary_version, 30,
                 "the new vocabulary on ~/vocabulary", running.node)
    current = running.vocabulary[-1]
    got = running.good_frame_round_trip()
    assert got.vocabulary_version == current.version
    assert {d.query for d in got.detections} <= set(current.queries)


def test_thousands_of_queries_over_dds_then_too_many(running):
    queries = [f"query {i}" for i in range(3000)]
    response = running.call(SetQueries.Request(queries=queries))
    assert response.success and list(response.active_queries) == queries, response.message
    too_many = [f"query {i}" for i in range(P.MAX_QUERIES + 1)]
    rejected = running.call(SetQueries.Request(queries=too_many))
    assert not rejected.success and "at most" in rejected.message
    assert rejected.vocabulary_version == response.vocabulary_version
    got = running.good_frame_round_trip()
    assert got.vocabulary_version == response.vocabulary_version
