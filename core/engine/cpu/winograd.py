"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for frozen weights on CPUs.

Why: on a CPU without a fast low-precision path (no AMX), VGG19's 3x3 convolutions run at
close to the peak fp32 rate, so the only way to make a step much cheaper is fewer multiplies.
F(4x4, 3x3) (Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks*, 2016) needs
2.25 per output instead of 9: every 6x6 input tile and every filter go to the transform domain,
where the convolution becomes 36 independent matrix products (one ``bmm``), and the 36 products
come back as a 4x4 output tile. The transforms are two small GEMMs with fixed Kronecker
matrices. The result equals the direct convolution up to fp32 rounding (relative error ~1e-5,
checked in tests/test_winograd.py and reported as a loss difference by the benchmark).

Style transfer never trains the network. The gradient with respect to the input is the exact
adjoint of the same computation (the same transformed filters, transposed), so L-BFGS sees
gradients consistent with the loss, and nothing of the input is saved for the backward pass.
The transformed filters are 4x the size of the filters (205 MB for VGG19 up to conv5_1), so
they are not kept: each call transforms its layer's filters (``G g G^T``, one small GEMM, about
1.4 ms for a 512x512 layer, ~2 % of a step) half of the taps at a time into a reused
scratch buffer, which keeps the model at its own size.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

