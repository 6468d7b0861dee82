"""Animations: every frame painted, each one after the first following the last along the motion.

Painting the frames of a clip one by one flickers: each optimisation lands in a different local
minimum. Ruder, Dosovitskiy and Brox (*Artistic style transfer for videos*, GCPR 2016) fix that
for optimisation-based transfer, and so does this module: the first frame is painted like a
still (the whole pyramid); every later frame starts from the previous painted frame carried
into it along the optical flow between the input frames, and its objective gains a temporal
term that keeps it close to that carried frame wherever the flow is trusted (core/flow.py,
losses.TemporalLoss). Later frames run at the output size only, ``frame_iterations`` steps.

The per-scale work is the still engine's (run._Run, scale.optimise_scale): a later frame is a
run with one scale, another start image and one more term. The style images, their colours and
so their Gram targets are the first frame's for the whole clip (computed once, then cache hits).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from core import flow, images
from core.animation import Animation, load_animation
from core.engine import colour
from core.engine.cpu import memory
from core.engine.losses import LayerApply, Scale, SumLoss, TemporalLoss
from core.engine.model import layer_plan
from core.engine.run import Engine, _Run, default_engine, plan_scales
from core.engine.tensors import resize, to_tensor
from core.errors import Cancelled, ImageError
from core.settings import Settings
from core.types import AnimationResult, ImageInput, Progress, StyleInput

ProgressHook = Callable[[Progress], None]


@dataclass
class FramesResult:
    """The painted frames, in order, and how they were made."""

    images: list[Image.Image]
    metadata: dict[str, Any] = field(default_factory=dict)


class _ClipColours(colour.Preservation):
    """Colour preservation for a later frame: its own photo for the content and the output's
    chroma, the first frame's for the style side, so the style targets stay the clip's."""

    def __init__(self, mode: str, photo: torch.Tensor, first: colour.Preservation) -> None:
        super().__init__(mode, photo)
        self.first = first

    def style_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return self.first.style_tensor(t)

    def recolour(self, style: torch.Tensor) -> torch.Tensor:
        return self.first.recolour(style)


class _LaterFrame(_Run):
    """A frame after the first: one scale at the output size, started from the previous painted
    frame carried along the flow where the flow is trusted (elsewhere from what ``init`` says),
    with [Ruder]'s temporal term in the objective."""

    def __init__(
        self,
        engine: Engine,
        frame: Image.Image,
        first: _Run,
        s: Settings,
        carried: tuple[torch.Tensor, torch.Tensor],
        hooks: tuple[ProgressHook | None, Callable[[], bool] | None],
    ) -> None:
        self.first = first
        self.warped, self.mask = carried
        super().__init__(engine, frame, first.inputs.styles, s, *hooks)
        photo = to_tensor(self.inputs.photo, self.device)
        self.colours = _ClipColours(s.preserve_colors, photo, first.colours)

    def _styles(self) -> list[tuple[Image.Image, float]]:
        return self.first.styles

    def _target_key(self) -> tuple:
        return self.first._target_key()

    def _first_image(self, size: tuple[int, int]) -> torch.Tensor:
        fresh = super()._first_image(size)
        return self.mask * self.warped + (1 - self.mask) * fresh

    def _objective(self, size: tuple[int, int], mask: torch.Tensor | None) -> SumLoss:
        objective = super()._objective(size, mask)
        target = self.colours.content_tensor(self.warped)
        term = Scale(LayerApply(TemporalLoss(target, self.mask), "input"), self.s.temporal_weight)
        objective.groups["temporal"] = nn.ModuleList([term])
        return objective


class _ClipProgress:
    """Turns each frame's Progress into the clip's: steps over all frames, frame i of n, and an
    ETA from the seconds per pixel-step so far."""

    def __init__(self, frames: int, on_progress: ProgressHook | None) -> None:
        self.frames, self.on_progress = frames, on_progress
        self.started = time.perf_counter()
        self.done_steps, self.done_pixels = 0, 0
        self.last_step = 0  # the running frame's steps so far

    def hook(self, index: int, later_steps: int, later_pixels: int) -> ProgressHook | None:
        """The callback for frame ``index``; ``later_steps`` / ``later_pixels`` are the planned
        steps, and pixel-steps, of the frames after it."""
        if self.on_progress is None:
            return None
        report = self.on_progress

        def on_frame_progress(p: Progress) -> None:
            self.last_step = p.step
            self.done_pixels += p.width * p.height
            step = self.done_steps + p.step
            elapsed = time.perf_counter() - self.started
            left = (p.total_steps - p.step) * p.width * p.height + later_pixels
            eta = elapsed / self.done_pixels * left if step >= 2 else None
            report(
                dataclasses.replace(
                    p, step=step, total_steps=self.done_steps + p.total_steps + later_steps,
                    frame=index + 1, frames=self.frames, elapsed=elapsed, eta=eta,
                )
            )  # fmt: skip

        return on_frame_progress

    def frame_done(self) -> None:
        self.done_steps += self.last_step
        self.last_step = 0


