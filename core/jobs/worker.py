"""The worker process: imports the engine once, keeps it warm, runs one job at a time.

Started by ``core.jobs.local`` with the multiprocessing "spawn" context, so torch is only
ever loaded here, never in the event loop's process and never inherited across a fork. Jobs
arrive on ``tasks`` as :class:`~core.jobs.messages.RunJob`; the job's events and the worker's
own messages go back on ``events`` (see :mod:`core.jobs.messages`). A job is stopped by writing
its ``seq`` into the shared ``cancel_seq``, which the engine's ``should_stop`` hook reads once
per step.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Protocol, cast

from core.animation import MIME_TYPES, AnimationInfo, encode_animation, probe_animation
from core.errors import Cancelled, PasticheError, SettingsError
from core.jobs.events import (
    Done,
    Failed,
    JobCancelled,
    JobRequest,
    Preview,
    ProgressUpdate,
    Started,
)
from core.jobs.messages import Crashed, FromWorker, Log, Ready, RunJob, SharedInt
from core.settings import Settings
from core.types import AnimationResult, ImageInput, Progress, Result, StyleInput

PROGRESS_INTERVAL = 0.2
"""Seconds between progress messages of one job (at most ~5/s; the last one always goes)."""
PREVIEW_INTERVAL = 1.0
"""Seconds between previews of one job (each is a PNG encode in the worker)."""


class StylizeFn(Protocol):
    """What a worker calls: ``core.engine.run.stylize``'s signature (tests plug in fakes)."""

    def __call__(
        self,
        content: ImageInput,
        styles: Sequence[StyleInput],
        settings: Settings | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Result: ...


class AnimateFn(Protocol):
    """The engine's painter of animations (``core.engine.run.stylize_animation``)."""

    def __call__(
        self,
        content: ImageInput,
        styles: Sequence[StyleInput],
        settings: Settings | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> AnimationResult: ...


Send = Callable[[FromWorker], None]


def load_engine(path: str) -> StylizeFn:
    """``"package.module:function"`` -> the function (``core.engine:stylize`` in production)."""
    module_name, _, attr = path.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{path} is not callable")
    return cast(StylizeFn, fn)


def load_animation_engine(path: str) -> AnimateFn | None:
    """The engine's painter of animations: ``<function>_animation`` in the same module
    (``core.engine:stylize_animation``), or None where the module has none."""
    module_name, _, attr = path.partition(":")
    fn = getattr(importlib.import_module(module_name), f"{attr}_animation", None)
    return cast(AnimateFn, fn) if callable(fn) else None


def main(
    tasks: Connection,
    events: Connection,
    cancel_seq: SharedInt,
    engine_path: str,
    warmup: Settings | None = None,
    threads: int | None = None,
) -> None:
    """Process entry point: serve jobs until told to exit or the parent goes away."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        _serve(tasks, events.send, cancel_seq, engine_path, warmup)
    except (BrokenPipeError, EOFError, ConnectionError):
        pass  # the parent is gone or closed the pipe: nothing left to report to
    finally:
        events.close()
        tasks.close()


def _serve(
    tasks: Connection,
    send: Send,
    cancel_seq: SharedInt,
    engine_path: str,
    warmup: Settings | None,
) -> None:
    engine, animate = _load(engine_path, send)
    if engine is not None:
        prepare_engine(engine_path, warmup, send)
    if engine is not None and warmup is not None:
        started = time.monotonic()
        try:
            _warm_up(engine, warmup)
            send(Log(logging.INFO, f"warm-up done in {time.monotonic() - started:.1f} s"))
        except Exception:
            send(Log(logging.WARNING, f"warm-up failed:\n{traceback.format_exc()}"))
    send(Ready(os.getpid()))
    while True:
        message = tasks.recv()
        if not isinstance(message, RunJob):
            return  # StopWorker
        _run_job((engine, animate), message, send, _stop_check(cancel_seq, message.seq))


def _stop_check(cancel_seq: SharedInt, seq: int) -> Callable[[], bool]:
    """The engine's ``should_stop`` for job ``seq``: the parent wrote its number."""
    return lambda: cancel_seq.value == seq


def _load(engine_path: str, send: Send) -> tuple[StylizeFn | None, AnimateFn | None]:
    """The engine and its painter of animations, or None (each job then fails, and the log
    says why)."""
    try:
        return load_engine(engine_path), load_animation_engine(engine_path)
    except Exception:
        send(Log(logging.ERROR, f"cannot load the engine {engine_path}:\n{traceback.format_exc()}"))
        return None, None


def prepare_engine(engine_path: str, settings: Settings | None, send: Send) -> None:
    """The engine's per-machine choices, once per worker before its first job (``prepare`` of
    the engine's module, if it has one: core.engine's runs the speed probe on first use)."""
    prepare = getattr(importlib.import_module(engine_path.partition(":")[0]), "prepare", None)
    if callable(prepare):
        try:
            send(Log(logging.INFO, f"speed: {prepare(settings)}"))
        except Exception:  # the first job makes the choice again and reports what fails
            send(Log(logging.WARNING, f"speed choice failed:\n{traceback.format_exc()}"))


def _warm_up(engine: StylizeFn, settings: Settings) -> None:
    """Paint a tiny synthetic image so weights, kernels and caches are loaded before job one."""
    from PIL import Image

    content = Image.linear_gradient("L").resize((48, 48)).convert("RGB")
    style = Image.effect_noise((48, 48), 64).convert("RGB")
    engine(content, [style], settings)


def progress_event(job_id: str, progress: Progress) -> ProgressUpdate:
    """The runner's event for one engine step. Numbers are made plain Python ones, so the
    parent never has to unpickle an engine type (a torch scalar would import torch there)."""
    return ProgressUpdate(
        job_id,
        percent=float(progress.percent),
        step=int(progress.step),
        total_steps=int(progress.total_steps),
        scale=int(progress.scale),
        scales=int(progress.scales),
        eta=None if progress.eta is None else float(progress.eta),
        losses={str(name): float(value) for name, value in progress.losses.items()},
        frame=int(progress.frame),
        frames=int(progress.frames),
    )


class ProgressRelay:
    """The engine's ``on_progress``: coalesces steps into at most one ProgressUpdate per
    PROGRESS_INTERVAL (the last step always goes) and one Preview per PREVIEW_INTERVAL. Shared
    by the local workers and the Celery workers, so both pace a job's events alike."""

    def __init__(self, job_id: str, send: Callable[[ProgressUpdate | Preview], None]) -> None:
        self.job_id = job_id
        self.send = send
        self.last_sent = 0.0
        self.last_preview = 0.0
        self.pending: ProgressUpdate | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.preview is not None and now - self.last_preview >= PREVIEW_INTERVAL:
            from core.images import encode_image

            self.last_preview = now
            self.send(Preview(self.job_id, encode_image(progress.preview, "png")))
        self.pending = progress_event(self.job_id, progress)
        if now - self.last_sent >= PROGRESS_INTERVAL or progress.step >= progress.total_steps:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            self.send(self.pending)
            self.last_sent = time.monotonic()
            self.pending = None


def _run_job(
    engines: tuple[StylizeFn | None, AnimateFn | None],
    task: RunJob,
    send: Send,
    should_stop: Callable[[], bool],
) -> None:
    """Run one job and send its events, ending with exactly one terminal message."""
    job_id = task.job_id
    engine, animate = engines
    try:
        if engine is None:
            raise RuntimeError("the engine could not be loaded (see the log above)")
        if should_stop():
            raise Cancelled()
        send(Started(job_id))
        kind = probe_animation(task.request.content)
        if kind is not None:
            send(_paint_animation(animate, kind, job_id, task.request, send, should_stop))
        else:
            send(_paint(engine, job_id, task.request, send, should_stop))
    except Cancelled:
        send(JobCancelled(job_id, ""))  # the runner knows (and words) the reason
    except PasticheError as exc:
        send(Failed(job_id, str(exc)))
    except (BrokenPipeError, EOFError, ConnectionError):
        raise
    except Exception:
        send(Crashed(job_id, traceback.format_exc()))


def _labelled(request: JobRequest) -> Settings:
    settings = request.settings
    if request.label and "label" not in settings.extra:
        settings = settings.replace(extra={**settings.extra, "label": request.label})
    return settings


def _paint_animation(
    animate: AnimateFn | None,
    kind: AnimationInfo,
    job_id: str,
    request: JobRequest,
    send: Send,
    should_stop: Callable[[], bool],
) -> Done:
    """Every frame painted, encoded as the request asks (or as the input's own kind)."""
    if animate is None:
        raise SettingsError("This painting engine cannot paint animations; send a still image.")
    relay = ProgressRelay(job_id, send)
    result = animate(
        request.content,
        list(request.styles),
        _labelled(request),
        on_progress=relay,
        should_stop=should_stop,
    )
    relay.flush()
    fmt = request.animation_format or default_animation_format(kind)
    metadata = dict(result.metadata)
    data = encode_animation(result.animation, fmt, metadata=metadata)
    width, height = result.animation.size
    return Done(job_id, data, metadata, width, height, MIME_TYPES[fmt], len(result.animation))


def default_animation_format(kind: AnimationInfo) -> str:
    """An animation goes back as it came (GIF, WebP, APNG); a video as MP4."""
    if kind.video:
        return "mp4"
    return {"GIF": "gif", "WEBP": "webp"}.get(kind.format, "png")


def _paint(
    engine: StylizeFn,
    job_id: str,
    request: JobRequest,
    send: Send,
    should_stop: Callable[[], bool],
) -> Done:
    from core.images import encode_image

    relay = ProgressRelay(job_id, send)
    result = engine(
        request.content,
        list(request.styles),
        _labelled(request),
        on_progress=relay,
        should_stop=should_stop,
    )
    relay.flush()
    metadata = dict(result.metadata)
    png = encode_image(result.image, "png", metadata=metadata)
    return Done(job_id, png, metadata, result.image.width, result.image.height)
