"""A tile's tone carried over from its painted neighbours before it is blended in.

Why: each tile is optimised on its own, and two neighbours can settle on tones a few percent
apart (their Gram targets differ: core/engine/tiled.py). The blend's ramp is narrow (a
sixteenth of a tile's side, so that two brush textures are averaged over few pixels), so such
a difference showed as a tile-shaped patch with a visible edge in flat areas (a 2048 px
painting's orange block; a flat magenta tile in a 21-tile grid).

The remedy is the low band of Burt and Adelson's multiresolution spline (*A Multiresolution
Spline With Application to Image Mosaics*, 1983): low frequencies are blended over a much wider
transition than high ones. Here the transition is the new tile's own first half: where the
tile overlaps painted neighbours, the difference between their pixels and the tile's (averaged
across the overlap, smoothed along it) is its tone error; that difference is added to the tile,
in full at the overlap and fading out over half the tile, before the usual narrow blend. The
texture is the tile's own throughout; only its tone bends towards its neighbours'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.engine.tiles import Tile, ramp

FADE_SHARE = 0.5
"""How far into the tile the correction fades out, as a share of its side: the tone then turns
from the neighbours' to the tile's own over half a tile instead of over the overlap."""
SMOOTH_SHARE = 1 / 8
"""Standard deviation of the smoothing along an overlap, as a share of the tile's side: what is
left is tone; brush strokes (a few to a few tens of pixels) average out."""


def match_tone(tile: Tile, before: torch.Tensor, painted: torch.Tensor) -> torch.Tensor:
    """``painted`` (the tile's optimised pixels) with its tone bent towards the painted
    neighbours in ``before`` (the canvas under the tile, whose overlaps with earlier tiles
    hold their pixels). A tile without painted neighbours comes back unchanged."""
    left, top = tile.feather_left, tile.feather_top
    if not left and not top:
        return painted
    _, _, h, w = painted.shape

    def diff(rows: slice, cols: slice) -> torch.Tensor:
        """Neighbours' pixels less the tile's, over one overlap only (no full-size copy)."""
        return before[:, :, rows, cols].to(painted.dtype) - painted[:, :, rows, cols]

    field = torch.zeros_like(painted[:, :, :1, :1]).expand(-1, -1, h, w)
    weight_sum = torch.zeros((1, 1, h, w), dtype=painted.dtype, device=painted.device)
    weight_max = torch.zeros_like(weight_sum)
    if left:
        along = _smooth(diff(slice(None), slice(0, left)).mean(dim=3), _sigma(h))  # (1, C, h)
        wl = _fade(left, w, painted).view(1, 1, 1, w)
        field = field + along.unsqueeze(3) * wl
        weight_sum, weight_max = weight_sum + wl, torch.maximum(weight_max, wl)
    if top:
        along = _smooth(diff(slice(0, top), slice(None)).mean(dim=2), _sigma(w))  # (1, C, w)
        wt = _fade(top, h, painted).view(1, 1, h, 1)
        field = field + along.unsqueeze(2) * wt
        weight_sum, weight_max = weight_sum + wt, torch.maximum(weight_max, wt)
    # Where both overlaps reach (the corner), the mean of the two estimates, not their sum.
    return painted + field * (weight_max / weight_sum.clamp(min=1e-6))


def _fade(overlap: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """1 across the overlap, then the blend's raised cosine (tiles.ramp) turned down to 0 over
    FADE_SHARE of the side."""
    span = max(1, round(length * FADE_SHARE))
    down = [1.0] * min(overlap, length) + [1.0 - v for v in ramp(span, max(0, length - overlap))]
    return torch.tensor(down, dtype=like.dtype, device=like.device)


def _sigma(length: int) -> float:
    return max(1.0, length * SMOOTH_SHARE)


def _smooth(profile: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (1, C, L) profile smoothed along L by a Gaussian (edges replicated)."""
    length = profile.shape[-1]
    radius = min(length - 1, int(3 * sigma))
    if radius < 1:
        return profile
    x = torch.arange(-radius, radius + 1, dtype=profile.dtype, device=profile.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1).expand(profile.shape[1], 1, -1)
    padded = F.pad(profile, (radius, radius), mode="replicate")
    return F.conv1d(padded, kernel, groups=profile.shape[1])
