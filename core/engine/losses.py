"""Loss terms as small composable objects, kept out of the network.

A loss maps the backbone's ``{layer: activation}`` dict (plus ``"input"``: the image) to a
scalar. ``Scale`` weights a term, ``LayerApply`` picks the activation it reads, ``SumLoss``
adds terms and reports each one, so the engine composes the objective instead of splicing
modules into the network (the pattern of crowsonkb/style-transfer-pytorch).

Normalisations, chosen so that one set of weights holds at every resolution:

* Gram matrices are divided by the number of positions (H*W) [crowsonkb]; Gatys et al.'s
  1/(4 N^2 M^2) factor on the unnormalised Gram is the same up to a constant, so the style
  term does not grow with the image.
* Content and style differences use the *scaled* MSE ``sum(d^2) / sum(|d|)`` [crowsonkb],
  whose gradient has an L1 norm of about one, so the term weights are relative shares.
* Total variation is a mean over pixels (nine-point stencil) [crowsonkb].
All terms are computed in float32 even when the backbone runs in bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

Features = Mapping[str, torch.Tensor]


class _Gram(torch.autograd.Function):
    """``mat^T mat / n`` (or ``mat mat^T / n``) in float32, with a one-product backward.

    Autograd's own backward for the product takes two products and a sum, three temporaries
    the size of the activation at once (about 150 MB for relu1_1 at 512 px, the step's memory
    peak); the Gram is symmetric, so one product with ``dG + dG^T`` gives the same gradient.

    A bf16 activation (autocast) is multiplied in float32 (the Gram must be exact: the style
    loss is a small difference of Grams), but its gradient is bf16 whatever precision the
    product has, so the backward product runs in bf16: on an AMX CPU far faster than the float32
    one (docs/BENCHMARKS.md), and only the bf16 activation is kept for it, not a
    float32 copy (about 90 MB at 512 px).
    """

    @staticmethod
    def forward(ctx, mat: torch.Tensor, positions_first: bool, n: int) -> torch.Tensor:
        ctx.save_for_backward(mat)
        ctx.positions_first, ctx.n = positions_first, n
        f = mat.float()  # a transient copy unless already float32
        product = (
            torch.bmm(f.transpose(1, 2), f) if positions_first else torch.bmm(f, f.transpose(1, 2))
        )
        return product.div_(n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mat,) = ctx.saved_tensors
        sym = (grad + grad.transpose(1, 2)).div_(ctx.n).to(mat.dtype)
        return (torch.bmm(mat, sym) if ctx.positions_first else torch.bmm(sym, mat)), None, None


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of a (B, C, H, W) activation, divided by H*W, in float32."""
    b, c, h, w = features.shape
    f = features if features.dtype in (torch.bfloat16, torch.float16) else features.float()
    if f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous():
        # (B, H*W, C) is a view of a channels_last tensor; reshaping to (B, C, H*W) would copy
        # the whole activation (and its gradient) every step.
        return _Gram.apply(f.permute(0, 2, 3, 1).reshape(b, h * w, c), True, h * w)
    return _Gram.apply(f.reshape(b, c, h * w), False, h * w)


