"""Typed model configuration parsed from a Hugging Face style ``config.json``.

Every size comes from the file; the only built-in numbers are the reference's own defaults,
used when a (diff-saved or older) ``config.json`` leaves a field out, exactly as
``transformers`` would fill it in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# Architectures we can build, keyed by the name in ``architectures`` -> (family, model_type).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "CLIPModel": ("clip", "clip"),
    "OwlViTForObjectDetection": ("owl", "owlvit"),
    "Owlv2ForObjectDetection": ("owl", "owlv2"),
}
_ARCH_BY_MODEL_TYPE = {model_type: arch for arch, (_, model_type) in ARCHITECTURES.items()}

# Activations the encoder implements (names as in transformers' ACT2FN).
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")

# The reference config classes' defaults (transformers configuration_{clip,owlvit,owlv2}.py),
# applied only to keys missing from config.json.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
             "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
             "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407},
    "owlvit": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
               "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 16,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
               "pad_token_id": 0, "bos_token_id": 49406, "eos_token_id": 49407},
}
_TEXT_DEFAULTS["owlv2"] = dict(_TEXT_DEFAULTS["owlvit"])
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0},
}
_VISION_DEFAULTS["owlvit"] = {**_VISION_DEFAULTS["clip"], "image_size": 768, "patch_size": 32}
_VISION_DEFAULTS["owlv2"] = {**_VISION_DEFAULTS["clip"], "image_size": 768, "patch_size": 16}
_TOP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}


class ConfigError(ValueError):
    """config.json describes something this package cannot build."""


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of one pre-LN transformer stack (shared by the vision and text towers)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VisionConfig(EncoderConfig):
    image_size: int
    patch_size: int
    num_channels: int

    @property
    def num_patches_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig(EncoderConfig):
    vocab_size: int
    max_position_embeddings: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    # Token id whose first occurrence is pooled; None pools at argmax(input_ids) (OWL-ViT and
    # legacy CLIP configs with eos_token_id == 2, as the reference does).
    pool_token_id: int | None


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model; ``extra`` keeps unknown config.json keys for saving."""

    architecture: str
    model_type: str
    vision: VisionConfig
    text: TextConfig
    projection_dim: int
    logit_scale_init_value: float
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    @property
    def is_owl(self) -> bool:
        return self.family == "owl"

    @property
    def is_v2(self) -> bool:
        return self.model_type == "owlv2"

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def num_patches_side(self) -> int:
        return self.vision.num_patches_side

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches_side**2

    @property
    def max_position_embeddings(self) -> int:
        """Text context length in tokens."""
        return self.text.max_position_embeddings

    @property
    def context_length(self) -> int:
        return self.text.max_position_embeddings

    @property
    def query_dim(self) -> int:
        """Width of OWL class embeddings: the class head projects to the text hidden size."""
        return self.text.hidden_size

    def with_dtype(self, dtype: torch.dtype) -> ModelConfig:
        return dataclasses.replace(self, dtype=dtype)


