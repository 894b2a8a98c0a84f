"""detector_node's inputs and side outputs, as a real process over DDS: every image encoding
(with padded rows), malformed messages, compressed transport, the annotated image, the
exemplar service, diagnostics, incompatible QoS and start-up failures."""

from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from engine_fixtures import random_image, tiny_checkpoint
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import NodeProcess, Probe, executable, publish_until, wait_for
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from test_image_messages import W, encode, make_msg

from clip_perception.detector import load_detector
from clip_perception.image_messages import SUPPORTED_ENCODINGS, compressed_to_rgb, image_to_rgb
from clip_perception.msg import DetectionArray
from clip_perception.srv import SetImageQuery

QUERIES = ["red", "blue"]
BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("owl"), "v1").path


@pytest.fixture(scope="module")
def engine(owl_dir):
    detector = load_detector(owl_dir, device="cpu", score_threshold=0.0, max_detections=10)
    detector.set_queries(QUERIES)
    yield detector
    detector.close()


def start(owl_dir, folder, ros_context, **params):
    settings = {"model": str(owl_dir), "device": "cpu", "image_topics": ["/cam"],
                "queries": QUERIES, "score_threshold": 0.0, "max_detections": 10, **params}
    return NodeProcess("detector_node", settings, folder), Probe(ros_context)


def stamp(i: int) -> Header:
    return Header(stamp=Time(sec=7, nanosec=i), frame_id="cam")


def ros_image(msg, header: Header) -> Image:
    return Image(header=header, height=msg.height, width=msg.width, encoding=msg.encoding,
                 is_bigendian=msg.is_bigendian, step=msg.step, data=msg.data)


def detections_for(bucket, i):
    return [m for m in bucket if m.header.stamp.nanosec == i]


def assert_same(msg: DetectionArray, expected) -> None:
    boxes = np.array([[d.center_x, d.center_y, d.size_x, d.size_y] for d in msg.detections])
    assert len(msg.detections) == len(expected) > 0
    np.testing.assert_allclose(boxes, expected.center_size(), atol=1e-3)
    np.testing.assert_allclose([d.score for d in msg.detections], expected.scores, atol=1e-5)


def test_every_encoding_malformed_frames_annotation_and_diagnostics(owl_dir, engine, tmp_path,
                                                                    ros_context):
    node, probe = start(owl_dir, tmp_path, ros_context)
    try:
        results = probe.collect(DetectionArray, "/cam/detections", RELIABLE)
        diagnostics = probe.collect(DiagnosticArray, "/diagnostics")
        camera = probe.node.create_publisher(Image, "/cam", BEST_EFFORT)
        wait_for(lambda: camera.get_subscription_count(), 60, "the node's subscription", node)

        # Every supported encoding, rows padded with garbage, big-endian where it matters.
        for i, encoding in enumerate(sorted(SUPPORTED_ENCODINGS), start=1):
            payload, _, _ = encode(encoding, bigendian=encoding.endswith("16"))
            msg = make_msg(encoding, payload, W, pad=5, bigendian=encoding.endswith("16"))
            publish_until(camera, ros_image(msg, stamp(i)), lambda i=i: detections_for(results, i),
                          30, f"detections for {encoding}", node)
            assert_same(detections_for(results, i)[0], engine.detect([image_to_rgb(msg)])[0])

        # Malformed messages are dropped and counted; the node keeps serving good frames.
        # Each bad frame is given time to be taken by the worker (diagnostics count it)
        # before the next frame could replace it in the latest-frame slot.
        def camera_values():
            statuses = [s for a in diagnostics for s in a.status if s.hardware_id == "/cam"]
            return {kv.key: kv.value for kv in statuses[-1].values} if statuses else {}

        good = make_msg("rgb8", random_image(40, 60, 3).reshape(40, -1), 60)
        bad_frames = [
            Image(header=stamp(900), height=40, width=60, encoding="rgb8", step=180,
                  data=b"\x00" * 100),
            Image(header=stamp(901), height=4, width=4, encoding="rgb42", step=12,
                  data=b"\x00" * 48),
            Image(header=stamp(902), height=0, width=0, encoding="rgb8", step=0)]
        for count, bad in enumerate(bad_frames, start=1):
            camera.publish(bad)
            wait_for(lambda c=count: camera_values().get("frames_malformed") == str(c), 10,
                     f"diagnostics counting {count} malformed frame(s)", node)
            n = 1000 + count
            publish_until(camera, ros_image(good, stamp(n)),
                          lambda n=n: detections_for(results, n), 30,
                          "a good frame after a bad one", node)
        assert not [m for m in results if 900 <= m.header.stamp.nanosec <= 902]
        assert "dropped a malformed frame from /cam" in node.output()

        # The annotated image is drawn only while someone subscribes.
        assert camera_values()["annotated_images_published"] == "0"
        annotated = probe.collect(Image, "/cam/detections/image", RELIABLE)
        frame_ids = iter(range(2000, 10**6))

        def publish_until_annotated() -> bool:
            # The node draws once it has discovered this subscriber; keep feeding frames.
            camera.publish(ros_image(good, stamp(next(frame_ids))))
            return bool(annotated)

        wait_for(publish_until_annotated, 30, "an annotated image", node)
        image = annotated[0]
        assert (image.width, image.height, image.encoding) == (60, 40, "rgb8")
        assert image.header.frame_id == "cam" and image.header.stamp.sec == 7
        assert not np.array_equal(np.frombuffer(bytes(image.data), np.uint8).reshape(40, 60, 3),
                                  image_to_rgb(good))  # boxes were drawn

        # Diagnostics: per camera and for the engine.
        wait_for(lambda: int(camera_values().get("annotated_images_published", 0)) > 0, 10,
                 "diagnostics counting annotated images", node)
        values = camera_values()
        for key in ("input_rate_hz", "processed_rate_hz", "frames_received",
                    "frames_dropped_latest_only", "latency_ms_p50", "latency_ms_p95"):
            assert key in values, key
        assert int(values["frames_received"]) >= len(SUPPORTED_ENCODINGS) + 6
        engine_status = [s for a in diagnostics for s in a.status
                         if s.name.endswith(": engine")][-1]
        engine_values = {kv.key: kv.value for kv in engine_status.values}
        assert engine_values["device"] == "cpu" and engine_values["precision"] == "fp32"
        assert engine_values["vocabulary_size"] == "2"
        assert float(engine_values["inference_ms_p50"]) > 0
        # Every good frame was inferred in some batch: the totals count them all.
        assert 1 <= int(engine_values["inference_batches"]) <= int(values["frames_received"])
        assert float(engine_values["inference_ms_total"]) >= float(
            engine_values["inference_ms_p50"])
    finally:
        probe.close()
        assert node.stop() == 0, node.output()


