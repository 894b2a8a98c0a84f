"""Seeded synthetic camera scenes of coloured shapes, for training and evaluating from scratch.

A category is a colour-shape pair such as ``"red circle"``. Scenes have muted, textured and
cluttered backgrounds, up to a few overlapping objects, distractor shapes that are not in the
vocabulary, and random lighting, blur and sensor noise.

Boxes: ``SceneObject.box`` is the tight xyxy box of the object's *visible* pixels (what a
detector can see, as in COCO), with exclusive right/bottom edges; ``full_box`` is the amodal box.
An object more than ``SceneConfig.max_occlusion`` hidden is not annotated (its visible sliver
stays in the image, like an unlabelled background object).

Determinism: every scene draws from its own ``np.random.default_rng`` seeded by
(seed, split, index), so the same arguments give identical bytes (with the same numpy/OpenCV
builds), and any scene can be rendered on its own: random access for data loaders.

The compositional split (``SplitSpec``) holds some colour-shape pairs out of training; val uses
seen pairs only, test mixes seen and unseen pairs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from clip_perception.train.render import (
    Photometry,
    Placement,
    SceneObject,
    apply_photometry,
    background,
    category_name,
    composite,
    muted,
)

Split = Literal["train", "val", "test"]

# Saturated, well separated colours; backgrounds and clutter stay desaturated so that colour
# words refer to objects only.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (40, 165, 60),
    "blue": (35, 85, 220),
    "purple": (145, 55, 190),
    "white": (240, 240, 240),
}
_PALETTE = np.array(list(COLORS.values()), np.float64)  # (C, 3)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
DISTRACTOR_SHAPES: tuple[str, ...] = ("hexagon", "crescent", "arrow", "heart")

# One held-out pair per shape and at most one per colour, so each colour keeps at least five
# training shapes and each shape at least six training colours.
DEFAULT_UNSEEN_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("orange", "ring"), ("yellow", "square"),
    ("green", "star"), ("blue", "cross"), ("purple", "circle"),
)

_SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_SCENE_STREAM, _CROP_STREAM, _VIDEO_STREAM = 0, 1, 2
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class SplitSpec:
    """Which colour-shape pairs are held out of training (seen only as unseen test queries)."""

    unseen_pairs: tuple[tuple[str, str], ...] = DEFAULT_UNSEEN_PAIRS
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    test_unseen_fraction: float = 0.5  # chance that a test object is drawn from an unseen pair

    def __post_init__(self) -> None:
        if not set(self.colors) <= set(COLORS) or not set(self.shapes) <= set(SHAPES):
            raise ValueError(f"colours must come from {list(COLORS)}, shapes from {SHAPES}")
        unknown = [p for p in self.unseen_pairs
                   if p[0] not in self.colors or p[1] not in self.shapes]
        if unknown:
            raise ValueError(f"unseen pairs outside the vocabulary: {unknown}")
        seen = self.seen_pairs
        missing = ({c for c, _ in self.unseen_pairs} - {c for c, _ in seen}) | (
            {s for _, s in self.unseen_pairs} - {s for _, s in seen})
        if missing:
            raise ValueError(f"held out entirely from training, so not compositional: {missing}")

    @property
    def seen_pairs(self) -> list[tuple[str, str]]:
        held = set(self.unseen_pairs)
        return [(c, s) for c in self.colors for s in self.shapes if (c, s) not in held]

    @property
    def categories(self) -> list[str]:
        """Every category name (seen and unseen), colour-major: the detector's vocabulary."""
        return [category_name(c, s) for c in self.colors for s in self.shapes]

    @property
    def unseen_categories(self) -> list[str]:
        return [category_name(c, s) for c, s in self.unseen_pairs]


DEFAULT_SPLIT = SplitSpec()


@dataclass(frozen=True)
class SceneConfig:
    """Image size and the ranges that scene content and photometry are sampled from."""

    width: int = 640
    height: int = 480
    n_objects: tuple[int, int] = (1, 5)
    n_distractors: tuple[int, int] = (0, 2)
    size_frac: tuple[float, float] = (0.05, 0.33)  # object diameter / short image side
    min_size_px: float = 8.0  # below this a shape is no longer recognisable
    max_occlusion: float = 0.6
    clutter: float = 1.0  # density of background lines and blobs
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.75, 1.25)
    color_cast: float = 0.1  # max relative per-channel gain deviation
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    noise_std: tuple[float, float] = (0.0, 8.0)

    def __post_init__(self) -> None:
        ranges = [self.n_objects, self.n_distractors, self.size_frac, self.brightness,
                  self.contrast, self.gamma, self.blur_sigma, self.noise_std]
        if any(lo > hi for lo, hi in ranges) or self.n_objects[0] < 1:
            raise ValueError(f"bad SceneConfig ranges: {self}")
        if min(self.width, self.height) < 2 * self.min_size_px or self.size_frac[1] > 0.95:
            raise ValueError(f"objects do not fit a {self.width}x{self.height} image")


