"""The painting side of a Celery worker: what its child process does with each job.

Built after the fork (see ``core.jobs.celery_worker``), a :class:`Painter` holds the warm
engine, a Redis client and a heartbeat thread. For each job it claims the job in Redis first
(``SET NX``), so a second delivery is never painted, sends the job's events to a Redis stream
(JSON, ``core.jobs.wire``), beats a heartbeat while it paints, and stops within one optimiser
step when the runner asks. Weights, device and file paths are the worker's own
(:class:`WorkerOptions`): a broker message cannot choose them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from core import __version__
from core.animation import MIME_TYPES, AnimationInfo, encode_animation, probe_animation
from core.errors import Cancelled, PasticheError, SettingsError
from core.jobs import wire
from core.jobs.backend import GENERIC_FAILURE
from core.jobs.broker import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TTL,
    KEY_TTL,
    STREAM_TTL,
    JobKeys,
    client_options,
    worker_key,
)
from core.jobs.events import (
    Done,
    Event,
    Failed,
    JobCancelled,
    JobRequest,
    Started,
    TerminalEvent,
)
from core.jobs.messages import Log
from core.jobs.worker import (
    AnimateFn,
    ProgressRelay,
    default_animation_format,
    load_animation_engine,
    load_engine,
    prepare_engine,
)
from core.jobs.worker import StylizeFn as EngineFn
from core.settings import Settings

log = logging.getLogger("pastiche.worker")

REDELIVERED = (
    "This job was interrupted when the machine painting it stopped, and it was not started "
    "again. Please try again."
)
NO_INIT_IMAGE = (
    "Starting from an image file is not available when painting on remote workers; "
    "use init content or noise."
)
OUTAGE_GRACE = 120.0
"""Seconds a worker keeps retrying to report a finished job while Redis is down."""
STREAM_MAXLEN = 200
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerOptions:
    """This worker's own settings; a job's settings can never override them."""

    broker: str
    device: str = "auto"
    weights: str | None = None
    backbone: str = "vgg19"
    engine: str = "core.engine:stylize"
    warmup: bool = True
    node: str = "pastiche@localhost"
    threads: int | None = None
    """Torch CPU threads; None = torch's default (all cores)."""

    def server_side(self, settings: Settings) -> Settings:
        """A job's settings with this worker's device and weights, and no file paths."""
        if settings.init == "image" or settings.init_image:
            raise SettingsError(NO_INIT_IMAGE)
        weights = self.weights if settings.backbone == self.backbone else None
        return settings.replace(device=self.device, weights=weights, init_image=None)


def _log_message(message: object) -> None:
    """``prepare_engine``'s messages into this worker's log."""
    if isinstance(message, Log):
        log.log(message.level, message.text)


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, **client_options())


def connection_errors() -> tuple[type[BaseException], ...]:
    from redis import exceptions as rx

    return (rx.ConnectionError, rx.TimeoutError, OSError)


def redis_error() -> type[BaseException]:
    from redis import RedisError

    return RedisError


