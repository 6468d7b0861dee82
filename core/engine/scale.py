"""One scale of the pyramid: its objective, its start image, and its optimisation.

``optimise_scale`` runs one scale's steps and returns a ``ScaleResult``; the run (core/engine/
run.py) chains the scales, each starting from the previous one's result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core import faces
from core.engine import colour
from core.engine.cpu.lbfgs import LBFGS
from core.engine.losses import (
    ContentLoss,
    GramGuide,
    LayerApply,
    MaskedContentLoss,
    Scale,
    StyleLoss,
    SumLoss,
    TVLoss,
    gram_key,
)
from core.engine.model import Forward, LayerPlan
from core.engine.tensors import fit, to_image
from core.engine.tiles import TileGrid
from core.errors import Cancelled, SettingsError
from core.settings import Settings
from core.types import Progress

PREVIEW_SIDE = 256

Grams = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ScalePlan:
    """One scale: its image size, its step budget (per tile when it is tiled) and its tiles
    (None: the whole scale at once; see core/engine/tiled.py)."""

    size: tuple[int, int]  # (width, height)
    iterations: int
    grid: TileGrid | None = None

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def tiles(self) -> int:
        return 1 if self.grid is None else len(self.grid.tiles)

    @property
    def steps(self) -> int:
        """Optimiser steps planned for the scale: its iterations for each tile."""
        return self.iterations * self.tiles

    @property
    def pixel_steps(self) -> int:
        """Pixels optimised over the scale's steps (overlaps counted for each tile)."""
        return self.iterations * (self.pixels if self.grid is None else self.grid.pixels)


@dataclass
class ScaleResult:
    """What one scale leaves: the image to carry on (detached, in [0, 1] for the output),
    the losses of that image (empty when no step ran), the steps run, and whether the best
    evaluated image replaced a worse last one."""

    image: torch.Tensor
    losses: dict[str, float]
    steps: int
    restored_best: bool
    curvature: float | None = None
    """L-BFGS's last curvature scale (``LBFGS.curvature_scale``), for a like problem next."""


# ---- the objective --------------------------------------------------------------------------
def style_size(img_size: tuple[int, int], scale_size: tuple[int, int], s: Settings, min_side: int):
    """The style image's size at this scale: relative to the scale, never upscaled, and never
    below what the deepest layer needs."""
    long_side = max(min_side, round(max(scale_size) * s.style_scale))
    ssize = fit(img_size, long_side) if max(img_size) > long_side else img_size
    if min(ssize) < min_side:
        ssize = fit(img_size, round(long_side * min_side / max(1, min(ssize))))
    return ssize


def content_terms(
    s: Settings,
    plan: LayerPlan,
    fwd: Forward,
    content_t: torch.Tensor,
    face_mask: torch.Tensor | None = None,
) -> list[nn.Module]:
    """The content loss of each content layer, plus ``face_terms`` under ``face_mask``."""
    with torch.no_grad():
        content_feats = fwd(content_t, plan.content)
    terms: list[nn.Module] = [
        Scale(
            LayerApply(ContentLoss(content_feats[n]), n),
            s.effective_content_weight / len(plan.content),
        )
        for n in plan.content
    ]
    if face_mask is not None:
        terms += face_terms(s, plan, content_feats, face_mask)
    return terms


def face_terms(
    s: Settings, plan: LayerPlan, content_feats: dict[str, torch.Tensor], mask: torch.Tensor
) -> list[nn.Module]:
    """Extra content terms over the faces (``Settings.keep_faces``): with the base term, the
    content weight per position inside a face is ``content_factor(keep_faces)`` times that
    outside (MaskedContentLoss says why the weight is scaled by the mask's coverage)."""
    extra = faces.content_factor(s.keep_faces) - 1.0
    terms: list[nn.Module] = []
    for n in plan.content:
        term = MaskedContentLoss(content_feats[n], mask)
        weight = s.effective_content_weight / len(plan.content) * extra * term.coverage
        terms.append(Scale(LayerApply(term, n), weight))
    return terms


def face_guide(s: Settings, mask: torch.Tensor) -> GramGuide:
    """Style weight per position: ``style_factor(keep_faces)`` inside the faces, 1 elsewhere,
    for the guided Gram matrices of the image being painted (the style targets stay plain)."""
    return GramGuide(1.0 - mask * (1.0 - faces.style_factor(s.keep_faces)))


