"""What ``clip_perception.bench`` measures: a random checkpoint folder and the contenders.

``build_checkpoint`` writes a randomly initialised transformers ``OwlViTForObjectDetection``
(``save_pretrained``) with a CLIP-shaped BPE vocabulary and an ``OwlViTProcessor``, so the
transformers contenders and ours load the very same weights, tokenizer and preprocessing
config from one folder, with nothing downloaded. Every contender maps a batch of HxWx3 uint8
frames to per-image boxes (xyxy source pixels), scores and query indices.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from clip_perception.detector import OpenVocabDetector, load_detector
from clip_perception.model.config import EncoderConfig, ModelConfig
from clip_perception.model.tokenizer import BOS_TOKEN, EOS_TOKEN, _bytes_to_unicode

# Architectures by name: overrides of transformers' OwlViTConfig defaults (B/32 at 768).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "b32": {},
    "b16": {"vision_config": {"patch_size": 16}},
    "l14": {
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        "vision_config": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 840, "patch_size": 14,
        },
        "projection_dim": 768,
    },
    # Seconds-long runs for tests: same code paths, toy widths.
    "tiny": {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4},
        "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 128, "patch_size": 32},
        "projection_dim": 64,
    },
}
_ADJECTIVES = ("red", "blue", "green", "small", "large", "wooden", "metal", "open", "broken",
               "striped", "white", "black", "shiny", "empty", "folded", "round", "plastic",
               "old", "wet", "dirty")
_NOUNS = ("mug", "person", "chair", "bottle", "laptop", "door", "box", "cable", "forklift",
          "pallet", "helmet", "ladder", "bicycle", "car", "dog", "cat", "backpack", "phone",
          "table", "shelf", "cup", "bowl", "knife", "book", "clock", "plant", "screen",
          "keyboard", "bag", "shoe", "window", "sign", "tire", "bucket", "glove", "drill",
          "hammer", "wrench", "crate", "barrel", "cone", "fence", "pipe", "valve", "lamp",
          "robot", "cart", "tray", "basket", "towel")


def make_queries(count: int) -> list[str]:
    """``count`` distinct short object phrases ("red mug", ...); up to 1,000 exist."""
    phrases = [f"{a} {n}" for a, n in product(_ADJECTIVES, _NOUNS)]
    if not 1 <= count <= len(phrases):
        raise ValueError(f"query count must be in [1, {len(phrases)}], got {count}")
    return phrases[:count]


def make_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """HxWx3 uint8 frames with blocky structure (pure noise would make every patch alike)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(-(-height // 16), -(-width // 16), 3), dtype=np.uint8)
        frames.append(np.ascontiguousarray(coarse.repeat(16, 0).repeat(16, 1)[:height, :width]))
    return frames


def write_vocabulary(folder: Path, vocab_size: int) -> None:
    """vocab.json + merges.txt shaped like CLIP's: 256 byte symbols, the same with ``</w>``,
    merges that make every query word one token, fillers, then BOS and EOS as the two largest
    ids (OWL pools the text at argmax(input_ids), so EOS must be the largest)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    known = set(tokens)
    for word in sorted({w for phrase in make_queries(1000) for w in phrase.split()}):
        prefix = word[0]
        for i, char in enumerate(word[1:], start=2):
            piece = char + ("</w>" if i == len(word) else "")
            merged = prefix + piece
            if merged not in known:
                merges.append((prefix, piece))
                tokens.append(merged)
                known.add(merged)
            prefix = merged
    fillers = vocab_size - 2 - len(tokens)
    if fillers < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for {len(tokens) + 2} tokens")
    tokens += [f"<|filler{i}|>" for i in range(fillers)] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter at a trained-like scale: matrices ~ N(0, 1/fan_in) keep the
    activations, and so the boxes, away from saturation; LayerNorm weights 1 + noise; other
    vectors small noise (transformers' init leaves biases 0 and box logits near-constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if param.dim() >= 2:
                param.copy_(noise * param[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + noise * 0.1)
            else:
                param.add_(noise * 0.1)


def build_checkpoint(folder: Path, arch: str = "b32", seed: int = 0) -> Path:
    """Write a random OwlViTForObjectDetection of ``arch`` plus tokenizer and processor."""
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    overrides = json.loads(json.dumps(ARCHITECTURES[arch]))  # deep copy
    config = OwlViTConfig(**overrides)
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(config).eval()
    randomize_weights(model, seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_vocabulary(folder, config.text_config.vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(
        folder, pad_token="!", model_max_length=config.text_config.max_position_embeddings
    )
    side = config.vision_config.image_size
    image_processor = OwlViTImageProcessor(
        size={"height": side, "width": side}, crop_size={"height": side, "width": side}
    )
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    image_processor.save_pretrained(folder)  # preprocessor_config.json, which our loader reads
    return folder


@dataclass(frozen=True)
class FrameResult:
    """One image's output: boxes (N, 4) xyxy source pixels, scores (N,), query ids (N,)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


Contender = Callable[[Sequence[np.ndarray]], list[FrameResult]]
# A timed step of the benchmark: (untimed setup, timed call); both get the round number.
Step = tuple[Callable[[int], object] | None, Callable[[int], object]]


def ours_from_detector(detector: OpenVocabDetector) -> Contender:
    """``detect`` as a contender (boxes, scores and query indices as tensors)."""
    def run(frames: Sequence[np.ndarray]) -> list[FrameResult]:
        return [
            FrameResult(torch.from_numpy(d.boxes), torch.from_numpy(d.scores),
                        torch.from_numpy(d.query_indices))
            for d in detector.detect(frames)
        ]

    return run


def ours_contender(
    folder: Path, device: torch.device, precision: str, queries: Sequence[str],
    threshold: float, compiled: bool = False, cuda_graphs: bool = True,
) -> tuple[Contender, OpenVocabDetector]:
    """``load_detector`` + ``set_queries`` once, then ``detect`` per frame batch (text cached).

    compiled: wrap the per-frame image path in ``torch.compile`` (opt-in: minutes to compile).
    cuda_graphs: the detector setting (on CUDA; with ``compiled`` the graphs replay the
    compiled kernels).
    """
    detector = load_detector(folder, device=device, precision=precision,
                             score_threshold=threshold, cuda_graphs=cuda_graphs)
    detector.set_queries(list(queries))
    if compiled:
        # Instance attribute: only this benchmark detector runs the compiled graph.
        detector.owl.image_features = torch.compile(detector.owl.image_features)
    return ours_from_detector(detector), detector


def ours_image_path(detector: OpenVocabDetector) -> Contender:
    """Preprocessing + ``image_features`` only: the part the GEMM fraction is judged on."""
    def run(frames: Sequence[np.ndarray]) -> list[FrameResult]:
        with torch.inference_mode():
            batch = detector.preprocess(frames)
            boxes = detector.image_features(batch.pixel_values).boxes.float().cpu()
        return [FrameResult(b, torch.ones(len(b)), torch.zeros(len(b), dtype=torch.long))
                for b in boxes]

    return run


class TransformersContenders:
    """transformers' OwlViTProcessor + OwlViTForObjectDetection (fp32) on the same folder."""

    def __init__(self, folder: Path, device: torch.device, queries: Sequence[str],
                 threshold: float) -> None:
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        self.processor = OwlViTProcessor.from_pretrained(folder)
        self.model = OwlViTForObjectDetection.from_pretrained(folder).to(device).eval()
        self.device = device
        self.queries = list(queries)
        self.threshold = threshold
        with torch.inference_mode():
            text = self.processor(text=[self.queries], return_tensors="pt").to(device)
            # Projected, unnormalised text embeddings: what the model's forward feeds its class
            # head (which normalises them).
            self.query_embeds = self.model.owlvit.get_text_features(**text).pooler_output
            self.query_mask = text["input_ids"][:, 0] > 0  # (Q,) padded queries start with 0

    def _results(self, outputs: Any, frames: Sequence[np.ndarray]) -> list[FrameResult]:
        sizes = [frame.shape[:2] for frame in frames]
        results = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=sizes
        )
        return [FrameResult(r["boxes"].cpu(), r["scores"].cpu(), r["labels"].cpu())
                for r in results]

    def pipeline(self, frames: Sequence[np.ndarray]) -> list[FrameResult]:
        """(a) As the model card shows it: processor(text, images), model(**inputs), post-process;
        the text tower runs on every frame."""
        with torch.inference_mode():
            inputs = self.processor(
                text=[self.queries] * len(frames), images=list(frames), return_tensors="pt"
            ).to(self.device)
            return self._results(self.model(**inputs), frames)

    def cached_text(self, frames: Sequence[np.ndarray]) -> list[FrameResult]:
        """(b) Text embedded once; per frame the image embedder, class and box heads."""
        from transformers.models.owlvit.modeling_owlvit import OwlViTObjectDetectionOutput

        model = self.model
        with torch.inference_mode():
            pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]
            feature_map, _ = model.image_embedder(pixels.to(self.device))  # (B, h, w, D)
            batch, rows, cols, width = feature_map.shape
            feats = feature_map.reshape(batch, rows * cols, width)  # (B, P, D)
            queries = self.query_embeds.expand(batch, -1, -1)  # (B, Q, Dq)
            mask = self.query_mask.expand(batch, -1)  # (B, Q)
            logits, _ = model.class_predictor(feats, queries, mask)  # (B, P, Q)
            boxes = model.box_predictor(feats, feature_map)  # (B, P, 4)
            outputs = OwlViTObjectDetectionOutput(logits=logits, pred_boxes=boxes)
            return self._results(outputs, frames)


