"""``clip-perception replay``: a recorded bag through the detector into a new mcap bag.

The main test replays test/data/cameras_bag with a tiny OWLv2 checkpoint (seeded, so its
weights are bit-identical on every run) in a real process and compares the detections read
back from the output bag with test/data/replay_expected.json (1e-3); the input images must
come out byte-identical. After an intended change of the engine or of the tiny checkpoints,
regenerate the expectations and review the diff:

    CLIP_PERCEPTION_UPDATE_EXPECTED=1 scripts/test test/test_replay.py

Compressed topics, malformed frames and ``--topics`` are tested in-process on a bag built here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from engine_fixtures import random_image, tiny_checkpoint
from rosbags.rosbag2 import Reader

from clip_perception.bag_io import COMPRESSED, DETECTION_ARRAY, IMAGE, BagWriter, typestore
from clip_perception.detector import load_detector
from clip_perception.replay import BagReplay

REPO = Path(__file__).resolve().parents[1]
BAG = REPO / "test" / "data" / "cameras_bag"
EXPECTED = REPO / "test" / "data" / "replay_expected.json"
UPDATE = os.environ.get("CLIP_PERCEPTION_UPDATE_EXPECTED") == "1"
QUERIES = "cat, dog, red car"
THRESHOLD = 0.7  # a few detections per frame; no score of the tiny model within 5e-4 of it
TOLERANCE = 1e-3
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("owlv2"), "v2", seed=0).path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bag_messages(path: Path) -> list[tuple[str, str, int, bytes]]:
    """(topic, msgtype, timestamp_ns, serialized bytes) of every message, sorted by time then
    topic (messages of equal time have no defined order in a bag)."""
    with Reader(path) as reader:
        messages = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    return sorted(messages, key=lambda m: (m[2], m[0]))


def detection_frames(path: Path) -> list[dict[str, Any]]:
    """The DetectionArray messages of an output bag, as plain JSON-ready records."""
    store = typestore()
    frames = []
    for topic, msgtype, timestamp, raw in bag_messages(path):
        if msgtype != DETECTION_ARRAY:
            continue
        msg = store.deserialize_cdr(raw, msgtype)
        frames.append({
            "topic": topic, "timestamp_ns": timestamp,
            "stamp": [msg.header.stamp.sec, msg.header.stamp.nanosec],
            "frame_id": msg.header.frame_id, "vocabulary_version": msg.vocabulary_version,
            "image_size": [msg.image_width, msg.image_height],
            "labels": [d.query for d in msg.detections],
            "query_indices": [d.query_index for d in msg.detections],
            "scores": [round(d.score, 6) for d in msg.detections],
            "boxes": [[round(v, 4) for v in (d.center_x, d.center_y, d.size_x, d.size_y)]
                      for d in msg.detections],
        })
    return frames


def test_tiny_checkpoint_is_bit_identical_across_runs(owl_dir: Path, tmp_path: Path) -> None:
    again = tiny_checkpoint(tmp_path, "v2", seed=0).path
    for name in (WEIGHTS, "config.json", "vocab.json", "merges.txt"):
        assert (again / name).read_bytes() == (owl_dir / name).read_bytes(), name


def test_replay_of_the_test_bag_matches_stored_expectations(owl_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "replayed"
    proc = subprocess.run(
        [sys.executable, "-m", "clip_perception.cli", "replay", str(BAG), "--model",
         str(owl_dir), "--device", "cpu", "--queries", QUERIES, "--threshold", str(THRESHOLD),
         "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    frames = detection_frames(out)
    if UPDATE:
        EXPECTED.write_text(json.dumps({
            "checkpoint_sha256": sha256(owl_dir / WEIGHTS), "queries": QUERIES,
            "threshold": THRESHOLD, "frames": frames}, indent=1) + "\n")
    expected = json.loads(EXPECTED.read_text())
    assert expected["checkpoint_sha256"] == sha256(owl_dir / WEIGHTS), (
        "the tiny OWLv2 checkpoint changed (engine_fixtures / model_fixtures or transformers); "
        "see this module's docstring to regenerate the expectations")
    assert (expected["queries"], expected["threshold"]) == (QUERIES, THRESHOLD)

    assert len(frames) == len(expected["frames"]) == 16
    for got, want in zip(frames, expected["frames"], strict=True):
        exact = ("topic", "timestamp_ns", "stamp", "frame_id", "vocabulary_version",
                 "image_size", "labels", "query_indices")
        assert {k: got[k] for k in exact} == {k: want[k] for k in exact}
        np.testing.assert_allclose(got["scores"], want["scores"], atol=TOLERANCE)
        np.testing.assert_allclose(np.reshape(got["boxes"], (-1, 4)),
                                   np.reshape(want["boxes"], (-1, 4)), atol=TOLERANCE)
    assert sum(len(f["labels"]) for f in frames) > 0

    images_in = [m for m in bag_messages(BAG) if m[1] == IMAGE]
    images_out = [m for m in bag_messages(out) if m[1] == IMAGE]
    assert images_out == images_in  # topic, type, time and bytes
    summary = proc.stdout.splitlines()
    assert summary[:3] == [f"wrote {out}", "/front/image_raw: 8 frames, 0 skipped",
                           "/side/image_raw: 8 frames, 0 skipped"]
    counts = {label: sum(f["labels"].count(label) for f in frames)
              for label in QUERIES.split(", ")}
    assert summary[3:] == [f"{label!r}: {n} detections" for label, n in counts.items()]


def _compressed_bag(path: Path) -> list[np.ndarray]:
    """A bag with /cam/image_raw/compressed (a PNG, a corrupt JPEG, a JPEG) and a raw topic
    /other/image_raw; returns the RGB of the frames that decode."""
    images = [random_image(72, 96, 10), random_image(72, 96, 11)]
    with BagWriter(path) as bag:
        compressed = bag.store.types[COMPRESSED]
        payloads = [("png", cv2.imencode(".png", images[0][..., ::-1])[1]),
                    ("jpeg", np.frombuffer(b"\xff\xd8\xff\xe0 broken", np.uint8)),
                    ("jpeg", cv2.imencode(".jpg", images[1][..., ::-1])[1])]
        for i, (fmt, data) in enumerate(payloads):
            header = bag.header(5, i, "cam")
            bag.write("/cam/image_raw/compressed", COMPRESSED, 5 * 10**9 + i,
                      compressed(header=header, format=fmt, data=data.reshape(-1)))
            bag.write_image("/other/image_raw", 5 * 10**9 + i, header, images[0])
    images[1] = cv2.cvtColor(cv2.imdecode(payloads[2][1], cv2.IMREAD_COLOR),
                             cv2.COLOR_BGR2RGB)  # JPEG is lossy: what the replay sees
    return images


def test_replay_of_compressed_topic_skips_malformed_frames(owl_dir: Path,
                                                           tmp_path: Path) -> None:
    source, out = tmp_path / "compressed", tmp_path / "out"
    images = _compressed_bag(source)
    detector = load_detector(owl_dir, device="cpu", score_threshold=THRESHOLD)
    detector.set_queries(QUERIES.split(", "))
    warnings: list[str] = []
    replay = BagReplay(source, topics=["/cam/image_raw/compressed"])
    assert replay.total == 3
    summary = replay.run(detector, out, warn=warnings.append, progress=False)

    assert summary.frames == {"/cam/image_raw/compressed": 3}
    assert summary.skipped == {"/cam/image_raw/compressed": 1}
    assert len(warnings) == 1 and "/cam/image_raw/compressed at 5000000001 ns" in warnings[0]
    written = bag_messages(out)
    assert [m for m in written if m[1] == COMPRESSED] == [
        m for m in bag_messages(source) if m[1] == COMPRESSED]
    assert {m[0] for m in written} == {"/cam/image_raw/compressed", "/cam/image_raw/detections"}

    frames = detection_frames(out)
    assert [f["timestamp_ns"] for f in frames] == [5 * 10**9, 5 * 10**9 + 2]
    for frame, image in zip(frames, images, strict=True):
        expected = detector.detect([image])[0]
        assert frame["labels"] == expected.labels
        np.testing.assert_allclose(frame["scores"], expected.scores, atol=1e-5)
        np.testing.assert_allclose(np.reshape(frame["boxes"], (-1, 4)), expected.center_size(),
                                   atol=1e-3)
    assert summary.detections == {
        label: sum(f["labels"].count(label) for f in frames) for label in QUERIES.split(", ")}
    detector.close()
