"""Training: losses on hand-checked cases, BPE vocabulary, short end-to-end runs of both
stages, and the shipped embedded checkpoints against transformers."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_perception.model import load_clip, load_owl, load_tokenizer
from clip_perception.templates import CLIP7
from clip_perception.train.bpe import learn_bpe, train_tokenizer
from clip_perception.train.clip_stage import train_clip
from clip_perception.train.coco import write_synthetic_coco
from clip_perception.train.common import read_summary
from clip_perception.train.embedded import build_embedded_models
from clip_perception.train.evaluate import evaluate_clip, evaluate_owl, variance_shares
from clip_perception.train.losses import (
    BoxTargets,
    contrastive_loss,
    detection_losses,
    hungarian_match,
    sigmoid_focal_loss,
)
from clip_perception.train.owl_stage import train_owl
from clip_perception.train.recipe import DetectionLossWeights, ModelShape, Recipe

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = {"owl": REPO / "models" / "synthetic-owl", "clip": REPO / "models" / "synthetic-clip"}
BOX_TOL, LOGIT_TOL = 1e-4, 1e-3


pytestmark = pytest.mark.usefixtures("two_torch_threads")


# ------------------------------------------------------------------ losses
def test_contrastive_loss_perfect_batch_is_analytic_and_beats_shuffled() -> None:
    n, scale = 4, 3.0
    embeds = torch.eye(n)  # orthonormal: cosine 1 on the diagonal, 0 elsewhere
    perfect = contrastive_loss(embeds, embeds, scale)
    # Each row: -log(e^s / (e^s + (n - 1) e^0)), the same in both directions.
    assert perfect.item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-scale)), rel=1e-5)
    shuffled = contrastive_loss(embeds, embeds[torch.tensor([1, 2, 3, 0])], scale)
    assert shuffled.item() > 3.0 > 0.2 > perfect.item()


def test_contrastive_loss_spreads_the_target_over_all_positives() -> None:
    # Two crops of one category: their texts are equally right, so swapping them costs nothing.
    image = torch.eye(3)
    text = torch.eye(3)[torch.tensor([1, 0, 2])]
    groups = torch.tensor([0, 0, 1])
    same = groups.view(-1, 1) == groups.view(1, -1)  # (3, 3)
    assert contrastive_loss(image, text, 5.0, same).item() == pytest.approx(
        contrastive_loss(image, image, 5.0, same).item())
    assert contrastive_loss(image, text, 5.0).item() > contrastive_loss(image, image, 5.0).item()
    # Asymmetric: caption 2 names only a colour that images 0 and 2 share, so image 0's target
    # is split over captions 0 and 2, and caption 2's over images 0 and 2.
    positives = torch.tensor([[True, False, True], [False, True, False], [False, False, True]])
    scale = 4.0
    loss = contrastive_loss(image, image, scale, positives).item()
    log_p = torch.log_softmax(scale * torch.eye(3), dim=1)  # (3, 3), rows and columns alike
    by_image = [-(log_p[0, 0] + log_p[0, 2]) / 2, -log_p[1, 1], -log_p[2, 2]]
    by_text = [-log_p[0, 0], -log_p[1, 1], -(log_p[2, 0] + log_p[2, 2]) / 2]
    expected = 0.5 * (sum(by_image) / 3 + sum(by_text) / 3)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_focal_loss_matches_hand_computation() -> None:
    logits = torch.tensor([2.0, -1.0, 0.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    alpha, gamma = 0.25, 2.0
    expected = 0.0
    for x, t in zip(logits.tolist(), targets.tolist(), strict=True):
        p = 1 / (1 + math.exp(-x))
        expected += (alpha * (1 - p) ** gamma * -math.log(p) if t else
                     (1 - alpha) * p**gamma * -math.log(1 - p))
    assert sigmoid_focal_loss(logits, targets, alpha, gamma).item() == pytest.approx(expected)


def _boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_hungarian_matching_finds_the_known_assignment() -> None:
    # Three predictions, two objects: object 0 sits on prediction 2, object 1 on prediction 0.
    pred = _boxes((0.7, 0.7, 0.2, 0.2), (0.5, 0.5, 0.1, 0.1), (0.2, 0.2, 0.2, 0.2))
    logits = torch.zeros(3, 2)  # equal class evidence: boxes decide
    target = BoxTargets(torch.tensor([1, 0]), _boxes((0.21, 0.2, 0.2, 0.2), (0.7, 0.69, 0.2, 0.2)))
    rows, cols = hungarian_match(logits, pred, target, DetectionLossWeights())
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 2: 0}
    # One-to-many: with two matches per object the leftover prediction 1 also gets matched, to
    # the nearer object (1: L1 0.59 against 0.79); the others keep their objects.
    many = DetectionLossWeights(matches_per_object=2)
    rows, cols = hungarian_match(logits, pred, target, many)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 1, 2: 0}


def test_detection_losses_vanish_on_perfect_boxes_and_count_confident_errors() -> None:
    boxes = _boxes((0.3, 0.3, 0.2, 0.2), (0.7, 0.7, 0.2, 0.2)).unsqueeze(0)  # (1, 2, 4)
    target = [BoxTargets(torch.tensor([1]), boxes[0, 1:])]
    right = torch.tensor([[[-9.0, -9.0], [-9.0, 9.0]]])  # (1, P, Q): only patch 1, query 1
    wrong = torch.tensor([[[9.0, -9.0], [-9.0, -9.0]]])
    w = DetectionLossWeights()
    good = detection_losses(right, boxes, target, w)
    assert good.l1.item() == pytest.approx(0.0, abs=1e-6)
    assert good.giou.item() == pytest.approx(0.0, abs=1e-5)  # torchvision adds an epsilon
    assert good.focal.item() < 1e-3
    assert detection_losses(wrong, boxes, target, w).loss.item() > good.loss.item() + 1.0


# ------------------------------------------------------------------ BPE
def test_bpe_learns_merges_and_round_trips(tmp_path: pathlib.Path) -> None:
    names = ["red circle", "blue star", "green ring"]
    texts = [t.format(n) for t in CLIP7 for n in names]
    merges = learn_bpe(texts, num_merges=500)
    assert ("c", "i") in merges or any("".join(m).startswith("ci") for m in merges)
    tok = train_tokenizer(texts, tmp_path, num_merges=500, context_length=16)
    again = load_tokenizer(tmp_path)
    assert again.context_length == 16 and again.encoder == tok.encoder
    assert tok.eos_id == max(tok.encoder.values()) and tok.bos_id == tok.eos_id - 1
    assert tok.pad_id == 0 != tok.bos_id
    for text in [*texts, "an unseen word, 42!"]:
        assert again.decode(again.encode(text)).replace(" ", "") == text.lower().replace(" ", "")
    # Words of the corpus became single tokens; the sequence is [bos, ..., eos, 0, ...].
    ids = again(["a red circle"])[0].tolist()
    assert ids[:5] == [tok.bos_id, *again.encode("a red circle"), tok.eos_id]
    assert len(again.encode("a red circle")) == 3 and ids[5:] == [0] * 11
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert reference("a blue star", padding="max_length", max_length=16)["input_ids"] == \
        again(["a blue star"])[0].tolist()


# ------------------------------------------------------------------ short runs
TINY = ModelShape(clip_image_size=32, image_size=64, vision_width=32, vision_layers=2,
                  vision_heads=2, text_width=32, text_layers=1, text_heads=2)


def _tiny_recipe() -> Recipe:
    return Recipe.from_dict({
        "shape": {k: getattr(TINY, k) for k in ("clip_image_size", "image_size", "vision_width",
                                                "vision_layers", "vision_heads", "text_width",
                                                "text_layers", "text_heads")},
        "clip": {"optim": {"steps": 40, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5}},
        "owl": {"optim": {"steps": 40, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5}},
    })


def _mean_loss(losses: list[dict[str, float]]) -> float:
    return float(np.mean([row["loss"] for row in losses]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny_run")
    write_synthetic_coco(root / "train", 48, (128, 96), seed=3, split="train")
    write_synthetic_coco(root / "test", 8, (128, 96), seed=3, split="test")
    recipe = _tiny_recipe()
    clip_dir = train_clip(recipe, root / "train", root / "clip")
    owl_dir = train_owl(recipe, root / "train", clip_dir, root / "owl")
    return {"root": root, "clip": clip_dir, "owl": owl_dir}


@pytest.mark.parametrize("stage", ["clip", "owl"])
def test_short_training_lowers_the_loss(tiny_run: dict[str, pathlib.Path], stage: str) -> None:
    losses = read_summary(tiny_run[stage]).losses
    assert len(losses) == 40
    assert _mean_loss(losses[-10:]) < 0.9 * _mean_loss(losses[:10])


def test_short_run_writes_loadable_folders(tiny_run: dict[str, pathlib.Path]) -> None:
    for stage in ("clip", "owl"):
        folder = tiny_run[stage]
        for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                     "tokenizer_config.json", "preprocessor_config.json"):
            assert (folder / name).is_file(), f"{stage}: {name} missing"
        special = json.loads((folder / "tokenizer_config.json").read_text())
        assert {"bos_token", "eos_token", "pad_token"} <= set(special)
    owl = load_owl(tiny_run["owl"])
    assert owl.config.image_size == 64 and owl.vision.pos_embed.shape[0] == 1 + 16
    evaluation = evaluate_owl(tiny_run["owl"], tiny_run["root"] / "test")
    assert 0.0 <= evaluation.seen.ap50 <= 1.0 and evaluation.int8 is not None
    accuracy = evaluate_clip(tiny_run["clip"], tiny_run["root"] / "test")
    assert [r.prompts for r in accuracy.results] == ["name", "single", "clip7", "clip80"]
    v = accuracy.variance
    assert v.templates == "clip80" and min(v.template, v.category, v.interaction) >= 0.0
    assert math.isclose(v.template + v.category + v.interaction, 1.0, rel_tol=1e-4)


def test_variance_shares_separate_template_category_and_interaction() -> None:
    gen = torch.Generator().manual_seed(0)
    template, category = torch.randn(5, 1, 8, generator=gen), torch.randn(1, 7, 8, generator=gen)
    additive = template + category  # (T, K, D): every template ranks categories alike
    t, c, i = variance_shares(additive)
    assert i < 1e-10 and math.isclose(t + c, 1.0, rel_tol=1e-6)
    assert math.isclose(t / c, float(template.var(dim=0, correction=0).sum()
                                 / category.var(dim=1, correction=0).sum()),
                        rel_tol=1e-4)
    only_interaction = torch.randn(5, 7, 8, generator=gen)
    only_interaction -= only_interaction.mean(0, keepdim=True)  # no category part
    only_interaction -= only_interaction.mean(1, keepdim=True)  # no template part
    assert math.isclose(variance_shares(only_interaction)[2], 1.0, rel_tol=1e-5)


def test_owl_fine_tunes_from_an_owl_checkpoint(tiny_run: dict[str, pathlib.Path]) -> None:
    recipe = Recipe.from_dict({**_tiny_recipe().to_dict(),
                               "owl": {"optim": {"steps": 3, "batch_size": 2}}})
    out = train_owl(recipe, tiny_run["root"] / "train", tiny_run["owl"],
                    tiny_run["root"] / "owl2")
    assert read_summary(out).init == str(tiny_run["owl"])
    assert load_owl(out).config == load_owl(tiny_run["owl"]).config


def test_embedded_build_writes_cards_and_its_recipe(tmp_path: pathlib.Path) -> None:
    """``train embedded`` end to end on a tiny recipe: both folders load, each holds the
    recipe that rebuilds it (the cards' reproduce command) and a card with the evaluation."""
    recipe = Recipe.from_dict({
        **_tiny_recipe().to_dict(), "seed": 5,
        "clip": {"optim": {"steps": 3, "batch_size": 8}},
        "owl": {"optim": {"steps": 3, "batch_size": 2},
                "rounds": [{"seed": 9, "steps": 2, "lr": 1e-4}]},
        "data": {"width": 128, "height": 96, "train_images": 12, "test_images": 4}})
    build_embedded_models(tmp_path, recipe.seed, recipe)
    for name, loader in (("synthetic-clip", load_clip), ("synthetic-owl", load_owl)):
        folder = tmp_path / name
        assert Recipe.from_json(folder / "recipe.json") == recipe
        card = (folder / "MODEL_CARD.md").read_text()
        assert "--recipe models/synthetic-owl/recipe.json" in card
        loader(folder)
    card = (tmp_path / "synthetic-owl" / "MODEL_CARD.md").read_text()
    assert "| seen AP50 | 0.80 |" in card and "Per-category AP50" in card
    # The shipped detector is the last round's: its own seed, steps and rate, from stage 2.
    last = read_summary(tmp_path / "synthetic-owl")
    assert len(last.losses) == 2 and last.recipe["seed"] == 9
    assert last.recipe["owl"]["optim"]["lr"] == 1e-4 and last.recipe["owl"]["rounds"] == []
    assert last.init == str(tmp_path / "synthetic-clip")
    assert [(r["steps"], r["seed"]) for r in last.earlier_runs] == [(3, 5)]
    # One command builds what the separate stage commands build, bit for bit.
    data, manual = tmp_path / "data", tmp_path / "manual"
    write_synthetic_coco(data, 12, (128, 96), seed=5, split="train")
    clip_dir = train_clip(recipe, data, manual / "clip")
    one_run = dataclasses.replace(recipe, owl=dataclasses.replace(recipe.owl, rounds=()))
    stage2 = train_owl(one_run, data, clip_dir, manual / "owl")
    final = train_owl(recipe.for_round(recipe.owl.rounds[0]), data, stage2, manual / "round1")
    for built, by_hand in ((tmp_path / "synthetic-clip", clip_dir),
                           (tmp_path / "synthetic-owl", final)):
        assert (built / "model.safetensors").read_bytes() == (
            by_hand / "model.safetensors").read_bytes(), built.name


# ------------------------------------------------------------------ shipped models
def _ids(folder: pathlib.Path, texts: list[str]) -> torch.Tensor:
    return load_tokenizer(folder)(texts)  # (N, L)


@torch.no_grad()
def test_shipped_owl_matches_transformers() -> None:
    folder = SHIPPED["owl"]
    assert (folder / "config.json").is_file(), f"{folder} missing: see its MODEL_CARD.md"
    from transformers import OwlViTForObjectDetection

    ours = load_owl(folder)
    ref = OwlViTForObjectDetection.from_pretrained(folder, dtype=torch.float32).eval()
    size = ours.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = _ids(folder, ["red circle", "blue star", "a photo of a green ring", "white cross"])
    got, want = ours(pixels, ids), ref(input_ids=ids, pixel_values=pixels)
    assert (got.logits - want.logits).abs().max().item() <= LOGIT_TOL
    assert (got.pred_boxes - want.pred_boxes).abs().max().item() <= BOX_TOL
    assert (folder / "MODEL_CARD.md").is_file()


@torch.no_grad()
def test_shipped_clip_matches_transformers() -> None:
    folder = SHIPPED["clip"]
    assert (folder / "config.json").is_file(), f"{folder} missing"
    from transformers import CLIPModel

    ours = load_clip(folder)
    ref = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    size = ours.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = _ids(folder, ["red circle", "a photo of a purple star.", "yellow ring"])
    got, want = ours(pixels, ids), ref(input_ids=ids, pixel_values=pixels)
    assert (got.logits_per_image - want.logits_per_image).abs().max().item() <= LOGIT_TOL
    assert F.cosine_similarity(got.text_embeds, want.text_embeds).min().item() > 1 - 1e-5
    assert (folder / "MODEL_CARD.md").is_file()
