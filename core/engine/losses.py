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
    def forward(ctx, mat: torch.Tensor, positions_first: bool, n: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mat)
        ctx.positions_first, ctx.n = positions_first, n
        f = mat.float()  # a transient copy unless already float32
        product = (
            torch.bmm(f.transpose(1, 2), f) if positions_first else torch.bmm(f, f.transpose(1, 2))
        )
        return product.div_(n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
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
