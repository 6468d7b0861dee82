"""Feature extractors that return ``{layer name: activation}``.

VGG19 and SqueezeNet 1.1 are defined in plain torch with the same state-dict keys as
torchvision's ``vgg19().features`` and ``squeezenet1_1().features``, so torchvision's published
checkpoints load without torchvision (whose wheel does not import against CPU-only torch).
The network is cut after the deepest layer in use and its weights are frozen, so autograd never
computes or keeps anything for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from core.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # neural-style's VGG preprocessing

_VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """Layer names (index = position in ``features``) and the layers used by default."""

    name: str
    names: tuple[str, ...]
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    style_weights: tuple[float, ...]
    min_side: int  # smallest input side that reaches the deepest default layer
    fields: tuple[int, ...] = ()
    """Receptive field of each layer of ``names``, in input pixels (from :func:`fields_of`)."""

    def reach(self, layers: Iterable[str]) -> int:
        """How far from a position the deepest of ``layers`` sees: half its receptive field.
        Tiles (core/engine/tiled.py) need no more context than this around them."""
        return max((self.fields[self.names.index(n)] for n in layers), default=0) // 2


def fields_of(specs: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    """Receptive fields of layers given as (kernel, stride) in order: each widens the field
    by ``kernel - 1`` steps of its input's spacing, and multiplies that spacing by its stride."""
    out: list[int] = []
    field, spacing = 1, 1
    for kernel, stride in specs:
        field += (kernel - 1) * spacing
        spacing *= stride
        out.append(field)
    return tuple(out)


def _vgg19_specs() -> list[tuple[int, int]]:
    """(kernel, stride) per name of :func:`_vgg19_names`: conv 3/1, its ReLU 1/1, pool 2/2."""
    specs: list[tuple[int, int]] = []
    for v in _VGG19_CFG:
        specs += [(2, 2)] if v == "M" else [(3, 1), (1, 1)]
    return specs


def _vgg19_names() -> tuple[str, ...]:
    names: list[str] = []
    block, conv = 1, 1
    for v in _VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return tuple(names)


VGG19 = Architecture(
    name="vgg19",
    names=_vgg19_names(),
    # Gatys et al.: content conv4_2, style conv1_1..conv5_1 (taken after their ReLUs, as in
    # crowsonkb and neural-style); layer weights 256:64:16:4:1 from crowsonkb.
    content_layers=("relu4_2",),
    style_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
    style_weights=(256.0, 64.0, 16.0, 4.0, 1.0),
    min_side=16,
    fields=fields_of(_vgg19_specs()),
)

SQUEEZENET = Architecture(
    name="squeezenet",
    names=("conv1", "relu1", "pool1", "fire2", "fire3", "pool3", "fire4", "fire5", "pool5",
           "fire6", "fire7", "fire8", "fire9"),
    # The layers of Stanford CS231n's SqueezeNet style-transfer assignment: content = module 3
    # (fire2), style = modules 1, 4, 6, 7; the shallow-heavy 4x weighting follows crowsonkb.
    content_layers=("fire2",),
    style_layers=("relu1", "fire3", "fire4", "fire5"),
    style_weights=(64.0, 16.0, 4.0, 1.0),
    min_side=32,
    # conv1 3/2, relu1, pool1 3/2, fire2-3 (3x3 expand), pool3 3/2, fire4-5, pool5, fire6-9
    fields=fields_of([(3, 2), (1, 1), (3, 2), (3, 1), (3, 1), (3, 2), (3, 1), (3, 1), (3, 2)]
                     + [(3, 1)] * 4),
)  # fmt: skip


class Fire(nn.Module):
    """SqueezeNet's fire module (torchvision's attribute names, so checkpoints load)."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [
                self.expand1x1_activation(self.expand1x1(x)),
                self.expand3x3_activation(self.expand3x3(x)),
            ],
            1,
        )


def vgg19_features() -> nn.Sequential:
    """torchvision's ``vgg19().features`` layout (indices and key names)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


