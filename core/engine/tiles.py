"""Where the tiles of a scale too large for the memory budget go, and how they are blended.

Why tiles at all: the optimiser's memory grows with the pixels it optimises at once
(core/engine/memory_model.py), so a print-size scale is optimised a tile at a time. Style targets
come from the whole style image, content from each tile's own part of the photo.

The axis of a scale is cut into *cores* (a partition); a tile is its core grown by half the
overlap on each side that has a neighbour, so neighbouring tiles share ``overlap`` pixels. Tiles
are painted in row-major order, each starting from the image as painted so far, and blended in
with a raised-cosine ramp across the overlap on the sides whose neighbour is already painted
(left and top): the ramp is 0 at the tile's edge, where zero padding distorts the network's
view, and 1 where the tile's own interior begins. Sides whose neighbour comes later are written
in full, and that neighbour blends over them.

Each tiled scale (a *pass*) shifts its cuts so that they fall as far as possible from the last
pass's cuts, so no seam stays in one place from scale to scale. A shifted axis has one more
core, none longer than the unshifted ones, so every tile still fits the budget.

The geometry is pure Python (no torch): :func:`plan_grid` and :class:`TileGrid`.
:func:`feather` builds a tile's blending weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHIFTS: tuple[float, ...] = (0.0, 0.5, 0.25, 0.75, 0.375, 0.625)
"""Candidate offsets of a pass's cuts, in cores; the first core is never under a quarter core."""


