"""Captions that say how a crop looks, as the alt-text CLIP was trained on does.

Many of CLIP's 80 prompt templates name a condition of the photo: "a blurry photo of",
"a photo of the small", "a dark photo of", "a close-up photo of". Captions drawn uniformly from
the templates whatever the crop teach the text tower to ignore the template, since every
template describes every crop equally; then averaging a label's templates (prompt
ensembling) cannot gain anything, which is what the first synthetic-clip showed.

``ConditionedCaptions`` draws a caption's template among those whose condition the crop
meets, measured from its pixels and its window (so any COCO dataset works): each template
then embeds near the crops it describes, one template alone covers only part of a category's
crops, and the ensemble covers them all. A condition holds for the ``tail`` fraction of crops
at one end of its measure; the cut points are fitted on a sample of the training windows.
Style templates ("a sculpture of", "a tattoo of") describe nothing a crop here can show; they
caption random crops, as uninformative web text does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clip_perception.templates import CLIP80

# condition -> (measure, end of its range that has it, templates that name it)
CONDITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dark": ("brightness", "low", ("a dark photo of the {}.", "a dark photo of a {}.")),
    "bright": ("brightness", "high", ("a bright photo of a {}.", "a bright photo of the {}.")),
    "blurry": ("sharpness", "low", ("a blurry photo of the {}.", "a blurry photo of a {}.")),
    "hard to see": ("contrast", "low", (
        "a photo of the hard to see {}.", "a photo of a hard to see {}.",
        "a bad photo of a {}.", "a bad photo of the {}.")),
    "small": ("size", "low", (
        "a photo of the small {}.", "a photo of a small {}.", "a low resolution photo of the {}.",
        "a low resolution photo of a {}.", "a pixelated photo of the {}.",
        "a pixelated photo of a {}.")),
    "large": ("size", "high", ("a photo of a large {}.", "a photo of the large {}.")),
    "close-up": ("tightness", "high", (
        "a close-up photo of a {}.", "a close-up photo of the {}.", "a cropped photo of the {}.",
        "a cropped photo of a {}.")),
}
# Photos with none of the conditions.
PLAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photo of the {}.", "a good photo of a {}.", "a good photo of the {}.",
    "a photo of a clean {}.", "a photo of the clean {}.", "a photo of one {}.", "itap of a {}.",
    "itap of the {}.", "a photo of my {}.", "itap of my {}.", "a photo of a nice {}.",
    "a photo of the nice {}.")
TEMPLATE_CONDITION = {t: name for name, (_, _, ts) in CONDITIONS.items() for t in ts}
_NAMED = {t for _, _, templates in CONDITIONS.values() for t in templates} | set(PLAIN_TEMPLATES)
STYLE_TEMPLATES: tuple[str, ...] = tuple(t for t in CLIP80 if t not in _NAMED)
assert set(CLIP80) >= _NAMED, "condition templates are CLIP80's own"

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # (1, 3, 1, 1)
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


@dataclass(frozen=True)
class CropLooks:
    """What a caption writer would see in each of n crops; every field (n,)."""

    brightness: np.ndarray  # mean luma, 0..1
    contrast: np.ndarray  # luma standard deviation
    sharpness: np.ndarray  # Laplacian energy / luma variance: low when blurred
    size: np.ndarray  # object's longer side in detector input pixels
    tightness: np.ndarray  # object side / window side: high for a close-up

    def measure(self, name: str) -> np.ndarray:
        return getattr(self, name)


def look_at(pixels: torch.Tensor, object_px: torch.Tensor, tightness: torch.Tensor) -> CropLooks:
    """Measure crops ``pixels`` (n, 3, S, S) in 0..1 of objects ``object_px`` (n,) pixels
    large, filling ``tightness`` (n,) of their window's side."""
    luma = (pixels * _LUMA).sum(dim=1, keepdim=True)  # (n, 1, S, S)
    variance = luma.var(dim=(1, 2, 3))  # (n,)
    edges = F.conv2d(luma, _LAPLACIAN)  # (n, 1, S - 2, S - 2)
    sharpness = edges.pow(2).mean(dim=(1, 2, 3)) / (variance + 1e-4)  # (n,)
    return CropLooks(luma.mean(dim=(1, 2, 3)).numpy(), variance.sqrt().numpy(),
                     sharpness.numpy(), object_px.numpy(), tightness.numpy())


class ConditionedCaptions:
    """Picks each crop's template from the conditions it meets (module docstring)."""

    def __init__(self, sample: CropLooks, tail: float, style: float) -> None:
        assert 0.0 < tail < 0.5 and 0.0 <= style <= 1.0
        self.style = style
        # Cut point per condition: a crop has it beyond this value of its measure.
        self.cuts = {name: float(np.quantile(sample.measure(measure),
                                             tail if end == "low" else 1.0 - tail))
                     for name, (measure, end, _) in CONDITIONS.items()}

    def conditions(self, looks: CropLooks) -> list[list[str]]:
        """The conditions each crop meets."""
        met = {name: (looks.measure(measure) < self.cuts[name] if end == "low"
                      else looks.measure(measure) > self.cuts[name])
               for name, (measure, end, _) in CONDITIONS.items()}  # name -> (n,) bool
        return [[name for name in CONDITIONS if met[name][i]]
                for i in range(len(looks.brightness))]

    def templates(self, looks: CropLooks, rng: np.random.Generator) -> list[str]:
        """One template per crop: a style one with probability ``style``, else one naming a
        random condition the crop meets, else a plain photo template."""
        out = []
        for met in self.conditions(looks):
            if rng.random() < self.style:
                choices = STYLE_TEMPLATES
            elif met:
                choices = CONDITIONS[met[rng.integers(len(met))]][2]
            else:
                choices = PLAIN_TEMPLATES
            out.append(choices[rng.integers(len(choices))])
        return out


class SubjectWording:
    """Templates whose use depends on the subject, as web captions' wording does.

    Every (template, word) pair gets a log-weight drawn from N(0, ``spread``^2); a category
    picks template t with probability proportional to exp(sum of its words' log-weights for
    t). A contrastive model learns that co-occurrence, so one template alone favours the
    categories it usually went with, and averaging many templates (prompt ensembling) cancels
    those preferences. Per word, so unseen colour-shape pairs inherit their words' habits.
    """

    def __init__(self, templates: tuple[str, ...], names: list[str], spread: float,
                 rng: np.random.Generator) -> None:
        assert spread >= 0.0
        self.templates = templates
        words = sorted({word for name in names for word in name.split()})
        log_weight = rng.normal(0.0, spread, (len(templates), len(words)))  # (T, W)
        columns = [[words.index(w) for w in name.split()] for name in names]
        logits = np.stack([log_weight[:, c].sum(axis=1) for c in columns])  # (K, T)
        logits -= logits.max(axis=1, keepdims=True)
        self.probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # (K, T)

    def draw(self, labels: np.ndarray, rng: np.random.Generator) -> list[str]:
        """One template per category index in ``labels`` (n,)."""
        cumulative = np.cumsum(self.probs[labels], axis=1)  # (n, T)
        picks = (rng.random((len(labels), 1)) > cumulative).sum(axis=1)  # (n,)
        return [self.templates[min(p, len(self.templates) - 1)] for p in picks]
