"""``pastiche worker``: a Celery worker that paints the jobs a bot or helper puts on the broker.

Run one per GPU (``--device cuda:1``). Each is a Celery prefork pool of exactly one child: the
parent never imports torch and only talks to the broker (so it answers Flower, and kills and
replaces its child), the child loads the engine after the fork (a process forked after CUDA was
initialised cannot use CUDA) and keeps it warm between jobs; what it does with each job is
``core.jobs.celery_painter``. The worker knows one task, accepts only JSON, and stops with a
sentence when the broker is unreachable or refuses its password.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from core.errors import SettingsError
from core.jobs import wire
from core.jobs.broker import (
    BROKER_ENV,
    QUEUE,
    STREAM_TTL,
    TASK_NAME,
    VISIBILITY_TIMEOUT,
    WORKER_LOST,
    BrokerError,
    JobKeys,
    check,
    make_app,
    node_name,
    normalise_url,
    redact,
)
from core.jobs.celery_painter import (
    STREAM_MAXLEN,
    Painter,
    WorkerOptions,
    connection_errors,
    redis_client,
)
from core.jobs.events import Event, Failed, JobCancelled
from core.settings import BACKBONES, Settings

log = logging.getLogger("pastiche.worker")

_OPTIONS: WorkerOptions | None = None  # set by main() in the parent, inherited by the child
_PAINTER: Painter | None = None  # built in the child after the fork


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
    _PAINTER = Painter(_OPTIONS)


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
        _PARENT_REDIS = redis_client(_OPTIONS.broker)
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
    except connection_errors() as exc:
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
