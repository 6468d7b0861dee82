"""The helper's HTTP API (aiohttp.web) in front of one :class:`core.jobs.Runner`.

Only the local user may use it: it answers on loopback, every request must carry the bearer
token from the owner-only discovery file, and the ``Host`` header must name a loopback host so
a web page cannot reach it through DNS rebinding. GIMP's Cancel button kills the plug-in, so a
job nobody has polled for ``orphan_timeout`` seconds is cancelled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from core import __version__
from core.animation import (
    MAX_FRAMES,
    Animation,
    AnimationLimits,
    encode_animation,
    load_animation,
    probe_animation,
)
from core.errors import BusyError, ImageError, LimitError, SettingsError
from core.images import encode_image, load_image, validate_image
from core.jobs.broker import BrokerError
from core.jobs.events import JobCancelled
from core.jobs.runner import Job, JobRequest, Runner, RunnerConfig
from core.presets import Preset, PresetLibrary, load_presets
from core.requests import request_settings
from core.settings import Settings

log = logging.getLogger("pastiche.helper")

MiB = 1 << 20
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
OWNER = "local"
SERVER_ONLY_SETTINGS = frozenset(
    {"weights", "device", "backbone", "init_image", "extra", "max_memory"}
)
"""Chosen by whoever starts the helper, not by the requests it serves."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class HelperOptions:
    """Everything the helper is configured with (the CLI fills it in)."""

    token: str
    defaults: Settings = field(default_factory=Settings)
    workers: int = 1
    max_queue: int = 8
    max_upload: int = 200 * MiB
    max_size: int = 4096
    """Longest side a job may ask for. Memory is no longer the limit (scales over the memory
    budget are painted in tiles); time is: 4096 px takes tens of minutes on a laptop CPU."""
    job_timeout: float = 3600.0
    """Seconds a running job may take (a local user can cancel from GIMP at any time)."""
    orphan_timeout: float = 30.0
    idle_exit: float | None = None
    presets: Path | None = None
    log_file: Path | None = None
    extra_hosts: frozenset[str] = frozenset()
    probe: bool = True
    """Ask a subprocess which device and weights the workers will use (shown by /health)."""
    start_workers: bool = True
    """Start the workers with the helper (warm model for the first job) instead of on demand."""
    tick: float | None = None
    """Seconds between housekeeping passes; None = derived from the timeouts."""
    runner_config: RunnerConfig | None = None
    """Overrides workers/max_queue (tests use it to shorten limits)."""
    backend: str = "local"
    """Where jobs are painted: local worker processes, or "celery" for workers on other
    machines (opt-in, docs/SCALING.md), which use their own weights and device, not
    ``defaults``'s."""
    broker: str | None = None
    """Redis URL of the Celery broker (backend "celery")."""


@dataclass
class Tracked:
    """A job the helper accepted, with when a client last asked about it."""

    job: Job
    style: str
    last_seen: float


class HelperState:
    """Shared by the handlers: the runner, the jobs, activity times, and the stop signal."""

    def __init__(self, options: HelperOptions) -> None:
        self.options = options
        self.runner: Runner | None = None
        self.starting: asyncio.Task[None] | None = None
        self.jobs: dict[str, Tracked] = {}
        self.presets = PresetLibrary()
        self.last_activity = time.monotonic()
        self.stop = asyncio.Event()
        self.probe: dict[str, Any] = {"probe": "pending"}

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    async def started_runner(self) -> Runner:
        """The runner, once its workers are up (starting them now if nobody has)."""
        assert self.runner is not None, "the app is not running"
        if self.starting is None:
            self.starting = asyncio.create_task(self.runner.start())
        await asyncio.shield(self.starting)
        return self.runner

    @property
    def ready(self) -> bool:
        task = self.starting
        return (
            task is not None and task.done() and not task.cancelled() and task.exception() is None
        )

    def live_jobs(self) -> list[Tracked]:
        return [t for t in self.jobs.values() if not t.job.done]


STATE = web.AppKey("state", HelperState)