def retrying(action: Callable[[], T], what: str, patience: float = OUTAGE_GRACE) -> T:
    """Run a Redis call, retrying through a broker outage of up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            return action()
        except connection_errors() as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable while %s (%s); retrying", what, exc)
            time.sleep(delay)
            delay = min(2.0, delay * 2)


class Heartbeat(threading.Thread):
    """Keeps this worker's presence record and its job's heartbeat fresh, and turns the
    runner's stop request into ``stop_requested`` (read by the engine's ``should_stop``)."""

    def __init__(self, url: str, node: str, info: dict[str, Any]) -> None:
        super().__init__(name="pastiche-heartbeat", daemon=True)
        self.redis = redis_client(url)
        self.node = node
        self.info = info
        self.stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._job: JobKeys | None = None
        self._holder = ""
        self._idle = threading.Event()
        self._quit = False
        self._failing = False

    def begin(self, keys: JobKeys, holder: str, client: Any) -> None:
        with self._lock:
            self._job, self._holder = keys, holder
            self.stop_requested.clear()
            self.info["job"] = keys.job_id
        retrying(lambda: client.set(keys.alive, holder, ex=HEARTBEAT_TTL), "starting a job")
        self._idle.set()

    def end(self, client: Any) -> None:
        with self._lock:
            keys, self._job = self._job, None
            self.info["job"] = None
        if keys is not None:
            try:
                client.delete(keys.alive)
            except connection_errors():
                pass  # it expires by itself

    def quit(self) -> None:
        self._quit = True
        self._idle.set()

    def run(self) -> None:
        while not self._quit:
            try:
                keys = self._beat()
                if keys is None:
                    self._idle.wait(HEARTBEAT_INTERVAL)
                    self._idle.clear()
                else:
                    self._watch(keys)
                self._failing = False
            except (*connection_errors(), redis_error()) as exc:
                if not self._failing:
                    log.warning("heartbeat: Redis unavailable (%s); retrying", exc)
                self._failing = True
                time.sleep(HEARTBEAT_INTERVAL)
        try:
            self.redis.delete(worker_key(self.node))
        except connection_errors():
            pass

    def _beat(self) -> JobKeys | None:
        with self._lock:  # no network I/O under the lock: an outage must not block end()
            keys, holder, info = self._job, self._holder, json.dumps(self.info)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(worker_key(self.node), info, ex=HEARTBEAT_TTL)
        if keys is not None:
            pipe.set(keys.alive, holder, ex=HEARTBEAT_TTL)
            # Put the claim back if a Redis restart lost it (never steal another's).
            pipe.set(keys.claim, holder, nx=True, ex=KEY_TTL)
            pipe.exists(keys.stop)
        results = pipe.execute()
        if keys is not None and results[-1]:
            self._request_stop(keys)
        return keys

    def _watch(self, keys: JobKeys) -> None:
        """Wait for the next beat, waking at once when the runner pushes a stop request."""
        if self.redis.blpop([keys.wake], timeout=max(1, int(HEARTBEAT_INTERVAL))):
            self._request_stop(keys)

    def _request_stop(self, keys: JobKeys) -> None:
        with self._lock:
            if self._job == keys:
                self.stop_requested.set()


class Painter:
    """The child's warm engine, its Redis client and its heartbeat; runs one job at a time."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.redis = redis_client(options.broker)
        info = {
            "node": options.node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": options.device,
            "backbone": options.backbone,
            "weights": options.weights,
            "version": __version__,
            "since": time.time(),
            "job": None,
        }
        self.heart = Heartbeat(options.broker, options.node, info)
        self.engine: EngineFn | None = None
        self.animate: AnimateFn | None = None
        try:
            if options.threads is not None:
                import torch

                torch.set_num_threads(options.threads)
            self.engine = load_engine(options.engine)
            self.animate = load_animation_engine(options.engine)
        except Exception:
            log.exception("cannot load the engine %s", options.engine)
        if self.engine is not None:
            prepare_engine(options.engine, options.server_side(Settings()), _log_message)
        if self.engine is not None and options.warmup:
            self._warm_up()
        self.heart.start()  # announce this worker only once it is ready to paint

    def _warm_up(self) -> None:
        """Paint a tiny image so weights, kernels and caches are loaded before the first job."""
        from PIL import Image

        from core.images import encode_image

        assert self.engine is not None
        started = time.monotonic()
        content = encode_image(Image.linear_gradient("L").resize((48, 48)).convert("RGB"), "png")
        style = encode_image(Image.effect_noise((48, 48), 64).convert("RGB"), "png")
        tiny = Settings(size=48, iterations=1, pyramid=False, backbone=self.options.backbone)  # type: ignore[arg-type]
        settings = self.options.server_side(tiny)
        try:
            self.engine(content, [(style, 1.0)], settings)
            log.info("warm-up done in %.1f s", time.monotonic() - started)
        except Exception:
            log.warning("warm-up failed:\n%s", traceback.format_exc())

    def close(self) -> None:
        self.heart.quit()
        self.heart.join(HEARTBEAT_INTERVAL * 3)

    # ---- one job ------------------------------------------------------------------------------
    def run(self, job_id: str, raw: Any, redelivered: bool = False) -> str:
        """Claim, paint and report one job; returns what happened (shown by Flower)."""
        keys = JobKeys(job_id)
        holder = f"{self.options.node} pid {os.getpid()}"
        claimed = retrying(
            lambda: self.redis.set(keys.claim, holder, nx=True, ex=KEY_TTL), "claiming a job"
        )
        if not claimed:
            return self._duplicate(keys, job_id)
        if redelivered:
            log.warning("job %s was delivered again but had never been claimed", job_id)
        reason = retrying(lambda: self.redis.get(keys.stop), "checking a job")
        if reason is not None:
            self._publish(keys, JobCancelled(job_id, reason.decode(errors="replace")))
            return "cancelled before it started"
        self.heart.begin(keys, holder, self.redis)
        try:
            terminal, detail = self._paint(keys, job_id, raw)
            self._publish(keys, terminal, detail, patience=OUTAGE_GRACE)
        finally:
            self.heart.end(self.redis)
        return type(terminal).__name__

    def _duplicate(self, keys: JobKeys, job_id: str) -> str:
        """A job already claimed: drop it quietly while its first copy is alive or over;
        otherwise its painter died, so fail it clearly instead of painting it again."""
        deadline = time.monotonic() + HEARTBEAT_TTL  # a holder back from an outage beats again
        while True:
            stop, alive, holder = retrying(
                lambda: self.redis.mget([keys.stop, keys.alive, keys.claim]), "checking a job"
            )
            if stop is not None or alive is not None or time.monotonic() > deadline:
                break
            time.sleep(HEARTBEAT_INTERVAL / 2)
        who = (holder or b"?").decode(errors="replace")
        if stop is not None:
            why = stop.decode(errors="replace")
            log.warning("job %s delivered again after it ended (%s); dropped", job_id, why)
            return "duplicate dropped"
        if alive is not None:
            log.warning("job %s delivered again while %s paints it; dropped", job_id, who)
            return "duplicate dropped"
        log.error(
            "job %s delivered again after %s stopped; failing it, not repainting", job_id, who
        )
        self._publish(keys, Failed(job_id, REDELIVERED), patience=HEARTBEAT_TTL)
        retrying(lambda: self.redis.set(keys.stop, "redelivered", ex=KEY_TTL), "ending a job")
        return "redelivered: failed"

    def _paint(self, keys: JobKeys, job_id: str, raw: Any) -> tuple[TerminalEvent, str | None]:
        relay = ProgressRelay(job_id, lambda event: self._publish(keys, event))
        try:
            request = wire.request_from_json(raw)
            settings = self.options.server_side(request.settings)
            if request.label and "label" not in settings.extra:
                settings = settings.replace(extra={**settings.extra, "label": request.label})
            if self.engine is None:
                raise RuntimeError("the engine could not be loaded (see this worker's log)")
            self._publish(keys, Started(job_id))
            kind = probe_animation(request.content)
            if kind is not None:
                return self._paint_animation(job_id, request, kind, settings, relay), None
            result = self.engine(
                request.content,
                list(request.styles),
                settings,
                on_progress=relay,
                should_stop=self.heart.stop_requested.is_set,
            )
            relay.flush()
            return self._done(job_id, result), None
        except Cancelled:
            return JobCancelled(job_id, "stopped on request"), None
        except PasticheError as exc:
            return Failed(job_id, str(exc)), None
        except Exception:
            detail = traceback.format_exc()
            log.error("job %s failed:\n%s", job_id, detail)
            return Failed(job_id, GENERIC_FAILURE), f"on {self.options.node}:\n{detail}"

    def _paint_animation(
        self,
        job_id: str,
        request: JobRequest,
        kind: AnimationInfo,
        settings: Settings,
        relay: ProgressRelay,
    ) -> Done:
        """Every frame painted and encoded as the request asks (or as the input's own kind)."""
        if self.animate is None:
            raise SettingsError("This painting engine cannot paint animations; send a still image.")
        result = self.animate(
            request.content,
            list(request.styles),
            settings,
            on_progress=relay,
            should_stop=self.heart.stop_requested.is_set,
        )
        relay.flush()
        fmt = request.animation_format or default_animation_format(kind)
        metadata = dict(result.metadata)
        data = encode_animation(result.animation, fmt, metadata=metadata)
        width, height = result.animation.size
        return Done(job_id, data, metadata, width, height, MIME_TYPES[fmt], len(result.animation))

    @staticmethod
    def _done(job_id: str, result: Any) -> Done:
        from core.images import encode_image

        metadata = dict(result.metadata)
        png = encode_image(result.image, "png", metadata=metadata)
        return Done(job_id, png, metadata, result.image.width, result.image.height)

    def _publish(
        self, keys: JobKeys, event: Event, detail: str | None = None, patience: float = 0.0
    ) -> None:
        """Append an event to the job's stream; progress is dropped during an outage, a
        terminal event is retried for ``patience`` seconds."""
        fields = wire.event_to_fields(event, detail)

        def send() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(keys.events, fields, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(keys.events, STREAM_TTL)
            pipe.execute()

        try:
            if patience:
                retrying(send, "reporting a job's end", patience)
            else:
                send()
        except connection_errors() as exc:
            level = logging.ERROR if patience else logging.DEBUG
            log.log(
                level, "could not send %s for job %s: %s", type(event).__name__, keys.job_id, exc
            )
