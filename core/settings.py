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
* [Gatys 2017] Gatys, Ecker, Bethge, Hertzmann, Shechtman, *Controlling Perceptual Factors in
  Neural Style Transfer* (CVPR 2017): spatial control, each loss term guided by a mask
  resampled to every layer's resolution.
* [Ruder] Ruder, Dosovitskiy, Brox, *Artistic style transfer for videos* (GCPR 2016) and its
  code, manuelruder/artistic-videos (content 5, style 100, temporal 1000, TV 1e-3 at 450x350,
  2000 iterations for the first frame and 1000 for each later one).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from core.byte_sizes import parse_bytes
from core.errors import SettingsError

# The allowed values of each choice, written once: the type hints below, and through
# typing.get_args() the validation in _check, the CLI's choices and the helper's options.
Optimizer = Literal["lbfgs", "adam"]
Init = Literal["content", "noise", "image"]
Blend = Literal["gram", "loss"]
PreserveColors = Literal["none", "luminance", "stats"]
Precision = Literal["auto", "fp32", "bf16"]
Backbone = Literal["vgg19", "vgg19-caffe", "squeezenet", "random"]
Quality = Literal["draft", "standard", "high"]

_RUDER_TEMPORAL, _RUDER_TV, _RUDER_VALUES = 1e3, 1e-3, 3 * 450 * 350
TEMPORAL_WEIGHT: float = round(2.0 * 2 * _RUDER_TEMPORAL / (_RUDER_TV * _RUDER_VALUES), 2)
"""8.47: [Ruder]'s temporal weight carried over to this project's loss scaling through the
total-variation term, the one other term that is, like the temporal loss, a quadratic penalty on
pixel values, so the ratio of the two transfers exactly whatever the colour scale (0-255 there,
0-1 here; both sides scale by 255^2). Their temporal loss is ``gamma / D * sum(c * d^2)`` (a mean
over the D = 3 * H * W values, gamma = 1000) and their TV is ``lambda / 2 * sum(dx^2 + dy^2)`` (a
sum, lambda = 1e-3); ours are ``w / D * sum(c * d^2)`` and ``tv_weight * mean(dx^2 + dy^2)`` (the
nine-point stencil of TVLoss equals that mean for a smooth image), tv_weight = 2. Equal ratios
give ``w = tv_weight * 2 * gamma / (lambda * D)`` at their working size of 450x350 (their TV,
a sum, grows with the image, so the ratio is only defined at a size; ours is a mean and holds at
every size). This assumes each project's TV weight plays the same part next to its content and
style terms, which is what both were chosen for (a light smoothing)."""

OPTIMIZERS: tuple[Optimizer, ...] = typing.get_args(Optimizer)
INITS: tuple[Init, ...] = typing.get_args(Init)
BLENDS: tuple[Blend, ...] = typing.get_args(Blend)
COLOUR_MODES: tuple[PreserveColors, ...] = typing.get_args(PreserveColors)
PRECISIONS: tuple[Precision, ...] = typing.get_args(Precision)
BACKBONES: tuple[Backbone, ...] = typing.get_args(Backbone)
QUALITIES: tuple[Quality, ...] = typing.get_args(Quality)