def test_compressed_transport_and_image_query_service(owl_dir, engine, tmp_path, ros_context):
    node, probe = start(owl_dir, tmp_path, ros_context, image_transport="compressed")
    try:
        results = probe.collect(DetectionArray, "/cam/detections", RELIABLE)
        camera = probe.node.create_publisher(CompressedImage, "/cam/compressed", BEST_EFFORT)
        wait_for(lambda: camera.get_subscription_count(), 60, "the node's subscription", node)
        rgb = random_image(48, 64, 5)
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        msg = CompressedImage(header=stamp(1), format="png", data=png.tobytes())
        publish_until(camera, msg, lambda: detections_for(results, 1), 30,
                      "detections from a PNG frame", node)
        assert_same(detections_for(results, 1)[0], engine.detect([compressed_to_rgb(msg)])[0])

        exemplar = make_msg("rgb8", rgb.reshape(48, -1), 64)
        request = SetImageQuery.Request(label="my thing", image=ros_image(exemplar, stamp(2)),
                                        x_min=8.0, y_min=8.0, x_max=40.0, y_max=40.0,
                                        append=True)
        response = probe.call(SetImageQuery, "/clip_detector/set_image_query", request)
        assert response.success, response.message
        assert response.vocabulary_version == 2
        bad = SetImageQuery.Request(label="x", image=Image(encoding="rgb42", width=2, height=2))
        response = probe.call(SetImageQuery, "/clip_detector/set_image_query", bad)
        assert not response.success and "exemplar image" in response.message
        bad_box = SetImageQuery.Request(label="x", image=ros_image(exemplar, stamp(3)),
                                        x_min=10.0, y_min=10.0, x_max=5.0, y_max=20.0)
        response = probe.call(SetImageQuery, "/clip_detector/set_image_query", bad_box)
        assert not response.success and "box" in response.message
        assert response.vocabulary_version == 2

        again = CompressedImage(header=stamp(4), format="png", data=png.tobytes())
        publish_until(camera, again, lambda: detections_for(results, 4), 30,
                      "detections after the exemplar", node)
        assert detections_for(results, 4)[0].vocabulary_version == 2
    finally:
        probe.close()
        assert node.stop() == 0, node.output()


def test_incompatible_qos_is_reported(owl_dir, tmp_path, ros_context):
    node, probe = start(owl_dir, tmp_path, ros_context, qos_reliability="reliable")
    try:
        # A best-effort camera cannot feed a reliable subscription: DDS delivers nothing.
        camera = probe.node.create_publisher(Image, "/cam", BEST_EFFORT)
        wait_for(lambda: "incompatible" in node.output(), 60, "the QoS warning", node)
        assert camera.get_subscription_count() == 0
    finally:
        probe.close()
        assert node.stop() == 0, node.output()


@pytest.mark.parametrize("model", ["/nonexistent/model", "__file__"])
def test_broken_model_is_one_clear_error_line(model, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    if model == "__file__":
        (folder / "config.json").write_text("{not json")
        model = str(folder)
    params = tmp_path / "params.yaml"
    params.write_text(f"/**:\n  ros__parameters:\n    model: '{model}'\n    device: cpu\n")
    result = subprocess.run([str(executable("detector_node")), "--ros-args", "--params-file",
                             str(params)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and model in errors[0], result.stderr
