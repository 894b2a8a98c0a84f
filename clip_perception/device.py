"""Device and numeric precision resolution, and CPU int8 quantisation.

``resolve_placement`` turns the user-facing strings (``device="auto"|"cpu"|"cuda"|"cuda:N"``,
``precision="auto"|"fp32"|"fp16"|"bf16"|"int8"``) into a checked ``Placement`` before any
weights are loaded, so that a bad request fails fast with a message naming the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_WEIGHT_DTYPES = {
    "fp32": torch.float32,
    "int8": torch.float32,  # dynamic quantisation converts an fp32 model after loading
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs.

    dtype is the dtype the weights are loaded in; for ``int8`` it is float32 because dynamic
    quantisation converts an fp32 model after loading (activations stay fp32).
    """

    device: torch.device
    precision: str
    dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; explicit CUDA requests are checked to exist."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        index = 0 if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_placement(
    device: str | torch.device = "auto", precision: str = "auto"
) -> Placement:
    """Check the device/precision pair and pick the weight dtype."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    resolved = resolve_device(device)
    on_cuda = resolved.type == "cuda"
    if precision == "auto" and not on_cuda:
        precision = "fp32"
    elif precision == "auto":
        # bf16 keeps fp32's exponent range (no overflow in attention logits); fp16 is the
        # fallback for pre-Ampere GPUs.
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("fp16", "bf16") and not on_cuda:
        raise ValueError(
            f"precision {precision!r} is GPU-only here; on CPU use 'fp32' or 'int8'"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision 'bf16' is not supported by this GPU; use 'fp16'")
    if precision == "int8" and on_cuda:
        raise ValueError(
            "precision 'int8' is CPU-only (dynamic quantisation); on CUDA use 'bf16' or 'fp16'"
        )
    return Placement(device=resolved, precision=precision, dtype=_WEIGHT_DTYPES[precision])


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every nn.Linear (weights int8, activations quantised on
    the fly), returned as a new module.

    Uses ``torch.ao.quantization.quantize_dynamic``: it still exists and works in the
    installed torch (2.x, x86/fbgemm and qnnpack engines). Its maintained replacement,
    torchao's ``quantize_``, is not installed in this environment, so switching would add a
    dependency for no gain; the deprecation warnings the call emits are silenced here only.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    assert not any(type(m) is nn.Linear for m in quantized.modules()), "nn.Linear left fp32"
    return quantized