def _rgb_array(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(resize(img.convert("RGB"), size), dtype=np.uint8)


def _carry(
    painted: Image.Image, join: flow.Link, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous painted frame warped into the current one, and the trust mask, as tensors."""
    previous = np.asarray(painted.convert("RGB"), dtype=np.float32) / 255.0
    warped = flow.warp(previous, join.backward)
    as_tensor = torch.from_numpy(np.ascontiguousarray(warped.transpose(2, 0, 1)))[None]
    mask = torch.from_numpy(join.mask)[None, None]
    return as_tensor.to(device), mask.to(device)


def _load_frames(frames: Sequence[ImageInput]) -> list[Image.Image]:
    if len(frames) == 0:
        raise ImageError("An animation needs at least one frame.")
    loaded = [images.load_image(f, name=f"frame {i}") for i, f in enumerate(frames, 1)]
    if len({img.size for img in loaded}) != 1:
        raise ImageError("Every frame of an animation must have the same size.")
    return loaded


def stylize_frames(
    frames: Sequence[ImageInput],
    styles: Sequence[StyleInput],
    settings: Settings | None = None,
    *,
    on_progress: ProgressHook | None = None,
    should_stop: Callable[[], bool] | None = None,
    engine: Engine | None = None,
) -> FramesResult:
    """Paint ``frames`` (equally sized, in order) as one clip; ``settings.temporal_weight`` 0
    paints each frame on its own, like a still. Progress reports frame i of n; ``should_stop``
    is checked before every step. Raises what ``stylize`` raises."""
    s = settings or Settings()
    loaded = _load_frames(frames)
    engine = engine or default_engine()
    # As Engine.stylize: freed memory kept only while the clip is painted, settings put back.
    with memory.during_run(engine.keep_heap):
        return _Clip(engine, s, loaded, on_progress, should_stop).run(styles)


class _Clip:
    """One call of ``stylize_frames``: the frames' plans, then one run per frame."""

    def __init__(
        self,
        engine: Engine,
        s: Settings,
        frames: list[Image.Image],
        on_progress: ProgressHook | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.engine, self.s, self.frames, self.should_stop = engine, s, frames, should_stop
        self.coherent = s.temporal_weight > 0
        # Later frames: one scale at the output size, ``frame_iterations`` steps.
        self.later_settings = s.replace(pyramid=False, initial_iterations=s.later_frame_iterations)
        min_side = layer_plan(s).arch.min_side
        first_plan = plan_scales(s, frames[0].size, min_side)
        later_plan = plan_scales(self.later_settings, frames[0].size, min_side)
        self.size = first_plan[-1].size
        self.later = later_plan if self.coherent else first_plan
        self.clock = _ClipProgress(len(frames), on_progress)

    def _hooks(self, index: int) -> tuple[ProgressHook | None, Callable[[], bool] | None]:
        rest = len(self.frames) - 1 - index
        steps = sum(p.iterations for p in self.later) * rest
        pixels = sum(p.iterations * p.pixels for p in self.later) * rest
        return self.clock.hook(index, steps, pixels), self.should_stop

    def run(self, styles: Sequence[StyleInput]) -> FramesResult:
        started = time.perf_counter()
        first = _Run(self.engine, self.frames[0], styles, self.s, *self._hooks(0))
        painted = [first.result().image]
        self.clock.frame_done()
        seconds = [time.perf_counter() - started]
        joins: list[flow.Link] = []
        previous = _rgb_array(self.frames[0], self.size)
        for index in range(1, len(self.frames)):
            if self.should_stop is not None and self.should_stop():
                raise Cancelled()
            t0 = time.perf_counter()
            current = _rgb_array(self.frames[index], self.size)
            if self.coherent:
                joins.append(flow.link(previous, current))
                carried = _carry(painted[-1], joins[-1], first.device)
                run: _Run = _LaterFrame(
                    self.engine, self.frames[index], first, self.later_settings, carried,
                    self._hooks(index),
                )  # fmt: skip
            else:
                run = _Run(
                    self.engine, self.frames[index], first.inputs.styles, self.s,
                    *self._hooks(index),
                )  # fmt: skip
            painted.append(run.result().image)
            self.clock.frame_done()
            previous = current
            seconds.append(time.perf_counter() - t0)
        return FramesResult(painted, self._metadata(first, painted, joins, seconds, started))

    def _metadata(
        self,
        first: _Run,
        painted: list[Image.Image],
        joins: list[flow.Link],
        seconds: list[float],
        started: float,
    ) -> dict[str, Any]:
        metadata = first._metadata([], [], {})
        for key in ("scales", "steps", "restored_best", "losses"):
            metadata.pop(key, None)
        metadata.update(
            frames=len(painted),
            temporal_weight=self.s.temporal_weight,
            frame_iterations=self.s.later_frame_iterations if self.coherent else None,
            seconds_per_frame=[round(t, 3) for t in seconds],
            seconds=round(time.perf_counter() - started, 3),
        )
        if joins:
            arrays = [_rgb_array(img, self.size) for img in painted]
            metadata["flow_trusted"] = [round(float(j.mask.mean()), 4) for j in joins]
            metadata["temporal_error"] = flow.temporal_error(arrays, joins)
        return metadata


def stylize_animation(
    content: bytes | str | Animation,
    styles: Sequence[StyleInput],
    settings: Settings | None = None,
    *,
    on_progress: ProgressHook | None = None,
    should_stop: Callable[[], bool] | None = None,
    engine: Engine | None = None,
) -> AnimationResult:
    """Paint an animation or video (bytes, a path, or an Animation already read): at most
    ``settings.max_frames`` of its frames, keeping its timing and loop count."""
    s = settings or Settings()
    if isinstance(content, Animation):
        clip = content
    else:
        clip = load_animation(content, max_side=s.size, name="animation")
    source_frames = len(clip)
    if s.max_frames is not None:
        clip = clip.decimated(s.max_frames)
    done = stylize_frames(
        clip.frames, styles, s, on_progress=on_progress, should_stop=should_stop, engine=engine
    )
    metadata = {**done.metadata, "source_frames": source_frames, "durations": clip.durations}
    metadata["loop"] = clip.loop
    return AnimationResult(clip.with_frames(done.images), s, metadata)
