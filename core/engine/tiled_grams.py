"""Gram matrices of an image too large for one forward pass, computed tile by tile.

A Gram matrix is a sum over positions (divided by their number), so it splits over a partition
of the positions: each tile's core contributes its positions' products, and the sum is divided
by the total. A tile is its core plus a margin on the inner sides, so the features of a core's
positions see (nearly) the context they have in the whole image; core boundaries are multiples
of the deepest layer's stride, so every layer's feature grid splits exactly. What is left is the
margin's reach: features whose receptive field crosses the margin see zero padding instead of
the image (VGG19's relu5_1 reaches far, but its weight near the edge of the field is small;
tests/test_tiled_grams.py measures the difference).

Used for the style targets when a style image's forward pass would not fit the memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from core.engine import tiles
from core.engine.losses import gram

ALIGN = 16
"""Core boundaries are multiples of this: the stride of VGG19's relu5_1 (four poolings)."""
MARGIN = 64
"""Context around each core, in pixels (a multiple of ALIGN)."""


def min_window(margin: int = MARGIN) -> int:
    """The fewest pixels a tile (core and margins) may have: any image splits into such tiles
    (cores of 128 px and more at the default margin; tests/test_tiled_grams.py). A budget that
    leaves less room is exceeded by at most such a tile's forward pass (75 MB in bf16) rather
    than refused."""
    return (4 * margin + 2 * ALIGN) ** 2


MIN_WINDOW = min_window()


def tiled_grams(
    forward: Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]],
    image: torch.Tensor,
    layers: Sequence[str],
    max_pixels: int,
    margin: int = MARGIN,
) -> dict[str, torch.Tensor]:
    """The Gram matrix (divided by the number of positions) of each of ``layers`` for the
    (1, C, H, W) ``image``, from forward passes over tiles of at most ``max_pixels`` pixels."""
    _, _, height, width = image.shape
    window = max(max_pixels, min_window(margin))
    grid = tiles.plan_grid(width, height, window, 2 * margin, align=ALIGN)
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    for tile in grid.tiles:
        with torch.no_grad():
            feats = forward(
                image[:, :, tile.y : tile.y + tile.height, tile.x : tile.x + tile.width], layers
            )
            for name in layers:
                part = _crop(feats[name], tile)
                positions = part.shape[-1] * part.shape[-2]
                if positions == 0:
                    continue
                total = gram(part).mul_(positions)
                sums[name] = sums[name].add_(total) if name in sums else total
                counts[name] += positions
        del feats
    return {name: sums[name].div_(counts[name]) for name in layers}


def _crop(feat: torch.Tensor, tile: tiles.Tile) -> torch.Tensor:
    """The core's positions of a tile's activation. The layer's stride is a power of two read
    off the shapes; an edge core keeps every position up to the activation's own edge (the
    pooling floors, as it does for the whole image)."""
    fh, fw = feat.shape[-2:]
    stride = 2 ** round(math.log2(max(1.0, tile.width / max(1, fw))))
    left, top, right, bottom = tile.core
    x0, y0 = (left - tile.x) // stride, (top - tile.y) // stride
    x1 = fw if right == tile.x + tile.width else (right - tile.x) // stride
    y1 = fh if bottom == tile.y + tile.height else (bottom - tile.y) // stride
    return feat[:, :, y0:y1, x0:x1]
