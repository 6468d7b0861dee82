"""The worker process: imports the engine once, keeps it warm, runs one job at a time.

Started by ``core.jobs.local`` with the multiprocessing "spawn" context, so torch is only
ever loaded here, never in the event loop's process and never inherited across a fork. Jobs
arrive on ``tasks`` as ``("job", seq, JobRequest)`` (``None`` = exit); everything goes back on
``events`` as small tuples (see ``LocalBackend``). A job is stopped by writing its ``seq`` into
the shared ``cancel_seq``, which the engine's ``should_stop`` hook reads once per step.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from core.errors import Cancelled, PasticheError
from core.jobs.events import JobRequest
from core.settings import Settings

PROGRESS_INTERVAL = 0.2
"""Seconds between progress messages of one job (at most ~5/s; the last one always goes)."""
PREVIEW_INTERVAL = 1.0
"""Seconds between previews of one job (each is a PNG encode in the worker)."""

EngineFn = Callable[..., Any]


def load_engine(path: str) -> EngineFn:
    """``"package.module:function"`` -> the function (``core.engine:stylize`` in production)."""
    module_name, _, attr = path.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{path} is not callable")
    return fn


def main(
    tasks: Connection,
    events: Connection,
    cancel_seq: Any,
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
        _serve(tasks, events, cancel_seq, engine_path, warmup)
    except (BrokenPipeError, EOFError, ConnectionError):
        pass  # the parent is gone or closed the pipe: nothing left to report to
    finally:
        events.close()
        tasks.close()


def _serve(
    tasks: Connection,
    events: Connection,
    cancel_seq: Any,
    engine_path: str,
    warmup: Settings | None,
) -> None:
    def log(level: int, text: str) -> None:
        events.send(("log", level, text))

    engine: EngineFn | None = None
    try:
        engine = load_engine(engine_path)
    except Exception:
        log(logging.ERROR, f"cannot load the engine {engine_path}:\n{traceback.format_exc()}")
    if engine is not None:
        _prepare(engine_path, warmup, log)
    if engine is not None and warmup is not None:
        started = time.monotonic()
        try:
            _warm_up(engine, warmup)
            log(logging.INFO, f"warm-up done in {time.monotonic() - started:.1f} s")
        except Exception:
            log(logging.WARNING, f"warm-up failed:\n{traceback.format_exc()}")
    events.send(("ready", os.getpid()))
    while True:
        message = tasks.recv()
        if message is None:
            return
        _, seq, request = message
        _run_job(engine, seq, request, events, cancel_seq)


def _prepare(engine_path: str, settings: Settings | None, log: Callable[[int, str], None]) -> None:
    """The engine's per-machine choices, once per worker before its first job (``prepare`` of
    the engine's module, if it has one: core.engine's runs the speed probe on first use)."""
    prepare = getattr(importlib.import_module(engine_path.partition(":")[0]), "prepare", None)
    if callable(prepare):
        try:
            log(logging.INFO, f"speed: {prepare(settings)}")
        except Exception:  # the first job makes the choice again and reports what fails
            log(logging.WARNING, f"speed choice failed:\n{traceback.format_exc()}")


def _warm_up(engine: EngineFn, settings: Settings) -> None:
    """Paint a tiny synthetic image so weights, kernels and caches are loaded before job one."""
    from PIL import Image

    content = Image.linear_gradient("L").resize((48, 48)).convert("RGB")
    style = Image.effect_noise((48, 48), 64).convert("RGB")
    engine(content, [style], settings)


def _run_job(
    engine: EngineFn | None, seq: int, request: JobRequest, events: Connection, cancel_seq: Any
) -> None:
    from core.images import encode_image

    def should_stop() -> bool:
        return cancel_seq.value == seq

    last_sent = 0.0
    last_preview = 0.0
    pending: dict[str, Any] | None = None

    def on_progress(progress: Any) -> None:
        nonlocal last_sent, last_preview, pending
        now = time.monotonic()
        preview = getattr(progress, "preview", None)
        if preview is not None and now - last_preview >= PREVIEW_INTERVAL:
            last_preview = now
            events.send(("preview", seq, encode_image(preview, "png")))
        pending = {
            "percent": float(progress.percent),
            "step": int(progress.step),
            "total_steps": int(progress.total_steps),
            "scale": int(progress.scale),
            "scales": int(progress.scales),
            "eta": None if progress.eta is None else float(progress.eta),
            "losses": {str(k): float(v) for k, v in progress.losses.items()},
        }
        if now - last_sent >= PROGRESS_INTERVAL or progress.step >= progress.total_steps:
            flush()

    def flush() -> None:
        nonlocal last_sent, pending
        if pending is not None:
            events.send(("progress", seq, pending))
            last_sent = time.monotonic()
            pending = None

    try:
        if engine is None:
            raise RuntimeError("the engine could not be loaded (see the log above)")
        if should_stop():
            raise Cancelled()
        events.send(("started", seq))
        settings = request.settings
        if request.label and "label" not in settings.extra:
            settings = settings.replace(extra={**settings.extra, "label": request.label})
        result = engine(
            request.content,
            list(request.styles),
            settings,
            on_progress=on_progress,
            should_stop=should_stop,
        )
        flush()
        metadata = dict(result.metadata)
        png = encode_image(result.image, "png", metadata=metadata)
        events.send(("done", seq, png, metadata, result.image.width, result.image.height))
    except Cancelled:
        events.send(("cancelled", seq))
    except PasticheError as exc:
        events.send(("failed", seq, str(exc)))
    except (BrokenPipeError, EOFError, ConnectionError):
        raise
    except Exception:
        events.send(("error", seq, traceback.format_exc()))