# ---- middlewares -------------------------------------------------------------------------------
def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure is JSON ``{"error": sentence}``, the same shape the plug-in shows."""
    state = request.app[STATE]
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = state.options.max_upload / MiB
        return _error(413, f"The upload is too large: the helper accepts at most {limit:g} MiB.")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason if exc.text is None else exc.text)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        where = state.options.log_file or "the helper's log"
        return _error(500, f"The helper hit an internal error; the details are in {where}.")


@web.middleware
async def loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse requests whose Host is not a loopback name (DNS rebinding protection)."""
    host = _hostname(request.headers.get("Host", ""))
    allowed = LOOPBACK_HOSTS | request.app[STATE].options.extra_hosts
    if host not in allowed:
        log.warning("refused a request for host %r from %s", host, request.remote)
        return _error(
            403, "The Pastiche helper only answers requests addressed to 127.0.0.1 or localhost."
        )
    return await handler(request)


@web.middleware
async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Constant-time check of ``Authorization: Bearer <token>``."""
    state = request.app[STATE]
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    expected = state.options.token.encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        return web.json_response(
            {"error": "Missing or wrong helper token; read it from the helper's discovery file."},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="pastiche"'},
        )
    state.touch()
    return await handler(request)


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---- handlers ----------------------------------------------------------------------------------
routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    opts = state.options
    runner = state.runner
    return web.json_response(
        {
            "ok": True,
            "ready": state.ready,
            "version": __version__,
            "pid": os.getpid(),
            "backbone": opts.defaults.backbone,
            "device": state.probe.get("device", opts.defaults.device),
            "weights_present": state.probe.get("weights_present"),
            "weights_path": state.probe.get("weights_path"),
            "weights_message": state.probe.get("weights_message"),
            "log_file": str(opts.log_file) if opts.log_file else None,
            "queue_length": runner.queue_length if runner else 0,
            "running": len(runner.running) if runner else 0,
            "workers": (opts.runner_config.workers if opts.runner_config else opts.workers),
            "backend": opts.backend,
            "max_size": opts.max_size,
            "styles": len(state.presets),
        }
    )


@routes.get("/styles")
async def styles(request: web.Request) -> web.Response:
    lib = request.app[STATE].presets
    items = [
        {"name": p.name, "description": p.description, "strength": p.strength}
        for p in sorted(lib.presets.values(), key=lambda p: p.name)
    ]
    return web.json_response({"styles": items, "problems": lib.problems})


@routes.post("/jobs")
async def submit(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not request.content_type.startswith("multipart/"):
        return _error(
            400,
            "Send a job as multipart/form-data with a 'content' image and a 'style' image "
            "or a 'preset' name.",
        )
    form = await request.post()
    content = _file_bytes(form.get("content"))
    frames = [data for data in map(_file_bytes, form.getall("frame", [])) if data is not None]
    if content is None and not frames:
        return _error(400, "The request has no 'content' image.")
    preset_name = str(form.get("preset") or "").strip()
    try:
        job, label = await _accept(state, form, content, frames)
    except (ImageError, SettingsError) as exc:
        return _error(400, str(exc))
    except LimitError as exc:
        return _error(413, str(exc))
    except BusyError as exc:
        return _error(429, str(exc), retry_after=10)
    except BrokerError as exc:
        return _error(503, str(exc))
    except OSError as exc:
        log.warning("cannot read preset %s: %s", preset_name, exc)
        return _error(500, f"The helper cannot read the {preset_name!r} style image.")
    state.jobs[job.id] = Tracked(job, label, time.monotonic())
    log.info(
        "job %s accepted (%s, %d bytes of content, size %d, keep_faces=%g)",
        job.id, label, len(job.request.content), job.request.settings.size,
        job.request.settings.keep_faces,
    )  # fmt: skip
    return web.json_response({"id": job.id, "position": job.position, "style": label}, status=201)


async def _accept(
    state: HelperState, form: Mapping[str, object], content: bytes | None, frames: list[bytes]
) -> tuple[Job, str]:
    """Check one job's form and submit it; raises the typed errors the handler turns into
    HTTP answers (OSError: a preset file that cannot be read any more). ``frames`` (GIMP's
    layers, one per frame) are painted as one animation, lossless both ways."""
    clip_format = None
    if frames:
        content = await asyncio.to_thread(_animation_of, frames, form.get("durations"))
        clip_format = "png"
    assert content is not None
    style = _file_bytes(form.get("style"))
    preset_name = str(form.get("preset") or "").strip()
    preset: Preset | None = None
    if style is not None:
        label = str(form.get("style_name") or "style").strip()[:64] or "style"
    elif preset_name:
        preset = state.presets.get(preset_name)
        label = preset.name
    else:
        raise SettingsError("Choose a style: attach a 'style' image or name a 'preset'.")
    settings = _settings(
        state,
        form.get("settings"),
        form.get("quality"),
        preset_strength=preset.strength if preset else None,
        notes={"style": label},
    )
    _check_size(settings, state.options.max_size)
    if preset is not None:
        style = await asyncio.to_thread(preset.read_bytes)
    assert style is not None
    max_pixels = state.runner.config.max_pixels if state.runner else None
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    await asyncio.to_thread(_validate_content, content, kwargs.get("max_pixels"))
    await asyncio.to_thread(validate_image, style, name="the style image", **kwargs)
    runner = await state.started_runner()
    job = await runner.submit(
        JobRequest(
            content=content, styles=((style, 1.0),), settings=settings, label=label,
            animation_format=clip_format,
        ),
        OWNER,
    )  # fmt: skip
    return job, label


def _check_size(settings: Settings, max_size: int) -> None:
    if settings.size > max_size:
        raise SettingsError(
            f"This helper paints at most {max_size} px on the long side, and {settings.size} px "
            "were asked for; choose a smaller size, or start the helper with a larger --max-size."
        )


@routes.get("/jobs/{id}")
async def status(request: web.Request) -> web.Response:
    tracked = _tracked(request)
    return web.json_response(await _status(tracked))


@routes.get("/jobs/{id}/result")
async def result(request: web.Request) -> web.StreamResponse:
    tracked = _tracked(request)
    done = tracked.job.result
    if done is None:
        info = await _status(tracked)
        if tracked.job.done:
            return _error(409, info["error"] or "The job did not finish.", state=info["state"])
        return _error(409, "The job has not finished yet.", state=info["state"])
    return web.Response(
        body=done.data,
        content_type=done.mime,
        headers={"X-Pastiche-Style": tracked.style},
    )


@routes.get("/jobs/{id}/frames")
async def frames_of(request: web.Request) -> web.StreamResponse:
    """An animation's painted frames as a ZIP of PNGs (frame-0001.png, ...) with
    ``animation.json`` ({"durations": [ms, ...], "loop": n}): what the GIMP plug-in reads with
    the standard library alone."""
    tracked = _tracked(request)
    done = tracked.job.result
    if done is None:
        info = await _status(tracked)
        return _error(409, info["error"] or "The job has not finished yet.", state=info["state"])
    body = await asyncio.to_thread(_zip_frames, done.data)
    return web.Response(
        body=body, content_type="application/zip", headers={"X-Pastiche-Style": tracked.style}
    )


@routes.delete("/jobs/{id}")
async def cancel(request: web.Request) -> web.Response:
    tracked = _tracked(request)
    cancelled = await tracked.job.cancel()
    if cancelled:
        log.info("job %s cancelled by the client", tracked.job.id)
    return web.json_response({"id": tracked.job.id, "cancelled": cancelled})


def _tracked(request: web.Request) -> Tracked:
    state = request.app[STATE]
    tracked = state.jobs.get(request.match_info["id"])
    if tracked is None:
        raise web.HTTPNotFound(text="There is no such job (it may have finished long ago).")
    tracked.last_seen = time.monotonic()
    return tracked


async def _status(tracked: Tracked) -> dict[str, Any]:
    job = tracked.job
    progress = job.progress
    info: dict[str, Any] = {
        "id": job.id,
        "state": job.state.value,
        "style": tracked.style,
        "position": job.position,
        "percent": round(progress.percent, 1) if progress else (100.0 if job.result else 0.0),
        "eta": progress.eta if progress else None,
        "step": progress.step if progress else 0,
        "total_steps": progress.total_steps if progress else 0,
        "frame": progress.frame if progress else 1,
        "frames": progress.frames if progress else 1,
        "error": None,
    }
    if job.result is not None:
        meta = job.result.metadata
        info.update(
            width=job.result.width,
            height=job.result.height,
            frames=job.result.frames,
            notes=list(meta.get("notes") or ()),
            faces=list((meta.get("faces") or {}).get("boxes") or ()),
        )
    elif job.done:
        event = await job.wait()
        info["error"] = event.reason if isinstance(event, JobCancelled) else job.error
    return info


def _validate_content(data: bytes, max_pixels: int | None) -> None:
    """A still image, or every frame of an animation, decoded once before the job is queued."""
    limit = {"max_pixels": max_pixels} if max_pixels else {}
    if probe_animation(data) is not None:
        load_animation(data, limits=AnimationLimits(**limit), max_side=512, name="animation")
    else:
        validate_image(data, name="the image", **limit)


def _animation_of(frames: list[bytes], raw_durations: object) -> bytes:
    """The frames (equal-sized images, in order) as one lossless APNG for the worker."""
    if len(frames) > MAX_FRAMES:
        raise ImageError(f"The animation has {len(frames)} frames; the limit is {MAX_FRAMES}.")
    pictures = [load_image(data, name=f"frame {i}") for i, data in enumerate(frames, 1)]
    if len({p.size for p in pictures}) != 1:
        raise ImageError("Every frame of an animation must have the same size.")
    durations = [100] * len(pictures)
    if raw_durations:
        try:
            durations = [int(d) for d in json.loads(str(raw_durations))]
        except (ValueError, TypeError):
            raise SettingsError("'durations' must be a JSON list of milliseconds.") from None
        if len(durations) != len(pictures) or min(durations) < 1:
            raise SettingsError("'durations' needs one positive number of milliseconds per frame.")
    if len(pictures) == 1:
        raise ImageError("An animation needs at least two frames.")
    return encode_animation(Animation(pictures, durations), "png")


def _zip_frames(data: bytes) -> bytes:
    import zipfile

    clip = load_animation(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed
        for i, frame in enumerate(clip.frames, 1):
            archive.writestr(f"frame-{i:04d}.png", encode_image(frame, "png"))
        archive.writestr(
            "animation.json", json.dumps({"durations": clip.durations, "loop": clip.loop})
        )
    return buf.getvalue()


def _file_bytes(value: object) -> bytes | None:
    if isinstance(value, web.FileField):
        data = value.file.read()
        return data or None
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    return None


def _client_options(raw: object) -> dict[str, Any]:
    """The client's ``settings`` form field: a JSON object of Settings fields (or nothing)."""
    if not raw:
        return {}
    try:
        client = json.loads(str(raw))
    except ValueError:
        raise SettingsError("The 'settings' field must be a JSON object.") from None
    if not isinstance(client, dict):
        raise SettingsError("The 'settings' field must be a JSON object.")
    return client


