"""Smoke tests of the benchmark's machinery (tiny sizes, no timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench, workers
from benchmarks.baseline import LossWeights, build, network, prepare
from core.engine import backbones
from core.engine import run as engine
from core.settings import Settings
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--sizes", "32,48", "--lever-size", "48", "--warmup", "1", "--timed", "2", "--rounds", "1",
    "--ref-size", "48", "--ref-iterations", "3", "--cap", "3", "--default-size", "32",
    "--cache-iterations", "1",
]  # fmt: skip


def test_baseline_computes_the_engines_objective() -> None:
    """Same weights, images and start: the baseline's loss equals the engine's first loss."""
    content, style = make_image(64, 48, seed=1), make_image(40, 40, seed=2)
    settings = Settings(backbone="random", device="cpu", size=48, pyramid=False, iterations=1,
                        precision="fp32",  # the baseline's precision: the same arithmetic
                        initial_iterations=1, early_stop=0.0, preview_every=0)  # fmt: skip
    seen: list[float] = []
    engine.stylize(content, [style], settings, on_progress=lambda p: seen.append(p.losses["total"]))
    content_t, style_t = prepare(content, style, 48, settings)
    cnn = network(backbones.random_state_dict("vgg19", workers.SEED))
    sm = build(cnn, content_t, style_t, LossWeights.from_settings(settings))
    sm.model(content_t)
    assert float(sm.loss().detach()) == pytest.approx(seen[0], rel=1e-4)
    # Tutorial structure: losses spliced in, model cut after the last one, weights trainable.
    names = [name for name, _ in sm.model.named_children()]
    assert names[-1] == "style_loss_relu5_1" and "content_loss_relu4_2" in names
    assert all(p.requires_grad for p in sm.model.parameters())


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "256,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "256", "--lever-size", "512"])
    _, plan = bench.parse_args(["--quick", "--timed", "4"])
    assert plan.timed == 4 and plan.ref_size == bench.QUICK.ref_size


def test_reach_counts_only_the_final_scale_and_estimates_from_fastest_steps() -> None:
    def step(scale: int, dt: float, loss: float, elapsed: float) -> dict:
        return {"scale": scale, "scales": 2, "iteration": 1, "dt": dt, "loss": loss,
                "elapsed": elapsed, "cpu": 2 * elapsed}  # fmt: skip

    run = {"steps": [step(1, 1.0, 0.5, 1.0), step(1, 0.5, 0.4, 1.5), step(2, 3.0, 2.0, 4.5)],
           "continued": {"steps": [step(2, 2.0, 0.9, 6.5), step(2, 2.5, 0.3, 9.0)]}}  # fmt: skip
    hit = bench.reach(run, 1.0)  # the coarse scale's 0.5 does not count
    assert hit is not None and hit["phase"] == "continued" and hit["step"] == 4
    assert hit["elapsed"] == 6.5 and hit["cpu"] == 13.0
    assert hit["estimate"] == 0.5 + 0.5 + 3.0 + 2.0
    assert bench.reach(run, 0.1) is None
    base = {"losses": [3.0, 1.0], "step_seconds": [2.0, 1.0], "elapsed": [3.0, 4.0]}
    hit = bench.reach(base, 1.0)
    assert hit is not None and hit["step"] == 2 and hit["estimate"] == 2.0 and hit["cpu"] is None


@pytest.mark.slow
def test_bench_runs_end_to_end_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """Every section runs and the ratios come last (workers in this process: no RSS meaning)."""
    assert bench.main(TINY, worker=workers.measure) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio time-to-objective @48: ")
    assert lines[-2].startswith("ratio time-to-objective @48 (CPU time): ")
    assert lines[-3].startswith("ratio time-to-objective @48 (fastest-step estimate): ")
    assert lines[-4].startswith("ratio per-iteration @48: ") and lines[-4].endswith("x")
    assert lines[-6].startswith("ratio per-iteration @32: ")
    text = "\n".join(lines)
    for part in ("same objective check", "channels_last @48", "torch.compile @48",
                 "frozen weights (baseline) @48", "pyramid @48", "style-target cache @48",
                 "fused ReLU+pool @48", "heap kept during a run @48", "speed probe: chose",
                 "Default-settings stylization @32"):  # fmt: skip
        assert part in text
    assert re.search(
        r"pyramid @48, default budget: on [\d.]+ s, result's loss [\d.e-]+ \(last", text
    )
    # Every precision x convolution path the probe did not choose is a lever row of its own,
    # and the other precision also runs to the objective.
    auto = re.search(r"speed path (\S+) \(", text)
    assert auto, text
    others = [p for p in ("fp32", "fp32+winograd", "bf16", "bf16+winograd") if p != auto[1]]
    assert all(f"path {p} @48: {auto[1]} (auto) " in text for p in others)
    other = "fp32" if auto[1].startswith("bf16") else "bf16"
    assert f"  engine in {other} (default pyramid, then final scale): " in text
    assert re.search(r"to the objective @48( \(default pyramid.*\): .* vs .* s \(|: not)", text)


@pytest.mark.slow
def test_worker_process_reports_json(tmp_path: Path) -> None:
    """The real path: a fresh process per variant answering one JSON line with its peak RSS."""
    content, style = tmp_path / "c.png", tmp_path / "s.png"
    make_image(48, 36, seed=1).save(content)
    make_image(40, 40, seed=2).save(style)
    spec = {"kind": "baseline", "label": "t", "content": str(content), "style": str(style),
            "size": 32, "iterations": 2}  # fmt: skip
    result = bench.run_worker(spec)
    assert len(result["losses"]) == 2 and result["peak_rss_mb"] >= result["rss_import_mb"] > 0


@pytest.mark.parametrize("entry", [["-m", "benchmarks.bench"], ["-m", "core", "bench"]])
def test_entry_points_parse_arguments(entry: list[str]) -> None:
    """``python -m benchmarks.bench`` and ``pastiche bench`` reach the same parser."""
    out = subprocess.run(
        [sys.executable, *entry, "--sizes", "x"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and "--sizes takes whole numbers" in out.stderr


def test_gpu_check_says_clearly_when_there_is_no_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_gpu_check_runs_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU check's code on the CPU at a tiny size: a row per variant, each with the path
    the engine ran and why (bf16 forced, fp32 forced, or the measured choice)."""
    from benchmarks import gpu

    args = ["--device", "cpu", "--sizes", "32", "--steps", "1", "--warmup", "1", "--no-compile"]
    assert gpu.main([*args, "--paint", "48:auto,48:1000GB"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " steps/s " in line]
    # Whole paintings too (the pyramid at default settings), each with its budget and tiles.
    paints = [line for line in out.splitlines() if line.startswith("paint ")]
    assert len(paints) == 2 and all("tiles per scale" in p for p in paints), paints
    assert len(rows) == len(gpu.VARIANTS) - len(gpu.COMPILED)
    # Precision forced; on a CPU the convolution path may still be measured ("..., precision forced").
    assert re.search(r"ran bf16(\+winograd)? \(.*forced\)", rows[1]), rows[1]
    assert re.search(r"ran fp32(\+winograd)? \(.*forced\)", rows[2]), rows[2]
    assert "(cached from" in rows[0] or "(measured" in rows[0]
