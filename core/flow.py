"""Dense optical flow between video frames, warping along it, and where it can be trusted.

The temporal coherence of Ruder, Dosovitskiy and Brox (*Artistic style transfer for videos*,
GCPR 2016) needs, for each frame after the first, the previous painted frame carried along the
motion into the new frame, and a mask of the pixels where that is meaningful. The flow is
OpenCV's DIS (Kroeger et al., *Fast Optical Flow using Dense Inverse Search*, ECCV 2016): tens
of milliseconds per 512 px frame on a CPU, where the DeepFlow the paper used takes minutes
(the complaint in cysmith/neural-style-tf#68). The mask is the paper's forward-backward
consistency check plus its motion-boundary test. numpy and OpenCV only (no torch), so the
benchmark and the tests can measure temporal error without the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INSTALL_HINT = "Painting animations needs OpenCV: pip install 'pastiche[video]'."


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        from core.errors import SettingsError

        raise SettingsError(INSTALL_HINT) from None
    return cv2


@dataclass(frozen=True)
class Link:
    """How frame i follows frame i-1: ``backward[y, x]`` is the offset from pixel (x, y) of
    frame i to where it was in frame i-1; ``mask`` is 1 where that is trusted, 0 at
    disocclusions, motion boundaries and pixels that came from outside the frame."""

    backward: np.ndarray  # (H, W, 2) float32, (dx, dy)
    mask: np.ndarray  # (H, W) float32 in {0, 1}


def flow(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Flow from ``src`` to ``dst`` (H, W, 3 uint8 RGB): ``src[p] ~ dst[p + flow[p]]``.

    DIS at its MEDIUM preset: the preset OpenCV recommends for quality at real-time speed."""
    cv2 = _cv2()
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    a = cv2.cvtColor(np.ascontiguousarray(src), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(np.ascontiguousarray(dst), cv2.COLOR_RGB2GRAY)
    return dis.calc(a, b, None)


def warp(image: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """``image`` (an earlier frame, H x W x C float32) carried into the later frame:
    ``out[p] = image[p + backward[p]]``, bilinear, edges repeated."""
    cv2 = _cv2()
    h, w = backward.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + backward[..., 0]
    map_y = grid_y + backward[..., 1]
    out = cv2.remap(
        np.ascontiguousarray(image, dtype=np.float32), map_x, map_y,
        interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    return out.reshape(image.shape)


def consistency_mask(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """1 where the flow is reliable, after Ruder et al. (their temporal consistency loss):

    * disocclusion: with w~(p) = forward(p + backward(p)) (the forward flow seen from the later
      frame), ``|w~ + b|^2 > 0.01 (|w~|^2 + |b|^2) + 0.5``: going forward and back again does
      not return to the start;
    * motion boundary: ``|grad b_x|^2 + |grad b_y|^2 > 0.01 |b|^2 + 0.002``;
    * pixels whose source lies outside the earlier frame.
    The constants are the paper's (pixel units)."""
    h, w = backward.shape[:2]
    carried = warp(forward, backward)
    round_trip = np.sum((carried + backward) ** 2, axis=2)
    scale = np.sum(carried**2, axis=2) + np.sum(backward**2, axis=2)
    occluded = round_trip > 0.01 * scale + 0.5
    gy_x, gx_x = np.gradient(backward[..., 0])
    gy_y, gx_y = np.gradient(backward[..., 1])
    gradient = gx_x**2 + gy_x**2 + gx_y**2 + gy_y**2
    boundary = gradient > 0.01 * np.sum(backward**2, axis=2) + 0.002
    grid_x, grid_y = np.meshgrid(np.arange(w), np.arange(h))
    src_x, src_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
    outside = (src_x < 0) | (src_x > w - 1) | (src_y < 0) | (src_y > h - 1)
    return (~(occluded | boundary | outside)).astype(np.float32)


def link(previous: np.ndarray, current: np.ndarray) -> Link:
    """Flow both ways between two consecutive input frames and the mask of trusted pixels."""
    forward = flow(previous, current)
    backward = flow(current, previous)
    return Link(backward=backward, mask=consistency_mask(forward, backward))


def links(frames: Sequence[np.ndarray]) -> list[Link]:
    """``links[i - 1]`` joins frame i - 1 to frame i."""
    return [link(a, b) for a, b in zip(frames, frames[1:], strict=False)]


def temporal_error(painted: Sequence[np.ndarray], joins: Sequence[Link]) -> float:
    """Ruder et al.'s measure of flicker: the mean, over frames after the first, of the squared
    difference between a painted frame and the previous painted frame warped along the input's
    flow, on the trusted pixels only (colour values in [0, 1]).

    ``painted`` are H x W x 3 arrays in [0, 1] (or uint8, scaled here)."""
    if len(painted) != len(joins) + 1:
        raise ValueError("temporal_error needs one link per pair of consecutive frames.")
    errors = []
    for previous, current, join in zip(painted, painted[1:], joins, strict=False):
        a, b = _unit(previous), _unit(current)
        diff = (b - warp(a, join.backward)) ** 2
        weight = join.mask[..., None]
        covered = float(weight.sum()) * diff.shape[2]
        if covered > 0:
            errors.append(float((diff * weight).sum()) / covered)
    return float(np.mean(errors)) if errors else 0.0


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
