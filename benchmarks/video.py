"""``python -m benchmarks.video``: painting a clip with and without temporal coherence.

On one synthetic moving scene (a textured background panning, a textured disc crossing it: so
there is motion, disocclusion and motion boundaries) and the random VGG19 weights, in one run:

* **coherent**: the engine's animation path, default settings (Ruder et al.'s warped start and
  temporal loss; later frames at the output size only);
* **independent** (the baseline): every frame painted alone as a still (``temporal_weight=0``).

It prints seconds per frame (the first frame, and the median of the later ones) and Ruder et
al.'s temporal error of both (mean squared difference, colour values in [0, 1], between each
painted frame and the previous painted frame warped by the input's optical flow, on the pixels
where that flow is trusted), then the ratios. Random weights paint nothing like a painting; the
error measures the flicker mechanism, not the look. The machine may be shared, so the load
average is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .bench import cpu_name, load_average


def scene(frames: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``frames`` frames, ``size`` px on the long side (4:3): the background pans 2 px a frame
    to the left, a disc of its own texture moves 4 px a frame to the right and 1 px down."""
    import cv2

    rng = np.random.default_rng(seed)
    width, height = size, size * 3 // 4

    def texture(h: int, w: int, blur: float) -> np.ndarray:
        noise = rng.random((h, w, 3)).astype(np.float32)
        smooth = cv2.GaussianBlur(noise, (0, 0), blur)
        smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
        return (smooth * 255).astype(np.uint8)

    background = texture(height, width + 2 * frames, 3.0)
    disc = texture(height // 2, height // 2, 1.5)
    radius = height // 4
    yy, xx = np.mgrid[: 2 * radius, : 2 * radius]
    inside = (xx - radius) ** 2 + (yy - radius) ** 2 <= radius**2
    out = []
    for i in range(frames):
        frame = background[:, 2 * i : 2 * i + width].copy()
        x, y = width // 5 + 4 * i, height // 4 + i
        region = frame[y : y + 2 * radius, x : x + 2 * radius]
        region[inside] = disc[: 2 * radius, : 2 * radius][inside]
        out.append(Image.fromarray(frame))
    return out


def temporal_error(frames: list[Image.Image], painted: list[Image.Image]) -> float:
    from core import flow

    size = painted[0].size
    inputs = [np.asarray(f.resize(size, Image.Resampling.LANCZOS)) for f in frames]
    return flow.temporal_error([np.asarray(p.convert("RGB")) for p in painted], flow.links(inputs))


def paint(frames, style, settings) -> tuple[list[Image.Image], list[float]]:
    from core.engine import stylize_frames

    done = stylize_frames(frames, [style], settings)
    return done.images, done.metadata["seconds_per_frame"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="long side (default 256)")
    parser.add_argument("--frames", type=int, default=6, help="frames in the clip (default 6)")
    parser.add_argument("--save", metavar="DIR", help="write both painted clips as GIFs here")
    ns = parser.parse_args(argv)

    from core.animation import Animation, save_animation
    from core.settings import Settings

    frames = scene(ns.frames, ns.size)
    style = Image.fromarray(np.asarray(scene(1, ns.size, seed=7)[0])[:, ::-1].copy())
    settings = Settings(size=ns.size, backbone="random", device="cpu", preview_every=0)
    print(f"{cpu_name()}; {os.cpu_count()} cores; load {load_average()}")
    print(f"{ns.frames} frames at {ns.size} px, default settings, random VGG19 weights")
    started = time.perf_counter()
    coherent, coherent_s = paint(frames, style, settings)
    alone, alone_s = paint(frames, style, settings.replace(temporal_weight=0.0))
    e_coherent, e_alone = temporal_error(frames, coherent), temporal_error(frames, alone)
    if ns.save:
        for name, clip in (("coherent", coherent), ("independent", alone)):
            save_animation(Animation(clip, [100] * len(clip)), os.path.join(ns.save, f"{name}.gif"))
    later, alone_frame = statistics.median(coherent_s[1:]), statistics.median(alone_s)
    print(f"coherent:    first frame {coherent_s[0]:.2f} s, later frames {later:.2f} s each "
          f"(median), temporal error {e_coherent:.6f}")  # fmt: skip
    print(f"independent: {alone_frame:.2f} s a frame (median), temporal error {e_alone:.6f}")
    print(f"done in {time.perf_counter() - started:.0f} s; load {load_average()}")
    print(f"temporal error, independent / coherent: {e_alone / max(e_coherent, 1e-12):.1f}x")
    print(f"seconds per later frame, independent / coherent: {alone_frame / later:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