@dataclass(frozen=True)
class Tile:
    """A rectangle of the scale's image, and the ramps it is blended with."""

    x: int
    y: int
    width: int
    height: int
    feather_left: int  # ramp width toward an already painted neighbour (0: none)
    feather_top: int
    core: tuple[int, int, int, int] = (0, 0, 0, 0)  # (left, top, right, bottom): the tile
    # less its overlaps; the cores of a grid partition the image

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), as PIL's ``crop`` takes it."""
        return self.x, self.y, self.x + self.width, self.y + self.height


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one pass over a ``width`` x ``height`` image, in painting order."""

    width: int
    height: int
    tiles: tuple[Tile, ...]
    cuts_x: tuple[int, ...]  # seam positions (core boundaries) along each axis
    cuts_y: tuple[int, ...]
    overlap: int
    context: int = 0
    """Pixels of fixed image around each tile that the network sees but the optimiser does not
    change (see :meth:`window`)."""

    def window(self, tile: Tile) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of what the network sees when ``tile`` is optimised: the
        tile grown by ``context`` on each side, within the image. Without it, the tile's edges
        would meet zero padding where the image goes on, and the deep layers (VGG19's relu5_1
        sees ~200 px around a position) would see a different picture than the whole's."""
        c = self.context
        return (
            max(0, tile.x - c),
            max(0, tile.y - c),
            min(self.width, tile.x + tile.width + c),
            min(self.height, tile.y + tile.height + c),
        )

    @property
    def largest_window(self) -> int:
        boxes = (self.window(t) for t in self.tiles)
        return max((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes)

    @property
    def pixels(self) -> int:
        """Pixels optimised per step over all tiles (overlaps counted twice)."""
        return sum(t.pixels for t in self.tiles)

    @property
    def largest(self) -> int:
        return max(t.pixels for t in self.tiles)

    def relative_cuts(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Seams as fractions of each axis (passes at other scales compare these)."""
        return (
            tuple(c / self.width for c in self.cuts_x),
            tuple(c / self.height for c in self.cuts_y),
        )


def cuts_for(length: int, count: int, shift: float, align: int = 1) -> tuple[int, ...]:
    """Core boundaries of ``count`` equal cores shifted by ``shift`` cores (0 <= shift < 1).

    Unshifted: ``count - 1`` cuts; shifted: ``count`` cuts (one more, shorter first and last
    core). Positions are rounded to multiples of ``align``."""
    step = length / count
    cuts: list[int] = []
    for i in range(count + 1):
        pos = int(round((i + shift) * step / align)) * align
        if 0 < pos < length and (not cuts or pos > cuts[-1]):
            cuts.append(pos)
    return tuple(cuts)


def spans(length: int, cuts: tuple[int, ...], half: int) -> list[tuple[int, int, int, int, int]]:
    """(start, end, ramp, core start, core end) per core: each grown by ``half`` on its inner
    sides; the ramp is the width shared with the previous tile (0 for the first)."""
    bounds = (0, *cuts, length)
    out: list[tuple[int, int, int, int, int]] = []
    for i in range(len(bounds) - 1):
        start = max(0, bounds[i] - half) if i > 0 else 0
        end = min(length, bounds[i + 1] + half) if i < len(bounds) - 2 else length
        out.append((start, end, out[-1][1] - start if out else 0, bounds[i], bounds[i + 1]))
    return out


def _cores_ok(length: int, cuts: tuple[int, ...], shortest: int) -> bool:
    bounds = (0, *cuts, length)
    return all(b - a >= shortest for a, b in zip(bounds, bounds[1:], strict=False))


def _best_shift(
    length: int, count: int, previous: tuple[float, ...], overlap: int, align: int
) -> tuple[int, ...]:
    """The cuts, among SHIFTS, farthest from ``previous`` (fractions of the axis), with no core
    shorter than the overlap."""
    plain = cuts_for(length, count, 0.0, align)
    if count == 1 or not previous:
        return plain
    best: tuple[float, tuple[int, ...]] = (-1.0, plain)
    for shift in SHIFTS:
        cuts = cuts_for(length, count, shift, align)
        if not _cores_ok(length, cuts, max(overlap, 1)):
            continue
        distance = min(abs(c / length - p) for c in cuts for p in previous)
        if distance > best[0] + 1e-9:
            best = (distance, cuts)
    return best[1]


def _counts(width: int, height: int, max_pixels: int, overlap: int, align: int) -> tuple[int, int]:
    """Cores per axis: the fewest pixels per step (overlaps included) whose largest tile, grown
    by the overlap, stays within ``max_pixels``."""

    def side(length: int, n: int) -> int:  # the longest tile along an axis cut into n cores
        return length if n == 1 else math.ceil(length / n) + align + overlap

    best: tuple[int, int, int] | None = None
    for nx in range(1, max(1, width // max(1, overlap)) + 1):
        room = max_pixels // side(width, nx)
        for ny in range(1, max(1, height // max(1, overlap)) + 1):
            if side(height, ny) <= room:
                cost = (width + nx * overlap) * (height + ny * overlap)
                if best is None or (cost, nx * ny) < (best[0], best[1] * best[2]):
                    best = (cost, nx, ny)
                break
    if best is None:
        raise ValueError(f"no grid of {width}x{height} fits tiles of {max_pixels} pixels")
    return best[1], best[2]


def plan_grid(
    width: int,
    height: int,
    max_pixels: int,
    overlap: int,
    previous: TileGrid | None = None,
    align: int = 1,
) -> TileGrid:
    """Tiles covering ``width`` x ``height``, none over ``max_pixels`` pixels, neighbours
    sharing ``overlap`` pixels (rounded down to an even number), cuts shifted away from
    ``previous``'s (relative positions, so the previous pass may be another scale).

    The counts are chosen for the worst case (a shifted axis, whose cores are at most as long
    as unshifted ones, each tile grown by the whole overlap), so any shift fits.
    Raises ValueError when not even the smallest grid fits."""
    half = overlap // 2
    if width * height <= max_pixels:
        whole = Tile(0, 0, width, height, 0, 0, (0, 0, width, height))
        return TileGrid(width, height, (whole,), (), (), 2 * half)
    nx, ny = _counts(width, height, max_pixels, 2 * half, align)
    prev_x, prev_y = previous.relative_cuts() if previous is not None else ((), ())
    cuts_x = _best_shift(width, nx, prev_x, 2 * half, align)
    cuts_y = _best_shift(height, ny, prev_y, 2 * half, align)
    tiles = tuple(
        Tile(x0, y0, x1 - x0, y1 - y0, ramp_x, ramp_y, (cx0, cy0, cx1, cy1))
        for y0, y1, ramp_y, cy0, cy1 in spans(height, cuts_y, half)
        for x0, x1, ramp_x, cx0, cx1 in spans(width, cuts_x, half)
    )
    return TileGrid(width, height, tiles, cuts_x, cuts_y, 2 * half)


def ramp(width: int, length: int, lead: int = 0) -> list[float]:
    """Weights over ``length`` samples: 0 for the first ``lead``, then a raised cosine from 0
    to 1 over ``width``, then 1."""
    out = [0.0] * min(lead, length) + [1.0] * max(0, length - lead)
    for k in range(width):
        if lead + k < length:
            out[lead + k] = 0.5 - 0.5 * math.cos(math.pi * (k + 0.5) / width)
    return out


def feather(tile: Tile) -> tuple[list[float], list[float]]:
    """A tile's blending weights as (per column, per row); the weight of pixel (x, y) is their
    product. 1 where the tile has no painted neighbour; across an overlap, a ramp over its
    middle half. The tiles are painted with context around them (TileGrid.window), so both
    sides of an overlap already agree near its middle; a ramp across all of it averaged two
    brush textures over a wider band and measurably flattened them there."""
    left, top = tile.feather_left, tile.feather_top
    return ramp(left - left // 2, tile.width, left // 4), ramp(
        top - top // 2, tile.height, top // 4
    )


def choose_overlap(max_pixels: int, minimum: int = 32, share: float = 0.125) -> int:
    """Overlap for tiles of up to ``max_pixels``: an eighth of a tile's side, at least
    ``minimum`` and a multiple of 16 (the deepest VGG19 layer's stride)."""
    side = math.sqrt(max_pixels)
    return max(minimum, int(side * share) // 16 * 16)
