"""Load and save Hugging Face format checkpoints (config.json + safetensors / pickle-free .bin).

Reference parameter names are mapped to ours through an explicit table built from the config
(:func:`key_map`); any missing, unexpected or mis-shaped tensor is a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .clip import ClipModel
from .config import ARCHITECTURES, ConfigError, ModelConfig, parse_config, to_reference_dict
from .owl import OwlModel

CONFIG_NAME = "config.json"
# Searched in this order; the .index.json variants are sharded checkpoints.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

ModelT = TypeVar("ModelT", OwlModel, ClipModel)


class CheckpointError(ValueError):
    """A checkpoint folder, its config.json or its weights cannot be used."""


# (ours, reference) names inside one encoder layer; both towers share the layout.
_LAYER_PARTS = (
    ("norm1", "layer_norm1"),
    ("attn.q", "self_attn.q_proj"),
    ("attn.k", "self_attn.k_proj"),
    ("attn.v", "self_attn.v_proj"),
    ("attn.out", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)


def _is_ignored(ref_key: str) -> bool:
    # Derived buffers some writers include: position ids and the OWL box prior.
    return ref_key.endswith("position_ids") or ref_key == "box_bias"


def _linear(table: dict[str, str], ours: str, ref: str, bias: bool = True) -> None:
    table[f"{ours}.weight"] = f"{ref}.weight"
    if bias:
        table[f"{ours}.bias"] = f"{ref}.bias"


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state_dict key -> the reference's key, for every persistent tensor of the model."""
    table: dict[str, str] = {}
    base = f"{cfg.model_type}." if cfg.is_owl else ""  # owlvit. / owlv2. wrap the CLIP part
    vis, txt = f"{base}vision_model", f"{base}text_model"
    # CLIP's reference spells its vision pre-norm "pre_layrnorm"; OWL fixed the typo.
    pre_norm = "pre_layernorm" if cfg.is_owl else "pre_layrnorm"
    table["vision.class_embed"] = f"{vis}.embeddings.class_embedding"
    table["vision.patch_embed.weight"] = f"{vis}.embeddings.patch_embedding.weight"
    table["vision.pos_embed"] = f"{vis}.embeddings.position_embedding.weight"
    _linear(table, "vision.pre_norm", f"{vis}.{pre_norm}")
    _linear(table, "vision.post_norm", f"{vis}.post_layernorm")
    table["text.token_embed.weight"] = f"{txt}.embeddings.token_embedding.weight"
    table["text.pos_embed"] = f"{txt}.embeddings.position_embedding.weight"
    _linear(table, "text.final_norm", f"{txt}.final_layer_norm")
    for tower, ref, layers in (
        ("vision", vis, cfg.vision.num_layers),
        ("text", txt, cfg.text.num_layers),
    ):
        for i in range(layers):
            for ours, theirs in _LAYER_PARTS:
                _linear(table, f"{tower}.encoder.layers.{i}.{ours}",
                        f"{ref}.encoder.layers.{i}.{theirs}")
    _linear(table, "visual_projection", f"{base}visual_projection", bias=False)
    _linear(table, "text_projection", f"{base}text_projection", bias=False)
    table["log_logit_scale"] = f"{base}logit_scale"
    if cfg.is_owl:
        _linear(table, "merge_norm", "layer_norm")
        _linear(table, "class_head.proj", "class_head.dense0")
        _linear(table, "class_head.shift", "class_head.logit_shift")
        _linear(table, "class_head.scale", "class_head.logit_scale")
        heads = ("box_head", "objectness_head") if cfg.is_v2 else ("box_head",)
        for head in heads:
            for i in range(3):
                _linear(table, f"{head}.fc{i}", f"{head}.dense{i}")
    return table


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Parse ``<path>/config.json`` (path may also be the file itself)."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in checkpoint folder {path}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        return parse_config(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def _load_one(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file), device="cpu")
        else:
            # weights_only refuses arbitrary pickled objects, so loading cannot run code.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means an unusable file
        raise CheckpointError(f"cannot read weights file {file}: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"weights file {file} is not a flat mapping of names to tensors")
    return state


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint folder, plus the file each one came from."""
    for name in WEIGHT_NAMES:
        file = folder / name
        if file.is_file():
            break
    else:
        raise CheckpointError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)})")
    if not name.endswith(".index.json"):
        state = _load_one(file)
        return state, dict.fromkeys(state, file)
    try:
        weight_map = json.loads(file.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read shard index {file}: {exc}") from exc
    state, sources = {}, {}
    for shard in shards:
        shard_state = _load_one(folder / shard)
        state.update(shard_state)
        sources.update(dict.fromkeys(shard_state, folder / shard))
    return state, sources


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _matched_state(
    model: nn.Module, cfg: ModelConfig, weights: dict[str, torch.Tensor],
    sources: dict[str, Path], folder: Path, dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Rename reference tensors to ours, strictly: every key present, known and well-shaped."""
    table = key_map(cfg)
    expected = model.state_dict()
    if set(table) != set(expected):  # guards the table itself against drift from the modules
        raise AssertionError(f"key table mismatch: {sorted(set(table) ^ set(expected))}")
    where = ", ".join(sorted({str(p) for p in sources.values()})) or str(folder)
    known = set(table.values())
    unexpected = sorted(k for k in weights if k not in known and not _is_ignored(k))
    if unexpected:
        raise CheckpointError(
            f"unexpected key {unexpected[0]!r} in {sources[unexpected[0]]} "
            f"({len(unexpected)} unexpected in total) for {cfg.architecture}"
        )
    state = {}
    for ours, ref in table.items():
        if ref not in weights:
            raise CheckpointError(f"missing key {ref!r} in {where} for {cfg.architecture}")
        tensor = weights[ref]
        want = tuple(expected[ours].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"key {ref!r} in {sources[ref]} has shape {tuple(tensor.shape)}, "
                f"but config.json implies {want}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"key {ref!r} in {sources[ref]} has dtype {tensor.dtype}")
        state[ours] = tensor.to(dtype)
    return state


def _load(
    path: str | os.PathLike[str], cls: type[ModelT], family: str,
    device: str | torch.device, dtype: torch.dtype | str, requires_grad: bool,
) -> ModelT:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist or is not a folder")
    cfg = read_config(folder)
    if cfg.family != family:
        wanted = [a for a, (f, _) in ARCHITECTURES.items() if f == family]
        raise CheckpointError(
            f"{folder / CONFIG_NAME} describes {cfg.architecture}; expected one of {wanted}"
        )
    dtype = _resolve_dtype(dtype)
    cfg = cfg.with_dtype(dtype)
    weights, sources = read_weights(folder)
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = cls(cfg)
    state = _matched_state(model, cfg, weights, sources, folder, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    model.to(device)
    model.eval()
    model.requires_grad_(requires_grad)
    return model


def load_owl(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    requires_grad: bool = False,
) -> OwlModel:
    """Load an OwlViTForObjectDetection / Owlv2ForObjectDetection checkpoint folder."""
    return _load(path, OwlModel, "owl", device, dtype, requires_grad)


def load_clip(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    requires_grad: bool = False,
) -> ClipModel:
    """Load a CLIPModel checkpoint folder."""
    return _load(path, ClipModel, "clip", device, dtype, requires_grad)


def _save(model: OwlModel | ClipModel, path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    table = key_map(model.config)
    state = {
        table[k]: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
    }
    cfg = model.config.with_dtype(model.log_logit_scale.dtype)
    # transformers refuses safetensors files without this metadata.
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(
        json.dumps(to_reference_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return folder


def save_owl(model: OwlModel, path: str | os.PathLike[str]) -> Path:
    """Write config.json + model.safetensors that transformers' from_pretrained can load."""
    return _save(model, path)


def save_clip(model: ClipModel, path: str | os.PathLike[str]) -> Path:
    """Write config.json + model.safetensors that transformers' from_pretrained can load."""
    return _save(model, path)
