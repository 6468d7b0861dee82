"""``pastiche helper``: the local service the GIMP plug-in sends its images to.

It binds to loopback only (unless ``--force-public-bind``), writes a discovery file with its URL
and a fresh token for the plug-in, logs to a file users can attach to a bug report, and with
``--idle-exit`` goes away by itself once nobody has used it for a while (the plug-in starts it
that way). The HTTP API lives in :mod:`core.helper.app`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import web

from core import __version__
from core.errors import SettingsError
from core.helper.app import STATE, HelperOptions, MiB, create_app, is_loopback
from core.helper.files import (
    default_discovery_file,
    default_log_file,
    remove_discovery,
    setup_logging,
    write_discovery,
)
from core.jobs.broker import BROKER_ENV, BrokerError, normalise_url
from core.settings import BACKBONES, Settings

log = logging.getLogger("pastiche.helper")

TOKEN_ENV = "PASTICHE_HELPER_TOKEN"
PRESETS_ENV = "PASTICHE_PRESETS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pastiche helper",
        description="Run the local service the Pastiche GIMP plug-in talks to.",
    )
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    net.add_argument(
        "--force-public-bind",
        action="store_true",
        help="allow --host to be a non-loopback address (anyone who can reach it and has the "
        "token can use your computer's time)",
    )
    net.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token (default: ${TOKEN_ENV} or a random one)",
    )
    net.add_argument(
        "--discovery-file",
        type=Path,
        default=None,
        help=f"where to write URL and token (default: {default_discovery_file()})",
    )
    net.add_argument(
        "--max-upload-mb",
        type=float,
        default=200.0,
        help="largest accepted request in MiB (default: 200, a 6000 px layer as PNG)",
    )
    jobs = p.add_argument_group("jobs")
    jobs.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    jobs.add_argument("--max-queue", type=int, default=8, help="jobs waiting at most (default: 8)")
    jobs.add_argument(
        "--max-size",
        type=int,
        default=HelperOptions.max_size,
        help="longest side in pixels a job may ask for; the plug-in paints layers up to this "
        f"size at their own resolution (default: {HelperOptions.max_size})",
    )
    jobs.add_argument(
        "--job-timeout",
        type=float,
        default=HelperOptions.job_timeout,
        metavar="SECONDS",
        help=f"stop a job that runs longer (default: {HelperOptions.job_timeout:g})",
    )
    jobs.add_argument(
        "--orphan-timeout",
        type=float,
        default=30.0,
        help="cancel a job nobody polled for this many seconds (default: 30)",
    )
    jobs.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this many seconds without jobs or requests",
    )
    jobs.add_argument(
        "--presets",
        type=Path,
        default=os.environ.get(PRESETS_ENV),
        help=f"folder with presets.toml (default: ${PRESETS_ENV})",
    )
    jobs.add_argument(
        "--backend",
        choices=("local", "celery"),
        default="local",
        help="local: worker processes on this computer (default); celery: workers on other "
        "machines through --broker (docs/SCALING.md)",
    )
    jobs.add_argument(
        "--broker",
        default=os.environ.get(BROKER_ENV),
        help=f"Redis URL for --backend celery (default: ${BROKER_ENV})",
    )
    model = p.add_argument_group("model (defaults for every job)")
    model.add_argument("--backbone", choices=BACKBONES, default=Settings.backbone)
    model.add_argument("--weights", default=None, help="local checkpoint file for --backbone")
    model.add_argument("--device", default=Settings.device, help="auto, cpu, cuda, cuda:N or mps")
    model.add_argument(
        "--max-memory",
        default=Settings.max_memory,
        help="peak memory of a job, e.g. 2GB; larger paintings are made in tiles "
        "(default: auto, half of the free memory)",
    )
    p.add_argument(
        "--log-file", type=Path, default=None, help=f"log file (default: {default_log_file()})"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return p


async def serve(options: HelperOptions, *, host: str, port: int, discovery_file: Path) -> None:
    """Serve until stopped (signal, ``--idle-exit``); the discovery file exists meanwhile."""
    app = create_app(options)
    state = app[STATE]
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()  # starts the job runner (workers load the model)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if sys.platform != "win32" else ()
    written = False
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}"
        info = {"url": url, "token": options.token, "pid": os.getpid(), "version": __version__}
        write_discovery(discovery_file, info)
        written = True
        log.info("listening on %s (pid %d, discovery file %s)", url, os.getpid(), discovery_file)
        print(
            f"Pastiche helper {__version__} listening on {url}\n"
            f"  discovery file: {discovery_file}\n  log file: {options.log_file}",
            file=sys.stderr,
            flush=True,
        )
        for sig in signals:
            loop.add_signal_handler(sig, state.stop.set)
        await state.stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if written:
            remove_discovery(discovery_file, options.token)
        await runner.cleanup()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and not args.force_public_bind:
        print(
            f"Refusing to listen on {args.host}: the helper is meant for this computer only. "
            "Add --force-public-bind if you really want other machines to reach it.",
            file=sys.stderr,
        )
        return 2
    try:
        defaults = Settings(
            backbone=args.backbone,
            weights=args.weights,
            device=args.device,
            max_memory=args.max_memory,
        )
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if (
        args.max_upload_mb <= 0 or args.workers < 1 or args.max_queue < 1
        or not 16 <= args.max_size <= 8192 or args.job_timeout <= 0
    ):  # fmt: skip
        print(
            "--max-upload-mb, --workers, --max-queue and --job-timeout must be positive, and "
            "--max-size between 16 and 8192.",
            file=sys.stderr,
        )
        return 2
    broker = None
    if args.backend == "celery":
        try:
            broker = normalise_url(args.broker)
        except BrokerError as exc:
            print(exc, file=sys.stderr)
            return 2
    log_file = (args.log_file or default_log_file()).expanduser()
    handler = setup_logging(log_file, verbose=args.verbose)
    options = HelperOptions(
        token=args.token or secrets.token_urlsafe(32),
        defaults=defaults,
        workers=args.workers,
        max_queue=args.max_queue,
        max_upload=int(args.max_upload_mb * MiB),
        max_size=args.max_size,
        job_timeout=args.job_timeout,
        orphan_timeout=args.orphan_timeout,
        idle_exit=args.idle_exit,
        presets=args.presets,
        log_file=log_file,
        extra_hosts=frozenset() if is_loopback(args.host) else frozenset({args.host.lower()}),
        backend=args.backend,
        broker=broker,
    )
    discovery = (args.discovery_file or default_discovery_file()).expanduser()
    try:
        asyncio.run(serve(options, host=args.host, port=args.port, discovery_file=discovery))
    except OSError as exc:  # port taken, discovery folder not writable, ...
        where = exc.filename or f"{args.host}:{args.port}"
        log.error("could not start: %s", exc)
        print(
            f"The Pastiche helper could not start ({where}): {exc.strerror or exc}.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        logging.getLogger().removeHandler(handler)
        with contextlib.suppress(Exception):
            handler.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
