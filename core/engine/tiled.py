"""One scale painted in overlapping tiles, when the whole scale does not fit the memory budget.

The tiles (core/engine/tiles.py) are optimised one after the other by the same per-scale
optimisation as a whole scale (core/engine/scale.py: ``optimise_scale``), each with its own
content target (its part of the photo) and the style targets of the whole style image; each
starts from the image as painted so far and is blended back in with feathered edges. The
scale's image (the *canvas*) is the only full-size tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image

from core.byte_sizes import format_bytes
from core.engine import memory_model, tiles
from core.engine.cpu import memory
from core.engine.device import pick_fused_pooling, pick_winograd
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
)
from core.engine.tensors import to_tensor
from core.errors import SettingsError
from core.settings import Settings

MIN_TILE_SIDE = 64
"""Smaller tiles would be mostly overlap; a budget that cannot hold one is refused."""


@dataclass
class MemoryPlan:
    """What a run may use (``limit`` bytes in all, None: no limit), what its process held when
    the scales were planned, and the measured costs (core/engine/memory_model.py) that decide
    which scales are painted in tiles."""

    limit: int | None
    held: int
    cost: ScaleCost
    targets: ScaleCost
    predicted: list[int] = field(default_factory=list)

    @classmethod
    def for_run(cls, s: Settings, device: torch.device, dtype: torch.dtype | None) -> MemoryPlan:
        """The budget of ``s.max_memory`` on ``device``: GPU memory on CUDA, else RAM."""
        free: int | None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            held = torch.cuda.memory_allocated(device)
        else:
            free, held = memory_model.available_ram(), memory_model.rss_now() or 0
        kind = memory_model.kind_of(
            "fp32" if dtype is None else "bf16",
            pick_winograd(s, device),
            pick_fused_pooling(s, device),
        )
        return cls(
            memory_model.resolve_budget(s.max_memory, held, free),
            held,
            memory_model.scale_cost(s.optimizer, kind, s.lbfgs_history),
            memory_model.TARGETS[kind],
        )

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
            max_pixels = self.cost.pixels_within(room - canvas)
            if max_pixels < MIN_TILE_SIDE**2:
                raise self._too_small(scale)
            grid = tiles.plan_grid(w, h, max_pixels, tiles.choose_overlap(max_pixels), previous)
            out.append(replace(scale, grid=grid))
            self.predicted.append(self.held + canvas + self.cost.extra(grid.largest))
            previous = grid
        return out

    def target_pixels(self, scale: tuple[int, int], style: tuple[int, int]) -> int | None:
        """The most pixels one forward pass for the style targets of a ``style``-sized image
        may take at a ``scale``-sized scale (None: no limit)."""
        room = self.room()
        if room is None:
            return None
        pixels = style[0] * style[1]
        taken = CANVAS_BYTES_PER_PIXEL * scale[0] * scale[1] + 3 * 4 * pixels  # style tensor
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
        need = self.held + self.cost.extra(MIN_TILE_SIDE**2) + CANVAS_BYTES_PER_PIXEL * w * h
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
    size; ``face_mask`` (the scale's, see run.py) is cut to each tile. The losses reported are the tiles' last ones weighted by their cores' areas (every
    term is a mean over positions, so this estimates the whole image's)."""
    grid = clock.scales[index].grid
    assert grid is not None
    targets = list(targets)
    totals: dict[str, float] = {}
    steps, restored = 0, False
    remaining = grid.pixels
    for k, tile in enumerate(grid.tiles):
        remaining -= tile.pixels
        clock.begin_tile(TileStep(k, tile.pixels, remaining, composer(canvas, tile)))
        content_t = content_prep(to_tensor(photo.crop(tile.box), canvas.device))
        mask = None if face_mask is None else _cut(face_mask, tile)
        objective = build_objective(s, plan, fwd, content_t, targets, mask)
        guide = None if mask is None else face_guide(s, mask)
        del content_t
        region = canvas[:, :, tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]
        leaf = region.clone().requires_grad_(True)
        memory.release()
        done = optimise_scale(s, fwd, plan, objective, leaf, index, clock, should_stop, guide)
        blend(canvas, tile, done.image)
        x0, y0, x1, y1 = tile.core
        share = (x1 - x0) * (y1 - y0) / (grid.width * grid.height)
        for name, value in done.losses.items():
            totals[name] = totals.get(name, 0.0) + value * share
        steps, restored = steps + done.steps, restored or done.restored_best
        del objective, leaf, done, mask, guide
    clock.end_tiles()
    return ScaleResult(canvas, totals, steps, restored)


def _cut(t: torch.Tensor, tile: tiles.Tile) -> torch.Tensor:
    return t[:, :, tile.y : tile.y + tile.height, tile.x : tile.x + tile.width].contiguous()
