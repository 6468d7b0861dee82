"""One scale painted in overlapping tiles, when the whole scale does not fit the memory budget.

The tiles (core/engine/tiles.py) are optimised one after the other by the same per-scale
optimisation as a whole scale (core/engine/scale.py: ``optimise_scale``), each with its own
content target (its part of the photo) and the style targets of the whole style image; each
starts from the image as painted so far and is blended back in with feathered edges. The
scale's image (the *canvas*) is the only full-size tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image

from core.byte_sizes import format_bytes
from core.engine import memory_model, tiles
from core.engine.cpu import memory
from core.engine.device import pick_fused_pooling, pick_winograd
from core.engine.losses import GramGuide, StyleShift, gram_key
from core.engine.memory_model import CANVAS_BYTES_PER_PIXEL, SAFETY, ScaleCost
from core.engine.model import Forward, LayerPlan
from core.engine.scale import (
    PREVIEW_SIDE,
    Grams,
    ProgressClock,
    ScalePlan,
    ScaleResult,
    TileStep,
    build_objective,
    face_guide,
    optimise_scale,
    style_terms,
)
from core.engine.tensors import to_tensor
from core.engine.tile_tone import match_tone
from core.errors import SettingsError
from core.settings import Settings

MIN_TILE_SIDE = 64
"""Smaller tiles would be mostly overlap; a budget that cannot hold one is refused."""
MIN_MARGIN = 16
"""The least overlap between tiles, and context around them (pixels; VGG19's deepest stride)."""
OVERLAP_SHARE = 1 / 16
"""Overlap between neighbouring tiles, as a share of a tile's side (at least 8 px, in steps of
8): the width of the ramp that blends them, narrow because across it two brush textures are
averaged and flattened. The overlap used to be twice this (at least 16, in steps of 16), with
the ramp over its middle half: the later tile's pixels in the first quarter were optimised and
then dropped (weight 0), and so were the earlier tile's in the last (weight 1). The same ramp
over an overlap of half the width blends the same, with fewer pixels per step; the tile's edge
pixels see the painting around them (the context)."""

SOURCE_BYTES_PER_PIXEL = 20
"""What the targets' pass of a tiled run holds beyond the model, per pixel of the style image
as given (before it is resized to the scale). Measured on a 2048 px scale at 1.5GB: from a
4096x4096 style image the pass peaked 0.26 GB over the prediction (a trace: 1.608 GB against
1.35; the benchmark's run of the same peaked at 1.600), from a 2048x2048 one 0.02-0.09 GB (two
traces); the same call alone in a fresh process was as predicted. Not explained yet; until it
is, the budget counts it (20 bytes a pixel bounds both)."""


@dataclass
class MemoryPlan:
    """What a run may use (``limit`` bytes in all, None: no limit), what its process held when
    the scales were planned, and the measured costs (core/engine/memory_model.py) that decide
    which scales are painted in tiles."""

    limit: int | None
    held: int
    cost: ScaleCost
    targets: ScaleCost
    reach: int | None = None
    """How far the network's deepest layer in use sees (backbones.Architecture.reach; None:
    unknown): context beyond it would change nothing the optimiser sees, and costs time."""
    held_now: Callable[[], int | None] | None = None
    """What the process holds at the moment (None: ``held`` throughout)."""
    predicted: list[int] = field(default_factory=list)

    @classmethod
    def for_run(
        cls, s: Settings, device: torch.device, dtype: torch.dtype | None, reach: int | None = None
    ) -> MemoryPlan:
        """The budget of ``s.max_memory`` on ``device``: GPU memory on CUDA, else RAM."""
        free: int | None
        huge_pages = device.type == "cpu" and memory.huge_pages()
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            held = torch.cuda.memory_allocated(device)
        else:
            free, held = memory_model.available_ram(), memory_model.rss_now() or 0
        kind = memory_model.kind_of(
            "fp32" if dtype is None else "bf16",
            pick_winograd(s, device),
            pick_fused_pooling(s, device),
            cuda=device.type == "cuda",
        )
        return cls(
            memory_model.resolve_budget(s.max_memory, held, free),
            held,
            memory_model.scale_cost(s.optimizer, kind, s.lbfgs_history, huge_pages),
            memory_model.TARGETS[kind],
            reach,
            partial(torch.cuda.memory_allocated, device)
            if device.type == "cuda"
            else memory_model.rss_now,
        )

    @property
    def tile_cost(self) -> ScaleCost:
        """A tile's steps in a tiled scale: the per-pixel cost times what the run's earlier
        scales and tiles leave behind (ScaleCost.tile_extra)."""
        return ScaleCost(self.cost.fixed, self.cost.per_pixel * self.cost.tile_extra)

    def room(self) -> float | None:
        """Bytes the scales may add to what is held (None: no limit)."""
        return None if self.limit is None else SAFETY * self.limit - self.held

    def tile(self, scales: Sequence[ScalePlan]) -> list[ScalePlan]:
        """The scales, each with tiles where the whole scale would not fit (each tiled scale's
        seams moved away from the previous tiled scale's)."""
        room = self.room()
        out: list[ScalePlan] = []
        previous: tiles.TileGrid | None = None
        self.predicted = []
        for scale in scales:
            if room is None or self.cost.extra(scale.pixels) <= room:
                out.append(scale)
                self.predicted.append(self.held + self.cost.extra(scale.pixels))
                continue
            w, h = scale.size
            canvas = CANVAS_BYTES_PER_PIXEL * w * h
            max_pixels = self.tile_cost.pixels_within(room - canvas)
            context = self._context(max_pixels)
            tile_pixels = int((math.sqrt(max_pixels) - 2 * context) ** 2)
            if tile_pixels < MIN_TILE_SIDE**2:
                raise self._too_small(scale)
            overlap = tiles.choose_overlap(
                tile_pixels, minimum=MIN_MARGIN // 2, share=OVERLAP_SHARE, step=8
            )
            try:
                grid = tiles.plan_grid(w, h, max_pixels, overlap, previous, context=context)
            except ValueError:
                raise self._too_small(scale) from None
            out.append(replace(scale, grid=grid))
            self.predicted.append(self.held + canvas + self.tile_cost.extra(grid.largest_window))
            previous = grid
        return out

    def _context(self, max_pixels: int) -> int:
        """Fixed image around each tile: an eighth of the largest window's side, but no more
        than the network's reach (rounded up to 16 px): at print sizes that eighth was 100-130
        px against VGG19's 78 (relu5_1), windows of twice their cores' pixels."""
        context = tiles.choose_overlap(max_pixels, minimum=MIN_MARGIN)
        if self.reach is None:
            return context
        return min(context, max(MIN_MARGIN, -(-self.reach // 16) * 16))

    def target_pixels(
        self, scale: tuple[int, int], style: tuple[int, int], source: tuple[int, int] = (0, 0)
    ) -> int | None:
        """The most pixels one forward pass for the style targets of a ``style``-sized image
        (resized from a ``source``-sized one) may take at a ``scale``-sized scale (None: no
        limit)."""
        if self.limit is None:
            return None
        # What the process holds now, not when the run began: by a print size's last scales
        # it held ~0.1 GB more (the previous scales' images, the heap's layout; a 2048 px
        # run's trace), and the targets' pass is a scale's peak.
        now = self.held_now() if self.held_now is not None else None
        room = SAFETY * self.limit - max(now or 0, self.held)
        pixels = style[0] * style[1]
        taken = (
            CANVAS_BYTES_PER_PIXEL * scale[0] * scale[1]
            + 3 * 4 * pixels  # the style tensor
            + SOURCE_BYTES_PER_PIXEL * source[0] * source[1]
        )
        return max(MIN_TILE_SIDE**2, self.targets.pixels_within(room - taken))

    def describe(self) -> dict[str, int | None]:
        """For the result's metadata (bytes)."""
        return {
            "budget": self.limit,
            "held_at_start": self.held,
            "predicted_peak": max(self.predicted, default=self.held),
        }

    def _too_small(self, scale: ScalePlan) -> SettingsError:
        w, h = scale.size
        side = MIN_TILE_SIDE + 2 * MIN_MARGIN
        need = self.held + self.tile_cost.extra(side**2) + CANVAS_BYTES_PER_PIXEL * w * h
        return SettingsError(
            f"max_memory {format_bytes(self.limit or 0)} is too small for a {w}x{h} painting: "
            f"this process already holds {format_bytes(self.held)}, and painting in tiles "
            f"needs at least {format_bytes(need / SAFETY)} in all. Raise max_memory or lower "
            "the size."
        )


def blend(canvas: torch.Tensor, tile: tiles.Tile, painted: torch.Tensor) -> None:
    """Write ``painted`` into the canvas, ramped in over the overlaps with painted neighbours."""
    region = canvas[:, :, tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]
    if not tile.feather_left and not tile.feather_top:
        region.copy_(painted)
        return
    wx, wy = tiles.feather(tile)
    weight = torch.tensor(wy, dtype=canvas.dtype, device=canvas.device).view(1, 1, -1, 1) * (
        torch.tensor(wx, dtype=canvas.dtype, device=canvas.device).view(1, 1, 1, -1)
    )
    region.lerp_(painted.to(canvas.dtype), weight)


def start_canvas(
    size: tuple[int, int],
    previous: torch.Tensor | None,
    first: Callable[[], torch.Tensor],
    prep: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The scale's whole image to paint tiles on: the previous scale upsampled (else
    ``first()``), clamped in place so that only one full-size tensor is made."""
    w, h = size
    if previous is None:
        start = first()
    else:
        start = F.interpolate(previous, size=(h, w), mode="bicubic", align_corners=False)
    return prep(start.clamp_(0, 1)).contiguous()


def preview_sized(photo: torch.Tensor | None) -> torch.Tensor | None:
    """The photo whose chroma previews take, shrunk to preview size: taking a print-size
    photo's chroma for every preview would make several full-size copies each time."""
    if photo is None:
        return None
    _, _, h, w = photo.shape
    factor = 2 * PREVIEW_SIDE / max(w, h)
    if factor >= 1:
        return photo
    return F.interpolate(
        photo, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area"
    )


def composer(
    canvas: torch.Tensor, tile: tiles.Tile, side: int = 2 * PREVIEW_SIDE
) -> Callable[[torch.Tensor], torch.Tensor]:
    """For previews: the canvas at most ``side`` px long with the tile's current image in
    place (both shrunk; the canvas itself is left alone)."""
    _, _, h, w = canvas.shape
    factor = min(1.0, side / max(w, h))

    def compose(current: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(canvas, size=(round(h * factor), round(w * factor)), mode="area")
        x0, y0 = round(tile.x * factor), round(tile.y * factor)
        x1 = min(small.shape[-1], round((tile.x + tile.width) * factor))
        y1 = min(small.shape[-2], round((tile.y + tile.height) * factor))
        if x1 > x0 and y1 > y0:
            small[:, :, y0:y1, x0:x1] = F.interpolate(current, size=(y1 - y0, x1 - x0), mode="area")
        return small

    return compose


def paint_tiled(
    s: Settings,
    plan: LayerPlan,
    fwd: Forward,
    index: int,
    clock: ProgressClock,
    should_stop: Callable[[], bool] | None,
    canvas: torch.Tensor,
    photo: Image.Image,
    content_prep: Callable[[torch.Tensor], torch.Tensor],
    targets: Iterable[tuple[Grams, float]],
    face_mask: torch.Tensor | None = None,
) -> ScaleResult:
    """Scale ``index`` of ``clock.scales`` (which has a grid) painted tile by tile onto
    ``canvas`` (its start image, changed in place); ``photo`` is the photo at the scale's
    size; ``face_mask`` (the scale's, see run.py) is cut to each tile's window.

    Style: the whole image's Gram matrix is the area-weighted sum of its cores' (tiles
    partition its positions; :func:`_core_grams`), so each tile is optimised towards its own
    Gram moved along the whole's distance to the style at the scale's start, in proportion to
    its energy (:func:`_ask`): the whole's style loss is what the untiled painting minimises.
    Matching every tile to the style itself asks each part for the statistics of the whole,
    which left the whole far from them (tests/test_tiling.py); letting each tile make up for
    all of the whole's distance gave the first tiles far more texture than the later ones;
    handing what a tile fell short of on to the next ones pushed the last tiles along what the
    first could not move (at 2048 px a tile of green noise). The losses reported are the
    tiles' content and TV terms weighted by their cores' areas, and the whole image's style
    loss.
    """
    grid = clock.scales[index].grid
    assert grid is not None
    targets = list(targets)
    whole, energy = _start_grams(fwd, plan, canvas, grid)  # the image's Grams, kept current
    first = [{n: g[n] - whole[n] for n in g} for g, _ in targets]  # the untiled scale's ask
    rest = dict.fromkeys(whole, 1.0)  # the share of the image's energy still to paint
    totals: dict[str, float] = {}
    steps, restored = 0, False
    curvature: float | None = None  # the last tile's, for the next one's first step
    remaining = grid.pixels
    for k, tile in enumerate(grid.tiles):
        remaining -= tile.pixels
        clock.begin_tile(TileStep(k, tile.pixels, remaining, composer(canvas, tile)))
        box = grid.window(tile)
        share = _share(grid, tile)
        # Under a face mask the tile's Grams are guided by it, so its first evaluation's are
        # not its core's plain ones that ``whole`` sums.
        before = None if face_mask is None else _core_grams(fwd, plan, canvas, grid, (tile,))
        part = {n: e / share for n, e in energy[k].items()}
        asks = [
            (_ask(g, whole, ask, rest, part), w) for (g, w), ask in zip(targets, first, strict=True)
        ]
        done, start = _paint_tile(s, plan, fwd, index, clock, should_stop, canvas, photo,
                                  content_prep, box, tile, asks, face_mask, curvature)  # fmt: skip
        if before is None:
            before = {n: g * share for n, g in start.items()}
        curvature = done.curvature or curvature
        rest = {n: r - energy[k][n] for n, r in rest.items()}
        for name, value in done.losses.items():
            totals[name] = totals.get(name, 0.0) + value * share
        steps, restored = steps + done.steps, restored or done.restored_best
        del done, asks, start
        # The steps' freed blocks stay in the heap, where the gradient-free pass's blocks of
        # other sizes did not fit them: it peaked above the steps (a 2048 px run's trace).
        memory.release()
        after = _core_grams(fwd, plan, canvas, grid, (tile,))
        whole = {n: whole[n] + after[n] - before[n] for n in whole}
        del after, before
    clock.end_tiles()
    if "style" in totals:  # the whole image's, from its Grams (the tiles' are per tile)
        style = _style_loss(s, plan, targets, whole)
        totals["total"] += style - totals["style"]
        totals["style"] = style
    return ScaleResult(canvas, totals, steps, restored)


def _paint_tile(
    s: Settings,
    plan: LayerPlan,
    fwd: Forward,
    index: int,
    clock: ProgressClock,
    should_stop: Callable[[], bool] | None,
    canvas: torch.Tensor,
    photo: Image.Image,
    content_prep: Callable[[torch.Tensor], torch.Tensor],
    box: tuple[int, int, int, int],
    tile: tiles.Tile,
    asks: list[tuple[Grams, float]],
    face_mask: torch.Tensor | None,
    curvature: float | None = None,
) -> tuple[ScaleResult, Grams]:
    """One tile optimised in its window ``box``, its core's Gram matrices moved by ``asks``
    (each style image's, with its blend share; losses.StyleShift), its tone matched to its
    painted neighbours' (core/engine/tile_tone.py) and blended into the canvas; its objective
    and optimiser go when it returns. Also returns the core's Grams at the start (its first
    evaluation's: guided by the face mask where there is one).

    ``curvature``: the tile before's last L-BFGS curvature scale, which sizes this tile's first
    step (core/engine/cpu/lbfgs.py: torch's first step moves an image almost nothing, and a
    print's last tiles get 5 steps). Tiles of a scale are one problem cut up: same size, same
    terms. Measured at 1024 px with 5 steps a tile (18 tiles, AMD EPYC, random weights): the
    last scale's mean tile loss 0.307 -> 0.257, the whole image's 0.1145 -> 0.1017, same time.
    Scales of a pyramid are not carried over: their curvature scales measured 12-81 with no
    trend in size (one 512 px run), too loose a guess."""
    content_t = content_prep(to_tensor(photo.crop(box), canvas.device))
    mask = None if face_mask is None else _cut(face_mask, box)
    shifts: list[StyleShift] = []

    def shift(ask: torch.Tensor) -> StyleShift:
        shifts.append(StyleShift(ask))
        return shifts[-1]

    objective = build_objective(s, plan, fwd, content_t, asks, mask, shift)
    del content_t
    embed, core = _embedding(canvas, tile, box)
    guide = GramGuide(core if mask is None else core * face_guide(s, mask).weights)
    region = canvas[:, :, tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]
    leaf = region.clone().requires_grad_(True)
    memory.release()
    done = optimise_scale(
        s, fwd, plan, objective, leaf, index, clock, should_stop, guide, embed, curvature
    )
    blend(canvas, tile, match_tone(tile, region, done.image))
    # The first len(plan.style) terms are one per style layer, in order (scale.style_terms).
    return done, {n: _started(term) for n, term in zip(plan.style, shifts, strict=False)}


def _started(term: StyleShift) -> torch.Tensor:
    assert term.start is not None, "a tile's optimiser evaluates its start first"
    return term.start


def _style_loss(
    s: Settings, plan: LayerPlan, targets: list[tuple[Grams, float]], grams: Grams
) -> float:
    feats = {gram_key(n): g for n, g in grams.items()}
    with torch.no_grad():
        return float(sum(float(term(feats)) for term in style_terms(s, plan, targets)))


MAX_ASK = 2.0
"""What earlier tiles fell short of is handed on to the later ones, up to this many times
their part of the scale's ask (unbounded, the last tiles were asked for up to 1/share times
theirs: a 30-tile scale's last tile blew up into colour noise, docs/BENCHMARKS.md)."""


def _ask(
    target: Grams, whole: Grams, first: Grams, rest: dict[str, float], part: dict[str, float]
) -> Grams:
    """How far the next tile's core is to move its Gram matrices: along ``first`` (the whole's
    distance to the style when the scale started), ``part`` times as far (the core's Gram
    energy over the whole's, at the start), and further by what the tiles before it fell
    short of: the whole's remaining distance along ``first`` over the energy still to paint,
    ``rest`` (at most MAX_ASK times, never backwards).

    Why along one direction: both loss terms are scaled MSEs whose gradients do not grow with
    the distance, so what a tile is asked changes where it goes more than how far. Handing
    on the remaining distance itself turned the last tiles' ask towards what the first ones
    could not move (colour statistics: at 2048 px, a tile of green-blue noise).
    Why in proportion to the energy: the untiled painting moves each position's features by
    the Gram gradient times those features, so a dark region's statistics move little, a
    textured one's much. Asked the same shift as a bright one, a dark tile filled itself with
    coloured noise."""
    out: Grams = {}
    for n, ask in first.items():
        norm = float((ask * ask).sum())
        along = float(((target[n] - whole[n]) * ask).sum()) / max(norm, 1e-30)
        out[n] = ask * part[n] * min(MAX_ASK, max(0.0, along / max(rest[n], 1e-6)))
    return out


def _start_grams(
    fwd: Forward, plan: LayerPlan, canvas: torch.Tensor, grid: tiles.TileGrid
) -> tuple[Grams, list[dict[str, float]]]:
    """The whole image's Grams (:func:`_core_grams` over every core), and each core's share
    of their energy (its share of the image times its Gram's trace, over the whole's trace;
    they sum to 1 for each layer)."""
    whole: Grams = {}
    traces: list[dict[str, float]] = []
    for tile in grid.tiles:
        mine = _core_grams(fwd, plan, canvas, grid, (tile,))
        traces.append({n: float(g.diagonal(dim1=-2, dim2=-1).sum()) for n, g in mine.items()})
        whole = {n: whole[n] + g if n in whole else g for n, g in mine.items()}
    totals = {n: sum(t[n] for t in traces) for n in whole}
    return whole, [{n: t[n] / max(totals[n], 1e-30) for n in t} for t in traces]


def _share(grid: tiles.TileGrid, tile: tiles.Tile) -> float:
    x0, y0, x1, y1 = tile.core
    return (x1 - x0) * (y1 - y0) / (grid.width * grid.height)


def _core_grams(
    fwd: Forward,
    plan: LayerPlan,
    canvas: torch.Tensor,
    grid: tiles.TileGrid,
    cores: Iterable[tiles.Tile],
) -> Grams:
    """Sum over ``cores`` of each core's share of the image times its Gram matrices, taken over
    the core's positions seen in the tile's window (the whole image's Gram when ``cores`` are
    all of them, as tiled_grams.py does for the style image)."""
    out: Grams = {}
    with torch.no_grad():
        for tile in cores:
            box = grid.window(tile)
            core = _core_weights(tile, box, canvas.device)
            feats = fwd(_cut(canvas, box), plan.style, grams=plan.style, guide=GramGuide(core))
            share = _share(grid, tile)
            for n in plan.style:
                g = feats[gram_key(n)] * share
                out[n] = out[n] + g if n in out else g
            del feats
    return out


def _core_weights(
    tile: tiles.Tile, box: tuple[int, int, int, int], device: torch.device
) -> torch.Tensor:
    """(1, 1, h, w) over the window ``box``: 1 on the tile's core, 0 elsewhere."""
    x0, y0, x1, y1 = tile.core
    weights = torch.zeros((1, 1, box[3] - box[1], box[2] - box[0]), device=device)
    weights[:, :, y0 - box[1] : y1 - box[1], x0 - box[0] : x1 - box[0]] = 1.0
    return weights


def _cut(t: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    return t[:, :, y0:y1, x0:x1].contiguous()


def _embedding(
    canvas: torch.Tensor, tile: tiles.Tile, box: tuple[int, int, int, int]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """What the network sees while ``tile`` is optimised: the tile's current pixels inside the
    canvas's fixed pixels of ``box`` (a copy, taken now); and the style guide's weights, 1 on
    the tile's core and 0 elsewhere, so that only the core's positions enter its Gram matrices
    (the context gives them their surroundings; the overlaps are other cores')."""
    context = _cut(canvas, box)
    x, y = tile.x - box[0], tile.y - box[1]

    def embed(leaf: torch.Tensor) -> torch.Tensor:
        seen = context.clone()
        seen[:, :, y : y + tile.height, x : x + tile.width] = leaf
        return seen

    return embed, _core_weights(tile, box, canvas.device)
