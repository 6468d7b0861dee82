"""The measuring side of the benchmark: one variant per fresh process, answered as one JSON line.

A fresh process per variant makes ``ru_maxrss`` (peak resident memory) that variant's own; the
RSS after importing torch and after building the model is reported too, so readers can tell the
fixed overhead from what a run adds. Run as ``python -m benchmarks.workers '<json spec>'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
SEED = 0  # the engine's backbone="random" weights are backbones.randomize_(features, seed=0)


def rss_now_mb() -> float | None:
    """Current resident set size (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


class Recorder:
    """Engine progress: per step its wall time, interval and loss; when the target was reached.

    ``stop_when_reached`` makes ``should_stop`` end the run once the loss at the final scale is
    at or below ``target`` and at least ``min_steps`` steps ran.
    """

    def __init__(
        self,
        started: float,
        target: float | None = None,
        *,
        stop_when_reached: bool = False,
        min_steps: int = 0,
        cpu_started: float | None = None,
    ) -> None:
        self.started, self.target = started, target
        self.cpu_started = time.process_time() if cpu_started is None else cpu_started
        self.stop_when_reached, self.min_steps = stop_when_reached, min_steps
        self.last = time.perf_counter()
        self.steps: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None

    def on_progress(self, p: Any) -> None:
        now = time.perf_counter()
        loss = p.losses["total"]
        self.steps.append(
            {
                "step": p.step,
                "scale": p.scale,
                "scales": p.scales,
                "iteration": p.iteration,
                "size": [p.width, p.height],
                "loss": loss,
                "dt": now - self.last,
                "elapsed": now - self.started,
                "cpu": time.process_time() - self.cpu_started,
            }
        )
        self.last = now
        final = p.scale == p.scales
        if self.reached is None and self.target is not None and final and loss <= self.target:
            self.reached = {
                "seconds": now - self.started,
                "step": p.step,
                "final_iteration": p.iteration,
                "loss": loss,
            }

    def should_stop(self) -> bool:
        return (
            self.stop_when_reached
            and self.reached is not None
            and len(self.steps) >= self.min_steps
        )


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one variant described by ``spec`` and return what was measured."""
    t_import = time.perf_counter()
    import torch

    from core import images
    from core.engine import backbones
    from core.settings import Settings

    out: dict[str, Any] = {
        "spec": spec,
        "import_seconds": time.perf_counter() - t_import,
        "rss_import_mb": rss_now_mb(),
        "threads": torch.get_num_threads(),
    }
    content = images.load_image(spec["content"], name="content image")
    style = images.load_image(spec["style"], name="style image")
    base = Settings(backbone="random", device="cpu")
    settings = base.replace(**spec.get("settings", {}))
    kind = spec["kind"]
    if kind == "baseline":
        from . import baseline

        started, cpu_started = time.perf_counter(), time.process_time()
        cnn = baseline.network(backbones.random_state_dict("vgg19", SEED))
        out["model_seconds"] = time.perf_counter() - started
        out["rss_model_mb"] = rss_now_mb()
        run = baseline.run(
            cnn,
            content,
            style,
            spec["size"],
            spec["iterations"],
            settings=settings,
            frozen=spec.get("frozen", False),
            started=started,
            cpu_started=cpu_started,
        )
        out["wall_seconds"] = time.perf_counter() - started
        out["peak_rss_mb"] = peak_rss_mb()
        out["step_seconds"] = run.step_seconds
        out["losses"] = run.losses
        out["elapsed"] = run.elapsed
        out["cpu"] = run.cpu
        return out
    if kind == "engine":
        return _engine(spec, settings, content, style, out)
    if kind == "cache":
        return _cache(settings, content, style, out)
    if kind == "probe":
        return _probe(out)
    raise ValueError(f"unknown benchmark kind {kind!r}")


def _prebuild(engine: Any, settings: Any) -> tuple[float, float | None]:
    """Build (and cache) the engine's model through its normal path; returns seconds and RSS."""
    started = time.perf_counter()
    engine.warm_up(settings)
    return time.perf_counter() - started, rss_now_mb()


@contextlib.contextmanager
def compiled_models(engine: Any) -> Iterator[None]:
    """The engine's cached networks under ``torch.compile`` for the block (the compile lever;
    the engine itself stays eager, see docs/BENCHMARKS.md), put back as they were after it.
    Two parts stay eager inside the compiled network: conv1_1, the backward of whose replicate
    padding torch 2.13's tracer rejects (a stride mismatch in ``replication_pad2d_backward``'s
    meta kernel), and Winograd layers, whose strided views it cannot trace."""
    import torch

    from core.engine.cpu.winograd import WinogradConv2d

    saved = engine.models.items()
    patched = []
    for key, model in saved:
        eager = [model.features[0]]
        eager += [m for m in model.modules() if isinstance(m, WinogradConv2d)]
        for module in eager:
            module.forward = torch.compiler.disable(module.forward)
            patched.append(module)
        engine.models.put(key, torch.compile(model))
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's own again
        for key, model in saved:
            engine.models.put(key, model)
        torch.compiler.reset()


def _engine(spec: dict[str, Any], settings: Any, content: Any, style: Any, out: dict) -> dict:
    from core.engine import Engine
    from core.errors import Cancelled

    # keep_heap False is the allocator lever: glibc's own behaviour during the run.
    engine = Engine(keep_heap=spec.get("keep_heap", True))
    started, cpu_started = time.perf_counter(), time.process_time()
    out["model_seconds"], out["rss_model_mb"] = _prebuild(engine, settings)
    target = spec.get("target")
    rec = Recorder(
        started,
        target,
        cpu_started=cpu_started,
        stop_when_reached=spec.get("stop_when_reached", False),
        min_steps=spec.get("min_steps", 0),
    )
    result = None
    maybe_compiled = (
        compiled_models(engine.default_engine())
        if spec.get("compile")
        else contextlib.nullcontext()
    )
    try:
        with maybe_compiled:
            result = engine.stylize(
                content, [style], settings, on_progress=rec.on_progress, should_stop=rec.should_stop
            )
    except Cancelled:
        pass
    except Exception as exc:  # torch.compile's tracer fails on what eager runs
        if not spec.get("compile"):
            raise
        out["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    out["wall_seconds"] = time.perf_counter() - started
    out["peak_rss_mb"] = peak_rss_mb()
    out["steps"] = rec.steps
    out["reached"] = rec.reached
    if result is not None:
        meta = result.metadata
        # What the user gets: the engine returns a scale's best evaluated image when its last
        # step went uphill, so this can be below the last step's loss.
        out["final_loss"] = meta["losses"]["total"]
        out["metadata"] = {
            k: meta[k]
            for k in (
                "precision", "channels_last", "winograd", "fused_pooling", "scales", "steps",
                "speed",
            )
        }  # fmt: skip
    continue_iters = spec.get("continue_iterations", 0)
    if target is not None and rec.reached is None and result is not None and continue_iters:
        out["continued"] = _continue(
            engine, settings, content, style, result.image, rec, continue_iters
        )
    if spec.get("evaluate") and result is not None:
        from core.engine import backbones

        from . import baseline

        cnn = baseline.network(backbones.random_state_dict("vgg19", SEED))
        out["fp32_objective"] = baseline.objective(cnn, content, style, result.image, settings)
    return out


def _continue(engine, settings, content, style, image, rec: Recorder, iterations: int) -> dict:
    """Go on at the final scale from the pyramid's output (an 8-bit image, L-BFGS restarted)
    until the target is reached or ``iterations`` more steps ran."""
    from core.errors import Cancelled

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pyramid.png"
        image.save(path)
        more = settings.replace(
            pyramid=False,
            init="image",
            init_image=str(path),
            iterations=iterations,
            initial_iterations=iterations,
            early_stop=0.0,
            preview_every=0,
        )
        rec2 = Recorder(
            rec.started, rec.target, stop_when_reached=True, cpu_started=rec.cpu_started
        )
        try:
            engine.stylize(
                content, [style], more, on_progress=rec2.on_progress, should_stop=rec2.should_stop
            )
        except Cancelled:
            pass
    return {
        "steps": rec2.steps,
        "reached": rec2.reached,
        "wall_seconds": time.perf_counter() - rec.started,
        "peak_rss_mb": peak_rss_mb(),
    }


def _cache(settings: Any, content: Any, style: Any, out: dict) -> dict:
    """Three short runs in one process: cold, warm, and warm with the style targets dropped."""
    from core.engine import Engine

    engine = Engine()
    out["model_seconds"], out["rss_model_mb"] = _prebuild(engine, settings)
    runs = []
    for label in ("first", "second", "second, style targets cleared"):
        if label.endswith("cleared"):
            engine.targets.clear()
        started = time.perf_counter()
        result = engine.stylize(content, [style], settings)
        runs.append(
            {
                "label": label,
                "seconds": time.perf_counter() - started,
                "style_cache_hits": result.metadata["style_cache_hits"],
                "loss": result.metadata["losses"]["total"],
                "image_digest": hashlib.blake2b(result.image.tobytes(), digest_size=8).hexdigest(),
            }
        )
    out["runs"] = runs
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _probe(out: dict) -> dict:
    """The engine's speed probe as a first run on this machine pays it (imports excluded)."""
    import torch

    from core.engine import autotune

    device = torch.device("cpu")
    started = time.perf_counter()
    record, origin = autotune.measurements(device)
    out["probe_wall"] = time.perf_counter() - started
    out["origin"] = origin
    out["record"] = record.to_json()
    out["choice"] = autotune.choose("auto", None, device).metadata()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = measure(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
