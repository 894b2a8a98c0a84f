"""/diagnostics for perception nodes: one status per camera and one for the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

from clip_perception.ros.camera_io import Camera
from clip_perception.ros.frame_slots import FrameSlots
from clip_perception.ros.stats import RollingWindow


@dataclass
class EngineFigures:
    """What the node reports about its engine, beside the per-camera figures."""

    device: str
    precision: str
    vocabulary_version: int
    vocabulary_size: int
    inference_ms: RollingWindow
    inference_batches: int  # batches inferred since start ...
    inference_ms_total: float  # ... and their total time
    failed_batches: int
    oom_splits: int  # batches split and retried after a GPU out-of-memory error
    vocabulary_rejections: int
    note: str  # the latest noteworthy event (e.g. "waiting for a vocabulary"), or ""


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"


def _pairs(**values: object) -> list[KeyValue]:
    return [KeyValue(key=k, value=v if isinstance(v, str) else str(v))
            for k, v in values.items()]


def camera_status(node_name: str, camera: Camera, slots: FrameSlots) -> DiagnosticStatus:
    """Every frame the camera sent is accounted for: frames_lost_before_node counts those
    that never arrived (up to the last one received); once the node is idle, frames_received =
    frames_dropped_latest_only + frames_malformed + frames_failed + frames_published."""
    counters = slots.counters(camera.index)
    p50, p95 = camera.latency_ms.percentiles((50, 95))
    silent_s = camera.received.age_s()
    level, message = DiagnosticStatus.OK, "ok"
    if camera.incompatible_qos:
        level, message = DiagnosticStatus.WARN, "publisher with incompatible QoS (not heard)"
    elif counters.received == 0:
        level, message = DiagnosticStatus.WARN, "no frames received yet"
    elif silent_s > camera.received.window_s:
        # A camera that stops is not an error of the node, but whoever watches should know.
        level, message = DiagnosticStatus.WARN, f"no frames for {silent_s:.0f} s"
    elif camera.bad_frames:
        level, message = DiagnosticStatus.WARN, f"{camera.bad_frames} malformed frame(s) dropped"
    return DiagnosticStatus(
        level=level, name=f"{node_name}: camera {camera.input_topic}", message=message,
        hardware_id=camera.input_topic,
        values=_pairs(
            input_rate_hz=_fmt(camera.received.rate_hz()),
            processed_rate_hz=_fmt(camera.processed.rate_hz()),
            frames_lost_before_node=counters.lost,
            frames_received=counters.received,
            frames_dropped_latest_only=counters.dropped,
            frames_malformed=camera.bad_frames,
            frames_failed=camera.failed,
            frames_published=camera.published,
            incompatible_qos_publishers=camera.incompatible_qos,
            annotated_images_published=camera.annotated,
            latency_ms_p50=_fmt(p50), latency_ms_p95=_fmt(p95)))


def engine_status(node_name: str, figures: EngineFigures) -> DiagnosticStatus:
    p50, p95 = figures.inference_ms.percentiles((50, 95))
    level = DiagnosticStatus.WARN if figures.note else DiagnosticStatus.OK
    values = _pairs(
        device=figures.device, precision=figures.precision,
        vocabulary_version=figures.vocabulary_version,
        vocabulary_size=figures.vocabulary_size,
        inference_ms_p50=_fmt(p50), inference_ms_p95=_fmt(p95),
        inference_batches=figures.inference_batches,
        inference_ms_total=_fmt(figures.inference_ms_total),
        failed_batches=figures.failed_batches,
        oom_batch_splits=figures.oom_splits,
        vocabulary_rejections=figures.vocabulary_rejections)
    if figures.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(figures.device)
        values += _pairs(
            gpu_memory_allocated_mb=_fmt(torch.cuda.memory_allocated(device) / 2**20),
            gpu_memory_reserved_mb=_fmt(torch.cuda.memory_reserved(device) / 2**20))
    return DiagnosticStatus(level=level, name=f"{node_name}: engine",
                            message=figures.note or "ok", hardware_id=figures.device,
                            values=values)


def diagnostic_array(node_name: str, stamp: Time, cameras: list[Camera], slots: FrameSlots,
                     figures: EngineFigures) -> DiagnosticArray:
    statuses = [camera_status(node_name, c, slots) for c in cameras]
    statuses.append(engine_status(node_name, figures))
    return DiagnosticArray(header=Header(stamp=stamp), status=statuses)
