"""clip_perception.model.preprocess against transformers' image processors and box post-processing.

Bounds, in normalised pixel units (1 uint8 level = 1/255/std ~ 0.015):
* CPU vs the default (torchvision-backed) transformers 5 processors: identical up to float
  rounding (atol 1e-5): on CPU we run the same uint8 antialiased kernel / the same Gaussian +
  bilinear resize.
* CPU vs the PIL/scipy-backed processors: mean < 0.01 (measured <= 0.0053, on noise images, the
  worst case); max is not bounded there (scipy's mirror edge on upscaling reaches 0.88 at the
  border row of OWLv2 inputs, PIL's rounding reaches 0.31 on noise).
* The float two-pass path used on CUDA (run here on CPU): max <= 2 levels (< 0.035), mean < 1e-3.
* Boxes: bit-for-bit (atol 1e-4) with ``post_process_object_detection``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clip_perception.model.boxes as box_frames
import clip_perception.model.preprocess as pp
from clip_perception.model.boxes import Mode, boxes_to_pixels, pixels_to_input_boxes
from clip_perception.model.preprocess import Preprocessor, load_preprocessor

transformers = pytest.importorskip("transformers")
SIZES = [(480, 640), (300, 500), (1000, 200)]
MODES = {"stretch": 768, "pad": 960, "clip": 224}


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + h * 7 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


@functools.cache
def _references(mode: str) -> tuple[object, object]:
    """(torchvision-backed default processor, PIL/scipy-backed processor) for a mode."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    return {
        "stretch": (transformers.OwlViTImageProcessor(), OwlViTImageProcessorPil()),
        "pad": (transformers.Owlv2ImageProcessor(), Owlv2ImageProcessorPil()),
        "clip": (transformers.CLIPImageProcessor(), CLIPImageProcessorPil()),
    }[mode]


def _reference_pixels(processor: object, image: np.ndarray) -> torch.Tensor:
    out = processor(images=[image], return_tensors="pt")["pixel_values"]  # type: ignore[operator]
    return torch.as_tensor(np.asarray(out[0]))


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference_processors(mode: str) -> None:
    tv_ref, pil_ref = _references(mode)
    pre = Preprocessor.from_config(tv_ref.to_dict())
    assert (pre.mode, pre.image_size) == (mode, MODES[mode])
    for h, w in SIZES:
        image = _noise(h, w)
        ours = pre([image]).pixel_values[0]
        torch.testing.assert_close(ours, _reference_pixels(tv_ref, image), atol=1e-5, rtol=0)
        assert (ours - _reference_pixels(pil_ref, image)).abs().mean() < 0.01


