"""Where and how the engine computes: device, autocast precision, memory layout, and the CPU
speed paths (Winograd convolutions, fused ReLU + pooling).

These functions are the single place of each choice: the engine, the helper's probe and the
benchmark all call them, so a change of policy (e.g. a measured probe) happens here only.
"""

from __future__ import annotations

import torch

from core.errors import SettingsError
from core.settings import Settings


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(
            f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            "CUDA was asked for, but this PyTorch build or machine has no CUDA GPU."
        )
    return device


def cpu_has_amx() -> bool:
    """Only AMX tiles make bf16 convolutions pay off on CPUs: without AMX, bf16 autocast
    measured slower than fp32 (benchmarks/bench.py; figures in docs/BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read(1 << 16)
    except OSError:
        return False
    return "amx_bf16" in flags


def pick_precision(settings: Settings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the backbone, or None for fp32 (see benchmarks/ for the numbers)."""
    if settings.precision == "fp32":
        return None
    if settings.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_amx() else None
    return None


def pick_winograd(settings: Settings, device: torch.device) -> bool:
    """Winograd convolutions where they measured faster: fp32 on CPU (core/engine/cpu/winograd.py).

    CUDA's cuDNN picks its own algorithms (Winograd among them); MPS has its own kernels."""
    if settings.winograd is not None:
        return settings.winograd
    return device.type == "cpu" and pick_precision(settings, device) is None


def pick_fused_pooling(settings: Settings, device: torch.device) -> bool:
    """ReLU + max pool fused (core/engine/cpu/fusion.py) on the CPU only: it was measured there
    (less memory at about the same speed); on a GPU its Python-level backward (four strided
    kernels instead of one) was never timed, so cuDNN's own pooling stays."""
    if settings.fused_pooling is not None:
        return settings.fused_pooling
    return device.type == "cpu"


def pick_channels_last(settings: Settings, device: torch.device) -> bool:
    """NHWC activations everywhere but on MPS, unless the settings say otherwise."""
    return settings.channels_last if settings.channels_last is not None else device.type != "mps"
