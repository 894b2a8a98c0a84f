"""Checkpoint loading and saving: formats, strict key checks, clear errors, safe unpickling,
dtype/device, and save -> transformers from_pretrained round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_fixtures import (
    make_input_ids,
    make_pixels,
    save_tiny_clip,
    save_tiny_owlv2,
    save_tiny_owlvit,
)
from safetensors.torch import load_file, save_file

from clip_perception.model import (
    CheckpointError,
    key_map,
    load_clip,
    load_owl,
    read_config,
    save_clip,
    save_owl,
)

SAVERS = {"owlvit": save_tiny_owlvit, "owlv2": save_tiny_owlv2, "clip": save_tiny_clip}


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    """One pristine OWL-ViT checkpoint; tests copy it before damaging it."""
    path = tmp_path_factory.mktemp("owlvit")
    save_tiny_owlvit(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def _outputs_equal(ours, ref, pixels, ids) -> None:
    with torch.no_grad():
        got, want = ours(pixels, ids), ref(input_ids=ids, pixel_values=pixels)
    assert (got.logits - want.logits).abs().max() <= 1e-3
    assert (got.pred_boxes - want.pred_boxes).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_key_map_covers_reference_state_dict(tmp_path, kind: str) -> None:
    ref = SAVERS[kind](tmp_path)
    table = key_map(read_config(tmp_path))
    ref_keys = {k for k in ref.state_dict() if not k.endswith("position_ids") and k != "box_bias"}
    assert set(table.values()) == ref_keys
    assert len(set(table.values())) == len(table)  # one-to-one


def test_both_weight_formats_load(tmp_path) -> None:
    ref_st = save_tiny_owlv2(tmp_path / "st", weights="safetensors")
    ref_bin = save_tiny_owlv2(tmp_path / "bin", weights="bin")
    assert not (tmp_path / "bin" / "model.safetensors").exists()
    pixels, ids = make_pixels(1, 64), make_input_ids(2, 16)
    _outputs_equal(load_owl(tmp_path / "st"), ref_st, pixels, ids)
    _outputs_equal(load_owl(tmp_path / "bin"), ref_bin, pixels, ids)


def test_sharded_checkpoint_loads(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reference = load_owl(owl_dir)
    sharded = load_owl(folder)
    for (name, a), b in zip(reference.state_dict().items(), sharded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_position_ids_buffers_are_ignored(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    _rewrite_weights(folder, lambda s: s.update({
        "owlvit.text_model.embeddings.position_ids": torch.arange(16)[None],
        "owlvit.vision_model.embeddings.position_ids": torch.arange(17)[None],
    }))
    load_owl(folder)


def test_missing_key_names_key_and_file(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    key = "owlvit.vision_model.encoder.layers.1.self_attn.k_proj.bias"
    _rewrite_weights(folder, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing key") as err:
        load_owl(folder)
    assert key in str(err.value) and str(folder / "model.safetensors") in str(err.value)


def test_unexpected_key_names_key_and_file(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    _rewrite_weights(folder, lambda s: s.update({"owlvit.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected key") as err:
        load_owl(folder)
    assert "owlvit.extra_head.weight" in str(err.value)
    assert str(folder / "model.safetensors") in str(err.value)


def test_shape_mismatch_names_key_file_and_shapes(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    key = "class_head.dense0.weight"
    _rewrite_weights(folder, lambda s: s.update({key: torch.zeros(5, 7)}))
    with pytest.raises(CheckpointError, match=r"\(5, 7\)") as err:
        load_owl(folder)
    assert key in str(err.value) and str(folder / "model.safetensors") in str(err.value)


def test_config_sizes_disagreeing_with_weights_is_a_shape_error(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["image_size"] = 96  # 6 x 6 patches: position table is too short
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="position_embedding"):
        load_owl(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights_file(tmp_path, owl_dir, name: str) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    if name == "pytorch_model.bin":
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / name)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights") as err:
        load_owl(folder)
    assert str(folder / name) in str(err.value)


def test_garbage_weights_file(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_owl(folder)


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_not_executed(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        load_owl(folder)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickle would have run it.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_missing_folder_config_and_weights(tmp_path, owl_dir) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_owl(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)

    no_config = _copy(owl_dir, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json") as err:
        load_owl(no_config)
    assert str(no_config) in str(err.value)

    bad_json = _copy(owl_dir, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_owl(bad_json)

    no_weights = _copy(owl_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights") as err:
        load_owl(no_weights)
    assert str(no_weights) in str(err.value)


def test_unsupported_or_wrong_architecture(tmp_path, owl_dir) -> None:
    folder = _copy(owl_dir, tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["BertModel"], model_type="bert")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architectures"):
        load_owl(folder)
    with pytest.raises(CheckpointError, match="CLIPModel"):
        load_clip(owl_dir)
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_defaults_for_fields_missing_from_config(tmp_path, kind: str) -> None:
    """A diff-style config.json gets the reference's defaults (e.g. OWLv2 patch 16, CLIP 77)."""
    import transformers

    cls = {"owlvit": transformers.OwlViTConfig, "owlv2": transformers.Owlv2Config,
           "clip": transformers.CLIPConfig}[kind]
    arch = {"owlvit": "OwlViTForObjectDetection", "owlv2": "Owlv2ForObjectDetection",
            "clip": "CLIPModel"}[kind]
    raw = {"architectures": [arch], "model_type": kind}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours, ref = read_config(tmp_path), cls.from_dict(raw)
    for mine, theirs in ((ours.vision, ref.vision_config), (ours.text, ref.text_config)):
        assert mine.hidden_size == theirs.hidden_size
        assert mine.num_layers == theirs.num_hidden_layers
        assert mine.num_heads == theirs.num_attention_heads
        assert mine.intermediate_size == theirs.intermediate_size
    assert ours.image_size == ref.vision_config.image_size
    assert ours.patch_size == ref.vision_config.patch_size
    assert ours.context_length == ref.text_config.max_position_embeddings
    assert ours.text.eos_token_id == ref.text_config.eos_token_id
    assert ours.projection_dim == ref.projection_dim


