"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for frozen weights on CPUs.

Why: on a CPU without a fast low-precision path (no AMX), VGG19's 3x3 convolutions run at
close to the peak fp32 rate, so the only way to make a step much cheaper is fewer multiplies.
F(4x4, 3x3) (Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks*, 2016) needs
2.25 per output instead of 9: every 6x6 input tile and every filter go to the transform domain,
where the convolution becomes 36 independent matrix products (one ``bmm``), and the 36 products
come back as a 4x4 output tile. The transforms are two small GEMMs with fixed Kronecker
matrices. The result equals the direct convolution up to fp32 rounding (relative error ~1e-5,
checked in tests/test_winograd.py and reported as a loss difference by the benchmark).

In bf16 (under a bf16 autocast, for CPUs whose bf16 dot products are faster than their fp32
ones) the same code runs F(2x2, 3x3): 4 multiplies per output, but transforms that do not
amplify bf16's rounding as F(4x4)'s do (see ``tiling_for``). Whether that path pays, and is
accurate enough, is measured on each machine (core/engine/speed_probe.py).

Style transfer never trains the network. The gradient with respect to the input is the exact
adjoint of the same computation (the same transformed filters, transposed), so L-BFGS sees
gradients consistent with the loss, and nothing of the input is saved for the backward pass.
The transformed filters are 4x the size of the filters (205 MB for VGG19 up to conv5_1), so
they are not kept: each call transforms its layer's filters (``G g G^T``, one small GEMM, a
small share of a step: docs/BENCHMARKS.md) half of the taps at a time into a reused scratch
buffer, which keeps the model at its own size.
"""

from __future__ import annotations

import threading
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

# Transform matrices for F(4, 3) with interpolation points 0, +-1, +-2, inf (Lavin & Gray).
_BT4 = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
_G4 = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_AT4 = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=torch.float64,
)
# F(2, 3) with points 0, +-1, inf (Lavin & Gray): 4 multiplies per output instead of 2.25, but
# its transforms hardly amplify rounding, which matters in bf16 (see ``tiling_for``).
_BT2 = torch.tensor(
    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64
)
_G2 = torch.tensor(
    [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], dtype=torch.float64
)
_AT2 = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


class Tiling:
    """F(m x m, 3x3): input tiles of (m + 2)^2 values give m x m outputs. Two-sided transforms
    of a flattened tile are one product each: vec(B^T d B) = kron(B^T, B^T) vec(d)."""

    def __init__(self, bt: torch.Tensor, g: torch.Tensor, at: torch.Tensor) -> None:
        self.m, self.t = at.shape  # output tile side, input tile side
        self.taps = self.t * self.t
        self.inp = torch.kron(bt, bt).float()  # (t^2, t^2)
        self.out = torch.kron(at, at).float()  # (m^2, t^2)
        self.filter = torch.kron(g, g).float()  # (t^2, 9): vec(G g G^T), per tap
        # Transformed filters made at a time: half of the taps, so their scratch is 19 MB for a
        # 512 x 512 layer in F(4x4) instead of 38 MB (a quarter made the products ~5 % slower).
        self.tap_group = self.taps // 2


F4 = Tiling(_BT4, _G4, _AT4)
F2 = Tiling(_BT2, _G2, _AT2)


def tiling_for(dtype: torch.dtype) -> Tiling:
    """F(4x4, 3x3) in float32; F(2x2, 3x3) in bfloat16, whose 8 significant bits F(4x4)'s
    transforms amplify about tenfold (2.7 % error per VGG19 layer against 0.29 % for a direct
    bf16 convolution; F(2x2): 0.46 %), too much for the probe's accuracy gate."""
    return F2 if dtype == torch.bfloat16 else F4


def filter_taps(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) filters as (9, in * out): a view for weights stored by ``relayout``."""
    k, c = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(9, c * k)


def relayout(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in, 3, 3) filters, stored tap-major so ``filter_taps`` needs no copy."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


# Tiles are processed in bands of rows so that the transform-domain buffers stay small
# (about this many floats each): bounded memory at any image size, and better cache reuse.
BAND_ELEMENTS = 1 << 22


def _band_rows(n: int, tiles_wide: int, channels: int, tiling: Tiling) -> int:
    return max(1, BAND_ELEMENTS // (tiling.taps * n * tiles_wide * channels))


_local = threading.local()


def _scratch(name: str, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A reusable per-thread buffer: fresh large allocations cost page faults on every call
    (glibc maps them anew), and keeping a few is cheap: two band buffers of BAND_ELEMENTS
    floats and one for half of the largest layer's transformed filters."""
    pool = _local.__dict__.setdefault("pool", {})
    key = (name, device, dtype)
    found = pool.get(key)
    if found is None or found.numel() < numel:
        found = pool[key] = torch.empty(max(numel, BAND_ELEMENTS), device=device, dtype=dtype)
    return found[:numel]


