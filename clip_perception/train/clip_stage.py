"""Stage 1: contrastive image-text pre-training of a small CLIP on object windows.

Any COCO detection dataset serves as image-text data: every annotated box gives a window
around it, captioned by its category name put through a random prompt template (CLIP's 80
ImageNet templates by default, or the bare name, as detection queries arrive). Windows are
cut from the frames as the detector sees them (``frames.FrameBank``) at the detector's scale
or zoomed in up to a tight crop, so the vision tower learns objects at the sizes it must
detect them. Every caption in a batch that describes a window counts as a match for it (two
windows of one category, or a caption naming only a window's colour; see
``losses.contrastive_loss`` and ``ClipRecipe.partial_names``).

From scratch, the BPE vocabulary is learned from all those captions first; with ``init`` a
CLIP checkpoint folder (ours or a public one) is fine-tuned with its own tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from clip_perception.model import ClipModel, load_clip, load_tokenizer
from clip_perception.model.tokenizer import ClipTokenizer
from clip_perception.templates import NAMED_TEMPLATES
from clip_perception.train.bpe import train_tokenizer
from clip_perception.train.coco import load_coco
from clip_perception.train.common import (
    TrainingSummary,
    clip_config,
    make_optimizer,
    preprocessor_for,
    run_steps,
    save_checkpoint,
    training_session,
)
from clip_perception.train.frames import FrameBank, build_frame_bank, crop_resize
from clip_perception.train.losses import contrastive_loss
from clip_perception.train.recipe import ClipRecipe, Recipe


def caption_templates(cfg: ClipRecipe) -> tuple[str, ...]:
    """The bare name ("{}") and the recipe's template set."""
    return ("{}", *NAMED_TEMPLATES[cfg.templates])


class WindowSampler:
    """Random augmented (pixels, token ids, category) batches of object windows.

    ``max_window`` is the window side, in frame units, that maps 1:1 onto the CLIP input at
    the detector's resolution (clip_image_size / image_size): windows are never larger, so
    objects never look smaller than the detector sees them.
    """

    def __init__(self, bank: FrameBank, tokenizer: ClipTokenizer, cfg: ClipRecipe,
                 image_size: int, max_window: float, rng: np.random.Generator) -> None:
        self.bank, self.tokenizer, self.cfg = bank, tokenizer, cfg
        self.image_size, self.max_window, self.rng = image_size, max_window, rng
        self.frame, self.boxes, self.labels = bank.objects()  # (M,), (M, 4), (M,)
        self.templates = caption_templates(cfg)

    def regions(self, boxes: torch.Tensor) -> torch.Tensor:
        """(n, 4) xyxy square windows around ``boxes`` (n, 4): log-uniform context, capped at
        ``max_window`` but always containing the object, centre jittered, kept in the frame."""
        n = len(boxes)
        side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).numpy()  # (n,)
        lo, hi = np.log(self.cfg.context)
        window = np.minimum(np.exp(self.rng.uniform(lo, hi, n)) * side, self.max_window)
        window = np.minimum(np.maximum(window, 1.1 * side), 1.0)  # (n,)
        centre = ((boxes[:, :2] + boxes[:, 2:]) / 2).numpy()  # (n, 2)
        centre = centre + self.rng.uniform(-1, 1, (n, 2)) * self.cfg.center_jitter * side[:, None]
        corner = np.clip(centre - window[:, None] / 2, 0.0, 1.0 - window[:, None])  # (n, 2)
        return torch.from_numpy(np.concatenate([corner, corner + window[:, None]], 1))

    def subjects(self, labels: torch.Tensor) -> list[str]:
        """What each caption names: the category, or with ``partial_names`` one of its words."""
        partial = self.rng.random(len(labels)) < self.cfg.partial_names
        out = []
        for name, part in zip((self.bank.names[int(c)] for c in labels), partial, strict=True):
            words = name.split()
            out.append(words[self.rng.integers(len(words))] if part and len(words) > 1 else name)
        return out

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels (n, 3, S, S), token ids (n, L), positives (n, n): caption j describes image
        i when all words it names are words of image i's category."""
        idx = torch.from_numpy(self.rng.integers(len(self.labels), size=n))
        flip = torch.from_numpy(self.rng.random(n) < self.cfg.hflip)
        frames = self.bank.frames[self.frame[idx]]  # (n, 3, C, C)
        pixels = crop_resize(frames, self.regions(self.boxes[idx]), self.image_size, flip)
        labels = self.labels[idx]
        subjects = self.subjects(labels)
        bare = self.rng.random(n) < self.cfg.bare_name
        picks = np.where(bare, 0, self.rng.integers(1, len(self.templates), size=n))  # (n,)
        captions = [self.templates[t].format(subject)
                    for t, subject in zip(picks, subjects, strict=True)]
        words = [set(self.bank.names[int(c)].split()) for c in labels]
        positives = torch.tensor([[set(subject.split()) <= image for subject in subjects]
                                  for image in words])  # (n, n)
        return pixels, self.tokenizer(captions), positives


def _start(recipe: Recipe, names: list[str], out: Path, init: Path | None
           ) -> tuple[ClipModel, ClipTokenizer, Path]:
    """(model, tokenizer, folder holding the tokenizer files) to train from."""
    if init is not None:
        return load_clip(init, requires_grad=True), load_tokenizer(init), init
    shape = recipe.shape
    subjects = set(names) | {word for name in names for word in name.split()}
    corpus = [t.format(s) for t in caption_templates(recipe.clip) for s in sorted(subjects)]
    tokenizer = train_tokenizer(corpus, out, recipe.clip.bpe_merges, shape.context_length)
    cfg = clip_config(shape, tokenizer.vocab_size, recipe.clip.init_log_logit_scale)
    # PyTorch's default (fan-in) init: the ViT-style N(0, 0.02) left all image embeddings
    # nearly identical at the start (cosine ~0.995), which stalled contrastive learning.
    return ClipModel(cfg), tokenizer, out


def train_clip(
    recipe: Recipe, data_dir: str | Path, out_dir: str | Path, init: str | Path | None = None,
) -> Path:
    """Train (or, with ``init``, fine-tune) a CLIP on a COCO dataset's object windows and
    write a CLIP checkpoint folder to ``out_dir``; returns it.

    Windows are cut at the scale of an OWL model with ``recipe.shape.image_size`` input.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.clip
    init_dir = Path(init) if init is not None else None
    with training_session(recipe.seed, recipe.num_threads) as rng:
        bank = build_frame_bank(load_coco(data_dir), recipe.shape.image_size)
        model, tokenizer, tokenizer_dir = _start(recipe, bank.names, out, init_dir)
        model.train()
        size = model.config.image_size
        sampler = WindowSampler(bank, tokenizer, cfg, size, size / recipe.shape.image_size, rng)
        named = [(n, p, 1.0) for n, p in model.named_parameters()]
        optimizer, scheduler = make_optimizer(named, cfg.optim)
        max_log_scale = math.log(cfg.max_logit_scale)

        def step() -> dict[str, torch.Tensor]:
            pixels, ids, positives = sampler.batch(cfg.optim.batch_size)
            image = model.encode_image(pixels)  # (B, D)
            text = model.encode_text(ids)  # (B, D)
            loss = contrastive_loss(image, text, model.logit_scale, positives)
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
