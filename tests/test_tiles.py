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
    # Across an overlap the ramp rises over all of it (1 after).
    tile = tiles.Tile(0, 0, 40, 40, 16, 0)
    wx, wy = tiles.feather(tile)
    assert wx[:16] == tiles.ramp(16, 16) and wx[16:] == [1.0] * 24
    assert wy == [1.0] * 40


def test_passes_move_the_seams() -> None:
    first = tiles.plan_grid(1000, 750, 200_000, 64)
    second = tiles.plan_grid(1000, 750, 200_000, 64, previous=first)
    assert first.cuts_x and first.cuts_y
    (fx, fy), (sx, sy) = first.relative_cuts(), second.relative_cuts()
    # At least an overlap apart: the two passes' ramps (each across its overlap) never overlap.
    assert min(abs(a - b) for a in fx for b in sx) * 1000 >= 64
    assert min(abs(a - b) for a in fy for b in sy) * 750 >= 64
    # Across scales (another size, the same picture) the relative positions still move.
    third = tiles.plan_grid(1414, 1060, 200_000, 64, previous=second)
    tx, _ = third.relative_cuts()
    assert min(abs(a - b) for a in sx for b in tx) > 0.02


def test_cuts_are_aligned_when_asked() -> None:
    grid = tiles.plan_grid(1000, 700, 100_000, 64, align=16)
    assert all(c % 16 == 0 for c in (*grid.cuts_x, *grid.cuts_y))


def test_aligned_cuts_never_make_a_sliver_at_the_image_edge() -> None:
    # 533 is not a multiple of 16: the image's own edge, rounded to 528, used to be taken for a
    # cut, leaving a 5 px core (and, once such cores were refused, no grid at all).
    assert tiles.cuts_for(533, 1, 0.0, align=16) == ()
    assert tiles.cuts_for(533, 2, 0.0, align=16) == (272,)
    for width in range(600, 1300, 37):
        grid = tiles.plan_grid(width, width * 3 // 4, 300_000, 128, align=16)
        for axis, length in ((grid.cuts_x, grid.width), (grid.cuts_y, grid.height)):
            bounds = (0, *axis, length)
            assert min(b - a for a, b in zip(bounds, bounds[1:], strict=False)) >= 64


def test_an_impossible_budget_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fits"):
        tiles.plan_grid(1000, 1000, 50, 16)


def test_overlap_grows_with_the_tile() -> None:
    assert tiles.choose_overlap(100 * 100) == 32
    assert tiles.choose_overlap(1024 * 1024) == 128
    assert tiles.choose_overlap(1024 * 1024) % 16 == 0


def test_windows_with_context_fit_and_the_grid_is_the_cheapest() -> None:
    # The 1024x768 scale of a 1024 px run with --max-memory 1.5GB (windows of 339k pixels,
    # context 72, overlap 48): planning tiles for the tile's size alone (the window less its
    # context on both sides, as a square) cut it into 4 x 2 tiles, 1.95x the scale's pixels
    # per step; with the real windows it fits 2 x 2, 1.49x.
    budget, overlap, context = 339_000, 48, 72
    grid = tiles.plan_grid(1024, 768, budget, overlap, context=context)
    windows = [grid.window(t) for t in grid.tiles]
    assert len(grid.tiles) == 4
    assert max((r - x) * (b - y) for x, y, r, b in windows) <= budget
    assert sum((r - x) * (b - y) for x, y, r, b in windows) < 1.5 * 1024 * 768
    # The next pass (here: the previous scale, cut in two columns) moves its cuts an overlap
    # away and keeps four tiles, still within the budget.
    previous = tiles.plan_grid(724, 543, 300_000, overlap, context=context)
    assert len(previous.cuts_x) == 1 and not previous.cuts_y
    moved = tiles.plan_grid(1024, 768, budget, overlap, previous, context=context)
    assert len(moved.tiles) == 4
    assert min(abs(c - previous.cuts_x[0] / 724 * 1024) for c in moved.cuts_x) >= overlap
    assert moved.largest_window <= budget
