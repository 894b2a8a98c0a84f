"""Image preprocessing for CLIP / OWL-ViT / OWLv2 with torch ops, and the inverse box mapping.

``Preprocessor`` turns HxWx3 uint8 RGB images (numpy or torch, CPU or GPU) into normalised
``pixel_values`` (B, 3, S, S) on any device/dtype. Images of equal size are resized together,
so a camera stream costs one interpolate call per frame batch. Three modes:

* ``"stretch"`` (OWL-ViT v1): resize to S x S ignoring aspect, bicubic with antialiasing.
* ``"pad"`` (OWLv2): rescale to [0, 1], pad bottom/right to a square with ``pad_value``, Gaussian
  antialias blur (sigma = (M/S - 1) / 2, as the reference), bilinear resize to S. The pad value is
  0.0: transformers >= 5 (PR #41938) switched from 0.5 grey to 0.0, which is what the official
  OWLv2 code does and scores better on LVIS; set ``pad_value=0.5`` for older behaviour.
* ``"clip"`` (CLIP classifier): resize the shortest side to ``shortest_edge`` (long side
  truncated with ``int`` as HF does), bicubic, center crop S.

The reference processors resize uint8 images, so their output sits on 1/255 steps. On CPU we
call the same uint8 antialiased torch kernel (bit-identical); CUDA has float kernels only, so
there the two separable passes run in float with uint8 rounding in between (see
``_resize_like_reference``).

Measured against transformers 5.24 (torch 2.14, CPU), normalised pixel units (one uint8 level
is about 0.015), uniform-noise uint8 images (the worst case for resampling), max / mean |diff|.
"default" is the torchvision-backed ``OwlViTImageProcessor`` / ``Owlv2ImageProcessor`` /
``CLIPImageProcessor`` that transformers 5 returns; "PIL" is the ``*ImageProcessorPil`` class
(PIL resize, scipy for OWLv2); "float" is our CUDA path (run on CPU) against "default":

========  =========  ===================  ====================  ====================
mode      HxW        vs default (CPU)     vs PIL                float path
========  =========  ===================  ====================  ====================
stretch   480x640    2.4e-7 / 7e-8        0.028 / 2.7e-5        0.029 / 5.3e-5
stretch   300x500    2.4e-7 / 7e-8        0.030 / 1.5e-4        0.030 / 1.5e-4
stretch   1000x200   2.4e-7 / 7e-8        0.31 / 5.2e-3         0.030 / 9.6e-5
pad       480x640    0 / 0                0.88 / 4.4e-4         same code as CPU
pad       300x500    0 / 0                0.87 / 5.6e-4         same code as CPU
pad       1000x200   0 / 0                2.3e-4 / 4.1e-6       same code as CPU
clip      480x640    2.4e-7 / 7.6e-8      0.015 / 6.1e-5        0.015 / 6.3e-5
clip      300x500    2.4e-7 / 7.3e-8      0.015 / 7.0e-5        0.015 / 7.2e-5
clip      1000x200   2.4e-7 / 7.0e-8      0.015 / 1.0e-4        0.015 / 1.1e-4
========  =========  ===================  ====================  ====================

The large PIL maxima are single border rows (scipy's mirror edge when OWLv2 upsamples) or
PIL's pass order and rounding on noise; on smooth images the PIL column stays within 0.03 / 6e-4.

The inverse map, predicted boxes back to source pixels, is in ``boxes``.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import Mode, boxes_to_pixels, clip_resize_shape

Resample = Literal["nearest", "bilinear", "bicubic"]
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes used in preprocessor_config.json; LANCZOS(1)/BOX(4)/HAMMING(5) have no
# torch equivalent and fall back to bicubic, the closest antialiased kernel.
_PIL_RESAMPLE: dict[int, Resample] = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic"}
_MODEL_MODES: dict[str, Mode] = {"owlvit": "stretch", "owlv2": "pad", "clip": "clip"}
ImageLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class PreprocessedBatch:
    """Model input plus what ``boxes_to_pixels`` needs to map predictions back."""

    pixel_values: torch.Tensor  # (B, 3, S, S)
    image_sizes: list[tuple[int, int]]  # source (H, W) per image
    mode: Mode
    input_size: int
    shortest_edge: int | None = None

    def boxes_to_pixels(self, boxes: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """(B, P, 4) normalised cxcywh predictions -> (B, P, 4) xyxy source pixels."""
        return boxes_to_pixels(
            boxes, self.image_sizes, self.mode, input_size=self.input_size,
            shortest_edge=self.shortest_edge, clip=clip,
        )


def _from_numpy(image: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor of a uint8 array. Camera frames are often read-only views of message
    buffers; torch warns about those, but the tensor here is only read (resizing makes a new
    one), so the warning is silenced instead of paying for a copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(image))


def _to_hwc_uint8(image: object, index: int) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        tensor = _from_numpy(image) if image.dtype == np.uint8 else None
        dtype = str(image.dtype)
    elif isinstance(image, torch.Tensor):
        tensor = image if image.dtype == torch.uint8 else None
        dtype = str(image.dtype)
    else:
        raise TypeError(f"image {index}: expected numpy array or torch tensor, got {type(image)}")
    shape = tuple(image.shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(
            f"image {index}: expected HxWx3 RGB (channels last), got shape {shape}; "
            "convert gray/RGBA/CHW images to HxWx3 first"
        )
    if tensor is None:
        raise ValueError(f"image {index}: expected uint8 pixels, got {dtype}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"image {index}: empty image of shape {shape}")
    return tensor


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, as torchvision's gaussian_blur in OWLv2."""
    radius = math.ceil(3.0 * sigma)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.softmax(-(taps / sigma).pow(2) / 2.0, dim=0)  # normalised exp(-t^2/2s^2)
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)  # (C, 1, 1, K)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)  # (C, 1, K, 1)
    x = F.conv2d(x, horizontal, groups=channels)
    return F.conv2d(x, vertical, groups=channels)


