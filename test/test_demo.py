"""The bundled model on the bundled bag: offline through the engine (recall of the seen
queries against the issue's aim), and end to end through scripts/demo's program (real
detector_node over DDS)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from clip_perception.bag_io import read_frames
from clip_perception.detector import load_detector
from clip_perception.image_messages import compressed_to_rgb
from clip_perception.metrics import recall_at_iou
from clip_perception.ros.demo import DEMO_THRESHOLD, QUERIES

REPO = Path(__file__).resolve().parents[1]
BAG = REPO / "data" / "demo_bag"
MODEL = REPO / "models" / "synthetic-owl"


def ground_truth() -> dict[int, list[tuple]]:
    frames = json.loads((BAG / "ground_truth.json").read_text())["frames"]
    return {i: [(o["category"], *o["box"]) for o in f["objects"]] for i, f in enumerate(frames)}


@pytest.fixture(scope="module")
def offline() -> dict[int, list[tuple]]:
    """The bundled model through the engine on every bag frame: index -> (label, *xyxy)."""
    detector = load_detector(MODEL, device="cpu", score_threshold=DEMO_THRESHOLD)
    detector.set_queries(QUERIES)
    found = {}
    for i, frame in enumerate(read_frames(BAG)):
        result = detector.detect([compressed_to_rgb(frame.msg)])[0]
        found[i] = [(label, *box) for label, box in zip(result.labels, result.boxes.tolist(),
                                                        strict=True)]
    detector.close()
    return found


def test_shipped_model_finds_the_bag_objects(offline):
    """The issue's aim for the bundled model on its bag: recall >= 0.9 at IoU 0.5 for the
    seen queries at the demo's threshold (0.912 when measured: MODEL_CARD.md), and the
    unseen pair is found too."""
    recall = recall_at_iou(ground_truth(), offline, iou=0.5)
    assert recall.seen >= 0.9, recall.per_query
    assert recall.unseen >= 0.9, recall.per_query


def test_demo_recall_matches_the_engine_offline(offline, tmp_path):
    """The demo's recall (what the node published over DDS) equals the recall of the same
    model run offline on the same frames: nothing is lost or altered on the way."""
    summary = run_demo(tmp_path)
    # The latest-frame policy may drop a frame when the machine stalls; compare the frames
    # the node processed (recall counts an unprocessed frame as one with no detections).
    assert summary["frames_out"] >= 80
    processed = summary["frames_processed"]
    assert len(offline) == 100 and len(processed) == summary["frames_out"]
    expected = recall_at_iou(ground_truth(), {i: offline[i] for i in processed}, iou=0.5)
    assert not math.isnan(expected.unseen)  # the bag has an unseen pair: it was measured
    assert summary["recall_seen"] == pytest.approx(expected.seen, abs=1e-9)
    assert summary["recall_unseen"] == pytest.approx(expected.unseen, abs=1e-9)


def run_demo(folder: Path) -> dict:
    out = folder / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "clip_perception.ros.demo", "--bag", str(BAG), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo: wrote" in result.stdout
    assert (out / "contact_sheet.png").stat().st_size > 10_000
    detections = list((out / "detections").glob("*.mcap"))
    assert len(detections) == 1 and detections[0].stat().st_size > 1_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == 100
    assert set(summary["detections_per_query"]) == set(QUERIES)
    return summary
