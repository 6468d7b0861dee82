"""The tile planner (core/engine/tiles.py): coverage, budget, overlaps, ramps and shifted seams."""

from __future__ import annotations

import itertools

import pytest

from core.engine import tiles


def _coverage(grid: tiles.TileGrid) -> list[list[int]]:
    counts = [[0] * grid.width for _ in range(grid.height)]
    for t in grid.tiles:
        for y in range(t.y, t.y + t.height):
            for x in range(t.x, t.x + t.width):
                counts[y][x] += 1
    return counts


@pytest.mark.parametrize(
    ("width", "height", "budget", "overlap"),
    [(300, 200, 20_000, 16), (257, 129, 9_000, 24), (512, 384, 60_000, 32), (96, 400, 12_000, 16)],
)
def test_tiles_cover_the_image_within_the_budget(width, height, budget, overlap) -> None:
    previous = None
    for _ in range(3):  # three passes, each shifted against the last
        grid = tiles.plan_grid(width, height, budget, overlap, previous)
        assert grid.largest <= budget
        counts = _coverage(grid)
        assert min(min(row) for row in counts) >= 1, "a pixel no tile paints"
        assert sum((r - x) * (b - y) for x, y, r, b in (t.core for t in grid.tiles)) == (
            width * height
        ), "the cores do not partition the image"
        for t in grid.tiles:
            x, y, r, b = t.core
            assert t.x <= x < r <= t.x + t.width and t.y <= y < b <= t.y + t.height
        assert max(max(row) for row in counts) <= 4, "more than a corner's four tiles overlap"
        for t in grid.tiles:
            assert t.x >= 0 and t.y >= 0 and t.x + t.width <= width and t.y + t.height <= height
        previous = grid


def test_a_scale_that_fits_is_one_tile() -> None:
    grid = tiles.plan_grid(200, 100, 20_000, 32)
    assert grid.tiles == (tiles.Tile(0, 0, 200, 100, 0, 0, (0, 0, 200, 100)),)
    assert grid.cuts_x == grid.cuts_y == ()


def test_neighbours_share_the_overlap_and_ramp_over_it() -> None:
    grid = tiles.plan_grid(600, 600, 40_000, 32)
    by_pos = {(t.x, t.y): t for t in grid.tiles}
    xs = sorted({t.x for t in grid.tiles})
    ys = sorted({t.y for t in grid.tiles})
    assert len(xs) > 1 and len(ys) > 1
    for t in grid.tiles:
        # A ramp exactly where an already painted neighbour (left, above) ends.
        left = [o for o in grid.tiles if o.y == t.y and o.x < t.x]
        above = [o for o in grid.tiles if o.x == t.x and o.y < t.y]
        if left:
            n = max(left, key=lambda o: o.x)
            assert t.feather_left == n.x + n.width - t.x == 32
        else:
            assert t.feather_left == 0
        if above:
            n = max(above, key=lambda o: o.y)
            assert t.feather_top == n.y + n.height - t.y == 32
        else:
            assert t.feather_top == 0
    assert (0, 0) in by_pos


def test_ramp_is_a_smooth_rise_from_zero_to_one() -> None:
    weights = tiles.ramp(8, 20)
    assert weights[8:] == [1.0] * 12
    assert 0 < weights[0] < 0.05 and weights[7] > 0.95
    assert all(a < b for a, b in itertools.pairwise(weights[:8]))
    # Two complementary ramps (left tile fading out, right tile fading in) sum to one.
    fade_in = weights[:8]
    fade_out = fade_in[::-1]
    assert all(abs(w + v - 1) < 1e-12 for w, v in zip(fade_in, fade_out, strict=True))
    # Across an overlap the ramp takes its middle half (0 before it, 1 after).
    tile = tiles.Tile(0, 0, 40, 40, 16, 0)
    wx, wy = tiles.feather(tile)
    assert wx[:4] == [0.0] * 4 and wx[4:12] == tiles.ramp(8, 8) and wx[12:] == [1.0] * 28
    assert wy == [1.0] * 40


def test_passes_move_the_seams() -> None:
    first = tiles.plan_grid(1000, 750, 200_000, 64)
    second = tiles.plan_grid(1000, 750, 200_000, 64, previous=first)
    assert first.cuts_x and first.cuts_y
    (fx, fy), (sx, sy) = first.relative_cuts(), second.relative_cuts()
    assert min(abs(a - b) for a in fx for b in sx) >= 0.1
    assert min(abs(a - b) for a in fy for b in sy) >= 0.1
    # Across scales (another size, the same picture) the relative positions still move.
    third = tiles.plan_grid(1414, 1060, 200_000, 64, previous=second)
    tx, _ = third.relative_cuts()
    assert min(abs(a - b) for a in sx for b in tx) > 0.02


def test_cuts_are_aligned_when_asked() -> None:
    grid = tiles.plan_grid(1000, 700, 100_000, 64, align=16)
    assert all(c % 16 == 0 for c in (*grid.cuts_x, *grid.cuts_y))


def test_an_impossible_budget_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fits"):
        tiles.plan_grid(1000, 1000, 50, 16)


def test_overlap_grows_with_the_tile() -> None:
    assert tiles.choose_overlap(100 * 100) == 32
    assert tiles.choose_overlap(1024 * 1024) == 128
    assert tiles.choose_overlap(1024 * 1024) % 16 == 0


def test_a_mirrored_grid_is_painted_from_the_other_end() -> None:
    """The second sweep of a tiled scale (core/engine/tiled.py) is a mirrored grid: the same
    cover and partition, its first tile at the bottom right, and each tile ramped in over the
    neighbours painted before it (right and below), not over the ones painted after it."""
    grid = tiles.plan_grid(300, 200, 20_000, 16)
    turned = grid.mirrored()
    assert _coverage(turned) == [row[::-1] for row in _coverage(grid)[::-1]]
    assert sum((r - x) * (b - y) for x, y, r, b in (t.core for t in turned.tiles)) == 300 * 200
    first, last = turned.tiles[0], turned.tiles[-1]
    assert (first.x + first.width, first.y + first.height) == (300, 200)
    assert (last.x, last.y) == (0, 0)
    assert turned.mirrored() == grid
    for plain, tile in zip(grid.tiles, turned.tiles, strict=True):
        wx, wy = tiles.feather(tile)
        px, py = tiles.feather(plain)
        assert (wx, wy) == (px[::-1], py[::-1])
        if tile.feather_left:  # its right neighbour was painted first: ramp 0 at the right edge
            assert wx[-1] == 0.0 and wx[0] == 1.0
    for i, tile in enumerate(turned.tiles):  # each ramp lies over a tile painted before it
        x, y = tile.x + tile.width - 1, tile.y + tile.height - 1  # its right and bottom edges
        mid_x, mid_y = tile.x + tile.width // 2, tile.y + tile.height // 2
        before = turned.tiles[:i]
        if tile.feather_left:
            assert any(o.x <= x < o.x + o.width and o.y <= mid_y < o.y + o.height for o in before)
        if tile.feather_top:
            assert any(o.y <= y < o.y + o.height and o.x <= mid_x < o.x + o.width for o in before)
    assert turned.cuts_x == tuple(sorted(300 - c for c in grid.cuts_x))
