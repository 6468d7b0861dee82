"""Print sizes within a memory budget: peak memory, time, and what tiling costs.

Each run is ``pastiche stylize`` in its own process (the command a user types), its peak RSS
read from the kernel when it exits (through benchmarks/peak.py's launcher, so this
process's own memory is not counted). Three measurements (issue 15's targets):

* ``2048``: 2048 px with ``--max-memory 1.5GB`` (peak must stay under 1.5 GB);
* ``4096``: 4096 px with ``--max-memory 3GB`` (under 3 GB, and under 30 minutes);
* ``overhead``: a size that also fits untiled (default 1024 px), untiled and with a budget
  that tiles its final scale, alternated; the ratio of the best wall times.

    python -m benchmarks.tiles overhead 2048          # one or more of: overhead 2048 4096
    python -m benchmarks.tiles 4096 --keep out/       # keep the painting to look at

Images: the benchmark's synthetic photo and painting (benchmarks/bench.py), random VGG19
weights, default quality; the machine and its load are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bench import cpu_name, load_average, synthetic_images
from .peak import run_python

ROOT = Path(__file__).resolve().parent.parent


def stylize(content: Path, style: Path, out: Path, *options: str) -> dict[str, Any]:
    """One ``pastiche stylize`` process: wall seconds, peak RSS (MiB and bytes), metadata."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [
        "-m", "core", "stylize", str(content), "--style", str(style),
        "-o", str(out), "--backbone", "random", "--quiet", *options,
    ]  # fmt: skip
    proc = run_python(command, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    from core.images import read_metadata

    meta = read_metadata(out) or {}
    peak = proc.peak_bytes  # the CLI's own, not this process's (benchmarks/peak.py)
    return {"options": list(options), "wall_seconds": proc.wall_seconds,
            "cpu_seconds": proc.cpu_seconds,  # the machine is shared: CPU time is steadier
            "peak_bytes": peak, "peak_mib": peak / 2**20, "metadata": meta}  # fmt: skip


def describe(run: dict[str, Any]) -> str:
    meta = run["metadata"]
    memory = meta.get("memory", {})
    return (
        f"{' '.join(run['options'])}: {run['wall_seconds']:.1f} s ({run['cpu_seconds']:.0f} s "
        f"CPU), peak RSS "
        f"{run['peak_bytes'] / 1e9:.3f} GB ({run['peak_mib']:.0f} MiB), tiles per scale "
        f"{meta.get('tiles')}, predicted peak {memory.get('predicted_peak', 0) / 1e9:.3f} GB, "
        f"loss {meta.get('losses', {}).get('total', float('nan')):.4g}"
    )


def budget_run(
    size: int, budget: str, images: tuple[Path, Path], keep: Path | None, extra: Sequence[str] = ()
) -> dict:
    content, style = images
    out = (keep or Path(tempfile.gettempdir())) / f"tiles-{size}.png"
    run = stylize(content, style, out, "--size", str(size), "--max-memory", budget, *extra)
    limit = float(budget.removesuffix("GB")) * 1e9
    run["within_budget"] = run["peak_bytes"] <= limit
    print(f"{size} px, --max-memory {budget}: {describe(run)}", flush=True)
    print(f"  peak within the budget: {run['within_budget']}", flush=True)
    if keep is None:
        out.unlink(missing_ok=True)
    return run


def overhead(size: int, budget: str, rounds: int, images: tuple[Path, Path]) -> dict:
    """Untiled and tiled runs of ``size`` px, alternated; best wall time of each."""
    content, style = images
    walls: dict[str, list[float]] = {"untiled": [], "tiled": []}
    cpus: dict[str, list[float]] = {"untiled": [], "tiled": []}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for label, options in (
                ("untiled", ("--size", str(size), "--max-memory", "1000GB")),
                ("tiled", ("--size", str(size), "--max-memory", budget)),
            ):
                run = stylize(content, style, Path(tmp) / f"{label}.png", *options)
                walls[label].append(run["wall_seconds"])
                cpus[label].append(run["cpu_seconds"])
                runs.append(run)
                print(f"  {label}: {describe(run)}", flush=True)
    ratio = min(walls["tiled"]) / min(walls["untiled"])
    cpu_ratio = min(cpus["tiled"]) / min(cpus["untiled"])
    print(
        f"tiling overhead at {size} px: {ratio:.2f}x the untiled wall time, {cpu_ratio:.2f}x "
        f"its CPU time (best of {rounds})"
    )
    return {"size": size, "budget": budget, "walls": walls, "cpus": cpus, "ratio": ratio,
            "cpu_ratio": cpu_ratio, "runs": runs}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiles")
    parser.add_argument("what", nargs="+", choices=("overhead", "2048", "4096"))
    parser.add_argument("--overhead-size", type=int, default=1024)
    parser.add_argument("--overhead-budget", default="1.5GB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="folder to keep the 2048/4096 paintings in")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument(
        "--extra",
        default="",
        help="more stylize options for the 2048/4096 runs, e.g. '--full-steps-up-to 0'",
    )
    ns = parser.parse_args(argv)
    if ns.keep:
        ns.keep.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load_average()}", flush=True)
    results: dict[str, Any] = {}
    extra = ns.extra.split()
    with tempfile.TemporaryDirectory(prefix="pastiche-tiles-") as tmp:
        side = 4096 if "4096" in ns.what else 2048
        images = synthetic_images(Path(tmp), side)
        for what in ns.what:
            if what == "overhead":
                results[what] = overhead(ns.overhead_size, ns.overhead_budget, ns.rounds, images)
            else:
                budget = "1.5GB" if what == "2048" else "3GB"
                results[what] = budget_run(int(what), budget, images, ns.keep, extra)
    print(f"load average at the end {load_average()}")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