def free_scratch() -> None:
    """Drop this thread's buffers (the speed probe's, about 75 MB for both precisions, which
    the run that follows may not use)."""
    _local.__dict__.pop("pool", None)


def _buffers(numel: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return _scratch("one", numel, device, dtype), _scratch("two", numel, device, dtype)


def _filters(weight: torch.Tensor, first: int, tiling: Tiling) -> torch.Tensor:
    """Transformed filters of taps ``first ... first + tap_group - 1``, (tap_group, in, out),
    in a shared scratch buffer (valid until the next call on this thread)."""
    k, c = weight.shape[:2]
    group = tiling.tap_group
    buf = _scratch("filters", group * c * k, weight.device, weight.dtype)
    rows = tiling.filter[first : first + group].to(weight.device, weight.dtype)
    torch.mm(rows, filter_taps(weight), out=buf.view(group, c * k))
    return buf.view(group, c, k)


def _products(
    a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, adjoint: bool, tiling: Tiling
) -> None:
    """``out[t] = a[t] @ U[t]`` (or ``U[t]^T`` for the adjoint) for every tap, where ``U`` are
    the transformed filters: the convolution proper, one batched GEMM per tap group."""
    for first in range(0, tiling.taps, tiling.tap_group):
        u = _filters(weight, first, tiling)
        taps = slice(first, first + tiling.tap_group)
        torch.bmm(a[taps], u.transpose(1, 2) if adjoint else u, out=out[taps])


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (weights best stored by ``relayout``).

    The result is channels_last (as the backbone's activations are); ``x`` may be either layout.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    f = tiling_for(x.dtype)
    m, tile = f.m, f.t
    th, tw = -(-h // m), -(-w // m)
    b_in, b_out = f.inp.to(x.device, x.dtype), f.out.to(x.device, x.dtype)
    # Zero padding: 1 for the convolution, plus whatever completes the last tile.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + tw * m - w, 1, 1 + th * m - h))
    # Written straight into a fresh channels_last tensor (not a view, so ReLU may work in place).
    out = torch.empty(
        (n, k, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last
    )
    out_hwc = out.permute(0, 2, 3, 1)
    step = _band_rows(n, tw, max(c, k), f)
    for r0 in range(0, th, step):
        tr = min(step, th - r0)
        tiles = n * tr * tw
        one, two = _buffers(f.taps * tiles * max(c, k), x.device, x.dtype)
        t = xp[:, m * r0 : m * (r0 + tr) + 2].unfold(1, tile, m).unfold(2, tile, m)
        d = one[: f.taps * tiles * c].view(tile, tile, n, tr, tw, c)
        d.copy_(t.permute(4, 5, 0, 1, 2, 3))  # n tr tw c t t -> (t, t, n, tr, tw, c)
        v = two[: f.taps * tiles * c].view(f.taps, -1)
        torch.mm(b_in, d.view(f.taps, -1), out=v)
        prod = one[: f.taps * tiles * k].view(f.taps, tiles, k)
        _products(v.view(f.taps, tiles, c), weight, prod, False, f)
        t = two[: m * m * tiles * k].view(m * m, -1)
        torch.mm(b_out, prod.view(f.taps, -1), out=t)
        t = t.view(m, m, n, tr, tw, k)
        y = t.permute(2, 3, 0, 4, 1, 5)  # n tr m tw m k
        rows = min(h - m * r0, m * tr)
        dst = out_hwc[:, m * r0 : m * r0 + rows]
        if rows == m * tr and w == m * tw:
            dst = dst.view(n, tr, m, tw, m, k)
        else:
            y = y.reshape(n, m * tr, m * tw, k)[:, :rows, :w]
        if bias is None:
            dst.copy_(y)
        else:
            torch.add(y, bias, out=dst)
    return out


def conv3x3_adjoint(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv3x3`` with respect to its input: the exact adjoint of its linear
    map (output tiles -> transform domain by A, filters transposed, back by B, overlapping input
    tiles summed), so it needs no second set of transformed filters."""
    n, k, h, w = grad.shape
    c = weight.shape[1]
    f = tiling_for(grad.dtype)
    m, tile = f.m, f.t
    th, tw = -(-h // m), -(-w // m)
    a_out_t, b_in_t = f.out.T.to(grad.device, grad.dtype), f.inp.T.to(grad.device, grad.dtype)
    g = grad.permute(0, 2, 3, 1)
    acc = torch.zeros((n, th + 1, m, tw + 1, m, c), device=grad.device, dtype=grad.dtype)
    step = _band_rows(n, tw, max(c, k), f)
    for r0 in range(0, th, step):
        tr = min(step, th - r0)
        rows = min(h - m * r0, m * tr)
        tiles = n * tr * tw
        one, two = _buffers(f.taps * tiles * max(c, k), grad.device, grad.dtype)
        t = F.pad(g[:, m * r0 : m * r0 + rows], (0, 0, 0, tw * m - w, 0, tr * m - rows))
        gt = one[: m * m * tiles * k].view(m, m, n, tr, tw, k)
        gt.copy_(t.view(n, tr, m, tw, m, k).permute(2, 4, 0, 1, 3, 5))
        prod = two[: f.taps * tiles * k].view(f.taps, -1)
        torch.mm(a_out_t, gt.view(m * m, -1), out=prod)
        v = one[: f.taps * tiles * c].view(f.taps, tiles, c)
        _products(prod.view(f.taps, tiles, k), weight, v, True, f)  # (taps, tiles, in)
        t = two[: f.taps * tiles * c].view(f.taps, -1)
        torch.mm(b_in_t, v.view(f.taps, -1), out=t)
        t = t.view(tile, tile, n, tr, tw, c)
        d = t.permute(2, 3, 0, 4, 1, 5)  # n tr t tw t c
        # Overlap-add: tile rows/cols 0..m-1 land in their own m x m block, the last two in the
        # next one's first two.
        a = acc[:, r0 : r0 + tr + 1]
        a[:, :tr, :, :tw] += d[:, :, :m, :, :m]
        a[:, 1:, :2, :tw] += d[:, :, m:, :, :m]
        a[:, :tr, :, 1:, :2] += d[:, :, :m, :, m:]
        a[:, 1:, :2, 1:, :2] += d[:, :, m:, :, m:]
    full = acc.view(n, m * th + m, m * tw + m, c)[:, 1 : 1 + h, 1 : 1 + w]  # drop the padding
    out = torch.empty(
        (n, c, h, w), device=grad.device, dtype=grad.dtype, memory_format=torch.channels_last
    )
    out.permute(0, 2, 3, 1).copy_(full)
    return out


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # frozen: nothing of the input is kept
        return conv3x3(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return conv3x3_adjoint(grad, ctx.weight), None, None


class WinogradConv2d(nn.Module):
    """A frozen 3x3, stride 1, padding 1 ``nn.Conv2d`` computed by Winograd's algorithm.

    Runs in float32 (F(4x4, 3x3)), or in bfloat16 under a bf16 autocast (F(2x2, 3x3); the
    transforms and products take bf16 inputs with float32 accumulation, as oneDNN's own bf16
    convolutions do). Falls back to the wrapped convolution for other dtypes or trainable
    weights, so a model can be moved between devices and precisions freely. The wrapped
    weights are re-laid out tap-major (same values and shape).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not supports(conv):
            raise ValueError(f"Winograd F(4x4, 3x3) does not apply to {conv}")
        with torch.no_grad():
            conv.weight.data = relayout(conv.weight.data)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if dtype is None or self.conv.weight.requires_grad:
            return self.conv(x)
        weight = self.conv.weight.detach().to(dtype)  # no copy when stored in ``dtype``
        bias = self.conv.bias.detach().to(dtype) if self.conv.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _Conv3x3.apply(x.to(dtype), weight, bias)


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """float32 or bfloat16 (under a bf16 autocast, or for bf16 input), else None."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = x.dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) else None


def supports(conv: nn.Module) -> TypeGuard[nn.Conv2d]:
    """True for a plain 3x3, stride 1, padding 1 (zeros), dilation 1, ungrouped conv."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# Where the transforms cost more memory traffic than the multiplies they save: per output, the
# multiplies go with in x out and the transform traffic with in + out. Measured per layer
# (forward plus input gradient), F(4x4, 3x3) made VGG19's 64 -> 64 layer (conv1_2) slower and
# its 64 -> 128 layer (conv2_1) and the wider ones faster (figures: docs/BENCHMARKS.md).
MIN_CHANNEL_PRODUCT = 64 * 128


def convert(features: nn.Module, min_product: int = MIN_CHANNEL_PRODUCT) -> int:
    """Swap every eligible 3x3 conv in ``features`` (in place) for WinogradConv2d; returns how
    many were swapped."""
    swapped = 0
    for name, child in list(features.named_children()):
        if supports(child) and child.in_channels * child.out_channels >= min_product:
            setattr(features, name, WinogradConv2d(child))
            swapped += 1
        elif not isinstance(child, WinogradConv2d):
            swapped += convert(child, min_product)
    return swapped
