"""Overload soak: four cameras at 30 Hz into a detector_node that infers far slower (a
B/32-sized OWL-ViT on CPU, seconds per batch), as real processes over DDS.

What the latest-frame policy promises, checked here: latency from stamp to publish stays
bounded (a frame waits for at most the batch in flight, then its own batch: about two batch
times) and does not grow over the run (no queue); every frame the cameras sent is either
published or counted as lost or dropped in /diagnostics; resident memory grows less than 5 %
over the run (peak of its second half against its first). CI runs 30 s of warm-up, then
60 s measured; scripts/soak runs any duration (SOAK_SECONDS) and prints the figures.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from reliability_fixtures import (
    RELIABLE,
    CameraStreamer,
    accounted_for,
    age_s,
    b32_checkpoint,
    latest_values,
    percentile,
    rss_mb,
)
from ros_harness import NodeProcess, Probe, wait_for

from clip_perception.msg import DetectionArray, Vocabulary

SOAK_S = float(os.environ.get("SOAK_SECONDS", "60"))
CAMERAS = int(os.environ.get("SOAK_CAMERAS", "4"))
RATE_HZ = float(os.environ.get("SOAK_HZ", "30"))
DEVICE = os.environ.get("SOAK_DEVICE", "cpu")
FIGURES = os.environ.get("SOAK_FIGURES")  # also write the figures there (scripts/soak)
# The measured run starts after a warm-up: the allocator's pools and DDS buffers grow to
# their working size over the first batches (measured: resident memory rises ~5 % in the
# first minute, then stays within a band of +-2 % for the next three).
WARM_UP_S = float(os.environ.get("SOAK_WARM_UP_SECONDS", "30"))
WARM_UP_BATCHES = 2
# Often enough to catch each batch's activation peak (batches take seconds).
MEMORY_SAMPLE_S = 0.2
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.fixture(scope="module")
def b32_dir(tmp_path_factory) -> Path:
    return b32_checkpoint(tmp_path_factory.getbasetemp() / "b32")


def test_four_cameras_at_30_hz_into_a_slow_node(b32_dir, tmp_path, ros_context):
    topics = [f"/soak{i}/image_raw" for i in range(CAMERAS)]
    node = NodeProcess("detector_node", {
        "model": str(b32_dir), "device": DEVICE, "image_topics": topics,
        "queries": ["a mug", "a person", "a forklift"], "max_detections": 20,
        "max_batch": CAMERAS, "publish_annotated": False}, tmp_path)
    probe = Probe(ros_context)
    arrivals: list[tuple[float, int, float]] = []  # (monotonic time, camera, latency s)
    try:
        vocabulary = probe.collect(Vocabulary, "/clip_detector/vocabulary", LATCHED)
        diagnostics = probe.collect(DiagnosticArray, "/diagnostics")
        for index, topic in enumerate(topics):
            probe.node.create_subscription(
                DetectionArray, f"{topic}/detections",
                lambda m, i=index: arrivals.append(
                    (time.monotonic(), i, age_s(probe.node, m.header.stamp))), RELIABLE)
        wait_for(lambda: vocabulary, 120, "the start-up vocabulary", node)
        streamer = CameraStreamer(probe.node, topics, RATE_HZ)
        wait_for(lambda: all(p.get_subscription_count() for p in streamer.publishers), 30,
                 "the node's camera subscriptions", node)

        streamer.start()
        wait_for(lambda: time.monotonic() - streamer.started_at >= WARM_UP_S
                 and len(arrivals) >= WARM_UP_BATCHES * CAMERAS, WARM_UP_S + 120,
                 "the warm-up batches", node)
        run_start = time.monotonic()
        memory: list[tuple[float, float]] = []  # (seconds into the measured run, RSS MB)
        while time.monotonic() - run_start < SOAK_S:
            assert node.alive(), node.output()
            memory.append((time.monotonic() - run_start, rss_mb(node.proc.pid)))
            time.sleep(MEMORY_SAMPLE_S)
        streamer.stop()
        cameras = [f"{t}" for t in topics]

        def idle() -> bool:  # every received frame published or counted as lost
            values = [latest_values(diagnostics, f"camera {c}") for c in cameras]
            return all(accounted_for(v)
                       and int(v["frames_published"]) == sum(a[1] == i for a in arrivals)
                       for i, v in enumerate(values))

        wait_for(idle, 120, "the node to drain and account for every frame", node)
        figures = soak_figures(streamer, run_start, arrivals, memory,
                               [latest_values(diagnostics, f"camera {c}") for c in cameras],
                               latest_values(diagnostics, ": engine"))
        print("\nsoak figures: " + json.dumps(figures))
        if FIGURES:
            Path(FIGURES).write_text(json.dumps(figures, indent=2) + "\n")
        check(figures)
    finally:
        probe.close()
        assert node.stop() == 0, node.output()


def soak_figures(streamer: CameraStreamer, run_start: float,
                 arrivals: list[tuple[float, int, float]], memory: list[tuple[float, float]],
                 cameras: list[dict[str, str]], engine: dict[str, str]) -> dict:
    """Figures of the measured run (after warm-up); frame counts cover the whole stream."""
    seconds = streamer.stopped_at - run_start
    during = [(t - run_start, latency) for t, _, latency in arrivals
              if run_start <= t <= streamer.stopped_at]
    latencies = [latency for _, latency in during]
    third = seconds / 3
    first = [latency for t, latency in during if t < third]
    last = [latency for t, latency in during if t >= 2 * third]
    batches = max(len(during) / CAMERAS, 1.0)
    # RSS swings by a few % with every batch (activations come and go), so peaks are compared
    # with peaks: the highest sample of the run's first half with that of its second half.
    rss = [value for _, value in memory]
    halves = (rss[:len(rss) // 2], rss[len(rss) // 2:])
    peaks = [max(h) for h in halves] if all(halves) else None
    return {
        "warm_up_s": round(run_start - streamer.started_at, 1),
        "duration_s": round(seconds, 1), "cameras": CAMERAS, "rate_hz_asked": RATE_HZ,
        "rate_hz_achieved": round(streamer.achieved_hz(), 1),
        "frames_sent": sum(streamer.sent),
        "frames_lost_before_node": sum(int(c["frames_lost_before_node"]) for c in cameras),
        "frames_received": sum(int(c["frames_received"]) for c in cameras),
        "frames_dropped": sum(int(c["frames_dropped_latest_only"]) for c in cameras),
        "frames_published": sum(int(c["frames_published"]) for c in cameras),
        "frames_failed": sum(int(c["frames_failed"]) for c in cameras),
        "frames_unaccounted": sum(streamer.sent) - sum(
            int(c["frames_received"]) + int(c["frames_lost_before_node"]) for c in cameras),
        "batch_period_s": round(seconds / batches, 2),
        "latency_s_p50": round(percentile(latencies, 50), 2),
        "latency_s_p95": round(percentile(latencies, 95), 2),
        "latency_s_max": round(max(latencies, default=float("nan")), 2),
        "latency_s_p95_first_third": round(percentile(first, 95), 2),
        "latency_s_p95_last_third": round(percentile(last, 95), 2),
        "inference_ms_p50": engine.get("inference_ms_p50"),
        "rss_mb_peak_first_half": round(peaks[0], 1) if peaks else None,
        "rss_mb_peak_second_half": round(peaks[1], 1) if peaks else None,
        "rss_growth_pct": round(100 * (peaks[1] / peaks[0] - 1), 2) if peaks else None,
        "rss_mb_peak_per_10_s": [round(max(v for t, v in memory if w <= t < w + 10))
                                 for w in range(0, int(memory[-1][0]) - 9, 10)],
    }


def check(figures: dict) -> None:
    assert figures["frames_published"] >= 3 * CAMERAS, "the node made no real progress"
    # Every frame sent is received or counted as lost on the way (from the publisher's
    # sequence numbers), never twice. Sequence gaps cannot reveal the frames sent before the
    # node's reader matched a camera (discovery is asymmetric: the camera may see the node
    # first) nor those after the last one received. Measured: 1 to 65 frames in 60 s runs
    # and 3 in a 600 s run, so a start-up effect, not a rate; 1 s of frames bounds it.
    assert 0 <= figures["frames_unaccounted"] <= RATE_HZ * CAMERAS, figures
    if DEVICE == "cpu":  # the scenario: a node far slower than its input
        assert figures["frames_dropped"] > figures["frames_published"], figures
    # Latest-frame policy: at most the batch in flight plus the frame's own batch, i.e. about
    # two batch periods; 3 periods + 2 s leaves room for the noisy shared machine. A queue
    # would instead grow with the run: by the last third its latency would be tens of s.
    bound = 3 * figures["batch_period_s"] + 2.0
    assert figures["latency_s_max"] <= bound, figures
    assert figures["latency_s_p95_last_third"] <= (
        1.5 * figures["latency_s_p95_first_third"] + figures["batch_period_s"]), figures
    assert figures["rss_growth_pct"] is not None and figures["rss_growth_pct"] < 5.0, figures