QUALITY_ITERATIONS: dict[Quality, int] = {"draft": 8, "standard": 20, "high": 100}
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
    full_steps_up_to: int = 1024
    """Pyramid scales whose long side is above this get fewer steps than ``iterations``: in
    proportion to 1 / side, ``iterations x full_steps_up_to / side`` (at least 1); 0 gives
    every scale ``iterations``. The shape of neural-style's own high-resolution recipe
    [neural-style: examples/multigpu_scripts/starry_stanford.sh: 500 iterations at 512 px, 200
    at 1024, 100 at 2048, 50 at 3620, each scale starting from the last; iterations x side stays
    within 0.7-1x of 512 px's]: a larger scale starts from the last one's painting, which has
    the style's statistics already, and adds finer detail. Where the fall-off starts is ours:
    above 1024 px, so the sizes at which the step budgets were set (512 px on a CPU, 1024 on a
    GPU) paint as before; a 4096 px print takes 5, 7, 10 and 14 steps at its last four scales
    instead of 20 each, 2.6x fewer pixel-steps in all (docs/BENCHMARKS.md)."""
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
    keep_faces: float = 0.5
    """Keep faces recognisable, in [0, 1]: under a soft mask over the faces found in the photo
    (core/faces.py) the content-to-style ratio grows 10x per 0.5 (content weight x10^k, style
    weight x10^-k through guided Gram matrices), so faces are painted as if ``strength`` were
    lower by this much [Gatys 2017: spatial guidance of the content and style terms]. 0 = off;
    with no face found nothing changes. Default 0.5 because Pastiche is a selfie tool and a
    dissolving face is the complaint portrait users of style transfer make most ("nose/eyes etc
    disappear", HalbertCH/IEContraAST#3, where the maintainer's advice is a higher content
    weight): at the default strength a face is then painted as at strength 0, the "stay close
    to the photo" end of the scale, and the rest of the picture is still fully styled."""

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
    """bf16 autocast for the convolutions, or fp32; Gram matrices and losses always in fp32.
    ``auto``: whichever a short probe measured faster on this machine at the same accuracy
    (core/engine/autotune.py; once per machine and torch version, then cached)."""
    channels_last: bool | None = None
    """None = on where measured faster."""
    winograd: bool | None = None
    """3x3 convolutions by Winograd's algorithm on CPUs (core/engine/cpu/winograd.py): F(4x4,
    3x3) in fp32, fewer multiplies, same result up to fp32 rounding; F(2x2, 3x3) in bf16.
    None = as the probe measured faster on this machine (see ``precision``)."""
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

    temporal_weight: float = TEMPORAL_WEIGHT
    """Animations: weight of [Ruder]'s temporal loss, which keeps each frame after the first
    close to the previous painted frame carried along the optical flow, on the pixels where the
    flow is trusted; 0 paints every frame on its own (flickers). Default: see TEMPORAL_WEIGHT."""
    frame_iterations: int | None = None
    """Animations: steps for each frame after the first, at the output size only (they start
    from the previous painting carried along the flow, so they need no pyramid); None =
    ``iterations``, half of the first frame's pyramid measured in full-size steps [Ruder: 1000
    after a first frame of 2000]."""
    max_frames: int | None = None
    """Animations: paint at most this many frames, evenly spread over the clip (dropped frames'
    time goes to the kept ones); None = every frame, up to the reader's hard limit."""

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

    def steps_at(self, long_side: int) -> int:
        """Steps for a pyramid scale after the first, of this long side (full_steps_up_to)."""
        if not self.full_steps_up_to or long_side <= self.full_steps_up_to:
            return self.iterations
        share = self.full_steps_up_to / long_side
        return max(min(1, self.iterations), round(self.iterations * share))

    @property
    def later_frame_iterations(self) -> int:
        """Steps for each animation frame after the first."""
        return self.iterations if self.frame_iterations is None else self.frame_iterations

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


def _choices() -> dict[str, tuple[str, ...]]:
    """Each ``Literal``-typed field and its allowed values, read from the type hints."""
    hints = typing.get_type_hints(Settings)
    return {
        name: typing.get_args(hint)
        for name, hint in hints.items()
        if typing.get_origin(hint) is Literal
    }


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
    for name, options in _CHOICES.items():
        _choice(s, name, options)
    _check_ranges(s)
    _check_layers(s)
    _check_switches(s)


def _check_ranges(s: Settings) -> None:
    _int_in(s, "size", 16, 8192)
    _int_in(s, "iterations", 0, 100_000)
    _int_in(s, "full_steps_up_to", 0, 100_000)
    if s.initial_iterations is not None:
        _int_in(s, "initial_iterations", 0, 100_000)
    _float_in(s, "learning_rate", 1e-6, 10.0)
    _int_in(s, "lbfgs_history", 1, 1000)
    _float_in(s, "content_weight", 0.0, 1e9)
    _float_in(s, "style_weight", 0.0, 1e9)
    _float_in(s, "tv_weight", 0.0, 1e9)
    _float_in(s, "strength", 0.0, 1.0)
    if s.style_depth is not None:
        _int_in(s, "style_depth", 1, 64)
    _float_in(s, "style_scale", 0.05, 8.0)
    _int_in(s, "seed", 0, 2**63 - 1)
    _int_in(s, "min_size", 16, 8192)
    _float_in(s, "early_stop", 0.0, 1.0)
    _int_in(s, "patience", 1, 10_000)
    _int_in(s, "preview_every", 0, 100_000)
    _float_in(s, "keep_faces", 0.0, 1.0)
    _float_in(s, "temporal_weight", 0.0, 1e9)
    if s.frame_iterations is not None:
        _int_in(s, "frame_iterations", 0, 100_000)
    if s.max_frames is not None:
        _int_in(s, "max_frames", 1, 100_000)


def _check_layers(s: Settings) -> None:
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


def _check_switches(s: Settings) -> None:
    """Paths, the device string, on/off/unset flags and ``extra``."""
    if s.init == "image" and not s.init_image:
        raise SettingsError('init "image" needs init_image (a path).')
    if not isinstance(s.pyramid, bool):
        raise SettingsError("pyramid must be true or false.")
    if s.weights is not None and not isinstance(s.weights, str):
        raise SettingsError("weights must be a file path.")
    if not isinstance(s.device, str) or not s.device:
        raise SettingsError("device must be auto, cpu, cuda, cuda:N or mps.")
    for name in ("channels_last", "winograd", "fused_pooling"):
        if getattr(s, name) is not None and not isinstance(getattr(s, name), bool):
            raise SettingsError(f"{name} must be true, false or unset.")
    _check_memory(s.max_memory)
    if not isinstance(s.extra, dict):
        raise SettingsError("extra must be a mapping.")


_CHOICES = _choices()
