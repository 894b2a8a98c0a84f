"""Stage 1: contrastive image-text pre-training of a small CLIP on object crops.

Any COCO detection dataset serves as image-text data: every annotated box gives a crop with
random context, scale, position jitter and mirroring, captioned by its category name put
through a random prompt template (CLIP's 80 ImageNet templates by default, or the bare name).
Crops of the same category in a batch count as matching pairs (see ``contrastive_loss``).

From scratch, the BPE vocabulary is learned from all those captions first; with ``init`` a
CLIP checkpoint folder (ours or a public one) is fine-tuned with its own tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from clip_perception.model import ClipModel, load_clip, load_tokenizer
from clip_perception.model.tokenizer import ClipTokenizer
from clip_perception.templates import NAMED_TEMPLATES
from clip_perception.train.bpe import train_tokenizer
from clip_perception.train.coco import CocoDataset, load_coco
from clip_perception.train.common import (
    TrainingSummary,
    clip_config,
    crop_resize,
    make_optimizer,
    new_clip,
    preprocessor_for,
    run_steps,
    save_checkpoint,
    training_session,
)
from clip_perception.train.losses import contrastive_loss
from clip_perception.train.recipe import ClipRecipe, Recipe

CROP_STORE_SIDE = 112  # pixels of each stored crop


@dataclass(frozen=True)
class CropBank:
    """One square uint8 crop per annotated object, centred on it, object side = ``object_side``
    pixels; wide enough for the largest context and jitter the recipe samples."""

    crops: torch.Tensor  # (N, 3, C, C) uint8
    labels: torch.Tensor  # (N,) int64 index into names
    names: list[str]  # categories with at least one object
    object_side: float


def build_crop_bank(dataset: CocoDataset, cfg: ClipRecipe, side: int = CROP_STORE_SIDE
                    ) -> CropBank:
    """Cut every annotated object out of the dataset's images (border pixels replicated)."""
    span = cfg.context[1] + 2 * cfg.center_jitter  # crop side / object side
    names = sorted({label for image in dataset.images for label in image.labels},
                   key=dataset.categories.index)
    index = {name: i for i, name in enumerate(names)}
    crops, labels = [], []
    for image in tqdm(dataset.images, desc="cropping objects", unit="img", mininterval=5.0):
        if not image.labels:
            continue
        rgb = image.read_rgb()
        for (x0, y0, x1, y1), label in zip(image.boxes.tolist(), image.labels, strict=True):
            window = max(x1 - x0, y1 - y0) * span
            size = max(2, math.ceil(window))
            patch = cv2.getRectSubPix(rgb, (size, size), ((x0 + x1) / 2, (y0 + y1) / 2))
            crops.append(cv2.resize(patch, (side, side), interpolation=cv2.INTER_AREA))
            labels.append(index[label])
    if not crops:
        raise ValueError(f"{dataset.annotation_file}: no annotated objects to train on")
    stacked = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()  # (N,3,C,C)
    return CropBank(stacked, torch.tensor(labels), names, side / span)


def caption_templates(cfg: ClipRecipe) -> tuple[str, ...]:
    """The bare name ("{}", how detection queries arrive) plus the recipe's template set."""
    return ("{}", *NAMED_TEMPLATES[cfg.templates])


class CropSampler:
    """Random augmented (pixels, token ids, category) batches from a :class:`CropBank`."""

    def __init__(self, bank: CropBank, tokenizer: ClipTokenizer, cfg: ClipRecipe,
                 image_size: int, rng: np.random.Generator) -> None:
        self.bank, self.tokenizer, self.cfg = bank, tokenizer, cfg
        self.image_size, self.rng = image_size, rng
        self.templates = caption_templates(cfg)

    def regions(self, n: int) -> torch.Tensor:
        """(n, 4) xyxy crop windows inside the stored crops: log-uniform context, jittered."""
        lo, hi = np.log(self.cfg.context)
        side = np.exp(self.rng.uniform(lo, hi, n)) * self.bank.object_side  # (n,)
        jitter = self.cfg.center_jitter * self.bank.object_side
        centre = self.bank.crops.shape[-1] / 2 + self.rng.uniform(-jitter, jitter, (n, 2))
        half = side[:, None] / 2  # (n, 1)
        return torch.from_numpy(np.concatenate([centre - half, centre + half], 1))  # (n, 4)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels (n, 3, S, S), token ids (n, L), labels (n,)."""
        idx = torch.from_numpy(self.rng.integers(len(self.bank.labels), size=n))
        flip = torch.from_numpy(self.rng.random(n) < self.cfg.hflip)
        pixels = crop_resize(self.bank.crops[idx], self.regions(n), self.image_size, flip)
        labels = self.bank.labels[idx]
        captions = [self.templates[t].format(self.bank.names[int(c)])
                    for t, c in zip(self.rng.integers(len(self.templates), size=n), labels,
                                    strict=True)]
        return pixels, self.tokenizer(captions), labels


def _start(recipe: Recipe, names: list[str], out: Path, init: Path | None
           ) -> tuple[ClipModel, ClipTokenizer, Path]:
    """(model, tokenizer, folder holding the tokenizer files) to train from."""
    if init is not None:
        return load_clip(init, requires_grad=True), load_tokenizer(init), init
    shape = recipe.shape
    corpus = [t.format(name) for t in caption_templates(recipe.clip) for name in names]
    tokenizer = train_tokenizer(corpus, out, recipe.clip.bpe_merges, shape.context_length)
    cfg = clip_config(shape, tokenizer.vocab_size, recipe.clip.init_log_logit_scale)
    return new_clip(cfg), tokenizer, out


def train_clip(
    recipe: Recipe, data_dir: str | Path, out_dir: str | Path, init: str | Path | None = None,
) -> Path:
    """Train (or, with ``init``, fine-tune) a CLIP on a COCO dataset's object crops and write
    a CLIP checkpoint folder to ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.clip
    with training_session(recipe.seed, recipe.num_threads) as rng:
        bank = build_crop_bank(load_coco(data_dir), cfg)
        init_dir = Path(init) if init is not None else None
        model, tokenizer, tokenizer_dir = _start(recipe, bank.names, out, init_dir)
        model.train()
        size = model.config.image_size
        sampler = CropSampler(bank, tokenizer, cfg, size, rng)
        named = [(n, p, 1.0) for n, p in model.named_parameters()]
        optimizer, scheduler = make_optimizer(named, cfg.optim)
        max_log_scale = math.log(cfg.max_logit_scale)

        def step() -> dict[str, torch.Tensor]:
            pixels, ids, labels = sampler.batch(cfg.optim.batch_size)
            image = model.encode_image(pixels)  # (B, D)
            text = model.encode_text(ids)  # (B, D)
            loss = contrastive_loss(image, text, model.logit_scale, groups=labels)
            return {"loss": loss, "logit_scale": model.logit_scale.detach()}

        def clamp_scale() -> None:
            with torch.no_grad():
                model.log_logit_scale.clamp_(max=max_log_scale)

        log, seconds = run_steps([p for _, p, _ in named], cfg.optim, optimizer, scheduler,
                                 step, "CLIP stage", after_step=clamp_scale)
    model.eval()
    preprocessor = preprocessor_for(init_dir, "clip", size)
    save_checkpoint(model, out, recipe.save_dtype, tokenizer_dir, preprocessor)
    TrainingSummary("clip", str(init) if init else None, str(data_dir), cfg.optim.steps,
                    seconds, log, recipe.to_dict()).write(out)
    return out

