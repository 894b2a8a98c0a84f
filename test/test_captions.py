"""Conditioned captions: the measures see darkness, blur, low contrast, size and close-ups; a
caption's template names a condition its crop meets; the stage-1 sampler uses them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_perception.templates import CLIP80
from clip_perception.train.captions import (
    CONDITIONS,
    PLAIN_TEMPLATES,
    STYLE_TEMPLATES,
    ConditionedCaptions,
    CropLooks,
    look_at,
)
from clip_perception.train.clip_stage import WindowSampler
from clip_perception.train.coco import load_coco, write_synthetic_coco
from clip_perception.train.frames import FrameBank, build_frame_bank
from clip_perception.train.recipe import ClipRecipe

GROUP = 40  # crops per kind below


def _scenes(rng: np.random.Generator) -> torch.Tensor:
    """(GROUP, 3, 32, 32) crops in 0..1: a bright-ish square and bar on mid grey."""
    crops = torch.full((GROUP, 3, 32, 32), 0.45)
    for i in range(GROUP):
        x, y = rng.integers(4, 16, 2)
        crops[i, :, y:y + 12, x:x + 12] = torch.from_numpy(rng.uniform(0.6, 0.9, (3, 1, 1)))
        crops[i, :, 26:29, 2:30] = float(rng.uniform(0.1, 0.3))
    return crops + torch.from_numpy(rng.normal(0, 0.01, crops.shape)).float()


def _blur(crops: torch.Tensor) -> torch.Tensor:
    kernel = torch.full((3, 1, 7, 7), 1 / 49)  # (C, 1, k, k) box blur per channel
    return F.conv2d(F.pad(crops, (3, 3, 3, 3), mode="replicate"), kernel, groups=3)


@pytest.fixture(scope="module")
def kinds() -> dict[str, CropLooks]:
    """Looks of five kinds of crop of the same scenes, mid-sized objects, mid tightness."""
    rng = np.random.default_rng(0)
    base = _scenes(rng)
    variants = {"plain": base, "dark": base * 0.2, "bright": 0.6 + 0.4 * base,
                "blurry": _blur(base), "hard to see": 0.45 + 0.08 * (base - 0.45)}
    return {kind: look_at(pixels.clamp(0, 1), torch.full((GROUP,), 20.0),
                          torch.full((GROUP,), 0.5))
            for kind, pixels in variants.items()}


def _concat(looks: list[CropLooks]) -> CropLooks:
    return CropLooks(*(np.concatenate([getattr(x, f.name) for x in looks])
                       for f in dataclasses.fields(CropLooks)))


def test_template_groups_split_clip80() -> None:
    groups = [t for _, _, templates in CONDITIONS.values() for t in templates]
    everything = groups + list(PLAIN_TEMPLATES) + list(STYLE_TEMPLATES)
    assert sorted(everything) == sorted(CLIP80)  # each template in exactly one group


def test_conditions_follow_what_the_crops_show(kinds: dict[str, CropLooks]) -> None:
    sizes = np.linspace(4, 60, GROUP)
    extremes = CropLooks(*(np.repeat(x.mean(), GROUP) for x in (
        kinds["plain"].brightness, kinds["plain"].contrast, kinds["plain"].sharpness)),
        size=sizes, tightness=np.linspace(0.2, 0.9, GROUP))
    # Six groups of GROUP: a tail of 1/6 puts each cut between a group's crops and the rest.
    captions = ConditionedCaptions(_concat([*kinds.values(), extremes]), tail=1 / 6, style=0.0)
    for kind, looks in kinds.items():
        met = captions.conditions(looks)
        photometric = [{c for c in m if c in ("dark", "bright", "blurry", "hard to see")}
                       for m in met]
        expected = set() if kind == "plain" else {kind}
        assert all(p == expected for p in photometric), (kind, photometric)
    met = captions.conditions(extremes)
    assert {"small", "large", "close-up"} & set(met[0]) == {"small"}
    assert {"small", "large", "close-up"} & set(met[-1]) == {"large", "close-up"}


def test_templates_name_a_met_condition_or_are_plain(kinds: dict[str, CropLooks]) -> None:
    looks = _concat(list(kinds.values()))
    captions = ConditionedCaptions(looks, tail=0.15, style=0.0)
    rng = np.random.default_rng(1)
    for met, template in zip(captions.conditions(looks), captions.templates(looks, rng),
                             strict=True):
        allowed = ([t for c in met for t in CONDITIONS[c][2]] if met else PLAIN_TEMPLATES)
        assert template in allowed
    styled = ConditionedCaptions(looks, tail=0.15, style=1.0).templates(looks, rng)
    assert set(styled) <= set(STYLE_TEMPLATES)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> FrameBank:
    root = tmp_path_factory.mktemp("captions")
    write_synthetic_coco(root, 24, (128, 96), seed=4, split="train")
    return build_frame_bank(load_coco(root), 64)


def test_window_sampler_captions_its_crops(bank: FrameBank) -> None:
    cfg = ClipRecipe(captions="conditioned", bare_name=0.0, style_captions=0.0)
    sampler = WindowSampler(bank, lambda texts: texts, cfg, 32, 0.5,
                            np.random.default_rng(2))
    idx, windows, pixels = sampler.draw(64)
    looks = sampler.look(idx, windows, pixels)
    side = (sampler.boxes[idx, 2:] - sampler.boxes[idx, :2]).amax(dim=1).numpy()  # (64,)
    assert np.allclose(looks.size, side * 64, rtol=1e-5)  # detector pixels: 32 / 0.5
    assert ((looks.tightness > 0) & (looks.tightness <= 1 / 1.1 + 1e-6)).all()
    assert sampler.conditioned is not None
    met = sampler.conditioned.conditions(looks)
    for conditions, template in zip(met, sampler.templates_for(looks, 64), strict=True):
        assert template in ([t for c in conditions for t in CONDITIONS[c][2]]
                            if conditions else PLAIN_TEMPLATES)


@pytest.mark.parametrize(("change", "message"), [
    ({"captions": "conditioned", "templates": "clip7"}, "need the clip80 templates"),
    ({"captions": "weighted"}, "captions must be 'uniform' or 'conditioned'"),
])
def test_bad_caption_settings_are_refused(bank: FrameBank, change: dict[str, str],
                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowSampler(bank, lambda texts: texts, ClipRecipe(**change), 32, 0.5,
                      np.random.default_rng(0))


def test_uniform_captions_ignore_the_crop(bank: FrameBank) -> None:
    sampler = WindowSampler(bank, lambda texts: texts, ClipRecipe(bare_name=0.0), 32, 0.5,
                            np.random.default_rng(3))
    assert sampler.conditioned is None
    assert set(sampler.templates_for(None, 500)) <= set(CLIP80)
