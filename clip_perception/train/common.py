"""What both training stages share: seeding, model construction from a recipe, the optimiser
and schedule, the step loop and checkpoint-folder writing."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clip_perception.model import ClipModel, ModelConfig, OwlModel, save_clip, save_owl
from clip_perception.model.config import parse_config
from clip_perception.model.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from clip_perception.train.recipe import ModelShape, OptimRecipe

SUMMARY_FILE = "training_summary.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@contextlib.contextmanager
def training_session(seed: int, num_threads: int) -> Iterator[np.random.Generator]:
    """Seeded, deterministic torch for the block (global state restored afterwards, so a
    training run inside a larger process does not change it); yields the data generator."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield np.random.default_rng(seed)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def clip_config(shape: ModelShape, vocab_size: int, log_logit_scale: float) -> ModelConfig:
    """A CLIPModel config.json (as parsed) for a model of ``shape``; EOS is the last id."""
    text = {
        "vocab_size": vocab_size, "hidden_size": shape.text_width,
        "intermediate_size": shape.text_width * shape.mlp_ratio,
        "num_hidden_layers": shape.text_layers, "num_attention_heads": shape.text_heads,
        "max_position_embeddings": shape.context_length, "hidden_act": shape.hidden_act,
        "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": 0,
    }
    vision = {
        "hidden_size": shape.vision_width,
        "intermediate_size": shape.vision_width * shape.mlp_ratio,
        "num_hidden_layers": shape.vision_layers, "num_attention_heads": shape.vision_heads,
        "image_size": shape.clip_image_size, "patch_size": shape.patch_size,
        "hidden_act": shape.hidden_act,
    }
    return parse_config({
        "architectures": ["CLIPModel"], "model_type": "clip",
        "projection_dim": shape.text_width, "logit_scale_init_value": log_logit_scale,
        "text_config": text, "vision_config": vision,
    })


def owl_config_from(clip_cfg: ModelConfig, image_size: int) -> ModelConfig:
    """The OWL-ViT (v1) config whose towers are ``clip_cfg``'s, at ``image_size`` input."""
    text = {**dataclasses.asdict(clip_cfg.text)}
    vision = {**dataclasses.asdict(clip_cfg.vision)}
    rename = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}
    text = {rename.get(k, k): v for k, v in text.items() if k != "pool_token_id"}
    vision = {rename.get(k, k): v for k, v in vision.items()}
    vision["image_size"] = image_size
    return parse_config({
        "architectures": ["OwlViTForObjectDetection"], "model_type": "owlvit",
        "projection_dim": clip_cfg.projection_dim,
        "logit_scale_init_value": clip_cfg.logit_scale_init_value,
        "text_config": text, "vision_config": vision,
    })


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, embeddings and the logit scale are not weight-decayed (as in CLIP)."""
    return param.ndim < 2 or name.endswith(("token_embed.weight", "pos_embed", "class_embed"))


def make_optimizer(
    named: list[tuple[str, nn.Parameter, float]], optim: OptimRecipe
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over (name, parameter, lr multiplier) triples, with the warmup-cosine schedule."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param, scale in named:
        groups.setdefault((no_decay(name, param), scale), []).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": optim.lr * scale, "weight_decay": 0.0 if skip
          else optim.weight_decay} for (skip, scale), params in groups.items()],
        betas=(0.9, 0.98), eps=1e-6,  # CLIP's values, steadier with small batches
    )

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return optim.final_lr_fraction + (1 - optim.final_lr_fraction) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainingSummary:
    """What a stage did; written next to the checkpoint as ``training_summary.json``."""

    stage: str
    init: str | None
    data: str
    steps: int
    seconds: float
    losses: list[dict[str, float]]  # per step
    recipe: dict[str, Any]
    # Runs of this stage before the one above (``OwlRecipe.rounds``), first to last: each
    # with its steps, seconds, seed and lr.
    earlier_runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def write(self, folder: Path) -> None:
        data = dataclasses.asdict(self)
        (folder / SUMMARY_FILE).write_text(json.dumps(data) + "\n", encoding="utf-8")


def read_summary(folder: str | Path) -> TrainingSummary:
    raw = json.loads((Path(folder) / SUMMARY_FILE).read_text(encoding="utf-8"))
    return TrainingSummary(**raw)


def run_steps(
    params: list[nn.Parameter], optim: OptimRecipe,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
    step: Callable[[], dict[str, torch.Tensor]], desc: str,
    after_step: Callable[[], None] | None = None,
) -> tuple[list[dict[str, float]], float]:
    """``optim.steps`` optimiser steps of ``step()`` (returns named losses, "loss" is the one
    minimised) with gradient clipping and a tqdm bar; returns the loss log and seconds."""
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(optim.steps), desc=desc, unit="step", mininterval=5.0)
    for _ in bar:
        losses = step()
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        log.append({k: round(float(v.detach()), 5) for k, v in losses.items()})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", refresh=False)
    return log, time.perf_counter() - start


def save_checkpoint(
    model: ClipModel | OwlModel, folder: Path, dtype: str,
    tokenizer_from: Path, preprocessor: dict[str, Any],
) -> None:
    """Write the Hugging Face folder: weights in ``dtype``, config, tokenizer files copied from
    ``tokenizer_from`` (if it is another folder) and ``preprocessor_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = {"float16": torch.float16, "float32": torch.float32}[dtype]
    saver = save_owl if isinstance(model, OwlModel) else save_clip
    # A copy: casting the training model in place would round it for any later use.
    saver(copy.deepcopy(model).to(stored), folder)
    if tokenizer_from.resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, folder / name)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")


def preprocessor_for(init: Path | None, model_type: str, image_size: int) -> dict[str, Any]:
    """A fine-tuned checkpoint keeps its own ``preprocessor_config.json``. A new model gets the
    reference processor's settings: OWL-ViT stretches frames to the square input, CLIP
    resizes the short side and centre-crops."""
    if init is not None and (init / "preprocessor_config.json").is_file():
        return json.loads((init / "preprocessor_config.json").read_text(encoding="utf-8"))
    common = {"do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
              "image_std": list(OPENAI_CLIP_STD), "do_rescale": True,
              "rescale_factor": 1 / 255, "do_resize": True, "resample": 3}
    if model_type == "owlvit":
        return {**common, "image_processor_type": "OwlViTImageProcessor",
                "do_center_crop": False, "size": {"height": image_size, "width": image_size},
                "crop_size": {"height": image_size, "width": image_size}}
    if model_type == "clip":
        return {**common, "image_processor_type": "CLIPImageProcessor",
                "do_center_crop": True, "do_convert_rgb": True,
                "size": {"shortest_edge": image_size},
                "crop_size": {"height": image_size, "width": image_size}}
    raise ValueError(f"no preprocessor defaults for model_type {model_type!r}")
