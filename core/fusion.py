"""ReLU followed by 2x2 max pooling, as one autograd function that keeps almost nothing.

Why: in VGG19 every pooling layer follows a ReLU whose output nobody else needs (relu1_2,
relu2_2, relu3_4, relu4_4 are neither style nor content layers). Run separately, autograd keeps
that full-resolution output twice over for the backward pass (for the ReLU's mask and as the
pooling's input: 94 MB at 512x384) and runs a full-size ReLU backward. ReLU is monotone, so
``max(relu(x)) == relu(max(x))``: pooling first and applying the ReLU to the quarter-size result
gives the same output, and the gradient only needs the pooling's indices and where that result
is positive. Same values and gradients as ``ReLU`` then ``MaxPool2d(2, 2)``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

_KERNEL, _STRIDE, _PADDING, _DILATION = [2, 2], [2, 2], [0, 0], [1, 1]


class _ReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x, _KERNEL, _STRIDE, _PADDING, _DILATION, False
        )
        out.clamp_(min=0)
        ctx.save_for_backward(indices, out > 0)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ctx.like = (x.shape, x.dtype, x.device, channels_last)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        indices, positive = ctx.saved_tensors
        shape, dtype, device, channels_last = ctx.like
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # Only the input's shape and layout are read: an unwritten tensor costs no memory.
        like = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad * positive, like, _KERNEL, _STRIDE, _PADDING, _DILATION, False, indices
        )


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
