"""Evaluation of trained checkpoints through the same engine the robot runs.

Detection: COCO AP and AP50 (pycocotools) of ``load_detector`` on a COCO dataset, with every
category of the dataset as a query at once (seen and unseen compete, as in deployment),
reported separately for seen and unseen categories; optionally the same for the CPU int8
model plus how many fp32 detections it reproduces.

Classification: zero-shot top-1 accuracy of ``load_classifier`` on the dataset's object
crops against all its category names, with the bare name, CLIP's single prompt and the
CLIP7 / CLIP80 ensembles (a prompt set's embeddings are averaged per label).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from clip_perception.classifier import ZeroShotClassifier, load_classifier
from clip_perception.detections import Detections
from clip_perception.detector import load_detector
from clip_perception.train.coco import CocoDataset, load_coco
from clip_perception.vocabulary import Templates, resolve_templates

# Prompt settings compared in zero-shot classification: (name, templates).
PROMPT_SETTINGS: tuple[tuple[str, Templates], ...] = (
    ("name", None),
    ("single", ("a photo of a {}.",)),
    ("clip7", "clip7"),
    ("clip80", "clip80"),
)
AGREEMENT_SCORE = 0.3  # fp32 detections at or above this score must be reproduced by int8
AGREEMENT_IOU = 0.5


@dataclass(frozen=True)
class ApScores:
    ap: float  # COCO AP, IoU 0.50:0.95
    ap50: float  # AP at IoU 0.5


@dataclass(frozen=True)
class Int8Agreement:
    seen: ApScores
    unseen: ApScores | None
    agreement: float  # fraction of fp32 detections (score >= 0.3) int8 finds (label, IoU 0.5)


@dataclass(frozen=True)
class OwlEvaluation:
    model: str
    data: str
    images: int
    overall: ApScores
    seen: ApScores
    unseen: ApScores | None  # None when the dataset names no unseen categories
    per_category_ap50: dict[str, float]
    seconds_per_image: float  # fp32, batch of 8, this machine
    int8: Int8Agreement | None


@dataclass(frozen=True)
class ZeroShotAccuracy:
    prompts: str
    top1: float
    seen: float
    unseen: float | None


@dataclass(frozen=True)
class PromptVariance:
    """Where the text embeddings of every (template, category) pair of a prompt set differ:
    shares of their total squared deviation from the mean that the template alone, the
    category alone and the two together (the interaction) explain, as in a two-way ANOVA.

    A template's own part shifts every category alike and cannot change a prediction; only
    the interaction can, and it is what averaging the templates (ensembling) removes. When it
    is near 0 every template ranks the categories alike, so ensembling has nothing to gain.
    """

    templates: str
    template: float
    category: float
    interaction: float


@dataclass(frozen=True)
class ClipEvaluation:
    model: str
    data: str
    crops: int
    results: list[ZeroShotAccuracy]
    variance: PromptVariance

    def accuracy(self, prompts: str) -> ZeroShotAccuracy:
        return next(r for r in self.results if r.prompts == prompts)


def unseen_categories(dataset: CocoDataset) -> list[str]:
    """Held-out category names recorded in the annotation file's ``info`` (our writer's)."""
    info = json.loads(dataset.annotation_file.read_text()).get("info") or {}
    return [c for c in info.get("unseen_categories", []) if c in dataset.categories]


def _detect_all(model_dir: Path, dataset: CocoDataset, precision: str, batch: int,
                threshold: float) -> tuple[list[Detections], float]:
    detector = load_detector(model_dir, device="cpu", precision=precision,
                             score_threshold=threshold, max_detections=100)
    try:
        detector.set_queries(dataset.categories)
        results: list[Detections] = []
        seconds = 0.0
        for start in range(0, len(dataset.images), batch):
            frames = [im.read_rgb() for im in dataset.images[start:start + batch]]
            tic = time.perf_counter()
            results += detector.detect(frames)
            seconds += time.perf_counter() - tic
    finally:
        detector.close()
    return results, seconds / max(1, len(dataset.images))


def _coco_scores(gt: COCO, dataset: CocoDataset, detections: list[Detections],
                 names: Sequence[str]) -> tuple[ApScores, dict[str, float]]:
    """AP / AP50 over ``names`` and AP50 per name, with pycocotools."""
    ids = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
    rows = [{"image_id": image.id, "category_id": ids[label], "score": float(score),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            for image, dets in zip(dataset.images, detections, strict=True)
            for (x0, y0, x1, y1), score, label in zip(dets.boxes, dets.scores, dets.labels,
                                                      strict=True)]
    if not rows or not names:
        return ApScores(0.0, 0.0), dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        evaluator = COCOeval(gt, gt.loadRes(rows), "bbox")
        evaluator.params.catIds = [ids[n] for n in names]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections)
    at50 = evaluator.eval["precision"][0, :, :, 0, -1]  # (R, K): IoU 0.5, all areas, 100 dets
    per_name = {n: float(at50[:, k][at50[:, k] > -1].mean()) if (at50[:, k] > -1).any()
                else 0.0 for k, n in enumerate(names)}
    stats = evaluator.stats
    return ApScores(max(0.0, float(stats[0])), max(0.0, float(stats[1]))), per_name


def _agreement(reference: list[Detections], other: list[Detections]) -> float:
    """Fraction of confident reference detections that ``other`` has too (label, IoU)."""
    found = total = 0
    for ref, oth in zip(reference, other, strict=True):
        keep = ref.scores >= AGREEMENT_SCORE
        total += int(keep.sum())
        if not keep.any() or len(oth) == 0:
            continue
        ious = box_iou(torch.from_numpy(ref.boxes[keep]), torch.from_numpy(oth.boxes))  # (N, M)
        same = np.equal.outer(np.array(ref.labels)[keep], np.array(oth.labels))  # (N, M)
        found += int(((ious.numpy() >= AGREEMENT_IOU) & same).any(axis=1).sum())
    return found / total if total else 1.0


def evaluate_owl(
    model_dir: str | Path, data_dir: str | Path, unseen: Sequence[str] | None = None,
    compare_int8: bool = True, score_threshold: float = 0.01, batch_size: int = 8,
) -> OwlEvaluation:
    """COCO AP of an OWL checkpoint on a COCO dataset; ``unseen`` defaults to the categories
    the annotation file lists as held out of training."""
    model, dataset = Path(model_dir), load_coco(data_dir)
    held_out = list(unseen) if unseen is not None else unseen_categories(dataset)
    seen = [c for c in dataset.categories if c not in held_out]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(dataset.annotation_file))
    fp32, seconds = _detect_all(model, dataset, "fp32", batch_size, score_threshold)
    overall, per_category = _coco_scores(gt, dataset, fp32, dataset.categories)
    seen_scores = _coco_scores(gt, dataset, fp32, seen)[0]
    unseen_scores = _coco_scores(gt, dataset, fp32, held_out)[0] if held_out else None
    int8 = None
    if compare_int8:
        quantized = _detect_all(model, dataset, "int8", batch_size, score_threshold)[0]
        int8 = Int8Agreement(
            seen=_coco_scores(gt, dataset, quantized, seen)[0],
            unseen=_coco_scores(gt, dataset, quantized, held_out)[0] if held_out else None,
            agreement=_agreement(fp32, quantized),
        )
    return OwlEvaluation(str(model), str(data_dir), len(dataset), overall, seen_scores,
                         unseen_scores, per_category, seconds, int8)


def object_crops(dataset: CocoDataset, context: float = 1.5
                 ) -> tuple[list[np.ndarray], list[str]]:
    """Square crops around every annotated object (side = context x its longer side, border
    replicated), as a detector's boxes would be cut out for classification."""
    crops, labels = [], []
    for image in dataset.images:
        if not image.labels:
            continue
        rgb = image.read_rgb()
        for (x0, y0, x1, y1), label in zip(image.boxes.tolist(), image.labels, strict=True):
            side = max(2, round(max(x1 - x0, y1 - y0) * context))
            crops.append(cv2.getRectSubPix(rgb, (side, side), ((x0 + x1) / 2, (y0 + y1) / 2)))
            labels.append(label)
    return crops, labels


