"""Zero-shot (and few-shot) image classification with a CLIP checkpoint.

Labels are a ``Vocabulary`` handled by the same ``VocabularyStore`` as the detector's queries
(validation, prompt templates, embedding cache, background encoding, atomic swap). A label
can also be defined by example images: its embedding becomes the renormalised mean of the
exemplars' image embeddings (the multi-shot prototype), replacing any text embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip_perception.detections import Classification
from clip_perception.detector import check_image_batch
from clip_perception.device import Placement, quantize_int8, resolve_placement
from clip_perception.model import ClipModel, load_clip, load_tokenizer
from clip_perception.model.preprocess import Preprocessor, load_preprocessor
from clip_perception.model.tokenizer import ClipTokenizer
from clip_perception.vocabulary import (
    EncoderStats,
    Templates,
    Vocabulary,
    text_vocabulary_store,
)


def load_classifier(
    model: str | Path, device: str | torch.device = "auto", precision: str = "auto",
    cache_size: int = 4096,
) -> ZeroShotClassifier:
    """Load a CLIP checkpoint folder (config.json, weights, vocab.json, merges.txt).

    device and precision as for ``load_detector``; cache_size bounds the prompt cache.
    """
    placement = resolve_placement(device, precision)
    clip = load_clip(model, device=placement.device, dtype=placement.dtype)
    if placement.quantized:
        clip = quantize_int8(clip)
    folder = Path(model).resolve()
    return ZeroShotClassifier(
        clip, load_tokenizer(folder), load_preprocessor(folder), placement,
        model_key=f"{folder}|{placement.precision}", cache_size=cache_size,
    )


class ZeroShotClassifier:
    """Softmax over logit_scale * cosine(image, label) for the active label vocabulary."""

    def __init__(
        self, clip: ClipModel, tokenizer: ClipTokenizer, preprocessor: Preprocessor,
        placement: Placement, model_key: str, cache_size: int = 4096,
    ) -> None:
        self.clip = clip
        self.preprocessor = preprocessor
        self.placement = placement
        self._store = text_vocabulary_store(
            tokenizer, clip.encode_text, clip.config.context_length, placement.device,
            placement.dtype, model_key, cache_size)

    @property
    def vocabulary(self) -> Vocabulary | None:
        return self._store.active

    @property
    def stats(self) -> EncoderStats:
        return self._store.stats

    def set_labels(self, labels: Sequence[str], templates: Templates = None) -> int:
        """Replace the labels (text); returns the new version once active."""
        return self.set_labels_async(labels, templates).result()

    def set_labels_async(
        self, labels: Sequence[str], templates: Templates = None
    ) -> Future[int]:
        """As ``set_labels``; ``classify`` keeps the previous labels until the swap."""
        return self._store.set_text_async(labels, None, templates)

    def add_exemplars(self, label: str, images: Sequence[np.ndarray]) -> int:
        """Define ``label`` (new or existing) by example images; returns the new version."""
        check_image_batch(images)
        with torch.inference_mode():  # in the caller: bad images raise here, not in the worker
            pixels = self._pixels(images)

        def prototype() -> torch.Tensor:
            embeddings = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)  # (N, D)
            return F.normalize(embeddings.mean(dim=0), dim=-1)  # (D,)

        return self._store.add_embedding_async(label, prototype, None, "upsert").result()

    def classify(self, images: Sequence[np.ndarray]) -> Classification:
        """Label probabilities for each image of a batch."""
        vocabulary = self._store.require()  # one read: the whole batch uses this version
        check_image_batch(images)
        with torch.inference_mode():
            image_embeds = self.clip.encode_image(self._pixels(images)).float()  # (B, D)
            text_embeds = vocabulary.embeddings.float()  # (L, D)
            logits = self.clip.logit_scale.float() * image_embeds @ text_embeds.T  # (B, L)
            probs = logits.softmax(dim=-1).cpu().numpy()
        return Classification(
            probs=probs, labels=list(vocabulary.labels), vocabulary_version=vocabulary.version
        )

    def close(self) -> None:
        """Stop the vocabulary worker (pending updates finish first)."""
        self._store.close()

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = self.preprocessor(images, self.placement.device, self.placement.dtype)
        return batch.pixel_values  # (B, 3, S, S)
