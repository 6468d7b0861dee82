"""``pastiche bench`` / ``python -m benchmarks.bench``: the engine against a tutorial-style baseline.

In one run, on the same random VGG19 weights and the same images, it measures

* the engine's speed probe (core/engine/autotune.py), in a cache of its own: how long a first
  run on this machine spends choosing precision and convolutions, and what it chose;
* seconds per L-BFGS iteration and peak memory of the baseline (benchmarks/baseline.py) and of
  the engine at each size, every variant in a fresh process, in alternating order;
* the time each needs to reach the objective the baseline reaches after ``--ref-iterations``
  steps (the engine: its default pyramid, then more steps at the final scale);
* a default-settings stylization (wall time and peak memory);
* each engine lever on and off, with the loss difference it causes: every precision x
  convolution path (fp32 / bf16, oneDNN / Winograd) against the measured choice, channels_last,
  fused pooling, the kept heap, torch.compile, frozen weights (via the baseline), the pyramid
  and the style-target cache.

The ratios are printed as the last lines. Timings are the median of the timed iterations after
a warm-up, the best over rounds; the machine may be shared, so the load average is printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workers import RESULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]  # per-iteration sizes (long side)
    warmup: int  # iterations left out of the per-iteration timing
    timed: int  # iterations timed per run
    rounds: int  # alternating rounds of the per-iteration variants
    lever_size: int  # size at which precision / channels_last / frozen are switched
    ref_size: int  # size of the time-to-objective comparison
    ref_iterations: int  # baseline iterations that define the objective to reach
    cap: int  # most engine steps at the final scale after its pyramid
    default_size: int  # the default-settings stylization
    cache_iterations: int  # steps per scale in the style-cache runs


PATHS = ("fp32", "fp32+winograd", "bf16", "bf16+winograd")  # core.engine.autotune's names
FULL = Plan((256, 512), 2, 5, 2, 512, 512, 300, 300, 512, 2)
QUICK = Plan((256, 512), 1, 3, 2, 256, 256, 50, 100, 512, 2)

Worker = Callable[[dict[str, Any]], dict[str, Any]]


class BenchError(RuntimeError):
    """A measuring process failed; ``str()`` says which and why."""


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one variant in a fresh Python process (so its peak RSS is its own)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.workers", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise BenchError(f"The {spec['label']} run failed (exit status {proc.returncode}):\n{tail}")


# ---- images -----------------------------------------------------------------------------------
def synthetic_images(folder: Path, long_side: int) -> tuple[Path, Path]:
    """A smooth 4:3 'photo' and a square high-frequency 'painting', seeded."""
    import torch
    from PIL import Image

    def save(rgb: torch.Tensor, name: str) -> Path:
        data = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        path = folder / name
        Image.fromarray(data.numpy(), "RGB").save(path)
        return path

    gen = torch.Generator().manual_seed(1)
    w, h = long_side, long_side * 3 // 4
    y = torch.linspace(0, 1, h).view(-1, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, -1).expand(h, w)
    face = ((x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.06).float()
    photo = torch.stack([0.3 + 0.5 * x, 0.2 + 0.6 * y, 0.6 - 0.3 * x]) * (1 - face)
    photo = photo + face * torch.tensor([0.85, 0.65, 0.5]).view(3, 1, 1)
    photo = photo + 0.05 * torch.rand((3, h, w), generator=gen)
    s = long_side
    v = torch.linspace(0, 1, s).view(-1, 1).expand(s, s)
    u = torch.linspace(0, 1, s).view(1, -1).expand(s, s)
    swirl = torch.sin(40 * u + 12 * torch.sin(6 * v)) * torch.cos(25 * v - 8 * u)
    painting = torch.stack([0.5 + 0.4 * swirl, 0.4 + 0.3 * torch.sin(30 * v), 0.6 - 0.3 * swirl])
    painting = painting + 0.25 * torch.rand((3, s, s), generator=gen)
    return save(photo, "content.png"), save(painting, "style.png")


# ---- summaries --------------------------------------------------------------------------------
def step_times(result: dict[str, Any]) -> list[float]:
    if "step_seconds" in result:
        return list(result["step_seconds"])
    return [s["dt"] for s in result["steps"]]


def step_losses(result: dict[str, Any]) -> list[float]:
    if "losses" in result:
        return list(result["losses"])
    return [s["loss"] for s in result["steps"]]


def result_loss(result: dict[str, Any]) -> float:
    """The loss of the image a run returned: the engine's own figure (its best evaluated image
    when the last step went uphill, or was a step it rejected), else the last step's (the
    baseline's)."""
    return float(result.get("final_loss", step_losses(result)[-1]))


