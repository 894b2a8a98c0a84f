"""Shared by the test_reliability_* modules and scripts/soak: a B/32-sized random OWL-ViT
checkpoint, cameras that stream at a fixed rate, node memory, and diagnostics readers.

Kept out of conftest.py so that only the reliability tests load it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from engine_fixtures import random_image
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from clip_perception.bench_contenders import randomize_weights
from clip_perception.model.tokenizer import _BYTE_ENCODER, BOS_TOKEN, EOS_TOKEN
from clip_perception.ros import messages

BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
RELIABLE = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
TEXT_VOCAB = 49408  # CLIP's: 49406 = start of text, 49407 = end of text (the largest id)


def b32_checkpoint(folder: Path) -> Path:
    """OWL-ViT B/32 as transformers' OwlViTConfig defaults describe it (768 px input, 12+12
    layers, 153 M parameters), random weights, and a 49408-id byte-level vocabulary without
    merges (every character is a token; end of text keeps the largest id, where OWL pools).
    Written once per folder: 600 MB that several tests share."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = OwlViTForObjectDetection(OwlViTConfig()).eval()
    randomize_weights(model, 1)  # realistic activations (and so realistic boxes and scores)
    model.save_pretrained(folder)
    symbols = list(_BYTE_ENCODER.values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [f"<unused{i}>" for i in range(TEXT_VOCAB - 2 - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab.update({BOS_TOKEN: TEXT_VOCAB - 2, EOS_TOKEN: TEXT_VOCAB - 1})
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def stamp_now(node: Node, frame_id: str) -> Header:
    return Header(stamp=node.get_clock().now().to_msg(), frame_id=frame_id)


def age_s(node: Node, stamp: Time) -> float:
    """Seconds from ``stamp`` to now on ``node``'s clock (system time, as the node's)."""
    now = node.get_clock().now().nanoseconds
    return (now - (stamp.sec * 10**9 + stamp.nanosec)) / 1e9


@dataclass
class CameraStreamer:
    """Cameras publishing rgb8 frames at ``rate_hz`` each, stamped when published, from one
    thread on an absolute schedule (a late frame is sent at once, never skipped, so the
    achieved rate is what the machine allowed and is reported)."""

    node: Node
    topics: Sequence[str]
    rate_hz: float
    size: tuple[int, int] = (240, 320)  # (height, width)
    sent: list[int] = field(default_factory=list)
    started_at: float = 0.0
    stopped_at: float = 0.0

    def __post_init__(self) -> None:
        self.publishers = [self.node.create_publisher(Image, t, BEST_EFFORT) for t in self.topics]
        height, width = self.size
        # One prepared message per camera (array('B') data, converted once per publish).
        self.frames = [messages.to_image(random_image(height, width, seed), Header())
                       for seed in range(len(self.topics))]
        self.sent = [0] * len(self.topics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CameraStreamer:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop publishing (idempotent; also safe before ``start``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
            self.stopped_at = time.monotonic()

    def achieved_hz(self) -> float:
        seconds = (self.stopped_at or time.monotonic()) - self.started_at
        return min(self.sent) / seconds if seconds > 0 else 0.0

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        tick = time.monotonic()
        while not self._stop.is_set():
            for i, (publisher, frame) in enumerate(zip(self.publishers, self.frames,
                                                       strict=True)):
                frame.header = stamp_now(self.node, f"camera{i}")
                publisher.publish(frame)
                self.sent[i] += 1
            tick += period
            self._stop.wait(max(tick - time.monotonic(), 0.0))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def latest_values(diagnostics: list[Any], name_suffix: str,
                  since: Time | None = None) -> dict[str, str]:
    """Key/values of the newest status whose name ends with ``name_suffix``, from a
    DiagnosticArray stamped after ``since`` (node clock) when given; {} if there is none."""
    after = 0 if since is None else since.sec * 10**9 + since.nanosec
    statuses = [s for a in list(diagnostics) for s in a.status
                if s.name.endswith(name_suffix)
                and a.header.stamp.sec * 10**9 + a.header.stamp.nanosec > after]
    return {kv.key: kv.value for kv in statuses[-1].values} if statuses else {}


def accounted_for(values: dict[str, str]) -> bool:
    """Every frame a camera received is published or counted as lost (true once idle)."""
    lost_or_done = ("frames_dropped_latest_only", "frames_malformed", "frames_failed",
                    "frames_published")
    return bool(values) and int(values["frames_received"]) == sum(
        int(values[k]) for k in lost_or_done)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")