# Transform matrices for F(4, 3) with interpolation points 0, +-1, +-2, inf (Lavin & Gray).
_BT = torch.tensor(
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
_G = torch.tensor(
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
_AT = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=torch.float64,
)
# Two-sided transforms of a flattened tile: vec(B^T d B) = kron(B^T, B^T) vec(d).
_IN = torch.kron(_BT, _BT).float()  # (36, 36)
_OUT = torch.kron(_AT, _AT).float()  # (16, 36)
TILE, OUT_TILE = 6, 4


_FILTER = torch.kron(_G, _G).float()  # (36, 9): vec(G g G^T) = kron(G, G) vec(g), per tap


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


def _band_rows(n: int, tiles_wide: int, channels: int) -> int:
    return max(1, BAND_ELEMENTS // (TILE * TILE * n * tiles_wide * channels))


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


def _buffers(numel: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return _scratch("one", numel, device, dtype), _scratch("two", numel, device, dtype)


# Taps whose transformed filters are made at a time: half of the 36, so the scratch for them is
# 19 MB for a 512 x 512 layer instead of 38 MB (a quarter made the products ~5 % slower).
TAP_GROUP = 18


def _filters(weight: torch.Tensor, first: int) -> torch.Tensor:
    """Transformed filters of taps ``first ... first + TAP_GROUP - 1``, (TAP_GROUP, in, out), in
    a shared scratch buffer (valid until the next call on this thread)."""
    k, c = weight.shape[:2]
    buf = _scratch("filters", TAP_GROUP * c * k, weight.device, weight.dtype)
    rows = _FILTER[first : first + TAP_GROUP].to(weight.device, weight.dtype)
    torch.mm(rows, filter_taps(weight), out=buf.view(TAP_GROUP, c * k))
    return buf.view(TAP_GROUP, c, k)


def _products(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, adjoint: bool) -> None:
    """``out[t] = a[t] @ U[t]`` (or ``U[t]^T`` for the adjoint) for all 36 taps, where ``U`` are
    the transformed filters: the convolution proper, one batched GEMM per tap group."""
    for first in range(0, TILE * TILE, TAP_GROUP):
        u = _filters(weight, first)
        taps = slice(first, first + TAP_GROUP)
        torch.bmm(a[taps], u.transpose(1, 2) if adjoint else u, out=out[taps])


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (weights best stored by ``relayout``).

    The result is channels_last (as the backbone's activations are); ``x`` may be either layout.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // OUT_TILE), -(-w // OUT_TILE)
    b_in, b_out = _IN.to(x.device, x.dtype), _OUT.to(x.device, x.dtype)
    # Zero padding: 1 for the convolution, plus whatever completes the last tile.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + tw * 4 - w, 1, 1 + th * 4 - h))
    # Written straight into a fresh channels_last tensor (not a view, so ReLU may work in place).
    out = torch.empty(
        (n, k, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last
    )
    out_hwc = out.permute(0, 2, 3, 1)
    step = _band_rows(n, tw, max(c, k))
    for r0 in range(0, th, step):
        tr = min(step, th - r0)
        tiles = n * tr * tw
        one, two = _buffers(TILE * TILE * tiles * max(c, k), x.device, x.dtype)
        t = xp[:, 4 * r0 : 4 * (r0 + tr) + 2].unfold(1, TILE, OUT_TILE).unfold(2, TILE, OUT_TILE)
        d = one[: TILE * TILE * tiles * c].view(6, 6, n, tr, tw, c)
        d.copy_(t.permute(4, 5, 0, 1, 2, 3))  # n tr tw c 6 6 -> (6, 6, n, tr, tw, c)
        v = two[: TILE * TILE * tiles * c].view(TILE * TILE, -1)
        torch.mm(b_in, d.view(TILE * TILE, -1), out=v)
        m = one[: TILE * TILE * tiles * k].view(TILE * TILE, tiles, k)
        _products(v.view(TILE * TILE, tiles, c), weight, m, adjoint=False)
        t = two[: 16 * tiles * k].view(16, -1)
        torch.mm(b_out, m.view(TILE * TILE, -1), out=t)
        t = t.view(4, 4, n, tr, tw, k)
        y = t.permute(2, 3, 0, 4, 1, 5)  # n tr 4 tw 4 k
        rows = min(h - 4 * r0, 4 * tr)
        dst = out_hwc[:, 4 * r0 : 4 * r0 + rows]
        if rows == 4 * tr and w == 4 * tw:
            dst = dst.view(n, tr, 4, tw, 4, k)
        else:
            y = y.reshape(n, 4 * tr, 4 * tw, k)[:, :rows, :w]
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
    th, tw = -(-h // OUT_TILE), -(-w // OUT_TILE)
    a_out_t, b_in_t = _OUT.T.to(grad.device, grad.dtype), _IN.T.to(grad.device, grad.dtype)
    g = grad.permute(0, 2, 3, 1)
    acc = torch.zeros((n, th + 1, 4, tw + 1, 4, c), device=grad.device, dtype=grad.dtype)
    step = _band_rows(n, tw, max(c, k))
    for r0 in range(0, th, step):
        tr = min(step, th - r0)
        rows = min(h - 4 * r0, 4 * tr)
        tiles = n * tr * tw
        one, two = _buffers(TILE * TILE * tiles * max(c, k), grad.device, grad.dtype)
        t = F.pad(g[:, 4 * r0 : 4 * r0 + rows], (0, 0, 0, tw * 4 - w, 0, tr * 4 - rows))
        gt = one[: 16 * tiles * k].view(4, 4, n, tr, tw, k)
        gt.copy_(t.view(n, tr, 4, tw, 4, k).permute(2, 4, 0, 1, 3, 5))
        m = two[: TILE * TILE * tiles * k].view(TILE * TILE, -1)
        torch.mm(a_out_t, gt.view(16, -1), out=m)
        v = one[: TILE * TILE * tiles * c].view(TILE * TILE, tiles, c)
        _products(m.view(TILE * TILE, tiles, k), weight, v, adjoint=True)  # (36, tiles, in)
        t = two[: TILE * TILE * tiles * c].view(TILE * TILE, -1)
        torch.mm(b_in_t, v.view(TILE * TILE, -1), out=t)
        t = t.view(6, 6, n, tr, tw, c)
        d = t.permute(2, 3, 0, 4, 1, 5)  # n tr 6 tw 6 c
        # Overlap-add: tile rows/cols 0-3 land in their own 4x4 block, 4-5 in the next one's 0-1.
        a = acc[:, r0 : r0 + tr + 1]
        a[:, :tr, :, :tw] += d[:, :, :4, :, :4]
        a[:, 1:, :2, :tw] += d[:, :, 4:, :, :4]
        a[:, :tr, :, 1:, :2] += d[:, :, :4, :, 4:]
        a[:, 1:, :2, 1:, :2] += d[:, :, 4:, :, 4:]
    full = acc.view(n, 4 * th + 4, 4 * tw + 4, c)[:, 1 : 1 + h, 1 : 1 + w]  # drop the padding
    out = torch.empty(
        (n, c, h, w), device=grad.device, dtype=grad.dtype, memory_format=torch.channels_last
    )
    out.permute(0, 2, 3, 1).copy_(full)
    return out


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.weight = weight  # frozen: nothing of the input is kept
        return conv3x3(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return conv3x3_adjoint(grad, ctx.weight), None, None


class WinogradConv2d(nn.Module):
    """A frozen 3x3, stride 1, padding 1 ``nn.Conv2d`` computed by F(4x4, 3x3).

    Runs in float32, or in bfloat16 under a bf16 autocast (the transforms and the products
    then take bf16 inputs with float32 accumulation, as oneDNN's own bf16 convolutions do: on
    CPUs with fast bf16 dot products the products cost half as much or less; whether that
    pays, and whether it is accurate enough, is measured by ``core.engine.probe``). Falls back
    to the wrapped convolution for other dtypes or trainable weights, so a model can be moved
    between devices and precisions freely. The wrapped weights are re-laid out tap-major (same
    values and shape).
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


def supports(conv: nn.Module) -> bool:
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
# multiplies go with in x out and the transform traffic with in + out. On the 2-core AVX512
# machine, F(4x4, 3x3) made VGG19's 64 -> 64 layer (conv1_2) 1.2x slower and its 64 -> 128
# layer (conv2_1) 1.3x faster, the wider ones 1.9-3.4x faster (forward plus input gradient,
# 512x384 input; docs/BENCHMARKS.md).
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