def per_iteration(result: dict[str, Any], warmup: int) -> float:
    """The fastest timed step: on a shared machine other work only ever adds time."""
    return min(step_times(result)[warmup:])


def timeline(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of a run (an engine run's continuation included) as
    ``{key, dt, elapsed, cpu, loss, final, phase, iteration}``; ``key`` groups steps of one size."""
    if "losses" in result:  # the baseline: one scale
        n = len(result["losses"])
        cpu = result.get("cpu") or [None] * n
        return [
            {"key": "baseline", "dt": d, "elapsed": e, "cpu": c, "loss": loss, "final": True,
             "phase": "first", "iteration": i + 1}
            for i, (d, e, c, loss) in enumerate(
                zip(result["step_seconds"], result["elapsed"], cpu, result["losses"], strict=True)
            )
        ]  # fmt: skip
    out = []
    phases = (
        ("first", result["steps"]),
        ("continued", (result.get("continued") or {}).get("steps", [])),
    )
    for phase, steps in phases:
        for s in steps:
            out.append(
                {"key": (phase, s["scale"]), "dt": s["dt"], "elapsed": s["elapsed"],
                 "cpu": s.get("cpu"), "loss": s["loss"], "final": s["scale"] == s["scales"],
                 "phase": phase, "iteration": s["iteration"]}
            )  # fmt: skip
    return out


def reach(result: dict[str, Any], target: float) -> dict[str, Any] | None:
    """When a run's loss at its final scale first got to ``target``: wall and CPU seconds, and
    an estimate free of other load (each step counted at the fastest step of its size)."""
    steps = timeline(result)
    fastest: dict[Any, float] = {}
    for s in steps:
        fastest[s["key"]] = min(fastest.get(s["key"], float("inf")), s["dt"])
    estimate = 0.0
    for i, s in enumerate(steps):
        estimate += fastest[s["key"]]
        if s["final"] and s["loss"] <= target:
            return dict(s, step=i + 1, estimate=estimate)
    return None


def rel(a: float, b: float) -> str:
    """(a - b) / b as a signed percentage."""
    return f"{100 * (a - b) / b:+.3f}%" if b else "n/a"


def mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} MB"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---- the run ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, plan: Plan, content: str, style: str, worker: Worker, out=None) -> None:
        self.plan, self.content, self.style, self.worker = plan, content, style, worker
        self.out = out or sys.stdout
        self.started = time.perf_counter()
        self.ratios: list[str] = []
        self.results: list[dict[str, Any]] = []
        self.choice: dict[str, Any] = {"path": "fp32+winograd", "reason": "not measured yet"}

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def measure(self, label: str, kind: str, **spec: Any) -> dict[str, Any]:
        spec = dict(spec, kind=kind, label=label, content=self.content, style=self.style)
        result = self.worker(spec)
        self.results.append(result)
        stamp = f"[{time.perf_counter() - self.started:6.0f} s, load {load_average().split()[0]}]"
        self.say(f"{stamp} {label}: {self.describe(result)}")
        return result

    def describe(self, r: dict[str, Any]) -> str:
        mem = (
            f"peak {mb(r.get('peak_rss_mb'))} (after import {mb(r.get('rss_import_mb'))}, "
            f"after model {mb(r.get('rss_model_mb'))})"
        )
        if "record" in r:
            return f"{r['probe_wall']:.2f} s, chose {r['choice']['path']}; {mem}"
        if "runs" in r:
            return "; ".join(f"{x['label']} {x['seconds']:.2f} s" for x in r["runs"]) + f"; {mem}"
        times, losses = step_times(r), step_losses(r)
        if not times:
            return mem
        speed = ""
        if len({s["scale"] for s in r.get("steps", [])}) <= 1 and len(times) > self.plan.warmup:
            timed = times[self.plan.warmup :]
            speed = f", min {min(timed):.3f} / median {statistics.median(timed):.3f} s/it timed"
        more = ""
        cont = r.get("continued")
        if cont and cont["steps"]:
            more = (
                f"; then {len(cont['steps'])} more steps at the final scale (wall "
                f"{cont['wall_seconds']:.1f} s in all, loss -> {cont['steps'][-1]['loss']:.6g}, "
                f"peak {mb(cont['peak_rss_mb'])})"
            )
        return (
            f"{len(times)} steps{speed}, wall {r['wall_seconds']:.1f} s, loss {losses[0]:.6g} -> "
            f"{losses[-1]:.6g}; {mem}{more}"
        )

    def engine_iter_spec(self, size: int, **settings: Any) -> dict[str, Any]:
        n = self.plan.warmup + self.plan.timed
        base = dict(
            size=size, pyramid=False, iterations=n, initial_iterations=n, early_stop=0.0,
            preview_every=0,
        )  # fmt: skip
        return {"settings": dict(base, **settings)}

    # ---- sections ----
    def per_iteration_section(self) -> dict[int, dict[str, list[dict[str, Any]]]]:
        p = self.plan
        n = p.warmup + p.timed
        self.say(f"\n== Per iteration ({p.warmup} warm-up + {p.timed} timed steps per run) ==")
        found: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for size in p.sizes:
            variants: dict[str, tuple[str, dict[str, Any]]] = {
                "baseline": ("baseline", {"size": size, "iterations": n}),
                "engine": ("engine", self.engine_iter_spec(size)),
            }
            if size == p.lever_size:
                for path in PATHS:
                    if path != self.choice["path"]:
                        precision, _, wino = path.partition("+")
                        variants[f"engine {path}"] = (
                            "engine",
                            self.engine_iter_spec(size, precision=precision, winograd=bool(wino)),
                        )
                for label, setting in (
                    ("channels_last", "channels_last"),
                    ("fused pooling", "fused_pooling"),
                ):
                    variants[f"engine {label} off"] = (
                        "engine",
                        self.engine_iter_spec(size, **{setting: False}),
                    )
                variants["engine compiled"] = (
                    "engine",
                    {**self.engine_iter_spec(size), "compile": True},
                )
                variants["engine heap kept off"] = (
                    "engine",
                    {**self.engine_iter_spec(size), "keep_heap": False},
                )
                variants["baseline frozen"] = (
                    "baseline",
                    {"size": size, "iterations": n, "frozen": True},
                )
                for name in variants:
                    if name == "engine" or name.removeprefix("engine ") in PATHS:
                        variants[name][1]["evaluate"] = True
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
            for r in range(p.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    kind, spec = variants[name]
                    runs[name].append(self.measure(f"{name} @{size}", kind, **spec))
            found[size] = runs
        return found

    def other_precision(self) -> str:
        """The precision the engine does not pick by default on this machine."""
        return "fp32" if self.choice["path"].startswith("bf16") else "bf16"

    def best(self, runs: list[dict[str, Any]]) -> float:
        return min(per_iteration(r, self.plan.warmup) for r in runs)

    def time_to_objective(self) -> dict[str, Any]:
        p = self.plan
        self.say(
            f"\n== Time to objective @{p.ref_size}: the baseline's best loss in "
            f"{p.ref_iterations} steps; engine = default pyramid, then up to {p.cap} more "
            "steps at the final scale =="
        )
        ref = self.measure(
            f"baseline reference ({p.ref_iterations} steps) @{p.ref_size}",
            "baseline",
            size=p.ref_size,
            iterations=p.ref_iterations,
        )
        target = min(ref["losses"])
        pyr = self.measure(
            f"engine default pyramid @{p.ref_size}",
            "engine",
            settings={"size": p.ref_size},
            target=target,
            continue_iterations=p.cap,
        )
        # Reduced precision makes steps cheaper but noisier: only the time to the same
        # objective says whether the precision the engine picks pays off.
        other = self.other_precision()
        other_pyr = self.measure(
            f"engine default pyramid, {other} @{p.ref_size}",
            "engine",
            settings={"size": p.ref_size, "precision": other},
            target=target,
            continue_iterations=p.cap,
        )
        from core.settings import Settings

        default_first = Settings().first_iterations
        single = self.measure(
            f"engine single scale (pyramid off) @{p.ref_size}",
            "engine",
            settings={
                "size": p.ref_size, "pyramid": False, "iterations": p.cap,
                "initial_iterations": max(p.cap, default_first), "early_stop": 0.0,
            },
            target=target,
            stop_when_reached=True,
            min_steps=default_first,
        )  # fmt: skip
        return {"ref": ref, "target": target, "pyramid": pyr, "single": single,
                "other_precision": (other, other_pyr), "default_first": default_first}  # fmt: skip

    def speed_section(self) -> dict[str, Any]:
        """The engine's speed probe, run now in a fresh process with an empty cache (so it is
        timed as a first run on this machine pays it); every engine run below uses its choice."""
        self.say("\n== Speed probe (what precision='auto' and winograd=None run) ==")
        r = self.measure("speed probe", "probe")
        rec = r["record"]
        self.say(
            f"  probe {r['probe_wall']:.2f} s in all (target < 3 s; steps {rec['probe_seconds']:.2f} "
            f"s), at {rec['size'][0]}x{rec['size'][1]} px, share of the cores "
            f"{rec.get('cpu_share')}, load {rec.get('load')}"
        )
        from core.engine.autotune import Trial

        for t in rec["trials"]:
            self.say(f"    {Trial(**t).describe()}")
        self.say(f"  chosen: {r['choice']['path']} ({r['choice']['reason']})")
        self.choice = r["choice"]
        return r

    def run(self) -> int:
        p = self.plan
        self.speed = self.speed_section()
        iters = self.per_iteration_section()
        tto = self.time_to_objective()
        self.say("\n== Default-settings stylization and style-target cache ==")
        if p.default_size == p.ref_size:
            default = tto["pyramid"]
            self.say(f"default stylization @{p.default_size}: the engine pyramid run above")
        else:
            default = self.measure(
                f"engine default stylization @{p.default_size}",
                "engine",
                settings={"size": p.default_size},
            )
        cache = self.measure(
            f"engine style-target cache @{p.lever_size}",
            "cache",
            settings={
                "size": p.lever_size, "iterations": p.cache_iterations,
                "initial_iterations": p.cache_iterations, "preview_every": 0,
            },
        )  # fmt: skip
        self.summary(iters, tto, default, cache)
        return 0

    # ---- the report ----
    def summary(self, iters, tto, default, cache) -> None:
        p = self.plan
        self.say("\n== Summary ==")
        self.say("Per iteration (fastest timed step over all rounds) and peak RSS:")
        for size, runs in iters.items():
            b, e = self.best(runs["baseline"]), self.best(runs["engine"])
            bm = max(r["peak_rss_mb"] for r in runs["baseline"])
            em = max(r["peak_rss_mb"] for r in runs["engine"])
            b0, e0 = runs["baseline"][0]["losses"][0], runs["engine"][0]["steps"][0]["loss"]
            self.say(
                f"  @{size}: baseline {b:.3f} s/it, {bm:.0f} MB | engine {e:.3f} s/it, "
                f"{em:.0f} MB | {b / e:.2f}x faster, {bm / em:.2f}x less memory"
            )
            self.say(
                f"         same objective check: loss at the start {b0:.7g} (baseline) vs "
                f"{e0:.7g} (engine), {rel(e0, b0)}"
            )
            self.ratios.append(f"ratio peak-memory @{size}: {bm / em:.2f}x")
            self.ratios.append(f"ratio per-iteration @{size}: {b / e:.2f}x")
        fixed = iters[p.sizes[0]]["engine"][0]
        self.say(
            f"  fixed overhead (engine process): {mb(fixed['rss_import_mb'])} after importing "
            f"torch, {mb(fixed['rss_model_mb'])} after building the model"
        )

        self.say(f"\nTime to objective @{p.ref_size}:")
        target, ref = tto["target"], tto["ref"]
        base = reach(ref, target)
        assert base is not None  # the target is one of the baseline's own losses
        self.say(
            f"  objective = {target:.6g}, the baseline's best in {p.ref_iterations} steps "
            f"(its last: {ref['losses'][-1]:.6g})"
        )
        self.say(
            "  (wall = as measured; CPU = process CPU time; estimate = each step at the fastest "
            "step of its size, setup left out: the least sensitive to other load)"
        )
        self.say(f"  baseline: step {base['step']}: {self.times(base)}")
        other, other_pyr = tto["other_precision"]
        rows = [("engine (default pyramid, then final scale)", tto["pyramid"], True),
                ("engine (single scale)", tto["single"], True),
                (f"engine in {other} (default pyramid, then final scale)", other_pyr, False)]  # fmt: skip
        tto_lines: list[str] = []
        for name, r, counts in rows:
            hit = reach(r, target)
            if hit is None:
                steps = len(timeline(r))
                self.say(f"  {name}: did NOT reach it within {steps} steps")
                if counts and not tto_lines:
                    tto_lines = [f"engine did not reach the baseline's objective in {steps} steps"]
                continue
            where = "within its run" if hit["phase"] == "first" else "after continuing"
            ratios = self.speedups(base, hit)
            self.say(
                f"  {name}: step {hit['step']} (final-scale step {hit['iteration']}, {where}): "
                f"{self.times(hit)}; faster by {ratios['wall']} (wall), {ratios['cpu']} (CPU), "
                f"{ratios['estimate']} (estimate)"
            )
            if counts and not tto_lines:
                tto_lines = [ratios["estimate"], ratios["cpu"], ratios["wall"]]
        note = (
            ""
            if (p.ref_iterations, p.ref_size) == (300, 512)
            else f" ({p.ref_iterations}-step reference)"
        )
        head = f"ratio time-to-objective @{p.ref_size}"
        if len(tto_lines) == 3:
            tto_final = [f"{head} (fastest-step estimate): {tto_lines[0]}{note}",
                         f"{head} (CPU time): {tto_lines[1]}{note}",
                         f"{head}: {tto_lines[2]}{note}"]  # fmt: skip
        else:
            tto_final = [f"{head}: {tto_lines[0]}"]

        self.say(f"\nDefault-settings stylization @{p.default_size} (Settings(backbone='random', "
                 "device='cpu'), otherwise defaults):")  # fmt: skip
        meta = default.get("metadata", {})
        self.say(
            f"  wall {default['wall_seconds']:.1f} s (model build included, imports "
            f"{default['import_seconds']:.1f} s not), peak RSS {mb(default['peak_rss_mb'])}, "
            f"scales {meta.get('scales')}, steps {meta.get('steps')}, "
            f"precision {meta.get('precision')}, channels_last {meta.get('channels_last')}, "
            f"winograd {meta.get('winograd')}, fused pooling {meta.get('fused_pooling')}, "
            f"speed path {meta.get('speed', {}).get('path')} ({meta.get('speed', {}).get('reason')})"
        )

        self.say("\nLevers (on vs off, same run):")
        lv = iters.get(p.lever_size)
        if lv:
            n = p.warmup + p.timed

            def row(name: str, on: str, off: str, on_label: str, off_label: str) -> None:
                a, b = self.best(lv[on]), self.best(lv[off])
                la, lb = result_loss(lv[on][0]), result_loss(lv[off][0])
                self.say(
                    f"  {name} @{p.lever_size}: {on_label} {a:.3f} s/it vs {off_label} "
                    f"{b:.3f} s/it ({b / a:.2f}x); result's loss after {n} steps "
                    f"{la:.6g} vs {lb:.6g} ({rel(lb, la)})"
                )

            self.path_rows(lv, tto, row)
            row("channels_last", "engine", "engine channels_last off", "on", "off")
            self.compile_row(lv)
            fused = lv["engine"][0]["metadata"].get("fused_pooling")
            row("fused ReLU+pool", "engine", "engine fused pooling off", f"{fused} (auto)", "off")
            row("heap kept during a run", "engine", "engine heap kept off", "on", "glibc default")
            for name in ("engine", "engine fused pooling off", "engine heap kept off"):
                self.say(f"      peak RSS {name}: {mb(max(r['peak_rss_mb'] for r in lv[name]))}")
            row("frozen weights (baseline)", "baseline frozen", "baseline", "frozen", "unfrozen")
        pyr, single, first = tto["pyramid"], tto["single"], tto["default_first"]
        if len(single["steps"]) >= first:
            at = single["steps"][first - 1]
            final = pyr.get("final_loss", pyr["steps"][-1]["loss"])
            self.say(
                f"  pyramid @{p.ref_size}, default budget: on {pyr['wall_seconds']:.1f} s, "
                f"result's loss {final:.6g} (last step {pyr['steps'][-1]['loss']:.6g}) vs off "
                f"({first} steps at full size) {at['elapsed']:.1f} s, loss {at['loss']:.6g} "
                f"({rel(at['loss'], final)})"
            )
        first_run, warm, cleared = cache["runs"]
        same = warm["image_digest"] == cleared["image_digest"]
        self.say(
            f"  style-target cache @{p.lever_size} ({p.cache_iterations} steps per scale): "
            f"cached {warm['seconds']:.2f} s ({warm['style_cache_hits']} hits) vs cleared "
            f"{cleared['seconds']:.2f} s: saves {cleared['seconds'] - warm['seconds']:.2f} s per "
            f"run; loss {warm['loss']:.6g} vs {cleared['loss']:.6g} "
            f"({'identical output' if same else 'outputs differ'}); cold first run "
            f"{first_run['seconds']:.2f} s (model already built)"
        )

        c, rec = self.choice, self.speed["record"]
        self.say(
            f"  speed probe: chose {c['path']} in {self.speed['probe_wall']:.2f} s ("
            + ", ".join(
                f"{k} {'rejected' if v is None else f'{v:.3f} s'}" for k, v in c["measured"].items()
            )
            + f", {rec['size'][0]}x{rec['size'][1]} px)"
        )
        self.say(f"\nload average at the end: {load_average()}; total {self.elapsed():.0f} s")
        self.say("")
        for line in (*self.ratios, *tto_final):
            self.say(line)

    def path_rows(self, lv: dict[str, list[dict[str, Any]]], tto: dict[str, Any], row) -> None:
        """Each precision x convolution path against the one the probe chose, with the loss
        difference it makes, the fp32 objective of its output, and the other precision's time
        to the objective."""
        p, auto = self.plan, self.choice["path"]
        a = lv["engine"][0].get("fp32_objective")
        for path in PATHS:
            if path == auto:
                continue
            row(f"path {path}", "engine", f"engine {path}", f"{auto} (auto)", path)
            b = lv[f"engine {path}"][0].get("fp32_objective")
            if a is not None and b is not None:
                self.say(
                    f"      fp32 objective of the 8-bit outputs: {a:.6g} ({auto}) vs "
                    f"{b:.6g} ({path}), {rel(b, a)}"
                )
        other, other_pyr = tto["other_precision"]
        picked = tto["pyramid"].get("metadata", {}).get("precision", auto)
        mine, theirs = reach(tto["pyramid"], tto["target"]), reach(other_pyr, tto["target"])
        if mine is not None and theirs is not None:
            self.say(
                f"      to the objective @{p.ref_size} (default pyramid, then final scale): "
                f"{picked} (auto) {mine['elapsed']:.1f} s vs {other} {theirs['elapsed']:.1f} s "
                f"({theirs['elapsed'] / mine['elapsed']:.2f}x)"
            )
        else:
            self.say(f"      to the objective @{p.ref_size}: not reached by both precisions")

    def compile_row(self, lv: dict[str, list[dict[str, Any]]]) -> None:
        """torch.compile of the network (benchmarks/workers.py): its steps after compiling,
        and what compiling cost (the first step's extra time)."""
        p = self.plan
        runs = lv["engine compiled"]
        if any("compile_error" in r for r in runs):
            self.say(f"  torch.compile @{p.lever_size}: failed: {runs[0].get('compile_error')}")
            return
        a, b = self.best(lv["engine"]), self.best(runs)
        first = min(step_times(r)[0] for r in runs) - b
        la, lb = result_loss(lv["engine"][0]), result_loss(runs[0])
        self.say(
            f"  torch.compile @{p.lever_size}: compiled {b:.3f} s/it vs eager {a:.3f} s/it "
            f"({a / b:.2f}x), compiling cost {first:.1f} s; result's loss after "
            f"{p.warmup + p.timed} steps {lb:.6g} vs {la:.6g} ({rel(lb, la)})"
        )

    @staticmethod
    def times(hit: dict[str, Any]) -> str:
        cpu = "?" if hit.get("cpu") is None else f"{hit['cpu']:.1f} s"
        return f"wall {hit['elapsed']:.1f} s, CPU {cpu}, estimate {hit['estimate']:.1f} s"

    @staticmethod
    def speedups(base: dict[str, Any], hit: dict[str, Any]) -> dict[str, str]:
        out = {}
        for key, b, e in (("wall", base["elapsed"], hit["elapsed"]), ("cpu", base.get("cpu"),
                          hit.get("cpu")), ("estimate", base["estimate"], hit["estimate"])):  # fmt: skip
            out[key] = "?" if not b or not e else f"{b / e:.2f}x"
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(
        prog="pastiche bench",
        description="Compare the engine with a tutorial-style baseline (speed, memory, levers).",
    )
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes")
    parser.add_argument("--sizes", help="per-iteration sizes, comma separated")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--timed", type=int, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, help="alternating rounds of each variant")
    parser.add_argument("--lever-size", type=int)
    parser.add_argument("--ref-size", type=int, help="size of the time-to-objective comparison")
    parser.add_argument("--ref-iterations", type=int, help="baseline steps defining the target")
    parser.add_argument("--cap", type=int, help="most engine steps at the final scale")
    parser.add_argument("--default-size", type=int, help="size of the default stylization")
    parser.add_argument("--cache-iterations", type=int)
    parser.add_argument("--content", help="content image (default: a synthetic one)")
    parser.add_argument("--style", help="style image (default: a synthetic one)")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement here")
    ns = parser.parse_args(list(argv))
    plan = QUICK if ns.quick else FULL
    changes: dict[str, Any] = {}
    if ns.sizes:
        try:
            changes["sizes"] = tuple(int(v) for v in ns.sizes.split(",") if v.strip())
        except ValueError:
            parser.error("--sizes takes whole numbers separated by commas")
    for name in ("warmup", "timed", "rounds", "lever_size", "ref_size", "ref_iterations", "cap",
                 "default_size", "cache_iterations"):  # fmt: skip
        value = getattr(ns, name)
        if value is not None:
            changes[name] = value
    plan = Plan(**{**plan.__dict__, **changes})
    if plan.warmup < 1 or plan.timed < 1 or plan.rounds < 1 or plan.ref_iterations < 1:
        parser.error("--warmup, --timed, --rounds and --ref-iterations must be at least 1")
    if min((*plan.sizes, plan.lever_size, plan.ref_size, plan.default_size)) < 32:
        parser.error("sizes must be at least 32 px")
    if plan.lever_size not in plan.sizes:
        parser.error("--lever-size must be one of --sizes")
    return ns, plan


def main(argv: Sequence[str] | None = None, *, worker: Worker | None = None) -> int:
    """Run the benchmark and print the report; returns the exit status."""
    ns, plan = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from core.engine import autotune

    saved = os.environ.get(autotune.ENV_VAR)
    with tempfile.TemporaryDirectory(prefix="pastiche-bench-") as tmp:
        # A cache of its own: the probe is timed as a first run pays it, and every engine
        # process of the run uses the choice it made.
        os.environ[autotune.ENV_VAR] = str(Path(tmp) / "speed.json")
        autotune.forget()
        if ns.content and ns.style:
            content, style, images = ns.content, ns.style, "given"
        elif ns.content or ns.style:
            print("pastiche bench: give both --content and --style, or neither.", file=sys.stderr)
            return 2
        else:
            side = max((*plan.sizes, plan.ref_size, plan.default_size))
            c, s = synthetic_images(Path(tmp), side)
            content, style, images = str(c), str(s), f"synthetic, made at {side} px"
        bench = Bench(plan, content, style, worker or run_worker)
        bench.say(f"pastiche bench {'--quick ' if ns.quick else ''}on {dt.date.today()}")
        bench.say(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
            f"CPUs ({cpu_name()}), load average at start {load_average()}"
        )
        bench.say(f"plan: {plan}")
        bench.say(f"images: {images}; weights: random VGG19 (seed 0), the same on both sides")
        try:
            return bench.run()
        except BenchError as exc:
            print(f"pastiche bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("pastiche bench: interrupted.", file=sys.stderr)
            return 130
        finally:
            if ns.json:
                Path(ns.json).write_text(json.dumps(bench.results, indent=1), encoding="utf-8")
            if saved is None:
                os.environ.pop(autotune.ENV_VAR, None)
            else:
                os.environ[autotune.ENV_VAR] = saved
            autotune.forget()


if __name__ == "__main__":
    sys.exit(main())
