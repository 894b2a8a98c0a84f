"""Rolling figures for diagnostics: event rates and latency percentiles over a time window.

Bounded memory by construction (fixed-length deques), so a node that runs for hours keeps a
constant footprint. Pure Python (no rclpy); thread-safe for one writer and one reader.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class RollingWindow:
    """Timestamps (and optional values) of recent events within ``window_s`` seconds."""

    def __init__(self, window_s: float = 5.0, max_events: int = 4096) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque(maxlen=max_events)
        self._lock = threading.Lock()

    def add(self, value: float = 0.0, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, value))

    def _recent(self, now: float) -> list[tuple[float, float]]:
        with self._lock:
            return [e for e in self._events if now - e[0] <= self.window_s]

    def rate_hz(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = self._recent(now)
        if len(recent) < 2:
            return 0.0
        # Events per second since the oldest event still in the window.
        return len(recent) / max(now - recent[0][0], 1e-9)

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the newest event; infinity before the first."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return now - self._events[-1][0] if self._events else float("inf")

    def percentiles(self, qs: tuple[float, ...], now: float | None = None) -> list[float]:
        """Percentiles of the values in the window; NaN where there are none."""
        now = time.monotonic() if now is None else now
        values = [v for _, v in self._recent(now)]
        if not values:
            return [float("nan")] * len(qs)
        return [float(x) for x in np.percentile(np.asarray(values), qs)]
