"""Camera inputs of a perception node: subscriptions, QoS, incompatible-QoS reports, decoding.

Subscription callbacks only store the message in the camera's depth-1 slot (no decoding, no
copies), so they never wait for inference; the worker decodes when it takes the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from rclpy.callback_groups import CallbackGroup
from rclpy.event_handler import QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from clip_perception.image_messages import compressed_to_rgb, image_to_rgb
from clip_perception.ros.frame_slots import FrameSlots
from clip_perception.ros.stats import RollingWindow

UNNUMBERED = 2**63  # RMW_MESSAGE_INFO_SEQUENCE_NUMBER_UNSUPPORTED is 2^64 - 1
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT,
               "reliable": ReliabilityPolicy.RELIABLE}


@dataclass
class Camera:
    """One input topic and what the node knows about it."""

    index: int
    topic: str  # fully resolved input topic (after remapping), e.g. /camera/image_raw
    compressed: bool
    incompatible_qos: int = 0  # publishers we cannot hear because of their QoS
    bad_frames: int = 0  # messages that could not be decoded
    failed: int = 0  # frames lost to a failed inference (or taken before any vocabulary)
    published: int = 0  # frames whose results were published
    annotated: int = 0  # annotated images published (drawn only while subscribed)
    received: RollingWindow = field(default_factory=RollingWindow)
    processed: RollingWindow = field(default_factory=RollingWindow)
    latency_ms: RollingWindow = field(default_factory=RollingWindow)

    @property
    def input_topic(self) -> str:
        return f"{self.topic}/compressed" if self.compressed else self.topic

    def output(self, suffix: str) -> str:
        """Output topics hang off the camera topic: <topic>/detections, ..."""
        return f"{self.topic}/{suffix}"


@dataclass(frozen=True)
class Frame:
    """A decoded frame ready for the engine."""

    camera: Camera
    header: Header
    rgb: np.ndarray  # (H, W, 3) uint8
    received_at: float


def decode(msg: Image | CompressedImage) -> np.ndarray:
    """Image or CompressedImage -> (H, W, 3) uint8 RGB; ImageConversionError when malformed."""
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg)
    return image_to_rgb(msg)


def sensor_qos(reliability: str) -> QoSProfile:
    # Depth 1: the node keeps only the newest frame anyway (latest-frame policy).
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                      reliability=RELIABILITY[reliability])


def subscribe_cameras(node: Node, topics: list[str], compressed: bool, reliability: str,
                      slots: FrameSlots, group: CallbackGroup) -> list[Camera]:
    """Subscribe every topic; frames go to ``slots``; QoS mismatches are reported, not silent."""
    cameras = []
    for index, topic in enumerate(topics):
        camera = Camera(index=index, topic=node.resolve_topic_name(topic),
                        compressed=compressed)

        def on_frame(msg, info: dict, camera=camera) -> None:
            camera.received.add()
            sequence = info.get("publication_sequence_number")
            # Middlewares that do not number samples report None or the all-ones sentinel.
            slots.put(camera.index, msg, sequence if sequence is not None and (
                sequence < UNNUMBERED) else None)

        def on_incompatible(event: QoSRequestedIncompatibleQoSInfo,
                            camera=camera) -> None:
            camera.incompatible_qos = event.total_count
            node.get_logger().warning(
                f"a publisher on {camera.input_topic} has QoS incompatible with this node's "
                f"{reliability} subscription (policy {event.last_policy_kind}); its frames "
                "are not received. Set qos_reliability to match the camera.")

        node.create_subscription(
            CompressedImage if compressed else Image, camera.input_topic, on_frame,
            sensor_qos(reliability), callback_group=group,
            event_callbacks=SubscriptionEventCallbacks(incompatible_qos=on_incompatible))
        cameras.append(camera)
    return cameras
