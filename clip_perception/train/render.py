"""Drawing primitives for ``synthetic``: shapes, backgrounds, occlusion-aware compositing and
camera photometry (lighting, blur, sensor noise).

Everything is vectorised numpy/OpenCV on regions of interest, and all randomness comes from the
caller's ``np.random.Generator``, so renders are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np


def category_name(color: str, shape: str) -> str:
    """The query text of a colour-shape pair, e.g. ``"red circle"``."""
    return f"{color} {shape}"


@dataclass(frozen=True)
class SceneObject:
    """One annotated object; boxes are xyxy pixels, right/bottom exclusive."""

    category: str
    color: str
    shape: str
    box: tuple[float, float, float, float]  # visible pixels
    full_box: tuple[float, float, float, float]  # amodal
    area: int  # visible pixel count
    visible_fraction: float
    track_id: int | None = None  # set in video frames only


@dataclass(frozen=True)
class Placement:
    """Where and how to paint one shape; ``radius`` bounds it (half its nominal size)."""

    shape: str
    rgb: np.ndarray  # (3,) float32
    cx: float
    cy: float
    radius: float
    angle: float
    shade: float  # relative brightness change from centre to rim, a simple directional light
    shade_angle: float
    color: str | None = None  # None: a distractor, not annotated
    track_id: int | None = None


@dataclass(frozen=True)
class Photometry:
    """Camera and lighting for one frame, applied after all shapes are painted."""

    gain: np.ndarray  # (3,) brightness x colour cast
    contrast: float
    gamma: float
    blur_sigma: float
    noise_std: float


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)  # (n, 2)


def _star() -> np.ndarray:
    pts = _regular(10)
    pts[1::2] *= 0.42
    return pts


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    pts = np.stack([16 * np.sin(t) ** 3,
                    -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                   axis=1)  # (40, 2)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


_W = 0.32  # half width of a cross arm
POLYGONS: dict[str, np.ndarray] = {  # vertices inside the unit circle, y down
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3),
    "star": _star(),
    "cross": np.array([(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1),
                       (-_W, 1), (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)]) / math.hypot(1, _W),
    "hexagon": _regular(6, 0.0),
    "arrow": np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6),
                       (0.15, 0.22), (-1, 0.22)]),
    "heart": _heart(),
}
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel placement keeps slow motion smooth
_ONE = 1 << _SHIFT


def draw_shape(mask: np.ndarray, shape: str, cx: float, cy: float, r: float,
               angle: float) -> None:
    """Anti-aliased coverage (0-255) of one shape, drawn into a zeroed uint8 mask."""
    def fix(v: float) -> int:
        return round(v * _ONE)

    if shape in ("circle", "ring", "crescent"):
        cv2.circle(mask, (fix(cx), fix(cy)), fix(r), 255, -1, cv2.LINE_AA, _SHIFT)
        if shape == "ring":
            cv2.circle(mask, (fix(cx), fix(cy)), fix(0.55 * r), 0, -1, cv2.LINE_AA, _SHIFT)
        elif shape == "crescent":
            hx, hy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
            cv2.circle(mask, (fix(hx), fix(hy)), fix(0.85 * r), 0, -1, cv2.LINE_AA, _SHIFT)
        return
    c, s = math.cos(angle), math.sin(angle)
    pts = POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * r + (cx, cy)  # (n, 2) rotated
    cv2.fillPoly(mask, [np.round(pts * _ONE).astype(np.int32)], 255, cv2.LINE_AA, _SHIFT)


def muted(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low-saturation colours (greys, beiges, slate): never mistaken for a palette colour."""
    grey = rng.uniform(30, 160, (n, 1))
    return np.clip(grey + rng.uniform(-14, 14, (n, 3)), 0, 255)  # (n, 3)