DEFAULT_SCENE = SceneConfig()
# Single-object renders for CLIP pre-training: one large object, small distractors behind it.
CROP_SCENE = SceneConfig(width=64, height=64, n_objects=(1, 1), n_distractors=(0, 1),
                         size_frac=(0.45, 0.9), clutter=0.5)


@dataclass(frozen=True)
class Scene:
    """One rendered image with its annotations and a caption listing them left to right."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[SceneObject]
    caption: str


@dataclass(frozen=True)
class Crop:
    """A single-object image for image-text (CLIP) pre-training."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    category: str
    caption: str  # e.g. "a red circle"


@dataclass(frozen=True)
class VideoFrame:
    """One frame of ``make_video_frames``; objects carry a ``track_id`` stable across frames."""

    index: int
    stamp: float  # seconds since the first frame
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[SceneObject]


def _sample_photometry(rng: np.random.Generator, cfg: SceneConfig) -> Photometry:
    gain = rng.uniform(*cfg.brightness) * (1 + rng.uniform(-cfg.color_cast, cfg.color_cast, 3))
    blur = rng.uniform(*cfg.blur_sigma) if rng.random() < cfg.blur_prob else 0.0
    gamma = math.exp(rng.uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1])))
    return Photometry(gain, rng.uniform(*cfg.contrast), gamma, blur, rng.uniform(*cfg.noise_std))


def _place(rng: np.random.Generator, cfg: SceneConfig, shape: str, color: str | None,
           rgb: np.ndarray, others: list[Placement]) -> Placement:
    short = min(cfg.width, cfg.height)
    lo = max(cfg.size_frac[0] * short, cfg.min_size_px)
    hi = max(cfg.size_frac[1] * short, lo)
    r = math.exp(rng.uniform(math.log(lo), math.log(hi))) / 2  # log-uniform: many small objects
    # A few tries to avoid stacking objects right on top of each other; occlusion still happens.
    for _ in range(8):
        cx, cy = rng.uniform(r + 1, cfg.width - r - 1), rng.uniform(r + 1, cfg.height - r - 1)
        if all(math.hypot(cx - o.cx, cy - o.cy) > 0.7 * (r + o.radius) for o in others):
            break
    return Placement(shape, rgb.astype(np.float32), cx, cy, r, rng.uniform(0, 2 * math.pi),
                     rng.uniform(0, 0.25), rng.uniform(0, 2 * math.pi), color)


def _sample_pair(rng: np.random.Generator, split: Split, spec: SplitSpec) -> tuple[str, str]:
    pool = spec.seen_pairs
    if split == "test" and spec.unseen_pairs and rng.random() < spec.test_unseen_fraction:
        pool = list(spec.unseen_pairs)
    return pool[rng.integers(len(pool))]


def _sample_placements(rng: np.random.Generator, cfg: SceneConfig,
                       pairs: Sequence[tuple[str, str]]) -> list[Placement]:
    """Objects for ``pairs`` plus distractors, in drawing order; the top one is an object so
    that every scene has at least one fully visible annotation."""
    placed: list[Placement] = []
    for color, shape in pairs:
        rgb = np.clip(np.array(COLORS[color]) + rng.normal(0, 8, 3), 0, 255)
        placed.append(_place(rng, cfg, shape, color, rgb, placed))
    for _ in range(rng.integers(cfg.n_distractors[0], cfg.n_distractors[1] + 1)):
        shape = DISTRACTOR_SHAPES[rng.integers(len(DISTRACTOR_SHAPES))]
        # Half the distractors wear a palette colour, so shape alone must reject them.
        rgb = (_PALETTE[rng.integers(len(_PALETTE))]
               if rng.random() < 0.5 else muted(rng, 1)[0])
        placed.append(_place(rng, cfg, shape, None, rgb, placed))
    top, rest = placed[len(pairs) - 1], placed[:len(pairs) - 1] + placed[len(pairs):]
    return [rest[i] for i in rng.permutation(len(rest))] + [top]


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _plural(category: str) -> str:
    return category + ("es" if category.endswith(("s", "x", "ch", "sh")) else "s")


