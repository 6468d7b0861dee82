"""ReLU followed by 2x2 max pooling, as one autograd function that keeps almost nothing.

Why: in VGG19 every pooling layer follows a ReLU whose output nobody else needs (relu1_2,
relu2_2, relu3_4, relu4_4 are neither style nor content layers). Run separately, autograd keeps
that full-resolution output twice over for the backward pass (for the ReLU's mask and as the
pooling's input: 94 MB at 512x384) and runs a full-size ReLU backward. ReLU is monotone, so
``max(relu(x)) == relu(max(x))``: pooling first and applying the ReLU to the quarter-size result
gives the same output, and the gradient only needs to know, per output, which slot of its 2x2
window won and whether the result is positive: one byte per output (3 MB for block 1 at
512x384 instead of a 25 MB int64 index and a 3 MB mask). Same values and gradients as ``ReLU``
then ``MaxPool2d(2, 2)``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

_NO_GRAD = 4  # added to the window code of an output the ReLU zeroed


class _ReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        peak = F.max_pool2d(x, 2)
        ctx.save_for_backward(_window_codes(x, peak))
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ctx.like = (x.shape, x.dtype, x.device, channels_last)
        return peak.clamp_(min=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (codes,) = ctx.saved_tensors
        shape, dtype, device, channels_last = ctx.like
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        grad_in = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
        h, w = codes.shape[-2:]
        # Every position is written once: the four window slots, then any odd last row/column.
        for code in range(4):
            dy, dx = divmod(code, 2)
            torch.mul(grad, codes == code, out=grad_in[..., dy : 2 * h : 2, dx : 2 * w : 2])
        grad_in[..., 2 * h :, :] = 0
        grad_in[..., : 2 * h, 2 * w :] = 0
        return grad_in


def _window_codes(x: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Per pooled output, which slot of its 2x2 window holds the maximum (0-3, row-major; the
    first of equal values, as max pooling picks), plus 4 where the ReLU zeroes it (no
    gradient): one byte per output instead of an 8-byte index and a mask."""
    h, w = peak.shape[-2:]

    def differs(dy: int, dx: int) -> torch.Tensor:
        return x[..., dy : 2 * h : 2, dx : 2 * w : 2] != peak

    # first slot = not s0 * (1 + not s1 * (1 + not s2)), in uint8 arithmetic
    codes = differs(1, 0).to(torch.uint8).add_(1).mul_(differs(0, 1)).add_(1).mul_(differs(0, 0))
    return codes.add_(peak <= 0, alpha=_NO_GRAD)


class ReluMaxPool(nn.Module):
    """``ReLU`` then ``MaxPool2d(2, 2)`` with a lean backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReluMaxPool.apply(x)


def _plain_2x2(pool: nn.Module) -> bool:
    def pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return (v, v) if isinstance(v, int) else tuple(v)

    return (
        isinstance(pool, nn.MaxPool2d)
        and pair(pool.kernel_size) == (2, 2)
        and pair(pool.stride) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


def fuse_relu_pool(features: nn.Sequential, keep: Collection[int] = ()) -> int:
    """Fuse each ``ReLU, MaxPool2d(2, 2)`` pair of ``features`` in place, except where the
    ReLU's own output is wanted (its index is in ``keep``); returns how many were fused.
    Indices stay as they were (the ReLU's slot becomes an ``Identity``)."""
    fused = 0
    for i in range(len(features) - 1):
        if i in keep or not isinstance(features[i], nn.ReLU) or not _plain_2x2(features[i + 1]):
            continue
        features[i], features[i + 1] = nn.Identity(), ReluMaxPool()
        fused += 1
    return fused
