"""``pastiche worker``: a Celery worker that paints the jobs a bot or helper puts on the broker.

Run one per GPU (``--device cuda:1``). Each is a Celery prefork pool of exactly one child: the
parent never imports torch and only talks to the broker (so it can answer Flower, and kill and
replace its child), the child loads the engine after the fork (a process forked after CUDA was
initialised cannot use CUDA) and keeps it warm between jobs. The child claims each job in Redis
before painting it, so a job delivered twice is never painted twice, sends the job's events to
a Redis stream (JSON, see ``core.jobs.wire``), beats a heartbeat while it paints and stops
within one optimiser step when the runner asks. Weights, device and any file path are this
worker's own: a broker message cannot choose them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from core import __version__
from core.errors import Cancelled, PasticheError, SettingsError
from core.jobs import wire
from core.jobs.backend import GENERIC_FAILURE
from core.jobs.broker import (
    BROKER_ENV,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TTL,
    KEY_TTL,
    QUEUE,
    STREAM_TTL,
    TASK_NAME,
    VISIBILITY_TIMEOUT,
    WORKER_LOST,
    BrokerError,
    JobKeys,
    check,
    client_options,
    make_app,
    node_name,
    normalise_url,
    redact,
    worker_key,
)
from core.jobs.events import (
    Done,
    Event,
    Failed,
    JobCancelled,
    Preview,
    ProgressUpdate,
    Started,
    TerminalEvent,
)
from core.jobs.worker import PREVIEW_INTERVAL, PROGRESS_INTERVAL, EngineFn, load_engine
from core.settings import BACKBONES, Settings

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


_OPTIONS: WorkerOptions | None = None  # set by main() in the parent, inherited by the child
_PAINTER: _Painter | None = None  # built in the child after the fork


# ---- the child process -----------------------------------------------------------------------
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, **client_options())


def _connection_errors() -> tuple[type[BaseException], ...]:
    from redis import exceptions as rx

    return (rx.ConnectionError, rx.TimeoutError, OSError)


def _redis_error() -> type[BaseException]:
    from redis import RedisError

    return RedisError


def _retrying(action: Callable[[], T], what: str, patience: float = OUTAGE_GRACE) -> T:
    """Run a Redis call, retrying through a broker outage of up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            return action()
        except _connection_errors() as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable while %s (%s); retrying", what, exc)
            time.sleep(delay)
            delay = min(2.0, delay * 2)


class _Heartbeat(threading.Thread):
    """Keeps this worker's presence record and its job's heartbeat fresh, and turns the
    runner's stop request into ``stop_requested`` (read by the engine's ``should_stop``)."""

    def __init__(self, url: str, node: str, info: dict[str, Any]) -> None:
        super().__init__(name="pastiche-heartbeat", daemon=True)
        self.redis = _redis(url)
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
        _retrying(lambda: client.set(keys.alive, holder, ex=HEARTBEAT_TTL), "starting a job")
        self._idle.set()

    def end(self, client: Any) -> None:
        with self._lock:
            keys, self._job = self._job, None
            self.info["job"] = None
        if keys is not None:
            try:
                client.delete(keys.alive)
            except _connection_errors():
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
            except (*_connection_errors(), _redis_error()) as exc:
                if not self._failing:
                    log.warning("heartbeat: Redis unavailable (%s); retrying", exc)
                self._failing = True
                time.sleep(HEARTBEAT_INTERVAL)
        try:
            self.redis.delete(worker_key(self.node))
        except _connection_errors():
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


