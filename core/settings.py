"""Every knob of a stylization, its default, and where that default comes from.

Front ends (CLI, bot, GIMP helper) map their options onto :class:`Settings` instead of
redefining defaults; the CLI reads its defaults from the dataclass fields so they never drift.

Sources of the defaults (never tuned on random weights):

* [Gatys] Gatys, Ecker, Bethge, *Image Style Transfer Using Convolutional Neural Networks*
  (CVPR 2016): content layer conv4_2, style layers conv1_1 ... conv5_1, L-BFGS.
* [crowsonkb] crowsonkb/style-transfer-pytorch (Gram-loss release, before the switch to the
  Wasserstein loss): content weight 0.015, TV weight 2, style layer weights 256:64:16:4:1
  (normalised to sum 1), Adam step 0.02, pyramid from 128 px in steps of sqrt(2), content init,
  style scale factor 1, L-BFGS with history 10 and one evaluation per step.
* [neural-style] jcjohnson/neural-style: 512 px output, L-BFGS by default, Adam as the low
  memory alternative, seeded runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from core.byte_sizes import parse_bytes
from core.errors import SettingsError

Optimizer = Literal["lbfgs", "adam"]
Init = Literal["content", "noise", "image"]
Blend = Literal["gram", "loss"]
PreserveColors = Literal["none", "luminance", "stats"]
Precision = Literal["auto", "fp32", "bf16"]
Backbone = Literal["vgg19", "vgg19-caffe", "squeezenet", "random"]

BACKBONES: tuple[str, ...] = ("vgg19", "vgg19-caffe", "squeezenet", "random")
QUALITY_ITERATIONS: dict[str, int] = {"draft": 8, "standard": 20, "high": 100}
"""Iterations at the final scale per quality tier (coarser scales get twice as many).