@pytest.mark.parametrize("mode", ["stretch", "clip"])
def test_float_resize_path_used_on_cuda(mode: Mode, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA has no uint8 antialiased kernel; its float two-pass emulation stays within 2 levels."""
    float_path = functools.partial(pp._resize_like_reference, uint8_kernel=False)
    monkeypatch.setattr(pp, "_resize_like_reference", float_path)
    tv_ref, _ = _references(mode)
    pre = Preprocessor.from_config(tv_ref.to_dict())
    for h, w in SIZES:
        image = _noise(h, w)
        diff = (pre([image]).pixel_values[0] - _reference_pixels(tv_ref, image)).abs()
        assert diff.max() < 0.035 and diff.mean() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_cpu(mode: Mode) -> None:
    pre = Preprocessor(image_size=MODES[mode], mode=mode)
    images = [_noise(h, w) for h, w in SIZES]
    cpu = pre(images).pixel_values
    gpu = pre([torch.from_numpy(i).cuda() for i in images], dtype=torch.float16)
    assert gpu.pixel_values.device.type == "cuda" and gpu.pixel_values.dtype == torch.float16
    diff = (gpu.pixel_values.float().cpu() - cpu).abs()
    assert diff.max() < 0.05 and diff.mean() < 2e-3


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_and_input_kinds(mode: Mode) -> None:
    pre = Preprocessor(image_size=64, mode=mode)
    images = [_noise(48, 64), _noise(30, 50), _noise(48, 64, seed=1), _noise(100, 20)]
    batch = pre(images)
    assert batch.pixel_values.shape == (4, 3, 64, 64)
    assert batch.image_sizes == [(48, 64), (30, 50), (48, 64), (100, 20)]
    # Grouping by size must not reorder or mix images.
    for i, image in enumerate(images):
        torch.testing.assert_close(batch.pixel_values[i], pre([image]).pixel_values[0])
    # torch uint8 input, a single image, a (B, H, W, 3) batch, a non-contiguous BGR->RGB view.
    torch.testing.assert_close(pre([torch.from_numpy(images[0])]).pixel_values[0],
                               batch.pixel_values[0])
    torch.testing.assert_close(pre(images[1]).pixel_values[0], batch.pixel_values[1])
    torch.testing.assert_close(pre(np.stack([images[0], images[2]])).pixel_values,
                               batch.pixel_values[[0, 2]])
    bgr = np.ascontiguousarray(images[1][..., ::-1])
    torch.testing.assert_close(pre([bgr[..., ::-1]]).pixel_values[0], batch.pixel_values[1])
    half = pre(images, dtype=torch.bfloat16).pixel_values
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), batch.pixel_values, atol=0.02, rtol=0.01)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((20, 30), np.uint8),  # gray HxW
        np.zeros((20, 30, 4), np.uint8),  # RGBA
        np.zeros((20, 30, 3), np.float32),  # float pixels
        torch.zeros((20, 30, 3)),  # float tensor
        torch.zeros((3, 20, 30), dtype=torch.uint8),  # CHW
        np.zeros((0, 30, 3), np.uint8),  # empty
    ],
)
def test_bad_images_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="image 0"):
        Preprocessor(image_size=32)([bad])  # type: ignore[list-item]


def test_other_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no images"):
        Preprocessor(image_size=32)([])
    with pytest.raises(TypeError):
        Preprocessor(image_size=32)([[[0, 0, 0]]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="mode"):
        Preprocessor(image_size=32, mode="crop")


class _Outputs(SimpleNamespace):
    logits: torch.Tensor
    pred_boxes: torch.Tensor


@pytest.mark.parametrize("mode", ["stretch", "pad"])
def test_boxes_match_reference_post_processing(mode: Mode) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = SIZES
    pred = torch.rand(len(sizes), 50, 4, generator=gen) * torch.tensor([1.2, 1.2, 0.5, 0.5])
    outputs = _Outputs(logits=torch.randn(len(sizes), 50, 3, generator=gen), pred_boxes=pred)
    processor = _references(mode)[0]
    # v2 scales by max(H, W) itself, i.e. the padded square that the model saw.
    results = processor.post_process_object_detection(  # type: ignore[attr-defined]
        outputs, threshold=-1.0, target_sizes=sizes
    )
    ours = boxes_to_pixels(pred, sizes, mode, clip=False)
    clipped = boxes_to_pixels(pred, sizes, mode)
    for i, ((h, w), result) in enumerate(zip(sizes, results, strict=True)):
        torch.testing.assert_close(ours[i], result["boxes"], atol=1e-4, rtol=0)
        upper = torch.tensor([w, h, w, h], dtype=torch.float32)
        expected = torch.minimum(result["boxes"].clamp(min=0), upper)
        torch.testing.assert_close(clipped[i], expected, atol=1e-4, rtol=0)
        # (N, 4) with a single size gives the same as the batched call.
        torch.testing.assert_close(boxes_to_pixels(pred[i], (h, w), mode), clipped[i])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", SIZES)
def test_box_mapping_follows_image_content(mode: Mode, size: tuple[int, int]) -> None:
    """A white rectangle found in pixel_values maps back onto where it was drawn."""
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    box = (int(0.3 * w), int(0.35 * h), int(0.6 * w), int(0.7 * h))  # x0, y0, x1, y1
    image[box[1] : box[3], box[0] : box[2]] = 255
    pre = Preprocessor(image_size=128, mode=mode)
    batch = pre([image])
    mask = batch.pixel_values[0, 0] > 0.5  # normalised 0 -> -1.79, 255 -> 1.93
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    found = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float() / 128
    cxcywh = torch.cat([(found[:2] + found[2:]) / 2, found[2:] - found[:2]]).view(1, 4)
    pixels = batch.boxes_to_pixels(cxcywh.view(1, 1, 4))[0, 0]
    sx, sy, ox, oy = box_frames._frame(size, mode, 128, None)
    tolerance = torch.tensor([sx, sy, sx, sy]) / 128 * 1.5  # 1.5 input pixels in source px
    # Only the part inside the model's view can be found (the center crop for "clip").
    visible = torch.tensor(box).float().view(2, 2).clamp(
        torch.tensor([ox, oy]), torch.tensor([ox + sx, oy + sy])
    ).flatten()
    assert ((pixels - visible).abs() <= tolerance).all(), (pixels, visible)
    # The exemplar helper is the inverse: drawn box -> normalised input xyxy ~ found.
    exemplar = pixels_to_input_boxes(box, size, mode, input_size=128)
    assert ((exemplar - found).abs() <= 1.5 / 128).all(), (exemplar, found)


def test_exemplar_mapping_values() -> None:
    box = [[64.0, 48.0, 320.0, 240.0]]
    torch.testing.assert_close(
        pixels_to_input_boxes(box, (480, 640), "stretch"), torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    )
    torch.testing.assert_close(
        pixels_to_input_boxes(box, (480, 640), "pad"),
        torch.tensor([[0.1, 0.075, 0.5, 0.375]]),
    )
    assert pixels_to_input_boxes([0, 0, 700, 500], (480, 640), "stretch").tolist() == [0, 0, 1, 1]


def test_pad_value_and_padding_region() -> None:
    image = np.full((50, 100, 3), 255, np.uint8)  # wide: padding at the bottom
    mean, std = torch.tensor(pp.OPENAI_CLIP_MEAN), torch.tensor(pp.OPENAI_CLIP_STD)
    for value in (0.0, 0.5):
        pixels = Preprocessor(image_size=50, mode="pad", pad_value=value)([image]).pixel_values
        torch.testing.assert_close(pixels[0, :, -1, 10], (value - mean) / std)
        torch.testing.assert_close(pixels[0, :, 0, 10], (1.0 - mean) / std)


def test_config_loading(tmp_path: Path) -> None:
    old_owl = {"crop_size": 768, "do_center_crop": False, "do_normalize": True, "do_resize": True,
               "feature_extractor_type": "OwlViTFeatureExtractor", "resample": 3, "size": 768}
    old_clip = {"crop_size": 224, "do_center_crop": True, "resample": 3, "size": 224,
                "feature_extractor_type": "CLIPFeatureExtractor"}
    assert Preprocessor.from_config(old_owl) == Preprocessor(768, "stretch", resample="bicubic")
    assert Preprocessor.from_config(old_clip) == Preprocessor(
        224, "clip", resample="bicubic", shortest_edge=224
    )
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Owlv2ImageProcessor", "resample": 2,
                    "size": {"height": 960, "width": 960}, "do_pad": True})
    )
    assert load_preprocessor(tmp_path) == Preprocessor(960, "pad", resample="bilinear")
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "owlvit", "vision_config": {"image_size": 768}})
    )
    assert load_preprocessor(tmp_path) == Preprocessor(768, "stretch")
    with pytest.raises(FileNotFoundError):
        load_preprocessor(tmp_path / "missing")
    with pytest.raises(ValueError, match="square"):
        Preprocessor.from_config({"size": {"height": 480, "width": 640}})