StyleTerm = Callable[[torch.Tensor], nn.Module]
"""A style loss from its Gram target: StyleLoss, or StyleShift (the target a shift of the start
image's own Gram; blend shares sum to 1, so the share-weighted mean of shifts is the shift of
the mean target)."""


def style_terms(
    s: Settings,
    plan: LayerPlan,
    targets: Iterable[tuple[Grams, float]],
    loss: StyleTerm = StyleLoss,
) -> list[nn.Module]:
    """Style losses against each (Gram targets, blend share): one term per image and layer, or,
    with ``style_blend="gram"``, one per layer against the share-weighted mean Gram."""
    layer_weights = list(zip(plan.style, plan.style_weights, strict=True))
    if s.style_blend != "gram":
        return [
            Scale(LayerApply(loss(grams[n]), gram_key(n)), s.style_weight * lw * share)
            for grams, share in targets
            for n, lw in layer_weights
        ]
    mixed: Grams = {}
    for grams, share in targets:
        for n in plan.style:
            mixed[n] = mixed[n] + grams[n] * share if n in mixed else grams[n] * share
    return [
        Scale(LayerApply(loss(mixed[n]), gram_key(n)), s.style_weight * lw)
        for n, lw in layer_weights
    ]


def build_objective(
    s: Settings,
    plan: LayerPlan,
    fwd: Forward,
    content_t: torch.Tensor,
    style_targets: Iterable[tuple[Grams, float]],
    face_mask: torch.Tensor | None = None,
    style_loss: StyleTerm = StyleLoss,
) -> SumLoss:
    """Content, style and TV terms of one scale (with faces kept under ``face_mask``, a soft
    (1, 1, H, W) mask at this scale). ``style_targets`` is read after the content features
    are dropped (pass a generator to compute the targets only then)."""
    content = content_terms(s, plan, fwd, content_t, face_mask)
    style = style_terms(s, plan, style_targets, style_loss)
    tv = [Scale(LayerApply(TVLoss(), "input"), s.tv_weight)]
    return SumLoss({"content": content, "style": style, "tv": tv})


