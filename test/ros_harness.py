"""Running installed nodes as processes and talking to them over DDS, for the node tests.

``NodeProcess`` starts an executable from install/ with a parameters file (what
`ros2 run ... --ros-args --params-file` does; ros2cli itself is not installable here) and
keeps its output for failure messages. ``Probe`` is the test's own rclpy node with helpers
to publish, collect and call services while spinning.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
import yaml
from ament_index_python.packages import get_package_prefix
from builtin_interfaces.msg import Time
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import Header


def executable(name: str) -> Path:
    return Path(get_package_prefix("clip_perception")) / "lib" / "clip_perception" / name


class NodeProcess:
    """An installed node running in its own process, stopped with SIGINT on ``stop``."""

    def __init__(self, name: str, params: dict[str, Any], folder: Path,
                 node_name: str | None = None) -> None:
        params_file = folder / f"{name}_params.yaml"
        params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
        args = [str(executable(name)), "--ros-args", "--params-file", str(params_file)]
        if node_name:
            args += ["-r", f"__node:={node_name}"]
        self.log_path = folder / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=os.environ.copy())

    def output(self) -> str:
        if not self._log.closed:  # failure messages read it after stop() too
            self._log.flush()
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(2)  # SIGINT, as Ctrl-C in a terminal
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def call_service(client: Any, request: Any, timeout: float) -> Any:
    """The response to ``request``; fails the test when none arrives within ``timeout``
    (the probe's executor thread delivers it)."""
    future = client.call_async(request)
    deadline = time.monotonic() + timeout
    while not future.done():
        assert time.monotonic() < deadline, f"no answer from {client.srv_name} (deadlock?)"
        time.sleep(0.005)
    return future.result()


class Probe:
    """The test's node: spins in a background thread; collects messages per topic."""

    def __init__(self, context: Any, name: str = "probe") -> None:
        self.node: Node = rclpy.create_node(name, context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.received: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    def collect(self, msg_type: type, topic: str, qos: QoSProfile | int = 10) -> list[Any]:
        bucket: list[Any] = []
        self.received[topic] = bucket

        def store(msg: Any) -> None:
            with self._lock:
                bucket.append(msg)

        self.node.create_subscription(msg_type, topic, store, qos)
        return bucket

    def call(self, srv_type: type, name: str, request: Any, timeout: float = 60.0) -> Any:
        client = self.node.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
        return call_service(client, request, timeout)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             node: NodeProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if node is not None and not node.alive():
            raise AssertionError(f"node exited while waiting for {what}:\n{node.output()}")
        time.sleep(0.02)
    details = f"\nnode output:\n{node.output()}" if node is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{details}")


def ros_image(bag_msg: Any) -> Any:
    """A sensor_msgs/Image read by rosbags -> the rclpy message with the same fields."""
    header = Header(stamp=Time(sec=bag_msg.header.stamp.sec,
                               nanosec=bag_msg.header.stamp.nanosec),
                    frame_id=bag_msg.header.frame_id)
    return Image(header=header, height=bag_msg.height, width=bag_msg.width,
                 encoding=bag_msg.encoding, is_bigendian=bag_msg.is_bigendian,
                 step=bag_msg.step, data=bytes(bag_msg.data))


def publish_until(publisher: Any, msg: Any, predicate: Callable[[], bool], timeout: float,
                  what: str, node: NodeProcess | None = None, every: float = 0.5) -> None:
    """Publish ``msg`` and again every ``every`` s until ``predicate`` holds: best-effort
    delivery may lose a message while discovery is still matching the two endpoints."""
    last = [0.0]

    def attempt() -> bool:
        if time.monotonic() - last[0] >= every:
            publisher.publish(msg)
            last[0] = time.monotonic()
        return predicate()

    wait_for(attempt, timeout, what, node)
