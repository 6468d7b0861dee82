"""``python -m benchmarks.gpu``: the engine on a CUDA GPU at 512, 1024 and 2048 px.

Nothing on the engine's CUDA path had been run when this was written (the project's machines
have no GPU), so this is the check to run whenever one is at hand: for each size and each way of
running it prints the time per step, steps per second and the peak GPU memory, with random VGG19
weights and synthetic images. The ways are the CUDA-only code paths: bf16 autocast and fp32,
cuDNN's own pooling (``fused_pooling`` off: the fused ReLU + pool is made for CPUs),
``channels_last``, ``torch.compile`` of the network, and what ``precision="auto"`` picks by
measuring (core/engine/autotune.py).
Every run is one scale (no pyramid) of ``--steps`` L-BFGS steps after ``--warmup`` untimed ones.
Then ``--paint`` runs whole paintings as a user gets them (the pyramid, default quality and
settings): by default 512 px with the default budget, and 4096 px within ``--max-memory 2GB``
of GPU memory, which paints its last scales in tiles (issue 15's planner on CUDA), printing
wall time, the peak GPU memory against the budget and the planner's prediction, and the tiles.

Without a CUDA device it says so and exits with status 2. ``--device cpu`` runs the same code on
the CPU (tests use it at tiny sizes; peak memory is then the process's peak RSS).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIZES = (512, 1024, 2048)
PAINT = "512:auto,4096:2GB"
VARIANTS: dict[str, dict[str, Any]] = {
    "auto (measured choice)": {},
    "bf16, cuDNN pooling, channels_last": {
        "precision": "bf16",
        "fused_pooling": False,
        "channels_last": True,
    },
    "fp32, cuDNN pooling, channels_last": {
        "precision": "fp32",
        "fused_pooling": False,
        "channels_last": True,
    },
    "bf16, cuDNN pooling, contiguous": {
        "precision": "bf16",
        "fused_pooling": False,
        "channels_last": False,
    },
    "bf16, cuDNN pooling, channels_last, compiled": {
        "precision": "bf16",
        "fused_pooling": False,
        "channels_last": True,
    },
}
COMPILED = {"bf16, cuDNN pooling, channels_last, compiled"}
"""Variants run under ``torch.compile`` (benchmarks/workers.py: compiled_models); the
compiling happens in the untimed warm-up steps, so it shows in the wall time only."""
NO_CUDA = (
    "benchmarks.gpu: no CUDA device here (torch {version}, torch.cuda.is_available() is False). "
    "Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch; `--device cpu` runs "
    "the same code on the CPU."
)


@dataclass
class Row:
    size: tuple[int, int]
    variant: str
    seconds_per_step: float
    wall: float
    peak_mb: float
    loss: float
    path: str
    reason: str

    def line(self) -> str:
        w, h = self.size
        return (
            f"{w}x{h:<5} {self.variant:46s} {self.seconds_per_step:7.3f} s/step "
            f"{1 / self.seconds_per_step:7.2f} steps/s  peak {self.peak_mb:8.0f} MB  "
            f"wall {self.wall:6.1f} s  loss {self.loss:.5g}  ran {self.path} ({self.reason})"
        )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="long sides, px")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile variant (minutes)"
    )
    parser.add_argument(
        "--variants", default="", help="only the variants whose name holds this text"
    )
    parser.add_argument(
        "--paint", default=PAINT, help="whole runs, SIZE:MAX_MEMORY,... ('' for none)"
    )
    ns = parser.parse_args(list(argv))
    try:
        ns.sizes = tuple(int(v) for v in ns.sizes.split(",") if v.strip())
        ns.paint = [
            (int(size), budget)
            for size, budget in (v.split(":") for v in ns.paint.split(",") if v.strip())
        ]
    except ValueError:
        parser.error("--sizes takes whole numbers, --paint SIZE:MAX_MEMORY pairs, by commas")
    if ns.steps < 1 or ns.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    return ns


def peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from benchmarks.workers import peak_rss_mb

    return peak_rss_mb()


def run_one(content: Path, style: Path, size: int, name: str, ns: argparse.Namespace) -> Row:
    """One variant at one size: ``warmup + steps`` steps at a single scale."""
    import contextlib

    import torch

    from benchmarks.workers import compiled_models
    from core.engine.run import default_engine
    from core.settings import Settings

    device = torch.device(ns.device)
    n = ns.warmup + ns.steps
    settings = Settings(
        backbone="random", device=ns.device, size=size, pyramid=False, iterations=n,
        initial_iterations=n, early_stop=0.0, preview_every=0, **VARIANTS[name],
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []
    started = time.perf_counter()
    engine = default_engine()
    engine.warm_up(settings)  # built (and the speed probe made) before the compiled wrapper
    compiled = compiled_models(engine) if name in COMPILED else contextlib.nullcontext()
    with compiled:
        # Progress reads the loss (a device sync), so the stamps are step boundaries.
        result = engine.stylize(
            str(content),
            [str(style)],
            settings,
            on_progress=lambda p: stamps.append(time.perf_counter()),
        )
    wall = time.perf_counter() - started
    steps = [b - a for a, b in zip(stamps[ns.warmup - 1 :], stamps[ns.warmup :], strict=False)]
    speed = result.metadata.get("speed", {})
    return Row(
        size=result.image.size,
        variant=name,
        seconds_per_step=statistics.median(steps),
        wall=wall,
        peak_mb=peak_memory_mb(device),
        loss=result.metadata["losses"]["total"],
        path=speed.get("path", result.metadata.get("precision", "?")),
        reason=speed.get("reason", "?"),
    )


def paint(content: Path, style: Path, size: int, budget: str, ns: argparse.Namespace) -> str:
    """A whole painting with default settings at ``size`` px within ``budget``: one line."""
    import torch

    from core.engine.run import default_engine
    from core.settings import Settings

    device = torch.device(ns.device)
    settings = Settings(backbone="random", device=ns.device, size=size, max_memory=budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = default_engine().stylize(str(content), [str(style)], settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    meta = result.metadata
    memory = meta.get("memory", {})
    w, h = result.image.size
    return (
        f"paint {w}x{h} --max-memory {budget}: wall {wall:.1f} s, peak {peak_memory_mb(device):.0f}"
        f" MB, budget {(memory.get('budget') or 0) / 2**20:.0f} MB, predicted "
        f"{memory.get('predicted_peak', 0) / 2**20:.0f} MB, tiles per scale {meta.get('tiles')}, "
        f"steps {meta.get('steps', '?')}, loss {meta['losses']['total']:.5g}, "
        f"ran {meta.get('speed', {}).get('path', '?')}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2
    from benchmarks.bench import synthetic_images

    device = torch.device(ns.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"benchmarks.gpu on {where}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); "
        f"random VGG19 weights, synthetic images; {ns.warmup} untimed + {ns.steps} timed "
        "L-BFGS steps per run, one scale; s/step is the median timed step",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="pastiche-gpu-") as tmp:
        content, style = synthetic_images(Path(tmp), max(ns.sizes + tuple(s for s, _ in ns.paint)))
        for size in ns.sizes:
            for name in VARIANTS:
                if (ns.no_compile and name in COMPILED) or ns.variants not in name:
                    continue
                try:
                    row = run_one(content, style, size, name, ns)
                except torch.cuda.OutOfMemoryError as exc:
                    print(f"{size:5d} px {name:46s} out of GPU memory: {exc}", flush=True)
                    continue
                except Exception as exc:  # e.g. torch.compile's tracer; the other rows still count
                    print(
                        f"{size:5d} px {name:46s} failed: {type(exc).__name__}: {exc}", flush=True
                    )
                    continue
                print(row.line(), flush=True)
        for size, budget in ns.paint:
            try:
                print(paint(content, style, size, budget, ns), flush=True)
            except Exception as exc:  # the other rows still count
                print(f"paint {size} px {budget}: failed: {type(exc).__name__}: {exc}", flush=True)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
