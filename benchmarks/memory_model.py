"""Measure what one optimisation scale adds to a process's peak memory, and fit the engine's
memory model (core/engine/memory_model.py) to it.

Each point runs in a fresh process: build the model, trim the heap, reset the kernel's peak-RSS
mark (``/proc/self/clear_refs``), run one scale of ``stylize`` (no pyramid) for enough steps to
fill L-BFGS's history, and report the peak over the RSS at the start. The fit is least squares
of that extra memory against the number of pixels: a fixed part and a part per pixel. Points are
measured with the heap kept whole unless ``--huge-pages`` puts torch's large blocks on
transparent huge pages (the engine's default; the engine's model has a table for each).

    python -m benchmarks.memory_model                       # measure, fit, print the table
    python -m benchmarks.memory_model --sizes 256,512 --variants lbfgs/bf16
    python -m benchmarks.memory_model --huge-pages --variants lbfgs/bf16,lbfgs/fp32
    python -m benchmarks.memory_model --device cuda --sizes 512,1024,1536,2048,3072

On CUDA the same is read from PyTorch's allocator: GPU memory allocated at the scale's start
and the allocator's peak (``torch.cuda.max_memory_allocated``) after it.

Tests (tests/test_memory_model.py) call :func:`measure` at a few sizes and compare the
measured extra with the model's prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "MEMORY-POINT "
VARIANTS = (
    "lbfgs/fp32", "lbfgs/bf16", "adam/fp32", "adam/bf16", "lbfgs/plain", "adam/plain",
    "targets/fp32", "targets/bf16", "targets/plain",
)  # fmt: skip
"""optimizer/precision kind; "plain" is fp32 without Winograd and fused pooling (the graph a GPU
runs, and the CPU's with those levers off); "targets" is no optimisation at all, only the
forward passes without gradients that compute the targets, at the same size for content and
style."""


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text(encoding="ascii")
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def reset_peak() -> None:
    """Set the kernel's peak-RSS mark (VmHWM, ru_maxrss) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def settings_for(
    variant: str, size: int, iterations: int, device: str = "cpu", **changes: Any
) -> Any:
    from core.settings import Settings

    optimizer, kind = variant.split("/")
    if optimizer == "targets":
        optimizer, iterations = "lbfgs", 0
    levers: dict[str, Any] = {"precision": "bf16" if kind == "bf16" else "fp32"}
    if kind == "plain":
        levers.update(winograd=False, fused_pooling=False)
    return Settings(
        backbone="random", device=device, size=size, pyramid=False, optimizer=optimizer,
        iterations=iterations, initial_iterations=iterations, early_stop=0.0, preview_every=0,
        **levers, **changes,
    )  # fmt: skip


def point(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this process (which must be fresh): see the module docstring."""
    from PIL import Image

    from benchmarks.bench import synthetic_images
    from benchmarks.workers import _prebuild
    from core.engine import run as engine
    from core.engine.cpu import memory

    device = spec.get("device", "cpu")
    settings = settings_for(spec["variant"], spec["size"], spec["iterations"], device)
    with tempfile.TemporaryDirectory() as tmp:
        c, s = synthetic_images(Path(tmp), spec["size"])
        content = Image.open(c).convert("RGB")
        style = Image.open(s).convert("RGB").resize((spec["style"], spec["style"]))
    _prebuild(engine.default_engine(), settings)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated() // 1024
        torch.cuda.reset_peak_memory_stats()
        result = engine.stylize(content, [style], settings)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() // 1024
    else:
        memory.keep_freed_memory()
        memory.release()
        start = _status_kib("VmRSS")
        reset_peak()
        result = engine.stylize(content, [style], settings)
        peak = _status_kib("VmHWM")
    w, h = result.metadata["scales"][-1]
    if spec["variant"].startswith("targets/"):  # the square style image is the larger forward
        w, h = style.size
    return {
        **spec,
        "huge_pages": device == "cpu" and memory.huge_pages(),
        "pixels": w * h,
        "start_mb": start / 1024,
        "peak_mb": peak / 1024,
        "extra_mb": (peak - start) / 1024,
    }


def measure(
    variant: str,
    size: int,
    iterations: int = 12,
    style: int = 256,
    device: str = "cpu",
    huge_pages: bool = False,
) -> dict[str, Any]:
    """:func:`point` in a fresh Python process (so nothing else sets its peak); ``huge_pages``:
    torch's large blocks on transparent huge pages, as the engine has them by default where the
    kernel offers them (the point says whether it did: ``huge_pages`` in the result)."""
    if variant.startswith("targets/"):
        style = size
    spec = {
        "variant": variant, "size": size, "iterations": iterations, "style": style,
        "device": device,
    }  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # Without huge pages the heap is kept whole (core/engine/cpu/memory.py), which peaks higher
    # (979-1014 against 746-818 MiB at 512 px): the model has a table for each.
    env["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_model", "--point", json.dumps(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    raise RuntimeError(f"memory point {spec} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def fit(points: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(fixed MiB, bytes per pixel) by least squares of extra memory on pixels."""
    n = len(points)
    xs = [p["pixels"] for p in points]
    ys = [p["extra_mb"] * 2**20 for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return (my - slope * mx) / 2**20, slope


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_model")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="256,384,512,768,1024")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--huge-pages", action="store_true", help="torch's large CPU blocks on huge pages"
    )
    ns = parser.parse_args(argv)
    if ns.point:
        print(PREFIX + json.dumps(point(json.loads(ns.point))), flush=True)
        return 0
    sizes = [int(v) for v in ns.sizes.split(",")]
    for variant in ns.variants.split(","):
        points = []
        for size in sizes:
            p = measure(variant, size, ns.iterations, device=ns.device, huge_pages=ns.huge_pages)
            points.append(p)
            print(
                f"{variant:12s} {size:5d} px  {p['pixels']:8d} pixels  start {p['start_mb']:7.1f}"
                f"  peak {p['peak_mb']:7.1f}  extra {p['extra_mb']:7.1f} MiB",
                flush=True,
            )
        fixed, per_px = fit(points)
        worst = max(abs(p["extra_mb"] - (fixed + per_px * p["pixels"] / 2**20)) for p in points)
        print(
            f"{variant:12s} fit: {fixed:.1f} MiB + {per_px:.1f} B/pixel "
            f"(largest residual {worst:.1f} MiB)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