def _resize_like_reference(
    x: torch.Tensor, size: tuple[int, int], resample: Resample, uint8_kernel: bool | None = None
) -> torch.Tensor:
    """uint8 (G, 3, H, W) -> float (G, 3, h, w) holding uint8 levels 0..255.

    The reference processors resize uint8 images (PIL, or torch's uint8 antialiased kernel,
    which reproduces PIL): separable, horizontal pass then vertical, each rounded and clipped
    to uint8. On CPU we call that same uint8 kernel (bit-identical). CUDA kernels take float
    only, so there the two passes run in float with the same rounding between them, which
    lands within 2 levels, mean about 1e-4 normalised units, of the reference.
    """
    if resample == "nearest":
        return F.interpolate(x.float(), size=size, mode="nearest")
    if uint8_kernel is None:
        uint8_kernel = x.device.type == "cpu"
    if uint8_kernel:
        try:
            out = F.interpolate(x, size=size, mode=resample, align_corners=False, antialias=True)
            return out.float()
        except (RuntimeError, NotImplementedError):
            pass  # a torch build without the uint8 kernel: use the float emulation below
    y = x.float()
    for step in ((y.shape[-2], size[1]), size):  # width first, then height
        y = F.interpolate(y, size=step, mode=resample, align_corners=False, antialias=True)
        y = y.round_().clamp_(0.0, 255.0)
    return y


