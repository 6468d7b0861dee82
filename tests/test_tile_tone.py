"""A tile's tone is bent towards its painted neighbours' before it is blended in
(core/engine/tile_tone.py): in full across the overlap, fading out over half the tile, smooth,
and never touching the tile's texture."""

from __future__ import annotations

import torch

from core.engine.tile_tone import FADE_SHARE, match_tone
from core.engine.tiles import Tile

H, W, OVERLAP = 48, 64, 8


def textured(offset: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return offset + 0.05 * torch.rand((1, 3, H, W), generator=gen)


def test_a_tile_without_painted_neighbours_is_left_alone() -> None:
    painted = textured(0.5)
    assert match_tone(Tile(0, 0, W, H, 0, 0), textured(0.7, seed=1), painted) is painted


def test_the_neighbours_tone_is_carried_in_and_fades_out_over_half_the_tile() -> None:
    painted, before = textured(0.5), textured(0.6, seed=1)  # the left neighbour is 0.1 lighter
    change = match_tone(Tile(0, 0, W, H, OVERLAP, 0), before, painted) - painted
    across = change[0, 0].mean(dim=0)  # per column
    assert torch.allclose(across[:OVERLAP], torch.full((OVERLAP,), 0.1), atol=0.01)
    fade_end = OVERLAP + round(W * FADE_SHARE)
    assert across[fade_end:].abs().max() < 1e-6  # the tile's own tone beyond the fade
    assert (across[1:] <= across[:-1] + 1e-4).all()  # falls off monotonically
    # Tone only: the change is smooth along the overlap (the textures' noise averaged out)
    # and the same in every channel here, so the tile's texture passes through untouched.
    assert change[0, :, :, 0].std(dim=1).max() < 0.005
    assert torch.allclose(change[0, 0], change[0, 2], atol=0.005)


def test_in_the_corner_two_neighbours_are_averaged_not_added() -> None:
    painted = textured(0.5)
    before = painted.clone()
    before[..., :, :OVERLAP] += 0.1  # the left neighbour 0.1 lighter
    before[..., :OVERLAP, OVERLAP:] += 0.1  # and the top one
    change = match_tone(Tile(0, 0, W, H, OVERLAP, OVERLAP), before, painted) - painted
    corner = float(change[0, 0, OVERLAP // 2, OVERLAP // 2])
    assert abs(corner - 0.1) < 0.02, corner  # both say 0.1: averaged, not added
    assert abs(float(change[0, 0, H - 1, 2]) - 0.1) < 0.02  # along the left edge, far from the top
    assert abs(float(change[0, 0, 2, W - 1]) - 0.1) < 0.02  # along the top edge, far from the left