def evaluate_clip(
    model_dir: str | Path, data_dir: str | Path, unseen: Sequence[str] | None = None,
    prompt_settings: Sequence[tuple[str, Templates]] = PROMPT_SETTINGS, batch_size: int = 64,
) -> ClipEvaluation:
    """Zero-shot accuracy of a CLIP checkpoint on a COCO dataset's object crops, for each
    prompt setting (see ``PROMPT_SETTINGS``)."""
    dataset = load_coco(data_dir)
    held_out = set(unseen if unseen is not None else unseen_categories(dataset))
    crops, labels = object_crops(dataset)
    truth = np.array([dataset.categories.index(n) for n in labels])  # (N,)
    is_unseen = np.array([n in held_out for n in labels], dtype=bool)  # (N,)
    classifier = load_classifier(model_dir, device="cpu", precision="fp32")
    results = []
    try:
        for name, templates in prompt_settings:
            classifier.set_labels(dataset.categories, templates=templates)
            predicted = np.concatenate([
                classifier.classify(crops[i:i + batch_size]).probs.argmax(axis=1)
                for i in range(0, len(crops), batch_size)])  # (N,)
            correct = predicted == truth
            results.append(ZeroShotAccuracy(
                name, float(correct.mean()), float(correct[~is_unseen].mean()),
                float(correct[is_unseen].mean()) if is_unseen.any() else None))
        variance = prompt_variance(classifier, dataset.categories)
    finally:
        classifier.close()
    return ClipEvaluation(str(model_dir), str(data_dir), len(crops), results, variance)


def prompt_variance(classifier: ZeroShotClassifier, names: Sequence[str], templates: str = "clip80"
                    ) -> PromptVariance:
    """The ``PromptVariance`` of the classifier's text tower over ``templates`` x ``names``:
    one template at a time as its labels, so the embeddings are the ones it classifies with
    (its prompt cache answers when the same set was just used). Leaves the last template's
    labels set."""
    rows = []
    for template in resolve_templates(templates):
        classifier.set_labels(names, templates=[template])
        vocabulary = classifier.vocabulary
        assert vocabulary is not None, "set_labels succeeded"
        rows.append(vocabulary.embeddings.float().cpu())  # (K, D), unit length
    return PromptVariance(templates, *variance_shares(torch.stack(rows)))  # (T, K, D)


def variance_shares(embeddings: torch.Tensor) -> tuple[float, float, float]:
    """(template, category, interaction) shares of the squared deviation of ``embeddings``
    (T, K, D) from their mean; they sum to 1 (the three parts are orthogonal)."""
    num_templates, num_categories = embeddings.shape[:2]
    mean = embeddings.mean(dim=(0, 1), keepdim=True)  # (1, 1, D)
    template = embeddings.mean(dim=1, keepdim=True) - mean  # (T, 1, D)
    category = embeddings.mean(dim=0, keepdim=True) - mean  # (1, K, D)
    interaction = embeddings - mean - template - category  # (T, K, D)
    total = float((embeddings - mean).pow(2).sum())
    return (float(template.pow(2).sum()) * num_categories / total,
            float(category.pow(2).sum()) * num_templates / total,
            float(interaction.pow(2).sum()) / total)
