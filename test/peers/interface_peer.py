"""A separate ROS process for test_dds_interfaces: publishes a DetectionArray on
`peer/detections` until stopped and serves `peer/set_queries`, answering with the queries it
was sent, a version equal to their count, and success=false for an empty request."""

import contextlib

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.qos import QoSProfile, ReliabilityPolicy

from clip_perception.msg import Detection, DetectionArray
from clip_perception.srv import SetQueries


def handle_set_queries(request: SetQueries.Request,
                       response: SetQueries.Response) -> SetQueries.Response:
    response.success = bool(request.queries)
    response.message = "ok" if request.queries else "queries must not be empty"
    response.vocabulary_version = len(request.queries)
    response.active_queries = list(request.queries)
    return response


def main() -> None:
    rclpy.init()
    node = rclpy.create_node("interface_peer")
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
    publisher = node.create_publisher(DetectionArray, "peer/detections", qos)
    node.create_service(SetQueries, "peer/set_queries", handle_set_queries)

    def publish() -> None:
        msg = DetectionArray(vocabulary_version=7, image_width=640, image_height=480)
        msg.header.frame_id = "peer_camera"
        msg.header.stamp.sec = 123
        msg.header.stamp.nanosec = 456
        msg.detections = [Detection(query="a red mug", query_index=2, score=0.75,
                                    center_x=100.5, center_y=200.25, size_x=30.0, size_y=40.0)]
        publisher.publish(msg)

    node.create_timer(0.05, publish)
    with contextlib.suppress(KeyboardInterrupt, ExternalShutdownException):
        rclpy.spin(node)


if __name__ == "__main__":
    main()
