"""A plain style transfer in the structure of PyTorch's tutorial "Neural Transfer Using PyTorch".

It is what the engine is measured against, so only the *structure* follows the tutorial:

* a ``Normalization`` module and ``ContentLoss``/``StyleLoss`` modules spliced into an
  ``nn.Sequential`` copy of the network right after the chosen layers, the targets computed by
  running the partly built model (no caching), the model cut after the last loss module;
* ``nn.ReLU(inplace=False)``; the weights are not frozen (``requires_grad`` stays True, so every
  step also computes weight gradients, which the tutorial never zeroes); fp32; one scale.

Everything that decides the *objective* is the engine's, so that "reaching the same loss" means
the same thing on both sides: the loss formulas of :mod:`core.losses` (scaled MSE, Gram / HW,
nine-point TV on the raw image, here as a module in front of the normalisation), the engine's
layers (content relu4_2 = conv4_2 after its ReLU, style relu1_1 ... relu5_1) and weights, its
image sizing and its network (conv1_1 with replicate padding). The optimiser is the engine's
default too: L-BFGS, lr 1, one evaluation per step, history 10. The tutorial's clamp of the image
inside the closure is left out because the engine does not clamp with L-BFGS.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from core.engine import backbones, losses
from core.engine.model import layer_plan
from core.engine.tensors import fit, resize, to_tensor
from core.settings import Settings


@dataclass(frozen=True)
class LossWeights:
    """The engine's weight of every term (after ``strength`` and layer-weight normalisation)."""

    content: Mapping[str, float]
    style: Mapping[str, float]
    tv: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LossWeights:
        plan = layer_plan(settings)
        cw = settings.effective_content_weight / len(plan.content)
        return cls(
            content={n: cw for n in plan.content},
            style={
                n: settings.style_weight * w
                for n, w in zip(plan.style, plan.style_weights, strict=True)
            },
            tv=settings.tv_weight,
        )


