"""ROS end-to-end overhead of detector_node: image published -> detections received, minus
the node's own inference time, for 1 and 4 cameras of 640x480 rgb8.

    python -m clip_perception.ros.overhead_bench --model DIR [--rounds 40] [--cameras 1 4]

Method: the installed detector_node runs with the model; each round publishes one frame per
camera and waits for every camera's detections (reliable QoS, so no frame is lost on
loopback). A round's time runs from publishing to the last camera's detections. The node's
own inference time over the timed rounds comes from its /diagnostics
(``inference_ms_total`` before and after them; several cameras' frames may take more than
one batch). Overhead per frame = (median round time - inference time per round) / cameras.
The same batch timed in this process before the node starts is printed for reference. The
last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rclpy
from ament_index_python.packages import get_package_prefix
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from clip_perception.detector import load_detector
from clip_perception.msg import DetectionArray
from clip_perception.ros import messages
from clip_perception.ros.perception_node import bundled_model

QUERIES = ["a red circle", "a blue square", "a green star"]


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(n)]


def engine_ms(model: str, images: list[np.ndarray], repeats: int) -> float:
    detector = load_detector(model, device="cpu", score_threshold=0.0)
    detector.set_queries(QUERIES)
    detector.detect(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.detect(images)
        times.append((time.perf_counter() - start) * 1e3)
    detector.close()
    return statistics.median(times)


@dataclass(frozen=True)
class NodeRun:
    """What one run of the node measured: per round, the time from publishing the frames to
    the last camera's detections; and the node's own inference time over those rounds."""

    round_ms: list[float]
    inference_ms_per_round: float


def node_run(model: str, cameras: int, rounds: int) -> NodeRun:
    topics = [f"/bench/cam{i}" for i in range(cameras)]
    with tempfile.TemporaryDirectory() as folder:
        params = Path(folder) / "params.yaml"
        params.write_text(json.dumps({"/**": {"ros__parameters": {
            "model": model, "device": "cpu", "image_topics": topics, "queries": QUERIES,
            "score_threshold": 0.0, "max_batch": cameras, "qos_reliability": "reliable"}}}))
        exe = Path(get_package_prefix("clip_perception")) / "lib/clip_perception/detector_node"
        node = subprocess.Popen([str(exe), "--ros-args", "--params-file", str(params)],
                                stdout=sys.stderr, stderr=subprocess.STDOUT)
        try:
            return _measure(topics, rounds, node)
        finally:
            node.send_signal(2)
            node.wait(timeout=20)


class _InferenceTotals:
    """The node's cumulative ``inference_ms_total`` from /diagnostics (one report a second)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reports: list[tuple[float, float]] = []  # (received at, total ms)

    def on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if "inference_ms_total" in values:
                with self.lock:
                    self.reports.append((time.perf_counter(),
                                         float(values["inference_ms_total"])))

    def first_after(self, moment: float, timeout_s: float = 5.0) -> float:
        """The total of the first report received after ``moment`` (no frame is sent while
        waiting, so it counts exactly the rounds before it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                later = [total for received, total in self.reports if received > moment]
            if later:
                return later[0]
            time.sleep(0.05)
        raise RuntimeError("detector_node sent no diagnostics")


def _measure(topics: list[str], rounds: int, node: subprocess.Popen) -> NodeRun:
    context = rclpy.Context()
    rclpy.init(context=context)
    probe = rclpy.create_node("overhead_bench", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)
    arrivals: dict[tuple[int, int], float] = {}
    lock = threading.Lock()
    totals = _InferenceTotals()

    def on_result(msg: DetectionArray, camera: int) -> None:
        with lock:
            arrivals[(camera, msg.header.stamp.nanosec)] = time.perf_counter()

    # Reliable on both ends: a best-effort 0.9 MB frame can be lost on loopback, and a lost
    # frame would stall the round rather than measure anything.
    qos = QoSProfile(depth=4, reliability=ReliabilityPolicy.RELIABLE)
    publishers = [probe.create_publisher(Image, t, qos) for t in topics]
    for i, topic in enumerate(topics):
        probe.create_subscription(DetectionArray, f"{topic}/detections",
                                  lambda m, i=i: on_result(m, i), 10)
    probe.create_subscription(DiagnosticArray, "/diagnostics", totals.on_diagnostics, 10)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    images = [messages.to_image(f, Header(frame_id=f"cam{i}"))
              for i, f in enumerate(frames(len(topics)))]
    round_ms: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while any(p.get_subscription_count() == 0 for p in publishers):
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError("detector_node did not subscribe (see its output)")
            time.sleep(0.05)
        for round_index in range(rounds + 3):  # 3 warm-up rounds
            warm_up = round_index < 3
            if round_index == 3:
                start_total = totals.first_after(time.perf_counter())
            keys = [(c, round_index) for c in range(len(topics))]
            wait_until = time.monotonic() + 30
            sent = 0.0
            while not all(k in arrivals for k in keys):
                # Warm-up frames are re-sent: best-effort delivery may lose them while
                # discovery is still matching the endpoints.
                if sent == 0.0 or (warm_up and time.perf_counter() - sent > 1.0):
                    sent = time.perf_counter()
                    for image, publisher in zip(images, publishers, strict=True):
                        image.header.stamp.nanosec = round_index
                        publisher.publish(image)
                if time.monotonic() > wait_until:
                    raise RuntimeError(f"no detections for round {round_index}")
                time.sleep(0.0005)
            if not warm_up:
                round_ms.append((max(arrivals[k] for k in keys) - sent) * 1e3)
        end_total = totals.first_after(time.perf_counter())
        return NodeRun(round_ms, (end_total - start_total) / rounds)
    finally:
        executor.shutdown()
        probe.destroy_node()
        rclpy.shutdown(context=context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="checkpoint folder (default: bundled)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    args = parser.parse_args(argv)
    model = args.model or bundled_model("synthetic-owl")
    report: dict[str, object] = {
        "label": args.label, "model": model, "image": "640x480 rgb8",
        "fastdds_profile": os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE", ""),
        "rounds": args.rounds, "cpu_count": os.cpu_count()}
    for cameras in args.cameras:
        offline = engine_ms(model, frames(cameras), repeats=max(10, args.rounds // 2))
        run = node_run(model, cameras, args.rounds)
        median = statistics.median(run.round_ms)
        overhead = median - run.inference_ms_per_round
        report[f"cameras_{cameras}"] = {
            "round_ms_median": round(median, 2),
            "round_ms_mean": round(statistics.fmean(run.round_ms), 2),
            "round_ms_p95": round(float(np.percentile(run.round_ms, 95)), 2),
            "inference_ms_per_round_in_node": round(run.inference_ms_per_round, 2),
            "engine_batch_ms_median_offline": round(offline, 2),
            "overhead_ms_median": round(overhead, 2),
            "overhead_ms_per_frame": round(overhead / cameras, 2)}
        print(f"{cameras} camera(s): round median {median:.2f} ms, inference in the node "
              f"{run.inference_ms_per_round:.2f} ms per round (one offline batch "
              f"{offline:.2f} ms), overhead {overhead:.2f} ms = {overhead / cameras:.2f} ms "
              "per frame", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
