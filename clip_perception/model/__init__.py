"""Networks (CLIP, OWL-ViT, OWLv2), checkpoint loading/saving, tokenizer and preprocessing."""

from .checkpoint import (
    CheckpointError,
    key_map,
    load_clip,
    load_owl,
    read_config,
    save_clip,
    save_owl,
)
from .clip import ClipModel, ClipOutput
from .config import ModelConfig, TextConfig, VisionConfig
from .owl import ImageQuery, OwlImageFeatures, OwlModel, OwlOutput, compute_box_bias
from .tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "ClipModel",
    "ClipOutput",
    "ImageQuery",
    "ModelConfig",
    "OwlImageFeatures",
    "OwlModel",
    "OwlOutput",
    "TextConfig",
    "VisionConfig",
    "compute_box_bias",
    "key_map",
    "load_clip",
    "load_owl",
    "load_tokenizer",
    "read_config",
    "save_clip",
    "save_owl",
]