def agreement_figures(
    fp32: dict[int, list[FrameResult]], low: dict[int, list[FrameResult]],
    reference: dict[int, list[FrameResult]], frame_hw: tuple[int, int],
) -> dict[str, float]:
    """Over the timed rounds' frames: the fraction of ours fp32 detections (the top 100 after
    NMS) that the other result has with the same label at IoU >= 0.9 (matched one to one).
    Against low precision that is the target; at IoU >= 0.5 it is context; against
    transformers (its per-patch boxes, clipped to the image like ours) a same-weights check."""
    height, width = frame_hw
    upper = torch.tensor([width, height, width, height], dtype=torch.float32)
    clipped = {r: [FrameResult(torch.minimum(f.boxes.clamp(min=0), upper), f.scores, f.labels)
                   for f in frames] for r, frames in reference.items()}
    pairs = {"low_vs_fp32_top100_iou0.9": (low, 0.9), "low_vs_fp32_top100_iou0.5": (low, 0.5),
             "fp32_vs_transformers_top100_iou0.9": (clipped, 0.9)}
    out: dict[str, float] = {}
    for key, (other, iou) in pairs.items():
        matched = total = 0
        for r, results in fp32.items():
            for ours, theirs in zip(results, other[r], strict=True):
                m, t = agreement(ours, theirs, iou=iou)
                matched, total = matched + m, total + t
        out[key] = matched / max(total, 1)
    out["boxes_compared"] = sum(len(f.boxes) for results in fp32.values() for f in results)
    return out


