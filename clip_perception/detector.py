"""Open-vocabulary object detection (OWL-ViT / OWLv2) for batches of camera images.

Per frame batch: preprocess on the detector's device (images of any sizes each map to the
square model input, so the batch is one forward), ``image_features`` once, ``class_logits``
against the cached vocabulary embeddings, then ``postprocess``. Text is encoded only when the
vocabulary changes (see ``vocabulary.VocabularyStore``).

Without a vocabulary ``detect`` raises ``NoVocabularyError``: an empty result would look like
"nothing there" to a robot, while the real state is "not told what to look for".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_perception.cuda_graph import GraphedImageFeatures
from clip_perception.detections import Detections
from clip_perception.device import Placement, quantize_int8, resolve_placement
from clip_perception.model import OwlModel, load_owl, load_tokenizer
from clip_perception.model.boxes import pixels_to_input_boxes
from clip_perception.model.owl import OwlImageFeatures
from clip_perception.model.preprocess import PreprocessedBatch, Preprocessor, load_preprocessor
from clip_perception.model.tokenizer import ClipTokenizer
from clip_perception.postprocess import best_query_per_patch, select_detections
from clip_perception.vocabulary import (
    EncoderStats,
    Templates,
    Vocabulary,
    VocabularyError,
    resolve_templates,
    text_vocabulary_store,
)


@dataclass(frozen=True)
class DetectorSettings:
    """Detector behaviour; every field can be passed to ``load_detector`` as a keyword.

    score_threshold: default per-query score threshold in [0, 1].
    nms_iou: NMS IoU threshold; a box is suppressed when its IoU with a better one is above.
    class_agnostic_nms: suppress across queries too (one box per object whatever its label).
    max_detections: cap per image, best scores first.
    rank_by_objectness: OWLv2 only; score = sigmoid(class logit) * sigmoid(objectness logit)
        (see ``postprocess.best_query_per_patch`` for why the product).
    templates: prompt templates used when ``set_queries`` gets none: None (queries as they
        are), "clip7", "clip80" or a list of strings with one ``{}`` each; with a default
        set, ``templates=["{}"]`` asks for the bare queries.
    cache_size: prompt embeddings kept in the LRU cache.
    text_batch_size: prompts per text-encoder call when a vocabulary is encoded.
    cuda_graphs: on CUDA, replay the image path from CUDA graphs captured per batch size
        (``cuda_graph.GraphedImageFeatures``); ignored on CPU.
    """

    score_threshold: float = 0.1
    nms_iou: float = 0.3
    class_agnostic_nms: bool = False
    max_detections: int = 100
    rank_by_objectness: bool = False
    templates: Templates = None
    cache_size: int = 4096
    text_batch_size: int = 256
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms_iou"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        for name in ("max_detections", "cache_size", "text_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "max_detections" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        try:
            resolve_templates(self.templates)
        except VocabularyError as err:
            raise ValueError(f"templates: {err}") from err


def load_detector(
    model: str | Path, device: str | torch.device = "auto", precision: str = "auto",
    **settings: Any,
) -> OpenVocabDetector:
    """Load an OWL-ViT/OWLv2 checkpoint folder (config.json, weights, vocab.json, merges.txt).

    device: auto (CUDA if present), cpu, cuda, cuda:N. precision: auto (fp32 on CPU, bf16 on
    CUDA when supported else fp16), fp32, fp16/bf16 (CUDA), int8 (CPU, dynamic quantisation).
    settings: fields of ``DetectorSettings``.
    """
    unknown = set(settings) - {f.name for f in dataclasses.fields(DetectorSettings)}
    if unknown:
        raise TypeError(f"unknown detector settings: {', '.join(sorted(unknown))}")
    config = DetectorSettings(**settings)
    placement = resolve_placement(device, precision)
    owl = load_owl(model, device=placement.device, dtype=placement.dtype)
    if config.rank_by_objectness and not owl.config.is_v2:
        raise ValueError("rank_by_objectness needs an OWLv2 checkpoint (v1 has no objectness)")
    if placement.quantized:
        owl = quantize_int8(owl)
    folder = Path(model).resolve()
    return OpenVocabDetector(
        owl, load_tokenizer(folder), load_preprocessor(folder), placement, config,
        model_key=f"{folder}|{placement.precision}",
    )


class OpenVocabDetector:
    """Detects the active vocabulary's queries in batches of HxWx3 uint8 RGB images."""

    def __init__(
        self, owl: OwlModel, tokenizer: ClipTokenizer, preprocessor: Preprocessor,
        placement: Placement, settings: DetectorSettings, model_key: str,
    ) -> None:
        self.owl = owl
        self.preprocessor = preprocessor
        self.placement = placement
        self.settings = settings
        self._graphed = self._graph(settings.cuda_graphs)
        self._limits: tuple[tuple[int, float], torch.Tensor] | None = None
        self._store = text_vocabulary_store(
            tokenizer, owl.encode_text, owl.config.context_length, placement.device,
            placement.dtype, model_key, settings.cache_size, settings.text_batch_size)

    @property
    def vocabulary(self) -> Vocabulary | None:
        """The active vocabulary; its ``warnings`` report e.g. truncated queries."""
        return self._store.active

    @property
    def stats(self) -> EncoderStats:
        return self._store.stats

    # ------------------------------------------------------------ vocabulary
    def set_queries(
        self, queries: Sequence[str], thresholds: Sequence[float] | None = None,
        templates: Templates = None,
    ) -> int:
        """Replace the vocabulary with text queries; returns its version once it is active.

        thresholds: one per query, overriding ``settings.score_threshold``. templates: None
        uses ``settings.templates``. Raises VocabularyError (vocabulary unchanged) on bad input.
        """
        return self.set_queries_async(queries, thresholds, templates).result()

    def set_queries_async(
        self, queries: Sequence[str], thresholds: Sequence[float] | None = None,
        templates: Templates = None,
    ) -> Future[int]:
        """As ``set_queries``, but encode in the background; ``detect`` keeps using the previous
        vocabulary until the future's version is active. Validation errors raise here."""
        chosen = self.settings.templates if templates is None else templates
        return self._store.set_text_async(queries, thresholds, chosen)

    def add_image_query(
        self, label: str, image: np.ndarray, box: Sequence[float] | None = None,
        append: bool = True, threshold: float | None = None,
    ) -> int:
        """One-shot exemplar: the embedding of ``box`` (pixel xyxy in ``image``; None = whole
        image) joins the vocabulary as a query named ``label`` (replacing the whole vocabulary
        if not ``append``). Returns the new version."""
        return self.add_image_query_async(label, image, box, append, threshold).result()

    def add_image_query_async(
        self, label: str, image: np.ndarray, box: Sequence[float] | None = None,
        append: bool = True, threshold: float | None = None,
    ) -> Future[int]:
        """As ``add_image_query``, embedding in the background; bad input raises here."""
        with torch.inference_mode():  # in the caller: bad images raise here, not in the worker
            batch = self.preprocessor([image], self.placement.device, self.placement.dtype)
        region = None if box is None else self._input_region(box, batch.image_sizes[0])
        mode = "append" if append else "replace"
        return self._store.add_embedding_async(
            label, lambda: self.owl.embed_image_query(batch.pixel_values, region), threshold, mode
        )

    def update_settings(self, **changes: Any) -> DetectorSettings:
        """Change settings (thresholds, NMS, cap) between frames: validated as a whole, then
        swapped in one assignment, so a batch in flight keeps the settings it started with."""
        updated = dataclasses.replace(self.settings, **changes)
        if updated.rank_by_objectness and not self.owl.config.is_v2:
            raise ValueError("rank_by_objectness needs an OWLv2 checkpoint (v1 has no objectness)")
        if updated.cuda_graphs != self.settings.cuda_graphs:
            self._graphed = self._graph(updated.cuda_graphs)
        self.settings = updated
        return updated

    def _graph(self, cuda_graphs: bool) -> GraphedImageFeatures | None:
        on_cuda = self.placement.device.type == "cuda"
        return GraphedImageFeatures(self.owl) if cuda_graphs and on_cuda else None

    def _input_region(self, box: Sequence[float], image_size: tuple[int, int]) -> torch.Tensor:
        """Check a pixel xyxy box and map it to normalised xyxy in the model input frame."""
        height, width = image_size
        values = np.asarray(box, dtype=np.float64)
        if values.shape != (4,) or not np.isfinite(values).all():
            raise VocabularyError(f"box must be 4 finite numbers x1, y1, x2, y2, got {box!r}")
        x1, y1, x2, y2 = values
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise VocabularyError(
                f"box {box!r} must satisfy 0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}"
            )
        pre = self.preprocessor
        return pixels_to_input_boxes(
            values.astype(np.float32), image_size, pre.mode,
            input_size=pre.image_size, shortest_edge=pre.shortest_edge,
        )  # (4,)

    # ------------------------------------------------------------ inference
    def image_features(self, pixel_values: torch.Tensor) -> OwlImageFeatures:
        """The per-frame, query-independent path (CUDA-graphed when so set)."""
        graphed = self._graphed  # one read: update_settings may swap it meanwhile
        return self.owl.image_features(pixel_values) if graphed is None else graphed(pixel_values)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections for each image of a batch (one camera each, any sizes), in order."""
        vocabulary = self._store.require()  # one read: the whole batch uses this version
        check_image_batch(images)
        with torch.inference_mode():
            batch = self.preprocess(images)
            return self.decode(batch, self.image_features(batch.pixel_values), vocabulary)

    def preprocess(self, images: Sequence[np.ndarray]) -> PreprocessedBatch:
        """HxWx3 uint8 images -> the model input on the detector's device and dtype."""
        return self.preprocessor(images, self.placement.device, self.placement.dtype)

    def decode(
        self, batch: PreprocessedBatch, features: OwlImageFeatures, vocabulary: Vocabulary
    ) -> list[Detections]:
        """The query-dependent end of ``detect``: scores against ``vocabulary``, per-query
        thresholds, NMS and the cap, boxes mapped back to each image's pixels."""
        settings = self.settings
        with torch.inference_mode():
            logits = self.owl.class_logits(features, vocabulary.embeddings)  # (B, P, Q)
            objectness = features.objectness_logits if settings.rank_by_objectness else None
            patches = best_query_per_patch(logits, objectness)
            boxes = batch.boxes_to_pixels(features.boxes.float())  # (B, P, 4) xyxy pixels
            limits = self._score_limits(vocabulary, settings.score_threshold)  # (Q,)
            selections = select_detections(
                boxes, patches, limits, settings.nms_iou, settings.class_agnostic_nms,
                settings.max_detections,
            )
        return [
            Detections(
                boxes=s.boxes.numpy(),
                scores=s.scores.numpy(),
                query_indices=s.query_indices.numpy(),
                labels=[vocabulary.labels[i] for i in s.query_indices.tolist()],
                vocabulary_version=vocabulary.version,
                image_size=size,
            )
            for s, size in zip(selections, batch.image_sizes, strict=True)
        ]

    def _score_limits(self, vocabulary: Vocabulary, default: float) -> torch.Tensor:
        """(Q,) per-query score thresholds on the detector's device: made once per vocabulary
        version and default threshold, not per frame (on a GPU each is a host-to-device copy)."""
        key = (vocabulary.version, default)
        cached = self._limits  # one read: another thread may replace it meanwhile
        if cached is None or cached[0] != key:
            values = [default if t is None else t for t in vocabulary.thresholds]
            cached = (key, torch.tensor(values, dtype=torch.float32, device=self.placement.device))
            self._limits = cached
        return cached[1]

    def close(self) -> None:
        """Stop the vocabulary worker (pending updates finish first)."""
        self._store.close()


def check_image_batch(images: object) -> None:
    """Reject what is not a non-empty batch; the preprocessor then checks every image (HxWx3
    uint8) and names the bad one."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError("expected a batch: pass a list of HxWx3 images, not one array")
    if not isinstance(images, (Sequence, np.ndarray)) or isinstance(images, str):
        raise ValueError(f"images must be a list of HxWx3 uint8 arrays, not {type(images)}")
    if len(images) == 0:
        raise ValueError("empty batch: pass at least one image")