class Normalization(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std


class ContentLoss(nn.Module):
    """Records its loss and passes the activation on, as in the tutorial."""

    def __init__(self, target: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target = target.detach()
        self.weight = weight
        self.loss = torch.zeros(())
        self.enabled = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.loss = losses.scaled_mse(input, self.target) * self.weight
        return input


class StyleLoss(nn.Module):
    def __init__(self, target_feature: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target = losses.gram(target_feature).detach()
        self.weight = weight
        self.loss = torch.zeros(())
        self.enabled = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.loss = losses.scaled_mse(losses.gram(input), self.target) * self.weight
        return input


class TVLoss(nn.Module):
    """The engine's TV term on the raw image, spliced in front of the normalisation."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.term = losses.TVLoss()
        self.weight = weight
        self.loss = torch.zeros(())
        self.enabled = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.loss = self.term(input) * self.weight
        return input


def network(state: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """VGG19 ``features`` with these weights and the engine's replicate padding on conv1_1."""
    cnn = backbones.vgg19_features()
    backbones.load_features(cnn, state, "vgg19")
    cnn[0].padding_mode = "replicate"
    return cnn


@dataclass
class StyleModel:
    model: nn.Sequential
    loss_modules: list[nn.Module]

    def loss(self) -> torch.Tensor:
        return sum((m.loss for m in self.loss_modules), torch.zeros(()))


def build(
    cnn: nn.Sequential,
    content_img: torch.Tensor,
    style_img: torch.Tensor,
    weights: LossWeights,
    *,
    frozen: bool = False,
) -> StyleModel:
    """The tutorial's ``get_style_model_and_losses``, with the engine's terms and layers."""
    cnn = copy.deepcopy(cnn)
    tv = TVLoss(weights.tv)
    model = nn.Sequential(tv, Normalization(backbones.IMAGENET_MEAN, backbones.IMAGENET_STD))
    loss_modules: list[nn.Module] = [tv]
    block, conv = 1, 0
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            conv += 1
            name = f"conv{block}_{conv}"
        elif isinstance(layer, nn.ReLU):
            name = f"relu{block}_{conv}"
            layer = nn.ReLU(inplace=False)  # the tutorial's choice; in place breaks the losses
        elif isinstance(layer, nn.MaxPool2d):
            name = f"pool{block}"
            block, conv = block + 1, 0
        else:
            raise RuntimeError(f"Unrecognized layer: {layer.__class__.__name__}")
        model.add_module(name, layer)
        if name in weights.content:
            target = _targets(model, content_img, loss_modules)
            module = ContentLoss(target, weights.content[name])
            model.add_module(f"content_loss_{name}", module)
            loss_modules.append(module)
        if name in weights.style:
            target_feature = _targets(model, style_img, loss_modules)
            module = StyleLoss(target_feature, weights.style[name])
            model.add_module(f"style_loss_{name}", module)
            loss_modules.append(module)
    # Cut the model after the last loss module.
    last = max(i for i, m in enumerate(model) if isinstance(m, (ContentLoss, StyleLoss)))
    model = model[: last + 1]
    if frozen:
        model.requires_grad_(False)
    return StyleModel(model, loss_modules)


def _targets(
    model: nn.Sequential, img: torch.Tensor, loss_modules: list[nn.Module]
) -> torch.Tensor:
    """Run the partly built model on a target image (the tutorial's way, recomputed for every
    loss module); the loss modules already inserted stay out of it because the style image
    need not have the content's size (the tutorial requires equal sizes instead)."""
    for m in loss_modules:
        m.enabled = False
    try:
        return model(img).detach()
    finally:
        for m in loss_modules:
            m.enabled = True


def prepare(
    content: Image.Image, style: Image.Image, size: int, settings: Settings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Content and style tensors sized exactly as the engine sizes them at this scale."""
    w, h = fit(content.size, size)
    content_t = to_tensor(resize(content.convert("RGB"), (w, h)), torch.device("cpu"))
    min_side = backbones.VGG19.min_side
    long_side = max(min_side, round(max(w, h) * settings.style_scale))
    ssize = fit(style.size, long_side) if max(style.size) > long_side else style.size
    if min(ssize) < min_side:
        ssize = fit(style.size, round(long_side * min_side / max(1, min(ssize))))
    style_t = to_tensor(resize(style.convert("RGB"), ssize), torch.device("cpu"))
    # to_tensor's tensors are permuted views; the tutorial's ToTensor gives contiguous NCHW.
    return content_t.contiguous(), style_t.contiguous()


@dataclass
class Run:
    """Per step: its seconds, the loss it reported, wall seconds since ``started`` and process
    CPU seconds since ``cpu_started`` (all threads; less sensitive to other load than wall time)."""

    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    image: torch.Tensor | None = None


def run(
    cnn: nn.Sequential,
    content: Image.Image,
    style: Image.Image,
    size: int,
    iterations: int,
    *,
    settings: Settings | None = None,
    frozen: bool = False,
    started: float | None = None,
    cpu_started: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Run:
    """Optimise from the content image for ``iterations`` L-BFGS steps (the tutorial's loop)."""
    s = settings or Settings()
    started = time.perf_counter() if started is None else started
    cpu_started = time.process_time() if cpu_started is None else cpu_started
    content_t, style_t = prepare(content, style, size, s)
    sm = build(cnn, content_t, style_t, LossWeights.from_settings(s), frozen=frozen)
    input_img = content_t.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([input_img], lr=1, max_iter=1, history_size=s.lbfgs_history)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        sm.model(input_img)
        loss = sm.loss()
        loss.backward()
        return loss

    out = Run()
    for i in range(iterations):
        t0 = time.perf_counter()
        loss = optimizer.step(closure).detach().item()
        now = time.perf_counter()
        out.step_seconds.append(now - t0)
        out.losses.append(loss)
        out.elapsed.append(now - started)
        out.cpu.append(time.process_time() - cpu_started)
        if on_step is not None:
            on_step(i + 1, loss)
    out.image = input_img.detach()
    return out


def objective(
    cnn: nn.Sequential,
    content: Image.Image,
    style: Image.Image,
    image: Image.Image,
    settings: Settings | None = None,
) -> float:
    """The fp32 objective of an output image at its own size (to compare reduced precision)."""
    s = settings or Settings()
    size = max(image.size)
    content_t, style_t = prepare(content, style, size, s)
    sm = build(cnn, content_t, style_t, LossWeights.from_settings(s), frozen=True)
    with torch.no_grad():
        sm.model(to_tensor(image.convert("RGB"), torch.device("cpu")).contiguous())
        return float(sm.loss())
