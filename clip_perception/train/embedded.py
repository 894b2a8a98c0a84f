"""Build the embedded default models (``models/synthetic-clip``, ``models/synthetic-owl``).

Renders the synthetic training and test sets, trains both stages with the default
``Recipe`` or a recipe JSON, evaluates, and writes each checkpoint folder with its
recipe.json and a MODEL_CARD.md. Reproduce with ``COMMAND``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from clip_perception.train.clip_stage import train_clip
from clip_perception.train.coco import write_synthetic_coco
from clip_perception.train.common import read_summary
from clip_perception.train.evaluate import (
    ApScores,
    ClipEvaluation,
    OwlEvaluation,
    evaluate_clip,
    evaluate_owl,
)
from clip_perception.train.owl_stage import train_owl
from clip_perception.train.recipe import Recipe
from clip_perception.train.synthetic import DEFAULT_SPLIT

CLIP_NAME, OWL_NAME = "synthetic-clip", "synthetic-owl"
COMMAND = ("python -m clip_perception.cli train embedded --recipe models/synthetic-owl/recipe.json"
           " --out models")
AIMS = {"seen AP50": 0.80, "unseen AP50": 0.50}


def build_embedded_models(out_root: str | Path = "models", seed: int = 0,
                          recipe: Recipe | None = None) -> None:
    """Generate data (in a temporary folder), train both stages, evaluate, write the cards."""
    recipe = dataclasses.replace(recipe or Recipe(), seed=seed)
    root = Path(out_root)
    with tempfile.TemporaryDirectory(prefix="clip_perception_data_") as tmp:
        tic = time.perf_counter()
        size = (recipe.data.width, recipe.data.height)
        write_synthetic_coco(Path(tmp) / "train", recipe.data.train_images, size, seed, "train")
        write_synthetic_coco(Path(tmp) / "test", recipe.data.test_images, size, seed, "test")
        data_seconds = time.perf_counter() - tic
        clip_dir = train_clip(recipe, Path(tmp) / "train", root / CLIP_NAME)
        owl_dir = train_owl(recipe, Path(tmp) / "train", clip_dir, root / OWL_NAME)
        clip_eval = evaluate_clip(clip_dir, Path(tmp) / "test")
        owl_eval = evaluate_owl(owl_dir, Path(tmp) / "test")
    owl = read_summary(owl_dir)
    facts = _Facts(recipe, data_seconds, read_summary(clip_dir).seconds,
                   [*(run["seconds"] for run in owl.earlier_runs), owl.seconds])
    for folder in (clip_dir, owl_dir):  # the card's reproduce command reads it
        recipe.to_json(folder / "recipe.json")
    (clip_dir / "MODEL_CARD.md").write_text(_clip_card(facts, clip_eval), encoding="utf-8")
    (owl_dir / "MODEL_CARD.md").write_text(_owl_card(facts, owl_eval, clip_eval),
                                           encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class _Facts:
    recipe: Recipe
    data_seconds: float
    clip_seconds: float
    owl_seconds: list[float]  # stage 2's first schedule, then each round


def _size_mb(folder: Path) -> float:
    return (folder / "model.safetensors").stat().st_size / 1e6


def _ap(scores: ApScores | None) -> str:
    return "n/a" if scores is None else f"{scores.ap:.3f} | {scores.ap50:.3f}"


def _common(f: _Facts) -> str:
    r = f.recipe
    return f"""## Data

Synthetic camera frames from `clip_perception.train.synthetic` ({r.data.width}x{r.data.height},
seed {r.seed}): 1-5 coloured shapes per frame over textured, cluttered backgrounds, distractor
shapes outside the vocabulary, random lighting, blur and noise. 42 categories "<colour>
<shape>" (7 colours x 6 shapes). Six colour-shape pairs are held out of training entirely
(unseen): {", ".join(DEFAULT_SPLIT.unseen_categories)}. Training: {r.data.train_images}
frames of seen pairs only. Test: {r.data.test_images} frames from a separate random stream,
half of the objects from unseen pairs.

## Reproduce

```
{COMMAND}
```

Deterministic for a given seed, numpy/OpenCV/torch build and thread count. Measured on
{platform.machine()} with {r.num_threads} CPU threads (torch {torch.__version__}, shared with
other jobs, so times are upper bounds): data rendering {f.data_seconds / 60:.1f} min, CLIP
stage {f.clip_seconds / 60:.1f} min, OWL stage {sum(f.owl_seconds) / 60:.1f} min
({" + ".join(f"{s / 60:.1f}" for s in f.owl_seconds)} min: the first schedule and each round).

## Recipe

