"""Where the tiles of a scale too large for the memory budget go, and how they are blended.

Why tiles at all: the optimiser's memory grows with the pixels it optimises at once
(core/engine/memory_model.py), so a print-size scale is optimised a tile at a time. Style targets
come from the whole style image, content from each tile's own part of the photo.

The axis of a scale is cut into *cores* (a partition); a tile is its core grown by half the
overlap on each side that has a neighbour, so neighbouring tiles share ``overlap`` pixels. Tiles
are painted in row-major order, each starting from the image as painted so far, and blended in
with a raised-cosine ramp across the overlap on the sides whose neighbour is already painted
(left and top), from 0 at the tile's edge to 1 at the overlap's end. Sides whose neighbour
comes later are written in full, and that neighbour blends over them.

A tile is optimised with ``context`` pixels of fixed image around it (TileGrid.window), so the
pixels per step of a tiled scale are its windows' areas: the grid is chosen to make their sum
the smallest whose largest window fits the budget (fewer, larger tiles: each cut adds the
overlap and twice the context to its axis). Each tiled scale (a *pass*) moves its cuts at
least an overlap away from the last pass's, so no seam stays in one place from scale to scale:
by moving every cut of an axis (a longer first core, a shorter last), or where no such grid
fits, by one more, shifted row or column of cores.

The geometry is pure Python (no torch): :func:`plan_grid` and :class:`TileGrid`.
:func:`feather` builds a tile's blending weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHIFTS: tuple[float, ...] = (0.0, 0.5, 0.25, 0.75, 0.375, 0.625)
"""Shifts of a pass's cuts that add a core (shorter first and last cores), in cores."""
OFFSETS: tuple[float, ...] = tuple(k / 16 for k in (1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6))
"""Shifts of a pass's cuts that keep its cores (longer first core, shorter last, or the
reverse), in cores: cheaper than SHIFTS, which add a row or column of tiles."""


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
    return _aligned([(i + shift) * step for i in range(count + 1)], length, align)


def offset_cuts(length: int, count: int, offset: float, align: int = 1) -> tuple[int, ...]:
    """The ``count - 1`` cuts of ``count`` equal cores, all moved by ``offset`` cores
    (-1 < offset < 1): the first core grows by that much and the last shrinks, or the reverse."""
    step = length / count
    return _aligned([(i + offset) * step for i in range(1, count)], length, align)


def _aligned(positions: list[float], length: int, align: int) -> tuple[int, ...]:
    cuts: list[int] = []
    for p in positions:
        if not 0 < p < length:  # an edge of the image: rounded, it could make a sliver core
            continue
        pos = int(round(p / align)) * align
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


@dataclass(frozen=True)
class _Axis:
    """One axis cut at ``cuts``: its longest window and the sum of its windows' lengths (the
    grid's largest window and its pixels per step are products of the two axes')."""

    cuts: tuple[int, ...]
    longest: int
    total: int

    @classmethod
    def of(cls, length: int, cuts: tuple[int, ...], half: int, context: int) -> _Axis:
        windows = [
            min(length, end + context) - max(0, start - context)
            for start, end, *_ in spans(length, cuts, half)
        ]
        return cls(cuts, max(windows), sum(windows))

    def distance(self, previous: tuple[float, ...], length: int) -> float:
        """Pixels between these cuts and the nearest of ``previous`` (fractions of the axis)."""
        if not self.cuts or not previous:
            return math.inf
        return min(abs(c - p * length) for c in self.cuts for p in previous)


def _cores_ok(length: int, cuts: tuple[int, ...], shortest: int) -> bool:
    bounds = (0, *cuts, length)
    return all(b - a >= shortest for a, b in zip(bounds, bounds[1:], strict=False))


def _candidates(length: int, count: int, half: int, context: int, align: int) -> list[_Axis]:
    """An axis in ``count`` cores: unshifted (what _counts planned), then its cuts moved by
    each of OFFSETS, then the shifted grids of SHIFTS (one more core); the moved ones only
    where no core is shorter than the overlap."""
    plain = cuts_for(length, count, 0.0, align)
    moved = [offset_cuts(length, count, o, align) for o in OFFSETS] if count > 1 else []
    moved += [cuts_for(length, count, s, align) for s in SHIFTS[1:]] if count > 1 else []
    ok = (c for c in moved if _cores_ok(length, c, max(2 * half, 1)))
    return [_Axis.of(length, cuts, half, context) for cuts in dict.fromkeys((plain, *ok))]