def background(rng: np.random.Generator, w: int, h: int, clutter: float,
               palette: np.ndarray) -> np.ndarray:
    """Muted textured backdrop with random lines and blobs; ``palette`` (C, 3) are the
    object colours, which lines may wear at low contrast."""
    c0, c1 = muted(rng, 2)
    # A gradient between two muted colours plus blotches on a coarse grid, smoothed by bicubic
    # upsampling, then finer texture at 1/8 resolution; rendering at low resolution keeps the
    # background cheap at 640x480.
    theta = rng.uniform(0, 2 * math.pi)
    gy, gx = np.mgrid[0:4, 0:5] / np.array([3.0, 4.0])[:, None, None]  # (2, 4, 5)
    ramp = np.clip(0.5 + (gx - 0.5) * math.cos(theta) + (gy - 0.5) * math.sin(theta), 0, 1)
    blotches = rng.normal(0, 16, (4, 5, 1)) + rng.normal(0, 4, (4, 5, 3))  # mostly luminance
    grid = c0 + ramp[..., None] * (c1 - c0) + blotches  # (4, 5, 3)
    low_size = (max(w // 8, 2), max(h // 8, 2))
    low = cv2.resize(grid.astype(np.float32), low_size, interpolation=cv2.INTER_CUBIC)
    low += rng.normal(0, rng.uniform(0, 10), low.shape[:2])[..., None].astype(np.float32)
    low = np.clip(low, 0, 255).astype(np.uint8)  # (h/8, w/8, 3)
    image = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)  # (H, W, 3)

    area = clutter * w * h / (640 * 480)
    scale = math.sqrt(w * h / (640 * 480))
    for _ in range(rng.poisson(6 * area)):
        p0 = (rng.uniform(-0.1, 1.1, 2) * (w, h)).astype(int).tolist()
        p1 = (rng.uniform(0, 1, 2) * (w, h)).astype(int).tolist()
        base = image[min(p1[1], h - 1), min(p1[0], w - 1)].astype(np.float64)
        # Lines may carry a palette colour, but only at low contrast to the background.
        colour = (base + 0.3 * (palette[rng.integers(len(palette))] - base)
                  if rng.random() < 0.3 else muted(rng, 1)[0])
        thick = int(rng.integers(1, max(2, round(4 * scale)) + 1))
        cv2.line(image, p0, p1, colour.tolist(), thick, cv2.LINE_AA)
    for _ in range(rng.poisson(4 * area)):
        centre = (rng.uniform(0, 1, 2) * (w, h)).astype(int).tolist()
        axes = ((rng.uniform(4, 60, 2) * scale).astype(int) + 1).tolist()
        cv2.ellipse(image, centre, axes, rng.uniform(0, 180), 0, 360,
                    muted(rng, 1)[0].tolist(), -1, cv2.LINE_AA)
    return image


def composite(image: np.ndarray, placements: Sequence[Placement],
              max_occlusion: float) -> list[SceneObject]:
    """Paint placements back to front into ``image`` (in place); annotate what stays visible."""
    h, w = image.shape[:2]
    owner = np.full((h, w), -1, np.int16)  # (H, W) index of the top placement at each pixel
    drawn: list[tuple[int, int, int, np.ndarray]] = []
    for k, p in enumerate(placements):
        x0, y0 = max(int(p.cx - p.radius) - 1, 0), max(int(p.cy - p.radius) - 1, 0)
        x1, y1 = min(int(p.cx + p.radius) + 3, w), min(int(p.cy + p.radius) + 3, h)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)  # (h_roi, w_roi) coverage
        draw_shape(mask, p.shape, p.cx - x0, p.cy - y0, p.radius, p.angle)
        xs = (np.arange(x0, x1, dtype=np.float32) - p.cx) / p.radius
        ys = (np.arange(y0, y1, dtype=np.float32) - p.cy) / p.radius
        shade = 1 + p.shade * (math.cos(p.shade_angle) * xs[None, :]
                               + math.sin(p.shade_angle) * ys[:, None])  # (h_roi, w_roi)
        colour = shade[..., None] * p.rgb  # (h_roi, w_roi, 3)
        alpha = mask[..., None].astype(np.float32) / 255  # (h_roi, w_roi, 1)
        roi = image[y0:y1, x0:x1]
        blended = roi + alpha * (colour - roi)
        roi[:] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        solid = mask >= 128
        owner[y0:y1, x0:x1][solid] = k
        if p.color is not None:
            drawn.append((k, x0, y0, solid))

    objects = []
    for k, x0, y0, solid in drawn:
        p = placements[k]
        visible = solid & (owner[y0:y0 + solid.shape[0], x0:x0 + solid.shape[1]] == k)
        full, seen = int(solid.sum()), int(visible.sum())
        if full == 0 or seen < (1 - max_occlusion) * full:
            continue
        objects.append(SceneObject(
            category=category_name(p.color, p.shape), color=p.color, shape=p.shape,
            box=_mask_box(visible, x0, y0), full_box=_mask_box(solid, x0, y0), area=seen,
            visible_fraction=seen / full, track_id=p.track_id))
    return objects


def _mask_box(mask: np.ndarray, x0: int, y0: int) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (float(x0 + cols[0]), float(y0 + rows[0]),
            float(x0 + cols[-1] + 1), float(y0 + rows[-1] + 1))


def apply_photometry(image: np.ndarray, ph: Photometry, rng: np.random.Generator) -> np.ndarray:
    """Lighting (one per-channel lookup table), then optics blur, then sensor noise."""
    levels = (np.arange(256) / 255.0)[:, None] ** ph.gamma * 255 * ph.gain  # (256, 3)
    levels = (levels - 128) * ph.contrast + 128
    lut = np.clip(np.round(levels), 0, 255).astype(np.uint8).reshape(256, 1, 3)  # (256, 1, 3)
    out = cv2.LUT(image, lut)
    if ph.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), ph.blur_sigma)
    if ph.noise_std > 0:
        # Uniform noise (std 73.9 per unit weight): at these levels it looks like sensor noise,
        # and one byte per value plus one saturating OpenCV pass is ~5x cheaper than rng.normal.
        raw = np.frombuffer(rng.bytes(out.size), np.uint8).reshape(out.shape)  # (H, W, 3)
        k = ph.noise_std / 73.9
        out = cv2.addWeighted(out, 1.0, raw, k, -127.5 * k, dtype=cv2.CV_8U)
    return out
