"""Stage 2: open-vocabulary detection training, OWL-ViT style.

Starting from a CLIP checkpoint (stage 1), the OWL-ViT v1 architecture is built around its two
towers: the vision tower at the detection resolution (position embeddings resized), plus new
class and box heads on the patch tokens. Starting from an OWL checkpoint (ours or a public
OWL-ViT / OWLv2 folder) it is fine-tuned as it is, e.g. on a user's own objects.

v1 rather than v2: OWLv2's extra objectness head only helps rank boxes for classes it was not
trained on in web-scale self-training; with a few labelled categories it adds a head and a
loss for no gain here. OWLv2 checkpoints are still fine-tuned, objectness included.

Training: frames from any COCO dataset are mapped to the square model frame (stretched for
OWL-ViT, padded for OWLv2, as their preprocessors do), randomly zoomed in (square crops) and
mirrored. The queries of a batch are the category names that occur in the training
annotations (names with no training box, e.g. held-out categories, are never used), each
matched to predictions by the Hungarian algorithm (see ``losses.detection_losses``).
The text tower is frozen by default (``OwlRecipe.text_lr_scale``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert

from clip_perception.model import OwlModel, load_clip, load_owl, load_tokenizer, read_config
from clip_perception.model.preprocess import load_preprocessor
from clip_perception.model.tokenizer import ClipTokenizer
from clip_perception.train.coco import load_coco
from clip_perception.train.common import (
    TrainingSummary,
    make_optimizer,
    owl_config_from,
    preprocessor_for,
    read_summary,
    run_steps,
    save_checkpoint,
    training_session,
)
from clip_perception.train.frames import FrameBank, build_frame_bank, crop_resize
from clip_perception.train.losses import BoxTargets, detection_losses
from clip_perception.train.recipe import OwlRecipe, Recipe


class FrameSampler:
    """Random zoomed, mirrored batches of frames with their boxes in the crop's frame."""

    def __init__(self, bank: FrameBank, cfg: OwlRecipe, image_size: int,
                 rng: np.random.Generator) -> None:
        self.bank, self.cfg, self.image_size, self.rng = bank, cfg, image_size, rng

    def _window(self) -> tuple[float, float, float]:
        """(x0, y0, side) of a square crop, in [0, 1] frame units."""
        if self.rng.random() < self.cfg.full_frame:
            return 0.0, 0.0, 1.0
        side = self.rng.uniform(*self.cfg.crop_scale)
        return self.rng.uniform(0, 1 - side), self.rng.uniform(0, 1 - side), side

    def _boxes_in(self, boxes: torch.Tensor, x0: float, y0: float, side: float, flip: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (G, 4) xyxy mapped into the crop; returns kept cxcywh boxes and the keep mask
        (objects cut to under ``min_visible`` of their area are dropped)."""
        moved = (boxes - torch.tensor([x0, y0, x0, y0])) / side  # (G, 4)
        clipped = moved.clamp(0.0, 1.0)
        area = (moved[:, 2:] - moved[:, :2]).prod(-1)  # (G,)
        visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(-1)  # (G,)
        keep = visible >= self.cfg.min_visible * area
        if flip:
            clipped = torch.stack([1 - clipped[:, 2], clipped[:, 1], 1 - clipped[:, 0],
                                   clipped[:, 3]], dim=-1)  # (G, 4)
        return box_convert(clipped[keep], "xyxy", "cxcywh"), keep

    def batch(self, n: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """pixels (n, 3, S, S), per image boxes (G, 4) cxcywh and labels (G,)."""
        idx = self.rng.integers(len(self.bank.frames), size=n)
        flips = self.rng.random(n) < self.cfg.hflip
        regions, boxes, labels = [], [], []
        for i, flip in zip(idx, flips, strict=True):
            x0, y0, side = self._window()
            regions.append([x0, y0, x0 + side, y0 + side])
            kept, keep = self._boxes_in(self.bank.boxes[i], x0, y0, side, bool(flip))
            boxes.append(kept)
            labels.append(self.bank.labels[i][keep])
        pixels = crop_resize(self.bank.frames[torch.from_numpy(idx)], torch.tensor(regions),
                             self.image_size, torch.from_numpy(flips))
        return pixels, boxes, labels


def owl_from_clip(clip_dir: Path, image_size: int, cfg: OwlRecipe) -> OwlModel:
    """OWL-ViT v1 with stage-1 CLIP towers and freshly initialised heads."""
    clip = load_clip(clip_dir)
    owl = OwlModel(owl_config_from(clip.config, image_size))
    side = owl.config.num_patches_side
    state = clip.state_dict()
    state["vision.pos_embed"] = clip.vision.position_embeddings(side, side)  # (1 + P, Dv)
    missing, unexpected = owl.load_state_dict(state, strict=False)
    assert not unexpected and all(k.split(".")[0] in _HEADS for k in missing), missing
    _init_heads(owl, cfg)
    return owl


_HEADS = ("merge_norm", "class_head", "box_head")


@torch.no_grad()
def _init_heads(owl: OwlModel, cfg: OwlRecipe) -> None:
    """Boxes start at the model's per-patch prior (box_bias) because the last box layer is
    zero; class logits start near the focal-loss prior with room (scale) to move."""
    for module in (*owl.class_head.modules(), *owl.box_head.modules()):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    nn.init.zeros_(owl.box_head.fc2.weight)
    prior_logit = float(np.log(cfg.prior_prob / (1 - cfg.prior_prob)))
    # logits = (cos + shift) * (elu(scale) + 1): at cos = 0 they equal the prior.
    owl.class_head.scale.bias.fill_(cfg.init_logit_scale - 1)
    owl.class_head.shift.bias.fill_(prior_logit / cfg.init_logit_scale)


def _start(src: Path, recipe: Recipe) -> tuple[OwlModel, ClipTokenizer, bool]:
    """(model, tokenizer, whether frames are padded to a square) for a CLIP or OWL folder."""
    if read_config(src).family == "clip":
        owl = owl_from_clip(src, recipe.shape.image_size, recipe.owl)
        return owl, load_tokenizer(src, context_length=owl.config.context_length), False
    owl = load_owl(src)
    return owl, load_tokenizer(src), load_preprocessor(src).mode == "pad"


def train_owl(
    recipe: Recipe, data_dir: str | Path, clip_dir_or_owl_dir: str | Path, out_dir: str | Path,
) -> Path:
    """Train an OWL detector on a COCO dataset, starting from a CLIP checkpoint (new heads) or
    an OWL checkpoint (fine-tuning), then run each of ``recipe.owl.rounds`` from the previous
    run's weights; writes the last run's checkpoint folder ``out_dir`` and returns it. Its
    training summary lists the earlier runs; the runs before the last live in a temporary
    folder."""
    runs = [dataclasses.replace(recipe, owl=dataclasses.replace(recipe.owl, rounds=())),
            *(recipe.for_round(r) for r in recipe.owl.rounds)]
    src, earlier = Path(clip_dir_or_owl_dir), []
    with tempfile.TemporaryDirectory(prefix="owl_rounds_") as tmp:
        start = src
        for k, run in enumerate(runs[:-1]):
            start = _train_once(run, data_dir, start, Path(tmp) / f"run-{k}", src, [])
            done = read_summary(start)
            earlier.append({"steps": done.steps, "seconds": done.seconds, "seed": run.seed,
                            "lr": run.owl.optim.lr})
        return _train_once(runs[-1], data_dir, start, Path(out_dir), src, earlier)


def _train_once(recipe: Recipe, data_dir: str | Path, src: Path, out: Path, origin: Path,
                earlier: list[dict[str, Any]]) -> Path:
    """One stage-2 schedule from checkpoint ``src``; the summary names ``origin``, where the
    chain of runs began, and the ``earlier`` runs."""
    cfg = recipe.owl
    with training_session(recipe.seed, recipe.num_threads) as rng:
        owl, tokenizer, pad = _start(src, recipe)
        size = owl.config.image_size
        bank = build_frame_bank(load_coco(data_dir), size, pad)
        sampler = FrameSampler(bank, cfg, size, rng)
        name_ids = tokenizer(bank.names)  # (K, L)
        train_text = cfg.text_lr_scale > 0
        owl.requires_grad_(True)
        for module in (owl.text, owl.text_projection):
            module.requires_grad_(train_text)
        owl.log_logit_scale.requires_grad_(False)  # image-level contrastive scale: unused here
        owl.train()
        named = [(n, p, cfg.text_lr_scale if n.startswith("text") else 1.0)
                 for n, p in owl.named_parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(named, cfg.optim)
        with torch.no_grad():
            frozen_queries = None if train_text else owl.encode_text(name_ids)  # (K, D)

        def step() -> dict[str, torch.Tensor]:
            pixels, boxes, labels = sampler.batch(cfg.optim.batch_size)
            chosen = _choose_queries(labels, len(bank.names), cfg.max_queries, rng)  # (Q,)
            remap = torch.full((len(bank.names),), -1, dtype=torch.long)
            remap[chosen] = torch.arange(len(chosen))
            queries = (frozen_queries[chosen] if frozen_queries is not None
                       else owl.encode_text(name_ids[chosen]))  # (Q, D)
            features = owl.image_features(pixels)
            logits = owl.class_logits(features, queries)  # (B, P, Q)
            targets = [BoxTargets(remap[lab], box) for lab, box in zip(labels, boxes,
                                                                       strict=True)]
            return detection_losses(logits, features.boxes, targets, cfg.loss,
                                    features.objectness_logits).as_dict()

        log, seconds = run_steps([p for _, p, _ in named], cfg.optim, optimizer, scheduler,
                                 step, "OWL stage")
    owl.eval()
    preprocessor = preprocessor_for(None if read_config(src).family == "clip" else src,
                                    "owlvit", size)
    save_checkpoint(owl, out, recipe.save_dtype, src, preprocessor)
    TrainingSummary("owl", str(origin), str(data_dir), cfg.optim.steps, seconds, log,
                    recipe.to_dict(), earlier).write(out)
    return out


def _choose_queries(labels: list[torch.Tensor], num_names: int, max_queries: int,
                    rng: np.random.Generator) -> torch.Tensor:
    """Every name when they fit in ``max_queries``; else the batch's labels plus random other
    names as negatives, up to ``max_queries``. Sorted name indices (Q,)."""
    if num_names <= max_queries:
        return torch.arange(num_names)
    present = torch.unique(torch.cat(labels)) if labels else torch.zeros(0, dtype=torch.long)
    others = np.setdiff1d(np.arange(num_names), present.numpy())
    extra = rng.choice(others, size=max(0, min(len(others), max_queries - len(present))),
                       replace=False)
    return torch.sort(torch.cat([present, torch.from_numpy(extra)])).values
