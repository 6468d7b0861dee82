"""Optical flow, warping and the consistency mask on synthetic scenes whose motion is known."""

from __future__ import annotations

import numpy as np
import pytest

from core import flow


def texture(height: int = 72, width: int = 120, seed: int = 0) -> np.ndarray:
    """Smooth random texture (uint8 RGB): DIS needs gradients to lock on to."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, 3)).astype(np.float32)
    return (cv2.GaussianBlur(noise, (0, 0), 2.0) * 255 * 3 - 255).clip(0, 255).astype(np.uint8)


def test_flow_finds_a_known_shift() -> None:
    scene = texture()
    before, after = scene[:, 10:90], scene[:, 7:87]  # the content moves 3 px to the right
    forward = flow.flow(before, after)
    backward = flow.flow(after, before)
    # Away from the borders DIS recovers the shift to a fraction of a pixel.
    assert np.abs(np.median(forward[10:-10, 10:-10], axis=(0, 1)) - (3, 0)).max() < 0.25
    assert np.abs(np.median(backward[10:-10, 10:-10], axis=(0, 1)) - (-3, 0)).max() < 0.25


def test_warp_carries_the_previous_frame_along_the_motion() -> None:
    scene = texture().astype(np.float32) / 255
    before, after = scene[:, 10:90], scene[:, 7:87]
    backward = np.zeros((*after.shape[:2], 2), np.float32)
    backward[..., 0] = -3.0  # exact flow: each pixel came from 3 px to its left
    warped = flow.warp(before, backward)
    assert np.abs(warped[:, 3:] - after[:, 3:]).max() < 1e-5


def test_mask_marks_disocclusions_and_the_entering_border() -> None:
    """A square moves right over a static background: the strip it uncovers (seen in the new
    frame, hidden in the old) and the border column entering the frame are not trusted."""
    background = texture(seed=1)[:, :96]
    square = texture(seed=2)[:24, :24]
    before, after = background.copy(), background.copy()
    before[24:48, 30:54] = square
    after[24:48, 36:60] = square  # moved 6 px right
    join = flow.link(before, after)
    uncovered = join.mask[28:44, 31:35]  # background where the square was: disoccluded
    assert uncovered.mean() < 0.5
    assert join.mask[:, 60:].mean() > 0.9 and join.mask[:20].mean() > 0.9  # static background
    assert join.mask[28:44, 40:56].mean() > 0.8  # inside the moving square


def test_mask_refuses_pixels_from_outside_the_frame() -> None:
    scene = texture()
    before, after = scene[:, 10:90], scene[:, 4:84]  # moving right 6 px: the left edge enters
    join = flow.link(before, after)
    assert join.mask[:, :5].mean() < 0.2 and join.mask[5:-5, 12:-5].mean() > 0.9


def test_temporal_error_is_zero_for_a_perfect_follower_and_grows_with_flicker() -> None:
    scene = texture()
    frames = [scene[:, 12 - 2 * i : 92 - 2 * i] for i in range(4)]
    joins = flow.links(frames)
    steady = flow.temporal_error(frames, joins)
    rng = np.random.default_rng(3)
    flicker = [np.clip(f + rng.normal(0, 20, f.shape), 0, 255).astype(np.uint8) for f in frames]
    noisy = flow.temporal_error(flicker, joins)
    assert steady < 2e-4 and noisy > 50 * steady
    with pytest.raises(ValueError):
        flow.temporal_error(frames, joins[:1])
