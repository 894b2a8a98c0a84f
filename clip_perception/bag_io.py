"""rosbag2 files without a ROS installation (the rosbags library): read camera frames,
write frames and detections (mcap storage).

Used by ``clip-perception replay`` (a recorded bag becomes a regression test), by the test
data and demo bag scripts, and by tests. Message definitions of our own types are read from
the package's msg/ files, so bags written here carry the same types the nodes publish.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from clip_perception.detections import Detections

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
DETECTION_ARRAY = "clip_perception/msg/DetectionArray"


def _msg_dir() -> Path:
    """msg/ of this package: beside the sources (checkout, symlink install) or in share/."""
    here = Path(__file__).resolve().parents[1] / "msg"
    if here.is_dir():
        return here
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        share = Path(prefix) / "share" / "clip_perception" / "msg"
        if share.is_dir():
            return share
    raise FileNotFoundError("clip_perception msg/ definitions not found: build the package "
                            "(scripts/setup) or run from a checkout")


def typestore() -> Typestore:
    """ROS 2 Jazzy's types plus clip_perception's messages."""
    store = get_typestore(Stores.ROS2_JAZZY)
    types: dict[str, Any] = {}
    for path in sorted(_msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"clip_perception/msg/{path.stem}"))
    store.register(types)
    return store


@dataclass(frozen=True)
class BagFrame:
    """One camera message from a bag: ``msg`` has the fields of sensor_msgs/Image or
    CompressedImage (``header``, ``data``, ...), so the image converters take it as is."""

    topic: str
    timestamp_ns: int  # bag receive time
    msgtype: str
    msg: Any


def read_frames(path: str | Path, topics: Sequence[str] | None = None,
                store: Typestore | None = None) -> Iterator[BagFrame]:
    """Image and CompressedImage messages of ``path`` in time order (all image topics when
    ``topics`` is None). Raises ValueError naming the problem for unreadable bags."""
    store = store or typestore()
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such bag")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as error:  # rosbags raises several types; the user needs one line
        raise ValueError(f"{path}: not a readable rosbag2 bag ({error})") from error
    try:
        connections = [c for c in reader.connections if c.msgtype in (IMAGE, COMPRESSED)
                       and (topics is None or c.topic in topics)]
        missing = set(topics or ()) - {c.topic for c in connections}
        if missing:
            raise ValueError(f"{path}: no image topic(s) {', '.join(sorted(missing))}; "
                             f"it has {', '.join(sorted({c.topic for c in reader.connections}))}")
        for connection, timestamp, raw in reader.messages(connections=connections):
            yield BagFrame(connection.topic, timestamp, connection.msgtype,
                           store.deserialize_cdr(raw, connection.msgtype))
    finally:
        reader.close()


class BagWriter:
    """Writes images and detections to a new mcap rosbag2 folder (a context manager)."""

    def __init__(self, path: str | Path, store: Typestore | None = None) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise ValueError(f"{self.path} exists: rosbag2 writes a new folder")
        self.store = store or typestore()
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._connections: dict[str, Any] = {}

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()

    def _connection(self, topic: str, msgtype: str) -> Any:
        if topic not in self._connections:
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self.store)
        return self._connections[topic]

    def write(self, topic: str, msgtype: str, timestamp_ns: int, msg: Any) -> None:
        """Write a message object of this writer's typestore."""
        self.write_cdr(topic, msgtype, timestamp_ns, self.store.serialize_cdr(msg, msgtype))

    def write_cdr(self, topic: str, msgtype: str, timestamp_ns: int, data: bytes) -> None:
        """Write an already serialised message (e.g. rclpy's ``serialize_message``)."""
        self._writer.write(self._connection(topic, msgtype), timestamp_ns, data)

    def header(self, sec: int, nanosec: int, frame_id: str) -> Any:
        types = self.store.types
        return types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
            frame_id=frame_id)

    def write_image(self, topic: str, timestamp_ns: int, header: Any, rgb: np.ndarray,
                    encoding: str = "rgb8") -> None:
        """An (H, W, 3) uint8 image as sensor_msgs/Image (rgb8 or bgr8)."""
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
        pixels = rgb[..., ::-1] if encoding == "bgr8" else rgb  # (H, W, 3)
        height, width = rgb.shape[:2]
        msg = self.store.types[IMAGE](
            header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
            step=width * 3, data=np.ascontiguousarray(pixels).reshape(-1))  # (H*W*3,)
        self.write(topic, IMAGE, timestamp_ns, msg)

    def write_compressed(self, topic: str, timestamp_ns: int, header: Any, data: bytes,
                         fmt: str = "jpeg") -> None:
        """Encoded image bytes as sensor_msgs/CompressedImage (``fmt``: jpeg or png)."""
        msg = self.store.types[COMPRESSED](
            header=header, format=fmt, data=np.frombuffer(data, dtype=np.uint8))
        self.write(topic, COMPRESSED, timestamp_ns, msg)

    def write_detections(self, topic: str, timestamp_ns: int, header: Any,
                         result: Detections) -> None:
        """``result`` as clip_perception/msg/DetectionArray (centre/size boxes in pixels)."""
        types = self.store.types
        detections = [
            types["clip_perception/msg/Detection"](
                query=label, query_index=int(q), score=float(s), center_x=float(b[0]),
                center_y=float(b[1]), size_x=float(b[2]), size_y=float(b[3]))
            for label, q, s, b in zip(result.labels, result.query_indices, result.scores,
                                      result.center_size(), strict=True)]
        height, width = result.image_size
        msg = types[DETECTION_ARRAY](
            header=header, vocabulary_version=result.vocabulary_version,
            image_width=width, image_height=height, detections=detections)
        self.write(topic, DETECTION_ARRAY, timestamp_ns, msg)
