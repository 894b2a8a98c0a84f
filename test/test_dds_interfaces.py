"""Two processes exchange our messages over real DDS, and a service call crosses them."""

import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy

from clip_perception.msg import DetectionArray
from clip_perception.srv import SetQueries


def spin_until(executor, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
        if predicate():
            return True
    return False


def test_detection_array_and_set_queries_cross_processes(ros_context, start_peer):
    peer = start_peer("interface_peer")
    node = rclpy.create_node("interface_test", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    received: list[DetectionArray] = []
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
    node.create_subscription(DetectionArray, "peer/detections", received.append, qos)
    try:
        assert spin_until(executor, lambda: received, timeout=30), (
            "no DetectionArray from the peer process")
        msg = received[0]
        assert msg.header.frame_id == "peer_camera"
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (123, 456)
        assert (msg.vocabulary_version, msg.image_width, msg.image_height) == (7, 640, 480)
        assert len(msg.detections) == 1
        det = msg.detections[0]
        assert (det.query, det.query_index) == ("a red mug", 2)
        assert (det.score, det.center_x, det.center_y, det.size_x, det.size_y) == (
            0.75, 100.5, 200.25, 30.0, 40.0)

        client = node.create_client(SetQueries, "peer/set_queries")
        assert client.wait_for_service(timeout_sec=20)
        future = client.call_async(SetQueries.Request(queries=["a mug", "a person"]))
        assert spin_until(executor, future.done, timeout=20)
        response = future.result()
        assert response.success
        assert response.vocabulary_version == 2
        assert list(response.active_queries) == ["a mug", "a person"]

        future = client.call_async(SetQueries.Request(queries=[]))
        assert spin_until(executor, future.done, timeout=20)
        assert not future.result().success
        assert future.result().message == "queries must not be empty"
    finally:
        executor.shutdown()
        node.destroy_node()
        assert peer.poll() is None, peer.stdout.read()