def _counts(
    width: int, height: int, max_pixels: int, half: int, context: int, align: int
) -> tuple[int, int]:
    """Cores per axis: the fewest pixels per step over all windows (overlaps and context
    included) whose unshifted grid's largest window fits in ``max_pixels``."""

    def axes(length: int) -> list[tuple[int, _Axis]]:
        counts = range(1, max(1, length // max(1, 2 * half)) + 1)
        return [
            (n, _Axis.of(length, cuts_for(length, n, 0.0, align), half, context)) for n in counts
        ]

    best: tuple[int, int, int, int] | None = None
    rows = axes(height)
    for nx, ax in axes(width):
        for ny, ay in rows:
            if ax.longest * ay.longest <= max_pixels:
                key = (ax.total * ay.total, nx * ny, nx, ny)
                best = key if best is None or key < best else best
                break  # more rows only cost more
    if best is None:
        raise ValueError(f"no grid of {width}x{height} fits windows of {max_pixels} pixels")
    return best[2], best[3]


def plan_grid(
    width: int,
    height: int,
    max_pixels: int,
    overlap: int,
    previous: TileGrid | None = None,
    align: int = 1,
    context: int = 0,
) -> TileGrid:
    """Tiles covering ``width`` x ``height``, neighbours sharing ``overlap`` pixels (rounded
    down to an even number), no tile's window (the tile grown by ``context``, within the image:
    TileGrid.window) over ``max_pixels`` pixels, and the fewest pixels per step over all
    windows, the measure of a tiled scale's time.

    When ``previous`` (another pass, maybe at another scale: positions are compared as
    fractions) has cuts, the cheapest grid whose cuts are at least ``overlap`` pixels from
    them is taken (apart, the two passes' ramps do not fall on each other), else the one
    farthest from them. Raises ValueError when not even the smallest grid fits."""
    half = overlap // 2
    if width * height <= max_pixels:
        whole = Tile(0, 0, width, height, 0, 0, (0, 0, width, height))
        return TileGrid(width, height, (whole,), (), (), 2 * half, context)
    nx, ny = _counts(width, height, max_pixels, half, context, align)
    prev_x, prev_y = previous.relative_cuts() if previous is not None else ((), ())
    best: tuple[tuple[float, int, int], _Axis, _Axis] | None = None
    for ax in _candidates(width, nx, half, context, align):
        apart_x = ax.distance(prev_x, width)
        for ay in _candidates(height, ny, half, context, align):
            if ax.longest * ay.longest > max_pixels:
                continue
            apart = min(apart_x, ay.distance(prev_y, height), 2 * half)
            key = (apart, -ax.total * ay.total, -ax.longest * ay.longest)
            if best is None or key > best[0]:
                best = (key, ax, ay)
    assert best is not None  # the unshifted grid fits (_counts)
    _, ax, ay = best
    tiles = tuple(
        Tile(x0, y0, x1 - x0, y1 - y0, ramp_x, ramp_y, (cx0, cy0, cx1, cy1))
        for y0, y1, ramp_y, cy0, cy1 in spans(height, ay.cuts, half)
        for x0, x1, ramp_x, cx0, cx1 in spans(width, ax.cuts, half)
    )
    return TileGrid(width, height, tiles, ax.cuts, ay.cuts, 2 * half, context)


def ramp(width: int, length: int) -> list[float]:
    """Weights over ``length`` samples: a raised cosine from 0 to 1 over the first ``width``,
    then 1."""
    out = [1.0] * length
    for k in range(min(width, length)):
        out[k] = 0.5 - 0.5 * math.cos(math.pi * (k + 0.5) / width)
    return out


def feather(tile: Tile) -> tuple[list[float], list[float]]:
    """A tile's blending weights as (per column, per row); the weight of pixel (x, y) is their
    product. 1 where the tile has no painted neighbour; across an overlap, a ramp over all of
    it. The ramp is kept narrow (an overlap is a sixteenth of a tile's side: choose_overlap's
    caller), because across it two brush textures are averaged and flattened."""
    return ramp(tile.feather_left, tile.width), ramp(tile.feather_top, tile.height)


def choose_overlap(max_pixels: int, minimum: int = 32, share: float = 0.125, step: int = 16) -> int:
    """Overlap (or context) for tiles of up to ``max_pixels``: ``share`` of a tile's side, at
    least ``minimum``, rounded down to a multiple of ``step`` (16: the deepest VGG19 layer's
    stride)."""
    side = math.sqrt(max_pixels)
    return max(minimum, int(side * share) // step * step)