```json
{json.dumps(r.to_dict(), indent=1)}
```
"""


def _clip_table(e: ClipEvaluation) -> str:
    rows = "\n".join(f"| {a.prompts} | {a.top1:.3f} | {a.seen:.3f} | "
                     f"{'n/a' if a.unseen is None else f'{a.unseen:.3f}'} |" for a in e.results)
    v = e.variance
    return ("| prompts | top-1 all | seen | unseen |\n|---|---|---|---|\n" + rows + "\n\n"
            f"Text embeddings of every {v.templates} template x category: the template explains "
            f"{v.template:.2%} of their variance, the category {v.category:.2%}, the "
            f"interaction {v.interaction:.2%}; only the interaction lets ensembling change a "
            "prediction (`evaluate.PromptVariance`).")


def _clip_card(f: _Facts, e: ClipEvaluation) -> str:
    folder = Path(e.model)
    return f"""# synthetic-clip

A small CLIP (ViT image tower, causal text tower, CLIPModel layout) trained from scratch by
contrastive pre-training on object crops of synthetic scenes. Stage 1 of the embedded default
models; its towers initialise `synthetic-owl`. It only knows coloured shapes: a working demo
and test model, not a general classifier.

- Input {f.recipe.shape.clip_image_size}x{f.recipe.shape.clip_image_size}, patch
  {f.recipe.shape.patch_size}; weights stored as {f.recipe.save_dtype}
  ({_size_mb(folder):.1f} MB), loaded in any dtype by `load_clip` and by transformers'
  `CLIPModel`.
- Tokenizer: byte-level BPE learned from the training captions (`clip_perception.train.bpe`),
  CLIP's layout (end-of-text has the largest id), context {f.recipe.shape.context_length}.

## Zero-shot classification

Top-1 over all 42 category names on {e.crops} object crops of the test frames (crop side 1.5x
the object). "name": the bare category name; "single": CLIP's "a photo of a {{}}."; "clip7",
"clip80": the CLIP paper's prompt ensembles (mean of the prompt embeddings per label).

{_clip_table(e)}

{_common(f)}"""


def _rounds(recipe: Recipe) -> str:
    if not recipe.owl.rounds:
        return ""
    runs = ", ".join(f"{r.steps} steps at lr {r.lr:g} (seed {r.seed})" for r in recipe.owl.rounds)
    return f"; then stage 2 again from its own weights with a fresh schedule: {runs}"


def _owl_card(f: _Facts, e: OwlEvaluation, clip_eval: ClipEvaluation) -> str:
    folder = Path(e.model)
    s = f.recipe.shape
    reached = {"seen AP50": e.seen.ap50, "unseen AP50": e.unseen.ap50 if e.unseen else 0.0}
    aims = "\n".join(f"| {k} | {v:.2f} | {reached[k]:.3f} | {'yes' if reached[k] >= v else 'no'} |"
                     for k, v in AIMS.items())
    int8 = ("not measured" if e.int8 is None else
            f"AP | AP50 seen {_ap(e.int8.seen)}, unseen {_ap(e.int8.unseen)}; "
            f"{100 * e.int8.agreement:.1f}% of fp32 detections with score >= 0.3 are found "
            "by int8 with the same label at IoU >= 0.5")
    return f"""# synthetic-owl

An OWL-ViT (v1 architecture, `OwlViTForObjectDetection` layout) open-vocabulary detector
trained here from scratch: stage 1 is `synthetic-clip` (contrastive pre-training), stage 2
adds OWL-ViT's class and box heads on the patch tokens and trains on boxes with Hungarian
matching (focal class loss against the category-name embeddings, L1 + GIoU boxes), text
tower frozen{_rounds(f.recipe)}. It detects coloured shapes given as text queries ("red
circle", "blue star") including colour-shape pairs it never saw in training. Demo and test
model only.

- Input {s.image_size}x{s.image_size} (frames are stretched to it, as OWL-ViT does), patch
  {s.patch_size} ({s.image_size // s.patch_size}x{s.image_size // s.patch_size} boxes per
  frame), vision {s.vision_layers}x{s.vision_width}, text {s.text_layers}x{s.text_width},
  context {s.context_length}.
- Weights stored as {f.recipe.save_dtype} ({_size_mb(folder):.1f} MB); `load_owl` and
  transformers' `OwlViTForObjectDetection` load them in any dtype.

## Detection (COCO metrics, pycocotools)

{e.images} test frames at {f.recipe.data.width}x{f.recipe.data.height} through
`load_detector` (fp32, CPU) with all 42 names as queries at once, score threshold 0.01, NMS
IoU 0.3, up to 100 detections per frame. {e.seconds_per_image * 1000:.0f} ms per frame on this
machine (batch 8, including preprocessing).

| categories | AP | AP50 |
|---|---|---|
| all | {_ap(e.overall)} |
| seen | {_ap(e.seen)} |
| unseen | {_ap(e.unseen)} |

Int8 (CPU dynamic quantisation): {int8}.

| aim | target | reached | met |
|---|---|---|---|
{aims}

Per-category AP50:

{", ".join(f"{k} {v:.2f}" for k, v in e.per_category_ap50.items())}

## Stage 1 zero-shot classification

{_clip_table(clip_eval)}

{_common(f)}"""
