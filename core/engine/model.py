"""The backbone as the optimisation sees it: which layers to use, how to build the frozen
extractor for a device, and how to run it with the chosen precision and memory layout."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.engine import backbones
from core.engine.cpu import fusion, winograd
from core.engine.losses import GramGuide, gram, gram_key
from core.errors import SettingsError
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    arch: backbones.Architecture
    content: tuple[str, ...]
    style: tuple[str, ...]
    style_weights: tuple[float, ...]

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer the extractor must return, each once, in order."""
        return tuple(dict.fromkeys((*self.content, *self.style)))


def arch_name(backbone: str) -> str:
    """The architecture of a backbone: from the weight source table (``random`` is VGG19)."""
    if backbone == "random":
        return "vgg19"
    from core.engine import weights

    return weights.get_source(backbone).arch


def layer_plan(settings: Settings) -> LayerPlan:
    arch = backbones.ARCHITECTURES[arch_name(settings.backbone)][0]
    content = settings.content_layers or arch.content_layers
    style = settings.style_layers or arch.style_layers
    if settings.style_layer_weights is not None:
        weights = settings.style_layer_weights
    elif settings.style_layers is None:
        weights = arch.style_weights
    else:
        weights = tuple(1.0 for _ in style)
    if len(weights) != len(style):
        raise SettingsError("style_layer_weights needs one weight per style layer.")
    if settings.style_depth is not None:
        style, weights = style[: settings.style_depth], weights[: settings.style_depth]
    unknown = [n for n in (*content, *style) if n not in arch.names]
    if unknown:
        raise SettingsError(
            f"{arch.name} has no layer(s) {', '.join(unknown)}; it has {', '.join(arch.names)}."
        )
    total = sum(weights)
    return LayerPlan(arch, tuple(content), tuple(style), tuple(w / total for w in weights))


@dataclass(frozen=True)
class BuildOptions:
    """How the extractor is laid out for its device (see core/engine/device.py)."""

    device: torch.device
    channels_last: bool
    winograd: bool
    fused_pooling: bool
    dtype: torch.dtype | None


def build_model(
    plan: LayerPlan,
    state: Mapping[str, torch.Tensor] | None,
    normalization: str,
    opts: BuildOptions,
) -> backbones.FeatureExtractor:
    """The frozen extractor for ``plan``'s layers, converted for its device."""
    if state is None:
        log.warning("Using RANDOM backbone weights: output will not look like a painting.")
    model = backbones.build(plan.arch.name, state, plan.layers, normalization=normalization)
    model = model.to(opts.device)
    if opts.channels_last:
        # Module.to takes memory_format (torch docs); the stubs lack it.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if opts.winograd:
        winograd.convert(model.features)
    if opts.fused_pooling:
        fusion.fuse_relu_pool(model.features, keep=set(model.index.values()))
    if opts.dtype is not None:
        store_weights_in(model, opts.dtype)
    return model


def store_weights_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the convolutions' weights in the autocast dtype: autocast rounds frozen weights
    anew on every forward pass (it caches only leaves that require grad) and autograd keeps
    those copies until the backward pass; rounding once gives the same values without them
    (the memory saved is in docs/BENCHMARKS.md). Buffers (the input normalisation) stay float32."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(dtype)


class Forward:
    """Runs the backbone with the chosen precision and memory layout."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype | None, channels_last: bool
    ) -> None:
        self.model, self.device, self.dtype, self.channels_last = (
            model,
            device,
            dtype,
            channels_last,
        )

    def __call__(
        self,
        x: torch.Tensor,
        layers: Sequence[str] | None = None,
        grams: Collection[str] = (),
        guide: GramGuide | None = None,
    ) -> dict[str, torch.Tensor]:
        """Activations by layer name, plus the Gram matrix of each layer in ``grams`` under
        ``gram_key(layer)`` (weighted per position by ``guide`` when given). Each Gram is taken as soon as its layer exists, so autograd (which
        runs the most recently created nodes first) computes its gradient only when the backward
        pass reaches that layer, instead of holding every style layer's gradient through the
        whole backward pass (docs/BENCHMARKS.md has the memory this saves)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        taken: dict[str, torch.Tensor] = {}

        def take_gram(name: str, h: torch.Tensor) -> None:
            if name in grams:
                with torch.autocast(self.device.type, enabled=False):  # Grams stay float32
                    taken[gram_key(name)] = gram(h) if guide is None else guide.gram(h)

        if self.dtype is None:
            feats = self.model(x, layers, take_gram if grams else None)
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                feats = self.model(x, layers, take_gram if grams else None)
        feats.update(taken)
        return feats


@dataclass(frozen=True)
class WeightFile:
    """Where a backbone's weights come from: ``path`` None for the random backbone; ``source``
    is what the metadata reports (the path, or ``random``)."""

    path: str | None
    normalization: str
    source: str

    def load(self) -> dict[str, torch.Tensor] | None:
        if self.path is None:
            return None
        from core.engine import weights

        return weights.load_state_dict(self.path)


def weight_file(settings: Settings) -> WeightFile:
    """Resolve (and, if allowed, download) the weights of ``settings.backbone``."""
    if settings.backbone == "random":
        return WeightFile(None, "imagenet", "random")
    from core.engine import weights

    src = weights.SOURCES[settings.backbone]
    path = weights.resolve(settings.backbone, settings.weights)
    return WeightFile(str(path), src.normalization, str(path))
