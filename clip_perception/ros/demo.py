"""The demo behind scripts/demo: the real detector_node, the bundled model, the bundled bag.

Starts the installed detector_node (bundled models/synthetic-owl unless --model), plays the
bag's compressed camera frames into it over DDS at their recorded rate (restamped with the
current time, so latency is measured from publication), records every DetectionArray, and
writes to --out: detections.mcap (rosbag2: the detections and the vocabulary), contact_sheet.png
(annotated frames drawn from what the node published) and summary.json (frames in and out,
detections per query, frame rate, latency, recall against the bag's ground truth).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import rclpy
from ament_index_python.packages import get_package_prefix
from builtin_interfaces.msg import Time
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from clip_perception.annotate import contact_sheet, draw_detections
from clip_perception.bag_io import DETECTION_ARRAY, BagFrame, BagWriter, read_frames
from clip_perception.image_messages import compressed_to_rgb
from clip_perception.metrics import recall_at_iou
from clip_perception.msg import DetectionArray, Vocabulary

CAMERA = "/demo_camera/image_raw"
# The bag's objects; "purple circle" is a colour-shape pair the model never saw in training.
QUERIES = ["orange square", "purple triangle", "orange circle", "purple circle"]
DEMO_THRESHOLD = 0.1  # recall of the bundled model at 0.1 and 0.05: its MODEL_CARD.md
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
Results = dict[int, tuple[DetectionArray, float]]  # frame index -> (message, time received)


def start_node(model: str, queries: list[str], folder: Path, log: Path) -> subprocess.Popen:
    params = folder / "demo_params.yaml"
    params.write_text(json.dumps({"/**": {"ros__parameters": {
        "model": model, "device": "cpu", "image_topics": [CAMERA],
        "image_transport": "compressed", "qos_reliability": "reliable", "queries": queries,
        "score_threshold": DEMO_THRESHOLD, "max_batch": 1}}}))
    exe = Path(get_package_prefix("clip_perception")) / "lib/clip_perception/detector_node"
    return subprocess.Popen([str(exe), "--ros-args", "--params-file", str(params)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="detector_node on the bundled camera bag")
    parser.add_argument("--bag", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="", help="checkpoint folder (default: bundled)")
    parser.add_argument("--queries", default=", ".join(QUERIES))
    args = parser.parse_args(argv)
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    frames = [f for f in read_frames(args.bag) if f.topic == f"{CAMERA}/compressed"]
    truth = json.loads((args.bag / "ground_truth.json").read_text())["frames"]

    node = start_node(args.model, queries, args.out, args.out / "detector_node.log")
    rclpy.init()
    probe = rclpy.create_node("clip_perception_demo")
    executor = SingleThreadedExecutor()
    executor.add_node(probe)
    results: Results = {}
    vocabularies: list[Vocabulary] = []
    probe.create_subscription(
        DetectionArray, f"{CAMERA}/detections",
        lambda m: results.setdefault(m.header.stamp.nanosec, (m, time.time())), RELIABLE)
    probe.create_subscription(Vocabulary, "/clip_detector/vocabulary", vocabularies.append,
                              LATCHED)
    camera = probe.create_publisher(CompressedImage, f"{CAMERA}/compressed", RELIABLE)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while not (vocabularies and camera.get_subscription_count()):
            if node.poll() is not None or time.monotonic() > deadline:
                print("demo: error: detector_node did not start; see "
                      f"{args.out / 'detector_node.log'}", file=sys.stderr)
                return 1
            time.sleep(0.05)
        sent: dict[int, float] = {}
        start = time.monotonic()
        for index, frame in enumerate(frames):  # at the recorded 10 Hz
            time.sleep(max(0.0, start + index * 0.1 - time.monotonic()))
            now = time.time()
            stamp = Time(sec=int(now), nanosec=index)  # nanosec carries the frame index
            camera.publish(CompressedImage(
                header=Header(stamp=stamp, frame_id=frame.msg.header.frame_id),
                format=frame.msg.format, data=bytes(frame.msg.data)))
            sent[index] = now
        drain = time.monotonic() + 10
        while len(results) < len(frames) and time.monotonic() < drain:
            time.sleep(0.05)
        elapsed = time.monotonic() - start
    finally:
        node.send_signal(2)
        node.wait(timeout=20)
        executor.shutdown()
        probe.destroy_node()
        rclpy.try_shutdown()

    summary = summarise(frames, truth, results, sent, queries, elapsed)
    write_outputs(args.out, frames, results, vocabularies)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"demo: {summary['frames_in']} frames in, {summary['frames_out']} out "
          f"({summary['frames_per_second']:.1f} frames/s), latency p50 "
          f"{summary['latency_ms_p50']:.1f} ms; recall@0.5 seen "
          f"{summary['recall_seen']:.2f}, unseen {summary['recall_unseen']:.2f}")
    print(f"demo: detections per query: {summary['detections_per_query']}")
    print(f"demo: wrote {args.out}/summary.json, contact_sheet.png, detections (rosbag2 mcap)")
    return 0


def summarise(frames: list[BagFrame], truth: list[dict], results: Results,
              sent: dict[int, float], queries: list[str], elapsed: float) -> dict:
    latencies = [(results[i][1] - sent[i]) * 1e3 for i in results if i in sent]
    per_query = {q: 0 for q in queries}
    for msg, _ in results.values():
        for det in msg.detections:
            per_query[det.query] = per_query.get(det.query, 0) + 1
    expected = {i: [(o["category"], *o["box"]) for o in f["objects"]]
                for i, f in enumerate(truth)}
    found = {i: [(d.query, d.center_x - d.size_x / 2, d.center_y - d.size_y / 2,
                  d.center_x + d.size_x / 2, d.center_y + d.size_y / 2) for d in m.detections]
             for i, (m, _) in results.items()}
    recall = recall_at_iou(expected, found, iou=0.5)
    return {
        "frames_in": len(frames), "frames_out": len(results),
        "frames_processed": sorted(results),
        "frames_per_second": len(results) / elapsed if elapsed > 0 else 0.0,
        "latency_ms_p50": statistics.median(latencies) if latencies else float("nan"),
        "latency_ms_p95": float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "detections_per_query": per_query, "queries": queries,
        "recall_seen": recall.seen, "recall_unseen": recall.unseen,
        "recall_per_query": recall.per_query}


def write_outputs(out: Path, frames: list[BagFrame], results: Results,
                  vocabularies: list[Vocabulary]) -> None:
    """detections/ (rosbag2 mcap: the vocabulary and every DetectionArray, as published) and
    a contact sheet of every 10th frame with its detections drawn."""
    tiles = []
    with BagWriter(out / "detections") as bag:
        for vocabulary in vocabularies[-1:]:
            bag.write_cdr("/clip_detector/vocabulary", "clip_perception/msg/Vocabulary", 0,
                          serialize_message(vocabulary))
        for index in sorted(results):
            msg, received = results[index]
            bag.write_cdr(f"{CAMERA}/detections", DETECTION_ARRAY, int(received * 1e9),
                          serialize_message(msg))
            if index % 10 == 0:
                tiles.append(annotated(frames[index].msg, msg))
    if tiles:
        sheet = contact_sheet(tiles, columns=5, tile_width=320)
        cv2.imwrite(str(out / "contact_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def annotated(compressed: object, msg: DetectionArray) -> np.ndarray:
    rgb = compressed_to_rgb(compressed)
    cs = np.array([[d.center_x, d.center_y, d.size_x, d.size_y] for d in msg.detections],
                  dtype=np.float32).reshape(-1, 4)  # (N, 4)
    boxes = np.concatenate([cs[:, :2] - cs[:, 2:] / 2, cs[:, :2] + cs[:, 2:] / 2], axis=1)
    return draw_detections(rgb, boxes, [d.query for d in msg.detections],
                           np.array([d.score for d in msg.detections], np.float32),
                           np.array([d.query_index for d in msg.detections], dtype=np.int64))


if __name__ == "__main__":
    sys.exit(main())