def test_dtype_device_eval_and_grad_defaults(owl_dir) -> None:
    model = load_owl(owl_dir, device="cpu", dtype="bfloat16")
    assert model.config.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.box_bias.dtype == torch.float32  # the prior is computed, not loaded
    trainable = load_owl(owl_dir, requires_grad=True)
    assert all(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError):
        load_owl(owl_dir, dtype=torch.int8)


@pytest.mark.parametrize("kind", ["owlvit", "owlv2"])
def test_save_owl_round_trip_through_transformers(tmp_path, kind: str) -> None:
    import transformers

    SAVERS[kind](tmp_path / "orig", text_config={"hidden_act": "gelu"})
    ours = load_owl(tmp_path / "orig")
    save_owl(ours, tmp_path / "saved")
    cls = {"owlvit": transformers.OwlViTForObjectDetection,
           "owlv2": transformers.Owlv2ForObjectDetection}[kind]
    ref = cls.from_pretrained(tmp_path / "saved").eval()
    assert ref.config.text_config.hidden_act == "gelu"
    pixels, ids = make_pixels(2, 64), make_input_ids(4, 16, padded_rows=(1,))
    _outputs_equal(ours, ref, pixels, ids)
    again = load_owl(tmp_path / "saved")
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_save_clip_round_trip_through_transformers(tmp_path) -> None:
    import transformers

    save_tiny_clip(tmp_path / "orig", text_config={"eos_token_id": 2})
    ours = load_clip(tmp_path / "orig")
    save_clip(ours, tmp_path / "saved")
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "saved").eval()
    assert ref.config.text_config.eos_token_id == 2
    pixels, ids = make_pixels(2, 64), make_input_ids(3, 16)
    with torch.no_grad():
        got, want = ours(pixels, ids), ref(input_ids=ids, pixel_values=pixels)
    assert (got.logits_per_image - want.logits_per_image).abs().max() <= 1e-3
    assert (got.image_embeds - want.image_embeds).abs().max() <= 1e-3
