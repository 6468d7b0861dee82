"""Where and how the engine computes: device, autocast precision, memory layout, and the CPU
speed paths (Winograd convolutions, fused ReLU + pooling).

These functions are the single place of each choice: the engine, the helper's probe and the
benchmark all call them. Precision and Winograd are measured on the machine (``pick_speed``).
"""

from __future__ import annotations

import torch

from core.engine import autotune
from core.engine.autotune import Choice
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


def pick_speed(settings: Settings, device: torch.device) -> Choice:
    """Precision and Winograd convolutions for ``settings`` on ``device``: as forced by the
    settings, else the fastest accurate way measured on this machine (core/engine/autotune.py:
    a short probe on first use, cached per machine and torch version). Never from CPU flags:
    bf16 was 2.5x faster than fp32 on one AVX512-BF16 CPU (with AMX), 1.6x slower on another
    (without) and 1.3x faster on a third (AMD Zen 4, no AMX; docs/BENCHMARKS.md)."""
    return autotune.choose(settings.precision, settings.winograd, device)


def pick_precision(settings: Settings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the backbone, or None for fp32 (see ``pick_speed``)."""
    return torch.bfloat16 if pick_speed(settings, device).precision == "bf16" else None


def pick_winograd(settings: Settings, device: torch.device) -> bool:
    """Winograd convolutions (core/engine/cpu/winograd.py), where measured faster on this CPU
    (see ``pick_speed``). CUDA's cuDNN and MPS choose their own convolution algorithms, so the
    probe offers Winograd on CPUs only."""
    return pick_speed(settings, device).winograd


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