class _GuidedGram(torch.autograd.Function):
    """``sum_p w_p f_p f_p^T / sum_p w_p``: a Gram matrix with a weight per position, Gatys et
    al. 2017's guided Gram (*Controlling Perceptual Factors in Neural Style Transfer*, section
    4: each region's style statistics are taken over that region's guidance channel).

    Same layout and precision rules as ``_Gram``; the weighted copy of the activation is a
    transient of the forward pass only, so only the activation itself, which the network keeps
    anyway, is saved. The forward weights both factors by ``sqrt(w)`` (the weights are
    non-negative), so its one float32 copy of the activation is also the weighted one: no more
    transient memory than ``_Gram`` (a second 64 MB copy at conv1_1 for a 512 px image
    otherwise).
    """

    @staticmethod
    def forward(ctx, mat: torch.Tensor, weights: torch.Tensor, positions_first: bool, n: float):
        ctx.save_for_backward(mat, weights)
        ctx.positions_first, ctx.n = positions_first, n
        root = weights.sqrt()
        f = mat.float().mul_(root) if mat.dtype != torch.float32 else mat * root
        product = (
            torch.bmm(f.transpose(1, 2), f) if positions_first else torch.bmm(f, f.transpose(1, 2))
        )
        return product.div_(n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        mat, weights = ctx.saved_tensors
        sym = (grad + grad.transpose(1, 2)).div_(ctx.n).to(mat.dtype)
        # (w * mat) @ sym == w * (mat @ sym) with one weight per position (a row of mat when
        # positions come first, a column otherwise): weighting the product in place spares an
        # activation-sized copy at the backward pass's peak (about 55 MB of a 512 px run's
        # peak, docs/BENCHMARKS.md).
        out = torch.bmm(mat, sym) if ctx.positions_first else torch.bmm(sym, mat)
        return out.mul_(weights.to(mat.dtype)), None, None, None


def guided_gram(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gram matrix of a (B, C, H, W) activation with a weight per position, ``weights`` of shape
    (1, 1, H, W) (non-negative, not all zero), divided by the weights' sum, in float32. With
    all weights 1 it is :func:`gram`."""
    b, c, h, w = features.shape
    f = features if features.dtype in (torch.bfloat16, torch.float16) else features.float()
    wts = weights.float()
    n = float(wts.sum())
    if f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous():
        mat = f.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return _GuidedGram.apply(mat, wts.reshape(1, h * w, 1), True, n)
    return _GuidedGram.apply(f.reshape(b, c, h * w), wts.reshape(1, 1, h * w), False, n)


class GramGuide:
    """Style weight per position for the guided Gram matrices of one scale: ``weights``
    (1, 1, H, W) at the image's resolution, area-resampled to each layer's resolution once
    (Gatys et al. 2017 resample their guidance channels the same way)."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights.float()
        self._at: dict[tuple[int, int], torch.Tensor] = {}

    def gram(self, features: torch.Tensor) -> torch.Tensor:
        size = (features.shape[-2], features.shape[-1])
        wts = self._at.get(size)
        if wts is None:
            wts = self._at[size] = F.interpolate(self.weights, size=size, mode="area")
        return guided_gram(features, wts)


def scaled_mse(input: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``sum(d^2) / sum(|d|)``: MSE rescaled so its gradient's L1 norm is about one."""
    diff = input.float() - target
    return diff.pow(2).sum() / (diff.abs().sum() + eps)


class ContentLoss(nn.Module):
    """Distance between activations and the photo's activations at the same layer."""

    target: torch.Tensor

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return scaled_mse(input, self.target)


class MaskedContentLoss(nn.Module):
    """Content loss inside a soft region only: spatial guidance of the content term, in the
    manner of Gatys et al. 2017 (*Controlling Perceptual Factors in Neural Style Transfer*,
    section 4), who guide each term by a mask resampled to each layer's resolution.

    ``mask`` is (1, 1, H, W) at any resolution (the image's); it is area-resampled to the
    target's positions once, here, so it follows whatever scale or tile the target was taken
    at. Both sides are weighted by the mask, so positions outside it neither pull nor count.
    ``coverage`` (the mask's mean at this layer) lets the engine scale the term: the scaled MSE
    gives any region a gradient of L1 norm ~1, so the weight per position of a term over a
    fraction ``a`` of the image is ``1/a`` times that of a term over all of it.
    """

    target: torch.Tensor
    mask: torch.Tensor

    def __init__(self, target: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        m = F.interpolate(mask.float(), size=target.shape[-2:], mode="area")
        self.register_buffer("mask", m)
        self.register_buffer("target", target.detach().float() * m)
        self.coverage = float(m.mean())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return scaled_mse(input.float() * self.mask, self.target)


class StyleLoss(nn.Module):
    """Distance between Gram matrices (the target is a Gram, possibly a blend of several).

    Takes an activation (B, C, H, W) or its Gram (B, C, C) already taken, as the engine does
    during the forward pass (feature key ``gram_key(layer)``)."""

    target: torch.Tensor

    def __init__(self, target_gram: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return scaled_mse(input if input.dim() == 3 else gram(input), self.target)


class StyleShift(nn.Module):
    """Distance to the Gram matrix the input had at its first evaluation, moved by ``shift``.

    For a tile (core/engine/tiled.py), whose target is its own Gram moved by its share of the
    scale's ask: the optimiser's first evaluation is at the start image, so its Gram comes
    with it, instead of from a gradient-free forward pass of the tile's window before the steps
    (half a step's time; 7 % of a tile's time at a print's 5 steps a tile). ``start`` is that
    first Gram (None before the first evaluation)."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.shift = shift.detach().float()
        self.start: torch.Tensor | None = None
        self.target: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        g = input if input.dim() == 3 else gram(input)
        if self.target is None:
            self.start = g.detach().float()  # nothing writes to a Gram in place
            self.target = self.start + self.shift
        return scaled_mse(g, self.target)


def gram_key(layer: str) -> str:
    """Feature-dict key of a layer's Gram matrix (see ``StyleLoss``)."""
    return f"{layer}:gram"


class TVLoss(nn.Module):
    """L2 total variation with a nine-point stencil, averaged over pixels [crowsonkb]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = F.pad(input.float(), (1, 1, 1, 1), mode="replicate")
        s1, s2, s3, s4 = slice(1, -1), slice(2, None), slice(None, -1), slice(1, None)
        d1 = (x[..., s1, s2] - x[..., s1, s1]).pow(2).mean() / 3
        d2 = (x[..., s2, s1] - x[..., s1, s1]).pow(2).mean() / 3
        d3 = (x[..., s4, s4] - x[..., s3, s3]).pow(2).mean() / 12
        d4 = (x[..., s4, s3] - x[..., s3, s4]).pow(2).mean() / 12
        return 2 * (d1 + d2 + d3 + d4)


class TemporalLoss(nn.Module):
    """Ruder et al.'s temporal consistency: ``mean(c * (x - w)^2)`` over every pixel value, where
    ``w`` is the previous painted frame carried into this one along the optical flow and ``c``
    (1, 1, H, W) is 1 where that flow is trusted and 0 elsewhere (core/flow.py). A mean over all
    values like theirs, so its weight carries over (see settings.TEMPORAL_WEIGHT)."""

    target: torch.Tensor
    mask: torch.Tensor

    def __init__(self, warped: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", warped.detach().float())
        self.register_buffer("mask", mask.detach().float())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return (self.mask * (input.float() - self.target).pow(2)).mean()


class LayerApply(nn.Module):
    """Apply ``loss`` to one entry of the feature dict."""

    def __init__(self, loss: nn.Module, layer: str) -> None:
        super().__init__()
        self.loss = loss
        self.layer = layer

    def forward(self, feats: Features) -> torch.Tensor:
        return self.loss(feats[self.layer])


class Scale(nn.Module):
    """Multiply a term by a constant weight."""

    def __init__(self, loss: nn.Module, weight: float) -> None:
        super().__init__()
        self.loss = loss
        self.weight = float(weight)

    def forward(self, feats: Features) -> torch.Tensor:
        return self.loss(feats) * self.weight


class SumLoss(nn.Module):
    """Sum of named groups of terms (content, style, tv); ``values()`` reports each."""

    def __init__(self, groups: Mapping[str, Sequence[nn.Module]]) -> None:
        super().__init__()
        self.groups = nn.ModuleDict({k: nn.ModuleList(v) for k, v in groups.items()})

    def forward(self, feats: Features) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=feats["input"].device)
        parts: dict[str, torch.Tensor] = {}
        for name, terms in self.groups.items():
            value = torch.zeros_like(total)
            for term in cast(nn.ModuleList, terms):
                value = value + term(feats)
            parts[name] = value.detach()
            total = total + value
        parts["total"] = total.detach()
        self._parts = parts
        return total

    def values(self) -> dict[str, float]:
        """The last evaluation's terms as floats (one device sync, done only when reported)."""
        return {k: float(v) for k, v in getattr(self, "_parts", {}).items()}