def squeezenet1_1_features() -> nn.Sequential:
    """torchvision's ``squeezenet1_1().features`` layout."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(64, 16, 64, 64),
        Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(128, 32, 128, 128),
        Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(256, 48, 192, 192),
        Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256),
        Fire(512, 64, 256, 256),
    )


ARCHITECTURES: dict[str, tuple[Architecture, Callable[[], nn.Sequential]]] = {
    "vgg19": (VGG19, vgg19_features),
    "squeezenet": (SQUEEZENET, squeezenet1_1_features),
}


def features_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``features.*`` entries of a torchvision checkpoint, prefix removed.

    Accepts a full model checkpoint (classifier keys are ignored), a bare ``features`` dict,
    or either wrapped in ``{"state_dict": ...}``.
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not out:
        out = {k: v for k, v in state.items() if k[:1].isdigit()}
    return out


class FeatureExtractor(nn.Module):
    """A frozen, truncated backbone returning the named activations asked for."""

    features: nn.Sequential
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        arch: Architecture,
        features: nn.Sequential,
        layers: Iterable[str],
        *,
        normalization: str = "imagenet",
    ) -> None:
        super().__init__()
        wanted = set(layers)
        unknown = sorted(wanted - set(arch.names))
        if unknown:
            raise WeightsError(
                f"{arch.name} has no layer(s) {', '.join(unknown)}; it has {', '.join(arch.names)}."
            )
        self.arch = arch
        self.layers = tuple(n for n in arch.names if n in wanted)
        self.index = {n: arch.names.index(n) for n in self.layers}
        last = max(self.index.values())
        self.features = cast(nn.Sequential, features[: last + 1])  # a slice is a Sequential
        # ReLUs must not overwrite conv outputs that are returned as activations; none of the
        # default layers is a conv output, but a user may ask for one.
        for name, i in self.index.items():
            if name.startswith("conv") and i + 1 < len(self.features):
                nxt = self.features[i + 1]
                if isinstance(nxt, nn.ReLU):
                    nxt.inplace = False
        if isinstance(self.features[0], nn.Conv2d) and arch.name == "vgg19":
            # Replicate padding on the first conv reduces edge artifacts [crowsonkb].
            self.features[0].padding_mode = "replicate"
        self.normalization = normalization
        if normalization == "caffe":
            mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
            std = torch.ones(1, 3, 1, 1) / 255.0
        else:
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.eval()
        self.requires_grad_(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] RGB to what the weights were trained on."""
        if self.normalization == "caffe":
            x = x.flip(1)  # RGB -> BGR, then (x * 255 - mean)
        return (x - self.mean) / self.std

    def forward(
        self,
        x: torch.Tensor,
        layers: Sequence[str] | None = None,
        tap: Callable[[str, torch.Tensor], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The activations of ``layers`` (default: all asked for at construction); ``tap`` is
        called with each one as soon as it exists, before the deeper layers run."""
        wanted = set(self.layers if layers is None else layers)
        stop = max(self.index[n] for n in wanted)
        want_idx = {self.index[n]: n for n in wanted}
        out: dict[str, torch.Tensor] = {}
        h = self.normalize(x)
        for i, module in enumerate(self.features):
            h = module(h)
            if i in want_idx:
                out[want_idx[i]] = h
                if tap is not None:
                    tap(want_idx[i], h)
            if i >= stop:
                break
        return out


def build(
    arch_name: str,
    state: Mapping[str, torch.Tensor] | None,
    layers: Iterable[str],
    *,
    normalization: str = "imagenet",
    seed: int = 0,
) -> FeatureExtractor:
    """Build a frozen extractor; ``state`` None means seeded random weights (tests only)."""
    arch, make = ARCHITECTURES[arch_name]
    features = _skeleton(make)
    load_features(features, _random_features(features, seed) if state is None else state, arch.name)
    return FeatureExtractor(arch, features, layers, normalization=normalization)


def _skeleton(make: Callable[[], nn.Sequential]) -> nn.Sequential:
    """The layers without tensors (on the meta device): every weight is replaced by the
    checkpoint's, so the default initialisation would be wasted work, 0.1-0.2 s of a VGG19
    build on two cores (a quarter of the speed probe's time went to it)."""
    with torch.device("meta"):
        return make()


def load_features(features: nn.Sequential, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Load a checkpoint into ``features`` (built by ``_skeleton``, or with tensors of its own);
    a clear WeightsError if it is not that network. The model gets its own float32 copies:
    it never shares memory with the checkpoint."""
    sd = features_state_dict(state)
    expected = features.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise WeightsError(
            f"This checkpoint is not a {name} checkpoint in torchvision's layout: it lacks "
            f"{len(missing)} of {len(expected)} feature tensors (first: features.{missing[0]})."
        )
    for key, tensor in expected.items():
        got = sd[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise WeightsError(
                f"This checkpoint does not fit {name}: features.{key} has shape {shape}, "
                f"expected {tuple(tensor.shape)}."
            )
    own = {k: sd[k].to(torch.float32, copy=True) for k in expected}
    features.load_state_dict(own, assign=True)


def _random_features(features: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-normal weights and zero biases for ``features``' convolutions, by state-dict
    key: activations keep their scale through depth (tests and benchmarks only)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, m in features.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            out[f"{name}.weight"] = (
                torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
            )
            if m.bias is not None:
                out[f"{name}.bias"] = torch.zeros(m.bias.shape)
    return out


def random_state_dict(arch_name: str = "vgg19", seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint in torchvision's layout with random weights (for tests and benchmarks)."""
    _, make = ARCHITECTURES[arch_name]
    return {f"features.{k}": v for k, v in _random_features(_skeleton(make), seed).items()}