def start_image(
    s: Settings,
    size: tuple[int, int],
    previous: torch.Tensor | None,
    first: Callable[[], torch.Tensor],
    prep: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The leaf tensor to optimise: the previous scale upsampled, else ``first()`` (content,
    noise or the given image at this size)."""
    w, h = size
    if previous is not None:
        start = F.interpolate(previous.detach(), size=(h, w), mode="bicubic", align_corners=False)
    else:
        start = first()
    return prep(start.clamp(0, 1)).contiguous().requires_grad_(True)


# ---- progress -------------------------------------------------------------------------------
class ProgressClock:
    """Counts a run's steps across scales (and tiles) and reports them as ``Progress`` events
    (with the ETA from the time per pixel-step so far, and a preview every ``preview_every``
    steps)."""

    def __init__(
        self,
        scales: list[ScalePlan],
        started: float,
        preview_every: int,
        on_progress: Callable[[Progress], None] | None,
        preview_photo: torch.Tensor | None,
    ) -> None:
        self.scales, self.started = scales, started
        self.preview_every, self.on_progress, self.preview_photo = (
            preview_every,
            on_progress,
            preview_photo,
        )
        self.total_steps = sum(p.steps for p in scales)
        self.pixel_steps = [p.pixel_steps for p in scales]
        self.done_pixel_steps, self.opt_time, self.step = 0, 0.0, 0
        self.tile = TileStep()

    def begin_tile(self, tile: TileStep) -> None:
        """The steps that follow belong to ``tile`` of a tiled scale."""
        self.tile = tile

    def end_tiles(self) -> None:
        self.tile = TileStep()

    def step_done(
        self,
        index: int,
        it: int,
        seconds: float,
        losses: dict[str, float],
        stopped_early: bool,
        current: Callable[[], torch.Tensor],
    ) -> None:
        """Step ``it`` of scale ``index`` (of its current tile, when tiled) took ``seconds``;
        when it ends its scale (or tile) early, the rest of that budget is reported as done."""
        plan, tile = self.scales[index], self.tile
        pixels = tile.pixels or plan.pixels
        self.opt_time += seconds
        self.step += 1
        self.done_pixel_steps += pixels
        if stopped_early:
            self.total_steps -= plan.iterations - it
        if self.on_progress is None:
            return
        w, h = plan.size
        remaining = (
            sum(self.pixel_steps[index + 1 :])
            + (plan.iterations - it) * pixels
            + plan.iterations * tile.pixels_after
        )
        eta = self.opt_time / self.done_pixel_steps * remaining if self.step >= 2 else None
        preview = None
        if self.preview_every and self.step % self.preview_every == 0:
            preview = _preview(tile.compose(current()), self.preview_photo)
        self.on_progress(
            Progress(
                step=self.step, total_steps=self.total_steps, scale=index + 1,
                scales=len(self.scales), iteration=tile.index * plan.iterations + it,
                iterations=plan.steps, width=w, height=h, losses=dict(losses),
                elapsed=time.perf_counter() - self.started, eta=eta, preview=preview,
                tile=tile.index + 1, tiles=plan.tiles,
            )
        )  # fmt: skip


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class TileStep:
    """Where a tiled scale's steps are: tile ``index`` (0-based) of ``pixels`` pixels, with
    ``pixels_after`` more pixels in the tiles after it; ``compose`` turns the tile's current
    image into the whole scale's, for previews."""

    index: int = 0
    pixels: int = 0
    pixels_after: int = 0
    compose: Callable[[torch.Tensor], torch.Tensor] = _whole


def _preview(t: torch.Tensor, photo: torch.Tensor | None) -> Image.Image:
    if photo is not None:
        t = colour.with_chroma_of(t, photo)
    img = to_image(t)
    img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return img


# ---- the optimisation of one scale ----------------------------------------------------------
REJECT_ABOVE: float | None = 2.0
"""L-BFGS rejects a step that multiplied the loss by more than this (cpu/lbfgs.py: undone, its
curvature pair kept, and taken again from where it began). A doubling marks a step that
diverged rather than one that wandered; 2.0 is the only value tried, not a tuned one.

Why: with bf16's gradients (about 6 % off fp32's, from the convolutions) L-BFGS without a line
search threw the image uphill at most 512 px scales measured on an AMD EPYC (Zen 4), and the
default run ended far above fp32's loss. Measured there, default settings at 512 px, random
weights, the engine's final loss without / with rejection: the benchmark's synthetic pair in
bf16 0.149 / 0.059 (fp32 0.057 / 0.059), the astronaut (a face) in bf16 0.137 / 0.073 (fp32
0.073 / 0.072), tubingen in fp32 0.094 / 0.077 (bf16 0.077 / 0.076); docs/BENCHMARKS.md.
tests/test_tiling.py's bars over four image seeds (fp32, 8 steps a scale): tiled over untiled
objective 0.82-1.07 (limit 1.25), seam energy within 4 % (limit 10 %). The first design, which
dropped the history and started again with a first step's length, stalled at the overshoot
that is usual early in a scale, and those runs ended 2-4.5x higher."""


def make_optimizer(
    s: Settings, image: torch.Tensor, first_scale: float | None = None
) -> tuple[LBFGS | torch.optim.Optimizer, torch.Tensor | None]:
    """The optimiser for one scale, and Adam's iterate average (None for L-BFGS);
    ``first_scale``: L-BFGS's first step from a like problem's curvature (see LBFGS)."""
    if s.optimizer == "lbfgs":
        # One function evaluation per step, history 10 [crowsonkb]; lr 1 is L-BFGS's own.
        # torch.optim.LBFGS's arithmetic with preallocated state (core/engine/cpu/lbfgs.py).
        lbfgs = LBFGS(
            image, lr=1, history_size=s.lbfgs_history, reject_above=REJECT_ABOVE,
            first_scale=first_scale,
        )  # fmt: skip
        return lbfgs, None
    # The average starts at the first iterate, a meaningful image, so it needs no bias correction.
    return torch.optim.Adam([image], lr=s.learning_rate), image.detach().clone()


def _current(image: torch.Tensor, average: torch.Tensor | None) -> torch.Tensor:
    """The image to show or carry on: Adam's averaged iterate, L-BFGS's own iterate."""
    return (image if average is None else average).detach().clamp(0, 1)


@dataclass
class BestImage:
    """The best image evaluated in a scale. L-BFGS without a line search (neural-style's and
    crowsonkb's configuration) is not monotone: a poor curvature estimate can throw the image
    far uphill for a few steps, so a scale ends on its best evaluated image when its last
    evaluation was worse (Adam's output is its iterate average instead)."""

    loss: float = math.inf
    image: torch.Tensor | None = None
    losses: dict[str, float] = field(default_factory=dict)
    last: float = 0.0

    def see(self, value: float, image: torch.Tensor, objective: SumLoss) -> None:
        self.last = value
        if value < self.loss:
            self.loss, self.losses = value, objective.values()
            if self.image is None:
                self.image = image.detach().clone()
            else:
                self.image.copy_(image.detach())

    @property
    def ended_uphill(self) -> bool:
        return self.image is not None and self.last > self.loss


def _closure(
    opt: LBFGS | torch.optim.Optimizer,
    fwd: Forward,
    grams: tuple[str, ...],
    image: torch.Tensor,
    objective: SumLoss,
    best: BestImage | None,
    guide: GramGuide | None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)  # one gradient buffer for the whole scale
        seen = image if embed is None else embed(image)
        feats = fwd(seen, grams=grams, guide=guide)
        feats["input"] = seen
        loss = objective(feats)
        loss.backward()
        if best is not None:
            best.see(float(loss.detach()), image, objective)
        return loss

    return closure


class EarlyStop:
    """Stop a scale when the loss has not fallen by the fraction ``threshold`` for ``patience``
    steps (threshold 0: never)."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold, self.patience = threshold, patience
        self.best, self.best_at = math.inf, 0

    def update(self, it: int, loss: float) -> bool:
        if loss < self.best * (1 - self.threshold):
            self.best, self.best_at = loss, it
        return self.threshold > 0 and it - self.best_at >= self.patience


def _rejected(opt: LBFGS | torch.optim.Optimizer) -> int:
    """How many steps the optimiser has rejected so far (only L-BFGS rejects)."""
    return opt.rejected if isinstance(opt, LBFGS) else 0


def _checked(losses: dict[str, float]) -> dict[str, float]:
    if not math.isfinite(losses["total"]):
        raise SettingsError(
            "The optimisation diverged (the loss is not a number). Lower the learning "
            "rate or the loss weights."
        )
    return losses


def optimise_scale(
    s: Settings,
    fwd: Forward,
    plan: LayerPlan,
    objective: SumLoss,
    image: torch.Tensor,
    index: int,
    clock: ProgressClock,
    should_stop: Callable[[], bool] | None,
    guide: GramGuide | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    first_scale: float | None = None,
) -> ScaleResult:
    """Run scale ``index`` from the leaf ``image`` (style Grams guided by ``guide``, see
    ``face_guide``); raises Cancelled when ``should_stop()`` (checked before every step) says
    so. ``embed`` (tiles, core/engine/tiled.py) puts the leaf into the fixed context the
    network sees around it; ``first_scale``, the curvature of the tile before it (its
    ScaleResult.curvature), sizes L-BFGS's first step."""
    opt, average = make_optimizer(s, image, first_scale)
    best = BestImage() if average is None else None
    closure = _closure(opt, fwd, plan.style, image, objective, best, guide, embed)
    early = EarlyStop(s.early_stop, s.patience)
    losses: dict[str, float] = {}
    it = 0
    for it in range(1, clock.scales[index].iterations + 1):
        if should_stop is not None and should_stop():
            raise Cancelled()
        t0 = time.perf_counter()
        rejected = _rejected(opt)
        # The stubs type the closure as returning float; torch's optimisers take the loss tensor.
        opt.step(closure)  # type: ignore[arg-type]
        if average is not None:
            with torch.no_grad():
                image.clamp_(0, 1)  # box constraint for Adam (not L-BFGS) [crowsonkb]
                # EMA of the iterates, decay 0.99 [crowsonkb avg_decay].
                average.mul_(0.99).add_(image.detach(), alpha=0.01)
        if not losses or _rejected(opt) == rejected:
            losses = _checked(objective.values())
        # else: the point evaluated was a step L-BFGS undid (its loss blew up, or was not a
        # number); the image is back where the last reported losses were measured, so those
        # stand, and the spike is neither shown nor taken for a diverged run.
        seconds = time.perf_counter() - t0
        stop = early.update(it, losses["total"])
        clock.step_done(index, it, seconds, losses, stop, lambda: _current(image, average))
        if stop:
            break
    if best is not None and best.ended_uphill:
        # The last evaluated image was not the best: the run went uphill at the end, so the
        # final step (never evaluated) is not trusted either.
        assert best.image is not None
        return ScaleResult(best.image, best.losses, it, True, _curvature(opt))
    return ScaleResult(_current(image, average).detach(), losses, it, False, _curvature(opt))


def _curvature(opt: LBFGS | torch.optim.Optimizer) -> float | None:
    return opt.curvature_scale if isinstance(opt, LBFGS) else None