The ratio of first-scale to later-scale iterations is crowsonkb's 1000:500. The absolute numbers
are a compute budget, not a tuned value: "standard" keeps a 512 px CPU stylization within about
90 s on two cores (an engine step at 512 px costs ~0.7-0.75 s there with Winograd convolutions,
~1.3 s without; see benchmarks/), "high" is for GPUs and patient people.
"""


@dataclass(frozen=True)
class Settings:
    """A validated, immutable description of one stylization (see module docstring for sources)."""

    size: int = 512
    """Long side of the output in pixels [neural-style: -image_size 512]."""
    iterations: int = QUALITY_ITERATIONS["standard"]
    """Optimiser steps at each scale after the first (compute budget, see QUALITY_ITERATIONS)."""
    initial_iterations: int | None = None
    """Steps at the first (coarsest) scale; None = 2 x iterations [crowsonkb: 1000 vs 500],
    or just ``iterations`` when there is only one scale."""
    optimizer: Optimizer = "lbfgs"
    """[Gatys], [neural-style] default; one function evaluation per step [crowsonkb]."""
    learning_rate: float = 0.02
    """Adam step size on pixels in [0, 1] [crowsonkb: step_size 0.02]. L-BFGS uses 1."""
    lbfgs_history: int = 10
    """L-BFGS memory [crowsonkb: history_size=10]."""

    content_weight: float = 0.015
    """[crowsonkb] with scaled-MSE losses (gradient L1 norm ~1 per term)."""
    style_weight: float = 1.0
    """Style layer weights are normalised to sum to 1 [crowsonkb]; this scales their sum."""
    tv_weight: float = 2.0
    """Nine-point-stencil L2 total variation, mean over pixels [crowsonkb: tv_weight 2]."""
    strength: float = 0.5
    """Front-end knob in [0, 1]: 0.5 keeps the weights above; every 0.5 away from it scales
    the content weight by 10x (0 = stay close to the photo, 1 = mostly style)."""

    content_layers: tuple[str, ...] | None = None
    """None = the backbone's default (VGG19: relu4_2, i.e. conv4_2 after its ReLU [Gatys])."""
    style_layers: tuple[str, ...] | None = None
    """None = the backbone's default (VGG19: relu1_1 ... relu5_1 [Gatys])."""
    style_layer_weights: tuple[float, ...] | None = None
    """None = the backbone's default (VGG19: 256, 64, 16, 4, 1 [crowsonkb]); normalised."""
    style_depth: int | None = None
    """Use only the first N style layers (fewer = finer, smaller brush strokes)."""
    style_blend: Blend = "gram"
    """Several styles: mix Gram targets [crowsonkb] or sum per-style losses."""
    style_scale: float = 1.0
    """Style image size relative to the output [crowsonkb: style_scale_fac 1]."""

    init: Init = "content"
    """Start from the photo [crowsonkb], seeded noise, or ``init_image``."""
    init_image: str | None = None
    """Path of the image to start from when ``init == "image"``."""
    seed: int = 0
    """Same seed, same device, same result on CPU."""

    pyramid: bool = True
    """Coarse to fine, each scale sqrt(2) larger, warm-started from the last [crowsonkb]."""
    min_size: int = 128
    """Long side of the first pyramid scale [crowsonkb: min_scale 128]."""
    early_stop: float = 1e-3
    """Stop a scale when the loss improved by less than this fraction over ``patience`` steps
    (0 disables)."""
    patience: int = 20

    preserve_colors: PreserveColors = "none"
    """Keep the photo's colours: ``luminance`` (transfer on Y of YCbCr, keep CbCr) or ``stats``
    (match the style's colour statistics to the photo first)."""

    backbone: Backbone = "vgg19"
    """Named weights: vgg19 (torchvision), vgg19-caffe (neural-style's), squeezenet (fast
    preview tier), random (tests and benchmarks only; marked in the output metadata)."""
    weights: str | None = None
    """A local checkpoint file for ``backbone`` instead of the download cache."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), or any torch device string."""
    precision: Precision = "auto"
    """bf16 autocast for convolutions where measured faster (see benchmarks/); Gram matrices
    and losses always in fp32."""
    channels_last: bool | None = None
    """None = on where measured faster."""
    winograd: bool | None = None
    """3x3 convolutions by Winograd's F(4x4, 3x3) (core/winograd.py): fewer multiplies, same
    result up to fp32 rounding. None = on for fp32 on CPU, where it measured faster."""
    fused_pooling: bool | None = None
    """Each ReLU before a max pool fused with it (core/fusion.py): same result, less memory
    and time in the backward pass. None = on for the CPU (the only device it is made for)."""
    preview_every: int = 10
    """Send a small preview image with every Nth progress event (0 = never)."""
    max_memory: str = "auto"
    """Peak memory a run may use: an amount such as ``2GB`` or ``800MB`` (core/byte_sizes.py),
    or ``auto``: what the process holds plus half of the memory available when the run starts
    (RAM; GPU memory on CUDA). A scale the memory model (core/engine/memory_model.py, measured)
    predicts to need more is painted in overlapping tiles; below it nothing changes."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Free-form notes carried into the output metadata (front end, preset name)."""

    def __post_init__(self) -> None:
        _check(self)

    # ---- derived values -------------------------------------------------------------------
    @property
    def first_iterations(self) -> int:
        return (
            self.initial_iterations if self.initial_iterations is not None else 2 * self.iterations
        )

    @property
    def effective_content_weight(self) -> float:
        """Content weight after ``strength``: log-linear, 10x per 0.5 away from 0.5."""
        return self.content_weight * 10.0 ** (2.0 * (0.5 - self.strength))

    # ---- conversions ----------------------------------------------------------------------
    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for metadata, HTTP and process boundaries)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Build from untrusted input (JSON, form fields); unknown keys are an error."""
        if not isinstance(data, dict):
            raise SettingsError("Settings must be a JSON object.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SettingsError(f"Unknown setting(s): {', '.join(unknown)}.")
        kwargs = {}
        for key, value in data.items():
            if (
                key in {"content_layers", "style_layers", "style_layer_weights"}
                and value is not None
            ):
                if isinstance(value, str):
                    value = [v for v in value.split(",") if v.strip()]
                if not isinstance(value, (list, tuple)):
                    raise SettingsError(f"{key} must be a list.")
                value = tuple(value)
                if key == "style_layer_weights":
                    value = tuple(_num(key, v) for v in value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise SettingsError(str(exc)) from None


def _num(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _int_in(s: Settings, name: str, lo: int, hi: int) -> None:
    value = getattr(s, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be a whole number, got {value!r}.")
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}.")


def _float_in(s: Settings, name: str, lo: float, hi: float) -> None:
    value = _num(name, getattr(s, name))
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}.")


def _choice(s: Settings, name: str, options: tuple[str, ...]) -> None:
    value = getattr(s, name)
    if value not in options:
        raise SettingsError(f"{name} must be one of {', '.join(options)}; got {value!r}.")


MIN_MEMORY = 256 * 2**20
"""Below this no run fits: a Python process that has imported torch holds about 225 MB."""


def _check_memory(value: object) -> None:
    if value == "auto":
        return
    if not isinstance(value, str):
        raise SettingsError(f"max_memory must be auto or an amount such as 2GB, got {value!r}.")
    if parse_bytes(value, name="max_memory") < MIN_MEMORY:
        raise SettingsError(
            f"max_memory {value} is too small: a run needs at least 256 MiB (PyTorch alone "
            "takes about 225 MB)."
        )


def _check(s: Settings) -> None:
    _int_in(s, "size", 16, 8192)
    _int_in(s, "iterations", 0, 100_000)
    if s.initial_iterations is not None:
        _int_in(s, "initial_iterations", 0, 100_000)
    _choice(s, "optimizer", ("lbfgs", "adam"))
    _float_in(s, "learning_rate", 1e-6, 10.0)
    _int_in(s, "lbfgs_history", 1, 1000)
    _float_in(s, "content_weight", 0.0, 1e9)
    _float_in(s, "style_weight", 0.0, 1e9)
    _float_in(s, "tv_weight", 0.0, 1e9)
    _float_in(s, "strength", 0.0, 1.0)
    for name in ("content_layers", "style_layers"):
        layers = getattr(s, name)
        if layers is not None and (not layers or not all(isinstance(x, str) and x for x in layers)):
            raise SettingsError(f"{name} must be a non-empty list of layer names.")
    if s.style_layer_weights is not None:
        weights = [_num("style_layer_weights", w) for w in s.style_layer_weights]
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise SettingsError("style_layer_weights must be non-negative and not all zero.")
        if s.style_layers is not None and len(weights) != len(s.style_layers):
            raise SettingsError("style_layer_weights needs one weight per style layer.")
    if s.style_depth is not None:
        _int_in(s, "style_depth", 1, 64)
    _choice(s, "style_blend", ("gram", "loss"))
    _float_in(s, "style_scale", 0.05, 8.0)
    _choice(s, "init", ("content", "noise", "image"))
    if s.init == "image" and not s.init_image:
        raise SettingsError('init "image" needs init_image (a path).')
    _int_in(s, "seed", 0, 2**63 - 1)
    if not isinstance(s.pyramid, bool):
        raise SettingsError("pyramid must be true or false.")
    _int_in(s, "min_size", 16, 8192)
    _float_in(s, "early_stop", 0.0, 1.0)
    _int_in(s, "patience", 1, 10_000)
    _choice(s, "preserve_colors", ("none", "luminance", "stats"))
    _choice(s, "backbone", BACKBONES)
    if s.weights is not None and not isinstance(s.weights, str):
        raise SettingsError("weights must be a file path.")
    if not isinstance(s.device, str) or not s.device:
        raise SettingsError("device must be auto, cpu, cuda, cuda:N or mps.")
    _choice(s, "precision", ("auto", "fp32", "bf16"))
    if s.channels_last is not None and not isinstance(s.channels_last, bool):
        raise SettingsError("channels_last must be true, false or unset.")
    for name in ("winograd", "fused_pooling"):
        if getattr(s, name) is not None and not isinstance(getattr(s, name), bool):
            raise SettingsError(f"{name} must be true, false or unset.")
    _int_in(s, "preview_every", 0, 100_000)
    _check_memory(s.max_memory)
    if not isinstance(s.extra, dict):
        raise SettingsError("extra must be a mapping.")
