"""``python -m benchmarks.scaling``: the Celery backend's throughput and per-job overhead.

On one machine, with a private redis-server on loopback and real ``pastiche worker`` processes
(tests/celery_procs.py), it measures

* jobs per minute with one and with two Celery workers on the same small jobs, and the local
  backend with one worker process as the baseline measured in the same run;
* the per-job overhead of the Celery path against the local backend: the median time from
  ``submit`` to ``Done`` of one job at a time (nothing else queued), Celery minus local.

The jobs run tests/fake_engines.py's ``paint`` by default (``--steps`` steps of 20 ms that
sleep, so two workers do not compete for the CPU and the figures show the dispatching, not the
painting); ``--engine real`` paints tiny images with the real engine and random weights
instead (on a machine with fewer cores than workers, those compete). Needs redis-server and a
source checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.jobs import Done, JobRequest, Runner, RunnerConfig
from core.jobs.celery_backend import CeleryBackend
from core.settings import Settings
from tests.celery_procs import celery_stack

FAKE = "tests.fake_engines:paint"
REAL = "core.engine:stylize"


def png(width: int, height: int, seed: int) -> bytes:
    """A small textured test image (a gradient plus noise), PNG-encoded."""
    from PIL import Image

    gradient = Image.linear_gradient("L").resize((width, height)).rotate(seed * 37)
    noise = Image.effect_noise((width, height), 40 + seed % 50)
    img = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def job(steps: int, engine: str, seed: int) -> JobRequest:
    content = png(48, 36, seed)
    style = png(48, 48, seed + 1)
    settings = Settings(iterations=steps, size=48, pyramid=False, preview_every=0)
    if engine == REAL:
        settings = settings.replace(backbone="random", device="cpu", precision="fp32")
    return JobRequest(content, ((style, 1.0),), settings, f"bench-{seed}")


async def throughput(runner: Runner, jobs: int, steps: int, engine: str) -> float:
    """Jobs per minute for ``jobs`` jobs submitted at once (after two untimed ones)."""
    for seed in range(2):
        assert isinstance(
            await (await runner.submit(job(steps, engine, seed), "warm")).wait(), Done
        )
    started = time.perf_counter()
    submitted = [await runner.submit(job(steps, engine, i), f"owner-{i}") for i in range(jobs)]
    ends = await asyncio.gather(*(j.wait() for j in submitted))
    wall = time.perf_counter() - started
    assert all(isinstance(e, Done) for e in ends), [e for e in ends if not isinstance(e, Done)]
    return jobs / wall * 60


async def latency(runner: Runner, rounds: int, steps: int, engine: str) -> float:
    """Median seconds from submit to Done, one job at a time."""
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        end = await (await runner.submit(job(steps, engine, 100 + i), "latency")).wait()
        times.append(time.perf_counter() - started)
        assert isinstance(end, Done), end
    return statistics.median(times)


def config(workers: int, jobs: int, engine: str) -> RunnerConfig:
    return RunnerConfig(
        workers=workers,
        max_queue=jobs + 5,
        max_per_owner=jobs + 5,
        engine=engine,
        threads=1 if engine == REAL else None,
    )


async def measure_local(args: argparse.Namespace) -> dict[str, float]:
    async with Runner(config(1, args.jobs, args.engine)) as runner:
        return {
            "per_min": await throughput(runner, args.jobs, args.steps, args.engine),
            "latency": await latency(runner, args.rounds, args.steps, args.engine),
        }


async def measure_celery(args: argparse.Namespace, workers: int, tmp: Path) -> dict[str, float]:
    worker_args = ["--engine", args.engine, "--device", "cpu"]
    if args.engine == REAL:
        worker_args += ["--backbone", "random", "--threads", "1"]  # as the local runner's
    folder = tmp / f"celery-{workers}"
    folder.mkdir()
    with celery_stack(folder, workers, *worker_args) as stack:
        cfg = config(workers, args.jobs, args.engine)
        async with Runner(cfg, backend=CeleryBackend(cfg, stack.url)) as runner:
            result = {"per_min": await throughput(runner, args.jobs, args.steps, args.engine)}
            if workers == 1:
                result["latency"] = await latency(runner, args.rounds, args.steps, args.engine)
            return result


def machine() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{model}, {os.cpu_count()} cores, load average {load}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pastiche-scaling-") as tmp:
        local = await measure_local(args)
        one = await measure_celery(args, 1, Path(tmp))
        two = await measure_celery(args, 2, Path(tmp))
    return {"local": local, "celery1": one, "celery2": two}


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    engine = "fake (sleeping steps)" if args.engine == FAKE else "real, random weights"
    per_step = " x 20 ms" if args.engine == FAKE else ""
    print(f"machine: {machine()}")
    print(f"jobs: {args.jobs} x {args.steps} steps{per_step}, 48 px, engine {engine}")
    local, one, two = r["local"], r["celery1"], r["celery2"]
    print(f"local backend, 1 worker:   {local['per_min']:7.1f} jobs/min")
    print(f"celery, 1 worker:          {one['per_min']:7.1f} jobs/min")
    print(f"celery, 2 workers:         {two['per_min']:7.1f} jobs/min")
    print(f"latency, one job at a time: local {local['latency']:.3f} s, "
          f"celery {one['latency']:.3f} s")  # fmt: skip
    overhead = one["latency"] - local["latency"]
    print(f"two workers / one worker (celery): {two['per_min'] / one['per_min']:.2f}x")
    print(f"celery / local, 1 worker: {one['per_min'] / local['per_min']:.2f}x jobs per minute")
    print(f"per-job overhead of the Celery path vs local: {overhead:+.3f} s (target < 0.3 s)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--jobs", type=int, default=40, help="jobs per throughput run")
    parser.add_argument("--steps", type=int, default=10, help="engine steps per job")
    parser.add_argument("--rounds", type=int, default=15, help="jobs in the latency run")
    parser.add_argument("--engine", choices=("fake", "real"), default="fake")
    args = parser.parse_args(argv)
    args.engine = FAKE if args.engine == "fake" else REAL
    report(args, asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