def _settings(
    state: HelperState,
    raw: object,
    quality: object,
    *,
    preset_strength: float | None = None,
    notes: dict[str, Any] | None = None,
) -> Settings:
    """The helper's defaults overlaid with the client's ``settings`` JSON, its ``quality`` tier
    and the preset's default strength."""
    return request_settings(
        "gimp",
        _client_options(raw),
        base=state.options.defaults,
        quality=str(quality) if quality else None,
        preset_strength=preset_strength,
        locked=SERVER_ONLY_SETTINGS,
        notes=notes,
    )


# ---- housekeeping ------------------------------------------------------------------------------
async def housekeeping(state: HelperState) -> None:
    """Cancel orphaned jobs, forget old finished ones, and stop when idle (``--idle-exit``)."""
    opts = state.options  # read on every pass: tests shorten the timeouts of a running helper
    while not state.stop.is_set():
        tick = opts.tick or max(0.05, min(1.0, opts.orphan_timeout / 4, (opts.idle_exit or 60) / 4))
        keep_finished = max(600.0, opts.orphan_timeout)
        await asyncio.sleep(tick)
        now = time.monotonic()
        for job_id, tracked in list(state.jobs.items()):
            quiet = now - tracked.last_seen
            if not tracked.job.done and quiet > opts.orphan_timeout:
                log.info("job %s: no client asked for %.0f s; cancelling it", job_id, quiet)
                await tracked.job.cancel()
            elif tracked.job.done and quiet > keep_finished:
                del state.jobs[job_id]
        if state.live_jobs():
            state.touch()
        elif opts.idle_exit is not None and now - state.last_activity >= opts.idle_exit:
            log.info("idle for %.0f s; exiting", now - state.last_activity)
            state.stop.set()