class _ProgressRelay:
    """The engine's progress as events: at most ~5 updates and one preview a second, the
    last update always sent (the same pacing as the local workers)."""

    def __init__(self, job_id: str, send: Callable[[Event], None]) -> None:
        self.job_id, self.send = job_id, send
        self.last_sent = 0.0
        self.last_preview = 0.0
        self.pending: ProgressUpdate | None = None

    def __call__(self, progress: Any) -> None:
        from core.images import encode_image

        now = time.monotonic()
        preview = getattr(progress, "preview", None)
        if preview is not None and now - self.last_preview >= PREVIEW_INTERVAL:
            self.last_preview = now
            self.send(Preview(self.job_id, encode_image(preview, "png")))
        self.pending = ProgressUpdate(
            self.job_id,
            percent=float(progress.percent),
            step=int(progress.step),
            total_steps=int(progress.total_steps),
            scale=int(progress.scale),
            scales=int(progress.scales),
            eta=None if progress.eta is None else float(progress.eta),
            losses={str(k): float(v) for k, v in progress.losses.items()},
        )
        if now - self.last_sent >= PROGRESS_INTERVAL or progress.step >= progress.total_steps:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            self.send(self.pending)
            self.last_sent = time.monotonic()
            self.pending = None


class _Painter:
    """The child's warm engine, its Redis client and its heartbeat; runs one job at a time."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.redis = _redis(options.broker)
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
        self.heart = _Heartbeat(options.broker, options.node, info)
        self.engine: EngineFn | None = None
        try:
            if options.threads is not None:
                import torch

                torch.set_num_threads(options.threads)
            self.engine = load_engine(options.engine)
        except Exception:
            log.exception("cannot load the engine %s", options.engine)
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
        claimed = _retrying(
            lambda: self.redis.set(keys.claim, holder, nx=True, ex=KEY_TTL), "claiming a job"
        )
        if not claimed:
            return self._duplicate(keys, job_id)
        if redelivered:
            log.warning("job %s was delivered again but had never been claimed", job_id)
        reason = _retrying(lambda: self.redis.get(keys.stop), "checking a job")
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
            stop, alive, holder = _retrying(
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
        _retrying(lambda: self.redis.set(keys.stop, "redelivered", ex=KEY_TTL), "ending a job")
        return "redelivered: failed"

    def _paint(self, keys: JobKeys, job_id: str, raw: Any) -> tuple[TerminalEvent, str | None]:
        relay = _ProgressRelay(job_id, lambda event: self._publish(keys, event))
        try:
            request = wire.request_from_json(raw)
            settings = self.options.server_side(request.settings)
            if request.label and "label" not in settings.extra:
                settings = settings.replace(extra={**settings.extra, "label": request.label})
            if self.engine is None:
                raise RuntimeError("the engine could not be loaded (see this worker's log)")
            self._publish(keys, Started(job_id))
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
                _retrying(send, "reporting a job's end", patience)
            else:
                send()
        except _connection_errors() as exc:
            level = logging.ERROR if patience else logging.DEBUG
            log.log(
                level, "could not send %s for job %s: %s", type(event).__name__, keys.job_id, exc
            )


# ---- Celery wiring ---------------------------------------------------------------------------
def register(app: Any) -> Any:
    """Pastiche's one task on ``app``; the worker knows no other."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
    def paint(task: Any, job_id: str, request: dict[str, Any]) -> str:
        if _PAINTER is None:
            raise RuntimeError("this process has no engine (pastiche worker runs prefork only)")
        delivery = getattr(task.request, "delivery_info", None) or {}
        return _PAINTER.run(job_id, request, redelivered=bool(delivery.get("redelivered")))

    return paint


def _init_child(**_: Any) -> None:
    """Celery's worker_process_init: build the painter in the freshly forked child."""
    global _PAINTER
    assert _OPTIONS is not None
    _PAINTER = _Painter(_OPTIONS)


def _shutdown_child(**_: Any) -> None:
    if _PAINTER is not None:
        _PAINTER.close()


_PARENT_REDIS: Any = None


