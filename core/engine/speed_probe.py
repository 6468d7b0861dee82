"""Times one forward and backward step of the real network each way (``core.engine.autotune``).

The network is the engine's own build (VGG19 up to relu5_1 with the engine's conversions:
Winograd convolutions, fused ReLU + pooling, channels_last, weights stored in bf16 for bf16
autocast) with seeded random weights: the choice is about kernels, not about what the weights
have learnt. The objective is the engine's content and style terms (the total-variation term
never touches the network), at a small size: 192 x 144 on CPUs; on GPUs up to 2048 x 1536 as
their memory allows, since small images measure kernel launches there rather than kernels.

Each path runs one untimed step first (oneDNN and cuDNN set up their kernels there), whose loss
and input gradient are compared with the plain fp32 path's; a path outside the accuracy gate is
not timed further. The accurate ones are then timed in a round; those still in a close race
(``_contenders``) are timed again in reverse order, each keeping its fastest step: on a shared
machine other work only ever adds time.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from core.engine.autotune import PRECISION_MARGIN, REFERENCE, Record, SpeedPath, Trial
from core.engine.cpu import memory, winograd

if TYPE_CHECKING:
    from core.engine.model import Forward

Step = Callable[[], tuple[float, torch.Tensor]]
"""One forward and backward step: the loss and the gradient with respect to the input."""

TIMED_ROUNDS = 2
"""At most; a round after the first times only the contenders, and runs only when there are
two or more."""
CLOSE_CALL = 1.15
BUDGET_SECONDS = 2.0
"""No further timed round starts after this long (the warm-up steps always run)."""


def _contenders(trials: dict[SpeedPath, Trial]) -> list[SpeedPath]:
    """The timed paths that could still win: within CLOSE_CALL of the fastest, comparing a
    reduced precision's time with its PRECISION_MARGIN added, as ``autotune.pick`` does when an
    fp32 path is there to fall back on. A later round times only these: one more step of a path
    that is already clearly out would cost the probe time and change no choice (on an AMD EPYC
    the second round spent 0.55 s of its 0.8 s on the two fp32 paths, both 1.6x behind)."""
    timed = {p: t.seconds for p, t in trials.items() if t.usable and t.seconds is not None}
    has_fp32 = any(p.precision == "fp32" for p in timed)

    def effective(path: SpeedPath) -> float:
        seconds = timed[path]
        assert seconds is not None
        reduced = path.precision != "fp32" and has_fp32
        return seconds * PRECISION_MARGIN if reduced else seconds

    if not timed:
        return []
    fastest = min(effective(p) for p in timed)
    return [p for p in timed if effective(p) <= fastest * CLOSE_CALL]


def time_paths(
    paths: Sequence[SpeedPath],
    make_step: Callable[[SpeedPath], Step],
    *,
    clock: Callable[[], float] = time.perf_counter,
    rounds: int = TIMED_ROUNDS,
    budget: float = BUDGET_SECONDS,
) -> list[Trial]:
    """Warm up and check every path against the reference (the first of ``paths``), then time
    the accurate ones in alternating rounds; one Trial per path, in the order given."""
    started = clock()
    trials = {p: Trial(p.name) for p in paths}
    steps: dict[SpeedPath, Step] = {}
    reference: tuple[float, torch.Tensor] | None = None
    for path in paths:
        try:
            step = make_step(path)
            loss, grad = step()
        except Exception as exc:  # a path this machine or build cannot run (e.g. no bf16)
            trials[path].error = f"{type(exc).__name__}: {exc}"[:200]
            continue
        if reference is None:
            if path != REFERENCE:
                raise ValueError("the first path measured must be the fp32 reference")
            reference = (loss, grad)
        trials[path].loss_error = abs(loss - reference[0]) / max(abs(reference[0]), 1e-30)
        diff = float((grad.float() - reference[1].float()).norm())
        trials[path].grad_error = diff / max(float(reference[1].float().norm()), 1e-30)
        if trials[path].accurate:
            steps[path] = step
    order = list(steps)
    for r in range(rounds):
        if r > 0:
            still = _contenders(trials)
            order = [p for p in order if p in still]
            if clock() - started > budget or len(order) < 2:
                break
        for path in order if r % 2 == 0 else reversed(order):
            t0 = clock()
            steps[path]()
            seconds = clock() - t0
            best = trials[path].seconds
            trials[path].seconds = seconds if best is None else min(best, seconds)
    return [trials[p] for p in paths]


def measure(device: torch.device, paths: Sequence[SpeedPath]) -> Record:
    """Probe ``paths`` on ``device`` with the real network; the record's key is left empty
    (the caller knows what it measured for)."""
    started = time.perf_counter()
    net = ProbeNetwork(device)
    try:
        trials = time_paths(paths, net.step_for)
    finally:
        net.close()
        winograd.free_scratch()  # the run that follows allocates what it uses
        # The five networks and their activations peak ~530 MB above the import and leave
        # ~300 MB of freed heap in the process (RSS 628 MB after the probe, 326 MB after a
        # trim; measured on an AMX Xeon): give it back before the run allocates its own.
        memory.release()
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = ""
    return Record(
        key={},
        trials=trials,
        probe_seconds=round(time.perf_counter() - started, 3),
        measured_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        load=load,
        size=list(net.size),
        cpu_share=net.cpu_share(),
    )


def probe_size(device: torch.device) -> tuple[int, int]:
    """Small enough for a probe of about two seconds on two cores, large enough that the
    Winograd layers' fixed cost per call (their filter transforms, ~30 ms a step for VGG19)
    weighs about a tenth of a step, as it does at the sizes where a run spends its time
    (362 and 512 px), not a fifth as at 128 px. On a GPU: :func:`gpu_probe_size`."""
    if device.type != "cuda":
        return (192, 144) if device.type == "cpu" else (512, 384)
    free, _ = torch.cuda.mem_get_info(device)
    return gpu_probe_size(free)


GPU_PROBE_PIXELS = 2048 * 1536
GPU_PROBE_SHARE = 0.25


def gpu_probe_size(free_bytes: int) -> tuple[int, int]:
    """A 4:3 size where a GPU's step is its kernels, not their launches: up to 2048 x 1536,
    within a quarter of the free GPU memory for the fp32 path. On an H200 (benchmarks/gpu.py,
    2026-11-30) a step took 12 ms at 512 x 384 both in fp32 and in bf16, launch-bound, so the
    probe's choice there was a coin toss; at 2048 x 1536, bf16 took 29 ms and fp32 42 ms,
    and that is the scale of the print sizes where a GPU run spends its time."""
    from core.engine.memory_model import COSTS

    cost = COSTS[("lbfgs", "cuda-fp32")]
    pixels = min(GPU_PROBE_PIXELS, cost.pixels_within(GPU_PROBE_SHARE * free_bytes))
    w = max(256, int((pixels * 4 / 3) ** 0.5) // 64 * 64)
    return w, w * 3 // 4


def probe_images(w: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image, content and style of the probe: white noise, and for the style a blurred noise.

    The style must differ from the image in its statistics, as a painting differs from a photo.
    With white noise for both, their Grams differ only by sampling noise, which shrinks as the
    size grows, and the style term measured that noise against bf16's rounding: bf16's loss was
    1.4 % off at 192 x 144 and 11 % at 1024 x 768, its input gradient 21 % and 59 % (CPU), and
    on an H200 at 2048 x 1536 23 % and 91 %, so the gate rejected a path that paints correctly.
    With this style, bf16 is off by < 0.1 % and about 6 % at every size (docs/BENCHMARKS.md).
    """
    gen = torch.Generator().manual_seed(seed)
    image, content = (torch.rand((1, 3, h, w), generator=gen) for _ in range(2))
    coarse = torch.rand((1, 3, max(1, h // 16), max(1, w // 16)), generator=gen)
    style = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return image, content, style


class ProbeNetwork:
    """The engine's network and objective at the probe size, built once for all paths."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        from core.engine import backbones, model
        from core.engine import device as devices
        from core.settings import Settings

        self.device = device
        self.size = probe_size(device)
        self.settings = Settings(backbone="random", device=device.type)
        self.plan = model.layer_plan(self.settings)
        self.state = backbones.random_state_dict("vgg19", seed)
        self.channels_last = devices.pick_channels_last(self.settings, device)
        self.fused = devices.pick_fused_pooling(self.settings, device)
        w, h = self.size
        self.image, content, style = probe_images(w, h, seed)
        self.image = self.image.to(device)
        self.objective = self._objective(content.to(device), style.to(device))
        self.wall = self.cpu = 0.0  # over the steps after each path's first

    def cpu_share(self) -> float | None:
        """CPU time of the timed steps over wall time x threads: about 1 on an idle machine,
        lower when other programs held the cores while the probe ran (autotune.BUSY_SHARE)."""
        if self.device.type != "cpu" or self.wall <= 0:
            return None
        return round(self.cpu / (self.wall * torch.get_num_threads()), 3)

    def _objective(self, content: torch.Tensor, style: torch.Tensor) -> torch.nn.Module:
        """The engine's content and style terms, with targets taken by the fp32 network."""
        from core.engine.losses import (
            ContentLoss,
            LayerApply,
            Scale,
            StyleLoss,
            SumLoss,
            gram,
            gram_key,
        )

        s, plan = self.settings, self.plan
        fwd = self._forward(REFERENCE)
        self._reference: Forward | None = fwd  # the reference path's step runs on it too
        with torch.no_grad():
            c, st = fwd(content, plan.content), fwd(style, plan.style)
        terms = {
            "content": [
                Scale(LayerApply(ContentLoss(c[n]), n), s.effective_content_weight)
                for n in plan.content
            ],
            "style": [
                Scale(LayerApply(StyleLoss(gram(st[n])), gram_key(n)), s.style_weight * w)
                for n, w in zip(plan.style, plan.style_weights, strict=True)
            ],
        }
        return SumLoss(terms)

    def _forward(self, path: SpeedPath) -> Forward:
        """The network built as the engine builds it for ``path`` (core/engine/model.py)."""
        from core.engine.model import BuildOptions, Forward, build_model

        dtype = torch.bfloat16 if path.precision == "bf16" else None
        opts = BuildOptions(self.device, self.channels_last, path.winograd, self.fused, dtype)
        net = build_model(self.plan, self.state, "imagenet", opts)
        return Forward(net, self.device, dtype, self.channels_last)

    def step_for(self, path: SpeedPath) -> Step:
        """One step of the engine's network and objective for ``path``."""
        fwd = self._reference if path == REFERENCE and self._reference else self._forward(path)
        x = self.image.clone().requires_grad_(True)
        objective, grams = self.objective, self.plan.style
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        calls = 0

        def step() -> tuple[float, torch.Tensor]:
            nonlocal calls
            wall, cpu = time.perf_counter(), time.process_time()
            feats = fwd(x, grams=grams)
            feats["input"] = x
            loss = objective(feats)
            (grad,) = torch.autograd.grad(loss, x)
            sync()
            if calls:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
            calls += 1
            return float(loss.detach()), grad

        return step

    def close(self) -> None:
        """Let the weights go before the real run starts."""
        del self.state, self.objective
        self._reference = None


def describe(record: Record) -> str:
    """One line for logs and the benchmark."""
    return f"{record.probe_seconds:.2f} s at {record.size}: " + "; ".join(
        t.describe() for t in record.trials
    )