async def run_probe(state: HelperState) -> None:
    """Ask a short-lived process which device and weights the workers will use (with
    remote workers: ask the broker which are connected)."""
    if state.options.backend == "celery":
        await _probe_remote(state)
        return
    settings_json = json.dumps(state.options.defaults.to_dict())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "core.helper.probe",
            settings_json,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err.decode(errors="replace").strip()[-500:])
        state.probe = json.loads(out.decode().strip().splitlines()[-1])
        log.info("workers will use %s", state.probe)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the helper still works without this information
        log.warning("could not probe device and weights: %s", exc)
        state.probe = {"probe": "failed"}


async def _probe_remote(state: HelperState) -> None:
    try:
        runner = await state.started_runner()
        workers = await runner.backend.workers()  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("could not ask the broker about its workers: %s", exc)
        state.probe = {"probe": "failed"}
        return
    devices = sorted({str(w.get("device")) for w in workers})
    state.probe = {
        "device": ", ".join(devices) or "no worker connected",
        "weights_present": None,
        "weights_path": None,
        "weights_message": f"{len(workers)} remote worker(s) with their own weights.",
    }
    log.info("remote workers: %s", workers)


def _backend(opts: HelperOptions, config: RunnerConfig) -> Any:
    if opts.backend != "celery":
        return None
    from core.jobs.celery_backend import CeleryBackend

    return CeleryBackend(config, opts.broker)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    opts = state.options
    if opts.presets is not None:
        state.presets = await asyncio.to_thread(load_presets, opts.presets)
        for problem in state.presets.problems:
            log.warning("presets: %s", problem)
    config = opts.runner_config or RunnerConfig(
        workers=opts.workers,
        max_queue=opts.max_queue,
        max_per_owner=opts.max_queue + opts.workers,
        job_timeout=opts.job_timeout,
    )
    tasks: list[asyncio.Task[None]] = []
    if opts.probe:
        tasks.append(asyncio.create_task(run_probe(state)))
    state.runner = Runner(config, backend=_backend(opts, config))
    if opts.start_workers:
        state.starting = asyncio.create_task(state.runner.start())
    state.touch()
    tasks.append(asyncio.create_task(housekeeping(state)))
    try:
        yield
    finally:
        state.stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if state.starting is not None:
            with contextlib.suppress(Exception):
                await state.starting  # let the workers come up before stopping them
        await state.runner.close()


def create_app(options: HelperOptions) -> web.Application:
    """The aiohttp application; its cleanup context owns the runner."""
    if not options.token:
        raise ValueError("The helper needs a token.")
    app = web.Application(
        middlewares=[errors_as_json, loopback_host_only, bearer_token],
        client_max_size=options.max_upload,
    )
    app[STATE] = HelperState(options)
    app.add_routes(routes)
    app.cleanup_ctx.append(_lifecycle)
    return app


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["STATE", "HelperOptions", "HelperState", "create_app", "is_loopback"]
