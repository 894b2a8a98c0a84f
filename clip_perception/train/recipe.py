"""The training recipe: one typed, JSON-serialisable config for both stages.

The defaults are the recipe that produced the shipped ``models/synthetic-clip`` and
``models/synthetic-owl`` (see ``embedded.build_embedded_models``); change a field with
``dataclasses.replace`` or load a JSON file written by :meth:`Recipe.to_json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a model built from scratch (ignored when starting from a checkpoint).

    The CLIP stage runs at ``clip_image_size`` on object crops and the OWL stage at
    ``image_size`` on whole frames; both share ``patch_size``, so the vision tower carries
    over with its position embeddings resized (as ViTs are fine-tuned at a new resolution).
    """

    clip_image_size: int = 64
    image_size: int = 160
    patch_size: int = 16
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128  # also the projection width: OWL needs them equal
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 16
    mlp_ratio: int = 4
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class OptimRecipe:
    """AdamW with decoupled weight decay and a linear-warmup cosine schedule."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float = 1.0
    final_lr_fraction: float = 0.05  # cosine decays to this fraction of lr


@dataclass(frozen=True)
class DetectionLossWeights:
    """Hungarian matching cost and loss weights (the Deformable-DETR / OWL-ViT values)."""

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    # Predictions matched to each object. 1 is OWL-ViT's one-to-one matching; k > 1 runs the
    # same Hungarian matching against k copies of every object (H-DETR's one-to-many branch),
    # which gives k times the positives per step and converges much faster on small budgets.
    # The detector's NMS removes the resulting near-duplicate boxes.
    matches_per_object: int = 1


@dataclass(frozen=True)
class ClipRecipe:
    """Stage 1: contrastive pre-training on object crops captioned through prompt templates."""

    optim: OptimRecipe = field(default_factory=lambda: OptimRecipe(
        steps=700, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=50))
    bpe_merges: int = 600  # upper bound; learning stops when no pair occurs twice
    # Window side / object side, sampled log-uniformly (windows are capped at the detector's
    # scale, see clip_stage.WindowSampler).
    context: tuple[float, float] = (1.5, 5.0)
    center_jitter: float = 0.15  # max shift of the crop centre, in object sides
    hflip: float = 0.5
    templates: str = "clip80"  # captions: a random template of this set per crop, or ...
    bare_name: float = 0.3  # ... with this probability the bare name, as detection queries are
    # Probability that a caption names one word of a multi-word category only ("red" or
    # "triangle" for "red triangle"; positive for every crop with that word). For
    # attribute-noun names like the synthetic ones: it makes both towers represent colour and
    # shape separately, which is what lets unseen pairs compose. 0 for other datasets.
    partial_names: float = 0.0
    init_temperature: float = 0.07  # CLIP's initial 1 / logit scale
    max_logit_scale: float = 100.0  # CLIP clamps the learned scale here

    @property
    def init_log_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)


@dataclass(frozen=True)
class OwlRound:
    """One more stage-2 run from the previous run's weights, with its own seed (new crops,
    batches and queries) and its own warm-up + cosine schedule of ``steps`` peaking at
    ``lr``; everything else is the ``OwlRecipe``'s. Restarting at a lower rate is how the
    shipped detector got past its AP50 aim (models/synthetic-owl/MODEL_CARD.md)."""

    seed: int
    steps: int
    lr: float


@dataclass(frozen=True)
class OwlRecipe:
    """Stage 2: OWL-ViT v1 detection fine-tuning with Hungarian matching."""

    optim: OptimRecipe = field(default_factory=lambda: OptimRecipe(
        steps=2500, batch_size=16, lr=5e-4, weight_decay=0.05, warmup_steps=100))
    # Learning-rate multiplier of the text tower; 0 freezes it, which keeps the stage-1 text
    # space (and so the unseen names' embeddings) intact.
    text_lr_scale: float = 0.0
    crop_scale: tuple[float, float] = (0.6, 1.0)  # square crop side / frame side (zoom in)
    full_frame: float = 0.3  # probability of the uncropped frame, the deployment view
    min_visible: float = 0.5  # boxes cut to less of their area are dropped
    hflip: float = 0.5
    max_queries: int = 64  # per batch: its labels plus random negatives up to this many
    loss: DetectionLossWeights = field(default_factory=DetectionLossWeights)
    # Class-head initialisation: logits start at the focal-loss prior, log(p / (1 - p)).
    prior_prob: float = 0.01
    init_logit_scale: float = 10.0
    rounds: tuple[OwlRound, ...] = ()  # run in order after the first schedule

    def __post_init__(self) -> None:
        # JSON gives the rounds as dicts.
        rounds = tuple(r if isinstance(r, OwlRound) else OwlRound(**r) for r in self.rounds)
        object.__setattr__(self, "rounds", rounds)


@dataclass(frozen=True)
class DataRecipe:
    """The synthetic data ``build_embedded_models`` renders (640x480, the camera frame)."""

    width: int = 640
    height: int = 480
    train_images: int = 5000
    test_images: int = 400


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    num_threads: int = 2
    save_dtype: str = "float16"  # storage only; load_* casts to the requested dtype
    shape: ModelShape = field(default_factory=ModelShape)
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    owl: OwlRecipe = field(default_factory=OwlRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)

    def for_round(self, owl_round: OwlRound) -> Recipe:
        """This recipe as one stage-2 run of ``owl_round``, without further rounds."""
        optim = dataclasses.replace(self.owl.optim, steps=owl_round.steps, lr=owl_round.lr)
        owl = dataclasses.replace(self.owl, optim=optim, rounds=())
        return dataclasses.replace(self, seed=owl_round.seed, owl=owl)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; missing fields keep their defaults, unknown ones fail."""
        return _updated(cls(), raw)

    @classmethod
    def from_json(cls, path: str | Path) -> Recipe:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


T = TypeVar("T")


def _updated(base: T, raw: dict[str, Any]) -> T:
    """``base`` with the fields named in ``raw`` replaced, recursing into nested sections."""
    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"unknown {type(base).__name__} fields: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            values[name] = _updated(current, value)
        elif isinstance(current, tuple):
            values[name] = tuple(value)  # JSON has lists only
        else:
            values[name] = value
    return dataclasses.replace(base, **values)  # type: ignore[type-var]