def _square_size(value: Any, name: str) -> int:
    """The reference computes grids as image_size // patch_size, i.e. square sizes only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{name}={value!r}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} is not a positive integer")
    return value


def _merged_sub_config(raw: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    sub = raw.get(key) or {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{key} must be an object, got {type(sub).__name__}")
    # Legacy ``*_config_dict`` keys override ``*_config`` (CLIPConfig.__post_init__ does this).
    legacy = raw.get(f"{key}_dict") or {}
    return {**defaults, **sub, **legacy}


def _encoder_fields(sub: dict[str, Any], name: str) -> dict[str, Any]:
    act = sub["hidden_act"]
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"{name}.hidden_act={act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})"
        )
    width, heads = int(sub["hidden_size"]), int(sub["num_attention_heads"])
    if heads <= 0 or width % heads:
        raise ConfigError(f"{name}: hidden_size {width} is not a multiple of {heads} heads")
    return {
        "hidden_size": width,
        "intermediate_size": int(sub["intermediate_size"]),
        "num_layers": int(sub["num_hidden_layers"]),
        "num_heads": heads,
        "hidden_act": act,
        "layer_norm_eps": float(sub["layer_norm_eps"]),
        "attention_dropout": float(sub["attention_dropout"] or 0.0),
    }


def _optional_id(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        # Lists are legal in transformers configs; pooling needs exactly one id.
        if len(value) != 1:
            raise ConfigError(f"{name}={value!r}: a single token id is required")
        value = value[0]
    return int(value)


def resolve_architecture(raw: dict[str, Any]) -> str:
    """The one supported architecture named by config.json (``architectures``, else model_type)."""
    archs = raw.get("architectures")
    if archs:
        supported = [a for a in archs if a in ARCHITECTURES]
        if not supported:
            raise ConfigError(
                f"unsupported architectures {archs!r} (supported: {sorted(ARCHITECTURES)})"
            )
        return supported[0]
    model_type = raw.get("model_type")
    if model_type in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[model_type]
    raise ConfigError(
        f"unsupported model_type {model_type!r} and no supported architectures "
        f"(supported: {sorted(ARCHITECTURES)})"
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from the parsed JSON of a reference ``config.json``."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must contain a JSON object")
    arch = resolve_architecture(raw)
    family, model_type = ARCHITECTURES[arch]
    if raw.get("model_type", model_type) != model_type:
        raise ConfigError(f"architecture {arch} does not match model_type {raw['model_type']!r}")
    t = _merged_sub_config(raw, "text_config", _TEXT_DEFAULTS[model_type])
    v = _merged_sub_config(raw, "vision_config", _VISION_DEFAULTS[model_type])
    try:
        eos = _optional_id(t["eos_token_id"], "text_config.eos_token_id")
        # None pools at argmax(input_ids): OWL always, CLIP only for its legacy eos id 2.
        pool_id = None if family == "owl" or eos == 2 or eos is None else eos
        text = TextConfig(
            **_encoder_fields(t, "text_config"),
            vocab_size=int(t["vocab_size"]),
            max_position_embeddings=int(t["max_position_embeddings"]),
            pad_token_id=_optional_id(t["pad_token_id"], "text_config.pad_token_id"),
            bos_token_id=_optional_id(t["bos_token_id"], "text_config.bos_token_id"),
            eos_token_id=eos,
            pool_token_id=pool_id,
        )
        image_size = _square_size(v["image_size"], "vision_config.image_size")
        patch_size = _square_size(v["patch_size"], "vision_config.patch_size")
        vision = VisionConfig(
            **_encoder_fields(v, "vision_config"),
            image_size=image_size,
            patch_size=patch_size,
            num_channels=int(v["num_channels"]),
        )
        projection_dim = int(raw.get("projection_dim", _TOP_DEFAULTS["projection_dim"]))
        scale_init = float(
            raw.get("logit_scale_init_value", _TOP_DEFAULTS["logit_scale_init_value"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"malformed config field: {exc!r}") from exc
    if image_size % patch_size:
        raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if family == "owl" and projection_dim != text.hidden_size:
        # The class head projects patches to text hidden_size and compares them with projected
        # queries of projection_dim; the reference only works when both agree.
        raise ConfigError(
            f"OWL needs projection_dim ({projection_dim}) == text_config.hidden_size "
            f"({text.hidden_size})"
        )
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vision=vision,
        text=text,
        projection_dim=projection_dim,
        logit_scale_init_value=scale_init,
        extra=dict(raw),
    )


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def to_reference_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json that transformers loads into the same architecture and sizes."""
    prefix = cfg.model_type
    text_extra = cfg.extra.get("text_config") or {}
    vision_extra = cfg.extra.get("vision_config") or {}

    def encoder(e: EncoderConfig) -> dict[str, Any]:
        return {
            "hidden_size": e.hidden_size,
            "intermediate_size": e.intermediate_size,
            "num_hidden_layers": e.num_layers,
            "num_attention_heads": e.num_heads,
            "hidden_act": e.hidden_act,
            "layer_norm_eps": e.layer_norm_eps,
            "attention_dropout": e.attention_dropout,
        }

    text = {
        **text_extra,
        **encoder(cfg.text),
        "model_type": f"{prefix}_text_model",
        "vocab_size": cfg.text.vocab_size,
        "max_position_embeddings": cfg.text.max_position_embeddings,
        "pad_token_id": cfg.text.pad_token_id,
        "bos_token_id": cfg.text.bos_token_id,
        "eos_token_id": cfg.text.eos_token_id,
    }
    vision = {
        **vision_extra,
        **encoder(cfg.vision),
        "model_type": f"{prefix}_vision_model",
        "image_size": cfg.vision.image_size,
        "patch_size": cfg.vision.patch_size,
        "num_channels": cfg.vision.num_channels,
    }
    out = {k: v for k, v in cfg.extra.items() if not k.endswith("_config_dict")}
    out.update(
        architectures=[cfg.architecture],
        model_type=cfg.model_type,
        projection_dim=cfg.projection_dim,
        logit_scale_init_value=cfg.logit_scale_init_value,
        text_config=text,
        vision_config=vision,
        dtype=_DTYPE_NAMES.get(cfg.dtype, "float32"),
    )
    out.pop("torch_dtype", None)  # superseded by "dtype" in current transformers
    return out
