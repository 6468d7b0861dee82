"""Stand-ins for ``core.engine.run.stylize`` that run in real worker processes (no torch).

Each has the engine's signature and honours ``should_stop`` between small sleeps, like the real
optimiser does between steps. The runner tests select one with ``RunnerConfig(engine=...)``;
a style blend weight or ``settings.iterations`` steers them from the test.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from core.errors import Cancelled, ImageError, SettingsError
from core.settings import Settings
from core.types import AnimationResult, Progress, Result

OnProgress = Callable[[Progress], None] | None
ShouldStop = Callable[[], bool] | None

STEP = 0.02  # seconds per fake optimiser step


def _progress(
    step: int, total: int, preview: Image.Image | None = None, frame: int = 1, frames: int = 1
) -> Progress:
    return Progress(
        frame=frame,
        frames=frames,
        step=step,
        total_steps=total,
        scale=1,
        scales=1,
        iteration=step,
        iterations=total,
        width=8,
        height=8,
        losses={"total": 1.0 / step},
        elapsed=step * STEP,
        eta=(total - step) * STEP,
        preview=preview,
    )


def _open(content: Any) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(content))
        img.load()
    except Exception as exc:
        raise ImageError(f"The content image could not be read ({exc}).") from None
    return img.convert("RGB")


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")  # loaded by the worker only when it sets a thread count
    return None if torch is None else torch.get_num_threads()


def paint(
    content: Any,
    styles: Sequence[Any],
    settings: Settings,
    *,
    on_progress: OnProgress = None,
    should_stop: ShouldStop = None,
) -> Result:
    """``settings.iterations`` steps of STEP seconds; the output is the content, inverted.

    Reports the worker's pid in the metadata so tests can tell workers apart."""
    img = _open(content)
    total = max(1, settings.iterations)
    for step in range(1, total + 1):
        if should_stop is not None and should_stop():
            raise Cancelled()
        time.sleep(STEP)
        if on_progress is not None:
            preview = img.resize((8, 8)) if step == 1 else None
            on_progress(_progress(step, total, preview))
    out = Image.eval(img, lambda v: 255 - v)
    return Result(
        image=out,
        settings=settings,
        metadata={
            "pid": os.getpid(),
            "label": settings.extra.get("label"),
            "steps": total,
            "threads": _torch_threads(),
            "device": settings.device,
            "weights": settings.weights,
        },
    )


def instant(
    content: Any,
    styles: Sequence[Any],
    settings: Settings,
    *,
    on_progress: OnProgress = None,
    should_stop: ShouldStop = None,
) -> Result:
    """No sleeping: for tests about bookkeeping under load."""
    return Result(image=Image.new("RGB", (4, 4)), settings=settings, metadata={"pid": os.getpid()})


def stubborn(
    content: Any,
    styles: Sequence[Any],
    settings: Settings,
    *,
    on_progress: OnProgress = None,
    should_stop: ShouldStop = None,
) -> Result:
    """Ignores ``should_stop`` (a stuck step): only killing the worker stops it."""
    time.sleep(600)
    raise AssertionError("not reached")


def by_mode(
    content: Any,
    styles: Sequence[Any],
    settings: Settings,
    *,
    on_progress: OnProgress = None,
    should_stop: ShouldStop = None,
) -> Result:
    """Behaviour chosen by ``settings.extra["mode"]``: ok, kill, segfault, raise, user_error,
    stubborn."""
    mode = settings.extra.get("mode", "ok")
    if mode == "stubborn":
        stubborn(content, styles, settings)
    if mode == "kill":
        if on_progress is not None:
            on_progress(_progress(1, 10))
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "segfault":
        ctypes.string_at(0)
    elif mode == "raise":
        raise ZeroDivisionError("a bug in the engine")
    elif mode == "user_error":
        raise SettingsError("The size must be between 16 and 8192, got 3.")
    return paint(content, styles, settings, on_progress=on_progress, should_stop=should_stop)


def paint_animation(
    content: Any, styles: Any, settings: Any = None, *, on_progress=None, should_stop=None
):
    """The animation engine's stand-in: ``settings.iterations`` steps per frame, reported as
    frame i of n; every frame inverted, timing and loop kept."""
    from core.animation import load_animation

    anim = load_animation(content)
    if settings.max_frames:
        anim = anim.decimated(settings.max_frames)
    per, n = max(1, settings.iterations), len(anim)
    for index in range(n):
        for step in range(1, per + 1):
            if should_stop is not None and should_stop():
                raise Cancelled()
            time.sleep(STEP)
            if on_progress is not None:
                preview = anim.frames[index].resize((8, 8)) if step == 1 else None
                on_progress(_progress(index * per + step, n * per, preview, index + 1, n))
    painted = [Image.eval(f.convert("RGB"), lambda v: 255 - v) for f in anim.frames]
    return AnimationResult(
        animation=anim.with_frames(painted),
        settings=settings,
        metadata={"pid": os.getpid(), "frames": n, "label": settings.extra.get("label")},
    )


by_mode_animation = paint_animation
