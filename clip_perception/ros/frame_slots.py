"""Latest-frame-only slots, one per camera, shared by subscription callbacks and the worker.

A perception node that infers slower than its cameras publish must not queue frames: the
queue (and the latency) would grow without bound. Each camera therefore owns a depth-1 slot;
a new frame replaces an unprocessed one, and the replaced frame is counted as dropped so the
loss is visible in diagnostics. Frames that never reach the slot (replaced in the DDS queue,
lost in transport) are counted from gaps in the publisher's sequence numbers. The worker
takes the newest frame of every camera at once and batches them. Pure Python (no rclpy) so
it is testable on its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Frame = TypeVar("Frame")


@dataclass
class SlotCounters:
    """Per-camera counters, read by diagnostics (monotonic, never reset)."""

    received: int = 0
    dropped: int = 0  # replaced before the worker took them (latest-frame policy)
    taken: int = 0
    lost: int = 0  # sent by the publisher but never received (gaps in its sequence numbers)


@dataclass
class TakenFrame(Generic[Frame]):
    """A frame handed to the worker, with the camera it came from."""

    camera: int
    frame: Frame
    received_at: float  # time.monotonic() when the callback stored it


@dataclass
class _Slot(Generic[Frame]):
    frame: Frame | None = None
    received_at: float = 0.0
    sequence: int | None = None  # the publisher's sequence number of the last frame received
    counters: SlotCounters = field(default_factory=SlotCounters)


class FrameSlots(Generic[Frame]):
    """Depth-1 slots for ``n_cameras`` cameras with a condition the worker can wait on."""

    def __init__(self, n_cameras: int) -> None:
        if n_cameras < 1:
            raise ValueError(f"need at least one camera, got {n_cameras}")
        self._slots = [_Slot[Frame]() for _ in range(n_cameras)]
        self._ready = threading.Condition()
        self._closed = False
        self._next_camera = 0  # round-robin start so no camera starves when batches are small

    def put(self, camera: int, frame: Frame, sequence: int | None = None) -> None:
        """Store the newest frame of ``camera`` (called from subscription callbacks).

        sequence: the publisher's sequence number of ``frame`` (None where the middleware
        does not report it). A number that does not increase is a new publisher (a restarted
        camera driver) and starts the count over; one publisher per camera is assumed.
        """
        with self._ready:
            slot = self._slots[camera]
            if sequence is not None and slot.sequence is not None and sequence > slot.sequence:
                slot.counters.lost += sequence - slot.sequence - 1
            slot.sequence = sequence
            slot.counters.received += 1
            if slot.frame is not None:
                slot.counters.dropped += 1
            slot.frame = frame
            slot.received_at = time.monotonic()
            self._ready.notify()

    def take(self, max_frames: int, timeout: float) -> list[TakenFrame[Frame]]:
        """Wait up to ``timeout`` s for frames; return at most ``max_frames`` of them, one per
        camera, oldest wait first after a round-robin start. Empty on timeout or close."""
        assert max_frames >= 1
        with self._ready:
            if not self._closed and not any(s.frame is not None for s in self._slots):
                self._ready.wait(timeout)
            if self._closed:
                return []
            n = len(self._slots)
            order = [(self._next_camera + i) % n for i in range(n)]
            taken: list[TakenFrame[Frame]] = []
            for camera in order:
                slot = self._slots[camera]
                if slot.frame is None:
                    continue
                taken.append(TakenFrame(camera, slot.frame, slot.received_at))
                slot.frame = None
                slot.counters.taken += 1
                if len(taken) == max_frames:
                    self._next_camera = (camera + 1) % n
                    break
            return taken

    def counters(self, camera: int) -> SlotCounters:
        with self._ready:
            c = self._slots[camera].counters
            return SlotCounters(c.received, c.dropped, c.taken, c.lost)

    def close(self) -> None:
        """Wake the worker for shutdown; later ``take`` calls return nothing."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