def make_caption(categories: Sequence[str]) -> str:
    """``"a photo of a red circle, two blue stars and an orange ring"``."""
    parts = [f"{_article(c)} {c}" if n == 1 else f"{_NUMBERS.get(n, 'many')} {_plural(c)}"
             for c, n in Counter(categories).items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a photo of {listed}"


def _render(rng: np.random.Generator, split: Split, spec: SplitSpec,
            cfg: SceneConfig) -> Scene:
    image = background(rng, cfg.width, cfg.height, cfg.clutter, _PALETTE)
    n = int(rng.integers(cfg.n_objects[0], cfg.n_objects[1] + 1))
    placements = _sample_placements(rng, cfg, [_sample_pair(rng, split, spec) for _ in range(n)])
    objects = composite(image, placements, cfg.max_occlusion)
    image = apply_photometry(image, _sample_photometry(rng, cfg), rng)
    # Left to right: a stable, spatially meaningful order for the caption.
    caption = make_caption([o.category for o in sorted(objects, key=lambda o: o.box[0])])
    return Scene(image, objects, caption)


def _rng(seed: int, split: Split, index: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, split, item, kind of item)."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index, stream])


def generate_scene(seed: int, index: int = 0, split: Split = "train",
                   spec: SplitSpec = DEFAULT_SPLIT, config: SceneConfig = DEFAULT_SCENE) -> Scene:
    """Scene ``index`` of ``split``; train and val objects come only from seen pairs."""
    return _render(_rng(seed, split, index, _SCENE_STREAM), split, spec, config)


def generate_scenes(n: int, seed: int, split: Split = "train", spec: SplitSpec = DEFAULT_SPLIT,
                    config: SceneConfig = DEFAULT_SCENE) -> Iterator[Scene]:
    """Scenes ``0 .. n-1`` of ``split`` (lazily)."""
    return (generate_scene(seed, i, split, spec, config) for i in range(n))


def generate_crop(seed: int, index: int = 0, size: int = 64, split: Split = "train",
                  spec: SplitSpec = DEFAULT_SPLIT) -> Crop:
    """A ``size`` x ``size`` image of one large object, captioned ``"a red circle"``."""
    rng = _rng(seed, split, index, _CROP_STREAM)
    scene = _render(rng, split, spec, replace(CROP_SCENE, width=size, height=size))
    category = scene.objects[0].category  # the one object is drawn on top, so always kept
    return Crop(scene.image, category, f"{_article(category)} {category}")


def _bounce(u: float, margin: float, size: float) -> float:
    """Free position ``u`` folded back into ``[margin, size - margin]``: elastic bounces."""
    span = size - 2 * margin
    m = (u - margin) % (2 * span)
    return margin + (m if m <= span else 2 * span - m)


def make_video_frames(n_frames: int, width: int = 640, height: int = 480, seed: int = 0,
                      fps: float = 10.0, n_objects: int = 4, split: Split = "test",
                      spec: SplitSpec = DEFAULT_SPLIT) -> list[VideoFrame]:
    """A fixed camera watching ``n_objects`` distinct categories (and one distractor) move at
    constant velocity, bouncing off the frame edges, under slowly drifting light.

    Objects carry ``track_id``; the draw order is fixed, so crossings occlude consistently.
    Frames are held in memory (~0.9 MB each at 640x480).
    """
    if n_objects < 1:
        raise ValueError(f"n_objects must be at least 1, got {n_objects}")
    rng = _rng(seed, split, 0, _VIDEO_STREAM)
    cfg = replace(DEFAULT_SCENE, width=width, height=height, n_distractors=(1, 1),
                  size_frac=(0.1, 0.25), blur_prob=0.0, noise_std=(2.0, 5.0))
    backdrop = background(rng, width, height, cfg.clutter, _PALETTE)
    pool = spec.seen_pairs + (list(spec.unseen_pairs) if split == "test" else [])
    pairs = [pool[i] for i in rng.choice(len(pool), n_objects, replace=False)]
    track_ids = iter(range(n_objects))
    placements = [p if p.color is None else replace(p, track_id=next(track_ids))
                  for p in _sample_placements(rng, cfg, pairs)]
    speed = rng.uniform(0.05, 0.2, len(placements)) * width  # px/s
    heading = rng.uniform(0, 2 * math.pi, len(placements))
    spin = rng.uniform(-0.5, 0.5, len(placements))  # rad/s
    base = _sample_photometry(rng, cfg)
    drift_phase = rng.uniform(0, 2 * math.pi, 4)  # brightness, then one per channel
    frames = []
    for i in range(n_frames):
        t = i / fps
        # Closed-form positions: no accumulated rounding, and any frame can be computed alone.
        moved = [replace(p, angle=p.angle + w * t,
                         cx=_bounce(p.cx + v * math.cos(a) * t, p.radius + 1, width),
                         cy=_bounce(p.cy + v * math.sin(a) * t, p.radius + 1, height))
                 for p, v, a, w in zip(placements, speed, heading, spin, strict=True)]
        image = backdrop.copy()
        objects = composite(image, moved, cfg.max_occlusion)
        # Light drifts over ~10 s: +-8% brightness, +-3% per-channel colour wobble.
        drift = ((1 + 0.08 * math.sin(2 * math.pi * t / 10 + drift_phase[0]))
                 * (1 + 0.03 * np.sin(2 * math.pi * t / 7 + drift_phase[1:])))
        image = apply_photometry(image, replace(base, gain=base.gain * drift), rng)
        frames.append(VideoFrame(i, t, image, objects))
    return frames