@dataclass(frozen=True)
class Preprocessor:
    """Configured image preprocessing; call it on a list of HxWx3 uint8 RGB images."""

    image_size: int
    mode: Mode = "stretch"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: Resample | None = None  # None: bicubic for stretch/clip, bilinear for pad
    shortest_edge: int | None = None  # clip mode: short side before the crop (default S)
    pad_value: float = 0.0  # pad mode, in [0, 1] units

    def __post_init__(self) -> None:
        if self.mode not in ("stretch", "pad", "clip"):
            raise ValueError(f"unknown mode {self.mode!r}; expected 'stretch', 'pad' or 'clip'")
        if self.image_size < 1 or (self.shortest_edge or self.image_size) < self.image_size:
            raise ValueError("image_size must be >= 1 and shortest_edge >= image_size")

    @classmethod
    def for_model(cls, model_type: str, image_size: int) -> Preprocessor:
        """Defaults of the reference processor for ``config.json``'s ``model_type``."""
        if model_type not in _MODEL_MODES:
            raise ValueError(f"no preprocessing defaults for model_type {model_type!r}")
        return cls(image_size=image_size, mode=_MODEL_MODES[model_type])

    @classmethod
    def from_config(cls, config: dict) -> Preprocessor:
        """Build from a Hugging Face ``preprocessor_config.json`` (old and new size formats)."""
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type"))
        if "owlv2" in kind.lower() or config.get("do_pad"):
            mode: Mode = "pad"
        elif config.get("do_center_crop"):
            mode = "clip"
        else:
            mode = "stretch"
        size = config.get("size", 768)
        if isinstance(size, dict):
            if size.get("height", 0) != size.get("width", 0):
                raise ValueError(f"only square model inputs are supported, got size {size}")
            size = size.get("shortest_edge") or size.get("height")
        crop = config.get("crop_size") or size
        if isinstance(crop, dict):
            crop = crop.get("height")
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        if config.get("do_normalize", True):
            mean = tuple(config.get("image_mean", mean))  # type: ignore[assignment]
            std = tuple(config.get("image_std", std))  # type: ignore[assignment]
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        resample = config.get("resample")
        return cls(
            image_size=int(crop if mode == "clip" else size),
            mode=mode,
            mean=mean,
            std=std,
            resample=_PIL_RESAMPLE.get(resample, "bicubic") if resample is not None else None,
            shortest_edge=int(size) if mode == "clip" else None,
        )

    # ------------------------------------------------------------------ resizing
    @property
    def resample_mode(self) -> Resample:
        """The interpolation actually used (the reference's default when unset)."""
        return self.resample or ("bilinear" if self.mode == "pad" else "bicubic")

    def _process_group(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (G, 3, H, W) -> float (G, 3, S, S) in [0, 1], before normalisation."""
        s = self.image_size
        height, width = x.shape[-2:]
        if self.mode == "stretch":
            return _resize_like_reference(x, (s, s), self.resample_mode).div_(255.0)
        if self.mode == "clip":
            new_h, new_w = clip_resize_shape(height, width, self.shortest_edge or s)
            resized = _resize_like_reference(x, (new_h, new_w), self.resample_mode)
            top, left = int((new_h - s) / 2.0), int((new_w - s) / 2.0)
            return resized[:, :, top : top + s, left : left + s].div(255.0)  # (G, 3, S, S)
        # pad (OWLv2): float [0, 1], pad to the square, Gaussian prefilter, plain bilinear
        # (interpolate's own antialias off), exactly the order of the reference.
        side = max(height, width)
        padded = torch.full(
            (x.shape[0], 3, side, side), self.pad_value, dtype=torch.float32, device=x.device
        )  # (G, 3, M, M)
        padded[:, :, :height, :width] = x.float() * (1.0 / 255.0)
        sigma = max(0.0, (side / s - 1.0) / 2.0)
        if sigma > 0:
            padded = _gaussian_blur(padded, sigma)
        if side == s:
            return padded
        mode = self.resample_mode
        align = None if mode == "nearest" else False
        return F.interpolate(padded, size=(s, s), mode=mode, align_corners=align)

    def __call__(
        self,
        images: Sequence[ImageLike] | ImageLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> PreprocessedBatch:
        """HxWx3 uint8 RGB images (a list, one image, or a (B, H, W, 3) batch) -> model input.

        ``device`` defaults to the first image's device. Work is done in float32 on ``device``
        and the result is cast to ``dtype``.
        """
        if isinstance(images, (np.ndarray, torch.Tensor)):
            # A (B, H, W, 3) batch is split; anything else is one image (validated below).
            images = list(images) if images.ndim == 4 else [images]
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        tensors = [_to_hwc_uint8(img, i) for i, img in enumerate(images)]
        target = torch.device(device) if device is not None else tensors[0].device
        s = self.image_size
        mean, std = _channel_stats(self.mean, self.std, target)  # each (1, 3, 1, 1)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.shape[0], t.shape[1]), []).append(i)
        out = None
        for indices in groups.values():
            # Move uint8 (4x fewer bytes than float) and convert on the target device.
            stack = _upload([tensors[i] for i in indices], target)  # (G, H, W, 3)
            x = stack.permute(0, 3, 1, 2)  # (G, 3, H, W), channels-last strides
            x = ((self._process_group(x) - mean) / std).to(dtype)  # (G, 3, S, S)
            if len(groups) == 1:  # one frame size (one camera, or equal cameras): no scatter
                out = x.contiguous()  # interpolate may return channels-last strides
                break
            if out is None:
                out = torch.empty((len(tensors), 3, s, s), device=target, dtype=dtype)
            out[torch.tensor(indices, device=target)] = x  # (B, 3, S, S)
        assert out is not None and out.shape == (len(tensors), 3, s, s)
        return PreprocessedBatch(
            pixel_values=out,
            image_sizes=[(int(t.shape[0]), int(t.shape[1])) for t in tensors],
            mode=self.mode,
            input_size=s,
            shortest_edge=self.shortest_edge if self.mode == "clip" else None,
        )


@functools.lru_cache(maxsize=16)
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation constants as (1, 3, 1, 1) tensors on ``device``, made once per device: a
    fresh tensor per call would be two host-to-device copies per frame batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),  # (1, 3, 1, 1)
            torch.tensor(std, device=device).view(1, 3, 1, 1))  # (1, 3, 1, 1)


def _upload(images: list[torch.Tensor], target: torch.device) -> torch.Tensor:
    """Equal-size HxWx3 uint8 images -> one (G, H, W, 3) tensor on ``target``.

    From the CPU to a GPU the images are stacked into page-locked memory and sent in one
    asynchronous copy: a copy from ordinary (pageable) memory goes through the driver's
    staging buffer at a fraction of the bus speed, which at 16 VGA frames was most of the
    preprocessing time. torch's pinned-memory cache keeps the buffer until the copy is done.
    """
    if target.type != "cuda" or any(image.device.type != "cpu" for image in images):
        return torch.stack([image.to(target) for image in images])
    staged = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True)
    torch.stack(images, out=staged)  # (G, H, W, 3) page-locked
    return staged.to(target, non_blocking=True)


def load_preprocessor(path: str | Path) -> Preprocessor:
    """From a checkpoint folder: ``preprocessor_config.json``, else ``config.json`` facts."""
    folder = Path(path)
    config_file = folder / "preprocessor_config.json"
    if config_file.is_file():
        return Preprocessor.from_config(json.loads(config_file.read_text(encoding="utf-8")))
    model_file = folder / "config.json"
    if not model_file.is_file():
        raise FileNotFoundError(f"{folder}: neither preprocessor_config.json nor config.json")
    config = json.loads(model_file.read_text(encoding="utf-8"))
    vision = config.get("vision_config") or {}
    return Preprocessor.for_model(str(config.get("model_type")), int(vision.get("image_size")))