def _on_task_failure(task_id: str | None = None, exception: Any = None, **_: Any) -> None:
    """Celery's task_failure, in the parent: the child died mid-job (killed, out of memory,
    the hard time limit). Report it now rather than after the heartbeat has gone quiet; the
    job's message is acknowledged, so a poison image is never handed to the next worker."""
    global _PARENT_REDIS
    from billiard.exceptions import TimeLimitExceeded, WorkerLostError

    if _PAINTER is not None or not task_id or _OPTIONS is None:
        return  # in the child a job never raises; its events tell the runner everything
    if not isinstance(exception, (WorkerLostError, TimeLimitExceeded)):
        return
    if _PARENT_REDIS is None:
        _PARENT_REDIS = _redis(_OPTIONS.broker)
    keys = JobKeys(task_id)
    try:
        reason = _PARENT_REDIS.get(keys.stop)
        event: Event = (
            Failed(task_id, WORKER_LOST)
            if reason is None
            else JobCancelled(task_id, reason.decode(errors="replace"))
        )
        log.error("job %s: the painting process died (%r)", task_id, exception)
        pipe = _PARENT_REDIS.pipeline(transaction=False)
        pipe.xadd(keys.events, wire.event_to_fields(event), maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(keys.events, STREAM_TTL)
        pipe.delete(keys.alive)
        pipe.execute()
    except _connection_errors() as exc:
        log.warning("job %s: could not report the lost process: %s", task_id, exc)


# ---- the command -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pastiche worker",
        description="Paint the jobs of a Pastiche bot or helper that uses backend = celery "
        "(one worker per GPU; see docs/SCALING.md).",
    )
    p.add_argument(
        "--broker",
        default=os.environ.get(BROKER_ENV),
        help=f"Redis URL, redis://:PASSWORD@HOST:6379/0 or rediss:// (default: ${BROKER_ENV})",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--weights", default=None, help="local checkpoint for --backbone")
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="vgg19",
        help="the backbone --weights is for (jobs for another backbone use the download cache)",
    )
    p.add_argument("--name", default=None, help="worker name (default: pastiche@HOSTNAME)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores; give CPU workers sharing a machine fewer)",
    )
    p.add_argument(
        "--no-warmup", action="store_true", help="do not paint a tiny image before the first job"
    )
    p.add_argument(
        "--visibility-timeout",
        type=float,
        default=VISIBILITY_TIMEOUT,
        help="seconds before Redis redelivers an unacknowledged job; above the longest job "
        f"(default: {VISIBILITY_TIMEOUT})",
    )
    p.add_argument(
        "--engine", default="core.engine:stylize", help="module:function that paints (tests)"
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def options_from(args: argparse.Namespace) -> WorkerOptions:
    """Validate the command line; raises BrokerError or SettingsError with a sentence."""
    url = normalise_url(args.broker)
    if args.weights is not None and not Path(args.weights).expanduser().is_file():
        raise SettingsError(f"The weights file {args.weights} does not exist.")
    module = args.engine.partition(":")[0]
    if ":" not in args.engine or importlib.util.find_spec(module) is None:
        raise SettingsError(f"--engine must be an importable module:function, got {args.engine}.")
    Settings(device=args.device, backbone=args.backbone)  # validates both
    if args.threads is not None and args.threads < 1:
        raise SettingsError("--threads must be at least 1.")
    weights = str(Path(args.weights).expanduser().resolve()) if args.weights else None
    return WorkerOptions(
        broker=url,
        device=args.device,
        weights=weights,
        backbone=args.backbone,
        engine=args.engine,
        warmup=not args.no_warmup,
        node=node_name(args.name),
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry (``pastiche worker``): check the broker, then serve until stopped."""
    global _OPTIONS
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        options = options_from(args)
        check(options.broker)
    except (BrokerError, SettingsError) as exc:
        print(f"pastiche worker: error: {exc}", file=sys.stderr)
        return 2
    _OPTIONS = options
    from celery import signals

    app = make_app(options.broker, visibility_timeout=args.visibility_timeout)
    register(app)
    signals.worker_process_init.connect(_init_child, weak=False)
    signals.worker_process_shutdown.connect(_shutdown_child, weak=False)
    signals.task_failure.connect(_on_task_failure, weak=False)
    log.info(
        "worker %s: broker %s, device %s, weights %s",
        options.node,
        redact(options.broker),
        options.device,
        options.weights or "from the cache",
    )
    worker = app.Worker(
        hostname=options.node,
        pool_cls="prefork",
        concurrency=1,
        queues=[QUEUE],
        loglevel=args.log_level,
        without_gossip=True,
        without_mingle=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    raise SystemExit(main())