def ours_stages(detector: OpenVocabDetector, frames: Sequence[np.ndarray],
                batch: int) -> dict[str, Step]:
    """``detect``'s three stages as separate steps on round r's frames (r, r+1, ...): each
    step's setup runs the stages before it untimed, so each times its own stage alone."""
    vocabulary = detector.vocabulary
    assert vocabulary is not None, "set_queries first"
    state: dict[str, Any] = {}

    def images(r: int) -> list[np.ndarray]:
        return [frames[(r + i) % len(frames)] for i in range(batch)]

    @torch.inference_mode()
    def preprocess(r: int) -> None:
        state["batch"] = detector.preprocess(images(r))

    @torch.inference_mode()
    def features(r: int) -> None:
        state["features"] = detector.image_features(state["batch"].pixel_values)

    def decode(r: int) -> object:
        return detector.decode(state["batch"], state["features"], vocabulary)

    def before_decode(r: int) -> None:
        preprocess(r)
        features(r)

    return {"preprocess": (None, preprocess), "image_features": (preprocess, features),
            "decode": (before_decode, decode)}


def agreement(reference: FrameResult, other: FrameResult, iou: float = 0.9) -> tuple[int, int]:
    """(matched, total): reference boxes with a same-label box in ``other`` at IoU >= ``iou``,
    matched one to one, best reference scores first (results come sorted by score)."""
    total = len(reference.boxes)
    if total == 0 or len(other.boxes) == 0:
        return 0, total
    overlaps = box_iou(reference.boxes.float(), other.boxes.float())  # (N, M)
    same = reference.labels[:, None] == other.labels[None, :]  # (N, M)
    overlaps = torch.where(same, overlaps, torch.zeros_like(overlaps))
    taken = torch.zeros(len(other.boxes), dtype=torch.bool)
    matched = 0
    for row in overlaps:
        row = row.masked_fill(taken, -1.0)
        best = int(row.argmax())
        if row[best] >= iou:
            taken[best] = True
            matched += 1
    return matched, total


# ------------------------------------------------------------------------ FLOPs
def _encoder_flops(tokens: int, cfg: EncoderConfig) -> int:
    """Multiply-adds x 2 of one pass of a pre-LN encoder over ``tokens`` tokens."""
    d, hidden = cfg.hidden_size, cfg.intermediate_size
    projections = 2 * tokens * d * (3 * d + d)  # fused q/k/v, then out
    attention = 2 * 2 * tokens * tokens * d  # q @ k^T and weights @ v, all heads
    mlp = 2 * 2 * tokens * d * hidden
    return cfg.num_layers * (projections + attention + mlp)


def image_flops(cfg: ModelConfig) -> int:
    """FLOPs of one image through the vision tower and the class/box(/objectness) heads."""
    vision = cfg.vision
    patches, d = vision.num_patches_side**2, vision.hidden_size
    embed = 2 * patches * vision.num_channels * vision.patch_size**2 * d
    class_head = 2 * patches * d * (cfg.query_dim + 2)  # embedding, logit shift and scale
    box_head = 2 * patches * d * (2 * d + 4)  # D x D, D x D, D x 4
    objectness_head = 2 * patches * d * (2 * d + 1) if cfg.is_v2 else 0
    heads = class_head + box_head + objectness_head
    return embed + _encoder_flops(patches + 1, vision) + heads


def text_flops_per_query(cfg: ModelConfig) -> int:
    """FLOPs to embed one query padded to the context length (the text tower + projection)."""
    text = cfg.text
    return _encoder_flops(cfg.context_length, text) + 2 * text.hidden_size * cfg.projection_dim


def scoring_flops_per_query(cfg: ModelConfig) -> int:
    """FLOPs per image and query of the class logits (patch embeddings x query embeddings)."""
    return 2 * cfg.vision.num_patches_side**2 * cfg.query_dim
