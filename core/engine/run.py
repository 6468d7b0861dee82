"""The run: plan the scales, load the inputs, optimise one scale at a time, assemble the output.

``stylize`` is the one entry point every front end uses (directly in the CLI, inside the
runner's worker processes for the bot and the GIMP helper). It runs on a default ``Engine`` per
process, which caches loaded backbones and style targets, so a warm worker pays for neither
twice.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

import torch
from PIL import Image

from core import faces, images
from core.engine import backbones, colour
from core.engine.cpu import memory
from core.engine.device import (
    pick_channels_last,
    pick_device,
    pick_fused_pooling,
    pick_speed,
)
from core.engine.inputs import Inputs, load_inputs, split_styles
from core.engine.losses import SumLoss, gram
from core.engine.model import (
    BuildOptions,
    Forward,
    LayerPlan,
    build_model,
    layer_plan,
    weight_file,
)
from core.engine.scale import (
    Grams,
    ProgressClock,
    ScalePlan,
    ScaleResult,
    build_objective,
    face_guide,
    optimise_scale,
    start_image,
    style_size,
)
from core.engine.tensors import digest, fit, resize, to_image, to_tensor
from core.engine.tiled import MemoryPlan, paint_tiled, preview_sized, start_canvas
from core.engine.tiled_grams import tiled_grams
from core.errors import ImageError
from core.settings import Settings
from core.types import ImageInput, Progress, Result, StyleInput

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A small least-recently-used map."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def values(self) -> list[V]:
        return list(self._items.values())

    def items(self) -> list[tuple[K, V]]:
        return list(self._items.items())

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


MAX_LONG_SIDE = 8192
"""The longest painting a thin panorama may grow to (the largest ``Settings.size``)."""


# ---- planning -------------------------------------------------------------------------------
def pyramid(min_size: int, size: int, enabled: bool) -> list[int]:
    """Long sides from ``min_size`` up to ``size``, each sqrt(2) larger [crowsonkb]."""
    if not enabled or min_size >= size:
        return [size]
    scales, i = set(), 0
    while True:
        s = round(size / 2 ** (i / 2))
        if s < min_size:
            break
        scales.add(s)
        i += 1
    return sorted(scales)


def output_long_side(
    photo_size: tuple[int, int], size: int, min_side: int
) -> tuple[int, list[str]]:
    """The painting's long side: ``size``, unless the photo is so thin (a panorama) that its
    short side would be under ``min_side``, the least the network can take; then the smallest
    size that gives that short side (the long side grows), with a note saying so."""
    width, height = photo_size
    if min(fit(photo_size, size)) >= min_side:
        return size, []
    long_side = math.ceil(min_side * max(width, height) / min(width, height))
    if long_side > MAX_LONG_SIDE:
        raise ImageError(
            f"The content image is {width}x{height} pixels, too thin to paint: for its short "
            f"side to reach the {min_side} px the network needs, its long side would be "
            f"{long_side} px, over the {MAX_LONG_SIDE} px limit. Crop it first."
        )
    out_w, out_h = fit(photo_size, long_side)
    note = (
        f"The photo is very thin ({width}x{height}): at {size} px its short side would be "
        f"under the {min_side} px the network needs, so it was painted at {out_w}x{out_h}."
    )
    return long_side, [note]


def plan_scales(s: Settings, photo_size: tuple[int, int], min_side: int) -> list[ScalePlan]:
    """The pyramid's sizes and step budgets, up to ``output_long_side``. Scales whose short
    side cannot reach the deepest layer are skipped; the first scale gets ``first_iterations``
    when there are several, the others ``Settings.steps_at`` their size."""
    long_side = output_long_side(photo_size, s.size, min_side)[0]
    out_w, out_h = fit(photo_size, long_side)
    sizes = [fit(photo_size, side) for side in pyramid(s.min_size, long_side, s.pyramid)]
    sizes = [wh for wh in sizes if min(wh) >= min_side] or [(out_w, out_h)]
    if len(sizes) == 1:
        iters = [s.iterations if s.initial_iterations is None else s.initial_iterations]
    else:
        iters = [s.first_iterations] + [s.steps_at(max(wh)) for wh in sizes[1:]]
    return [ScalePlan(wh, n) for wh, n in zip(sizes, iters, strict=True)]


# ---- the engine -----------------------------------------------------------------------------
class Engine:
    """Paints images, keeping what is worth keeping between runs of one process: the built
    backbones (``models``, LRU of two) and the style images' Gram targets (``targets``, LRU of
    32, so a preset used again is free). ``keep_heap`` False leaves glibc's allocator
    settings alone during runs (core/engine/cpu/memory.py; the benchmark's allocator lever)."""

    def __init__(
        self, model_cache_size: int = 2, target_cache_size: int = 32, *, keep_heap: bool = True
    ) -> None:
        self.keep_heap = keep_heap
        self.models: LRU[tuple, backbones.FeatureExtractor] = LRU(model_cache_size)
        self.targets: LRU[tuple, Grams] = LRU(target_cache_size)

    def clear(self) -> None:
        """Forget every cached backbone and style target."""
        self.models.clear()
        self.targets.clear()

    def stylize(
        self,
        content: ImageInput,
        styles: Sequence[StyleInput],
        settings: Settings | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Result:
        """Paint ``content`` in the style of ``styles`` (each an image or (image, blend
        weight)).

        Raises ImageError / SettingsError / WeightsError for user errors and Cancelled when
        ``should_stop()`` returns True (checked once per optimiser step).
        """
        # Freed memory goes back when the run ends, however it ends (core/engine/cpu/memory.py).
        with memory.during_run(keep=False):
            run = _Run(self, content, styles, settings or Settings(), on_progress, should_stop)
            # Few page faults from step to step while the scales are painted. A run painted in
            # tiles keeps freed memory only where the large blocks are mapped on huge pages: a
            # heap that keeps them too fragments between tiles and scales of different sizes
            # (a 2048 px run at --max-memory 1.5GB peaked at 2.0 GB with it, 1.45 GB with
            # glibc's defaults, 1.19 GB with the large blocks mapped: docs/BENCHMARKS.md).
            with memory.during_run(self.keep_heap and (not run.tiled or memory.huge_pages())):
                return run.result()

    def warm_up(self, settings: Settings) -> None:
        """Build (and cache) the backbone ``settings`` use, ahead of the first run."""
        plan = layer_plan(settings)
        device = pick_device(settings.device)
        self.load_model(settings, plan, device, pick_channels_last(settings, device))

    def load_model(
        self, settings: Settings, plan: LayerPlan, device: torch.device, channels_last: bool
    ) -> tuple[backbones.FeatureExtractor, str]:
        """The frozen extractor for these settings, built once per engine; and its source."""
        wf = weight_file(settings)
        speed = pick_speed(settings, device)
        opts = BuildOptions(
            device,
            channels_last,
            speed.winograd,
            pick_fused_pooling(settings, device),
            speed.dtype,
        )
        mtime = os.path.getmtime(wf.path) if wf.path else 0.0
        key = (
            settings.backbone, wf.source, mtime, wf.normalization, str(device), plan.layers,
            channels_last, opts.winograd, opts.fused_pooling, opts.dtype,
        )  # fmt: skip
        model = self.models.get(key)
        if model is None:
            model = build_model(plan, wf.load(), wf.normalization, opts)
            self.models.put(key, model)
        return model, wf.source

    def style_grams(
        self,
        fwd: Forward,
        key: tuple,
        img: Image.Image,
        size: tuple[int, int],
        layers: tuple[str, ...],
        prep: Callable[[torch.Tensor], torch.Tensor],
        max_pixels: int | None = None,
    ) -> tuple[Grams, bool]:
        """Gram targets of one style image at one size, and whether they came from the cache.
        Over ``max_pixels`` pixels (the memory budget's), the forward pass goes tile by tile
        (core/engine/tiled_grams.py)."""
        tiled = max_pixels is not None and size[0] * size[1] > max_pixels
        full_key = (*key, digest(img), size, layers, tiled)
        hit = self.targets.get(full_key)
        if hit is not None:
            return hit, True
        with torch.no_grad():
            t = prep(to_tensor(resize(img, size), fwd.device))
            if tiled:
                assert max_pixels is not None
                grams = tiled_grams(fwd, t, layers, max_pixels)
            else:
                feats = fwd(t, layers)
                grams = {n: gram(feats[n]) for n in layers}
        self.targets.put(full_key, grams)
        return grams, False


class _Run:
    """One call of ``Engine.stylize``: its inputs, model and scales, prepared in the order the
    errors should surface (style weights, layers, images, weights, sizes)."""

    def __init__(
        self,
        engine: Engine,
        content: ImageInput,
        styles: Sequence[StyleInput],
        s: Settings,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.engine, self.s, self.should_stop = engine, s, should_stop
        self.started = time.perf_counter()
        style_items = split_styles(styles)
        self.plan = layer_plan(s)
        self.inputs: Inputs = load_inputs(content, style_items, s)
        self.faces = faces.detect_faces(self.inputs.photo) if s.keep_faces > 0 else []
        self.device = pick_device(s.device)
        self.speed = pick_speed(s, self.device)  # the probe runs here on first use
        self.dtype = self.speed.dtype
        self.channels_last = pick_channels_last(s, self.device)
        model, self.source = engine.load_model(s, self.plan, self.device, self.channels_last)
        self.fwd = Forward(model, self.device, self.dtype, self.channels_last)
        torch.manual_seed(s.seed)
        self.gen = torch.Generator().manual_seed(s.seed)
        self.long_side, self.notes = output_long_side(
            self.inputs.photo.size, s.size, self.plan.arch.min_side
        )
        scales = plan_scales(s, self.inputs.photo.size, self.plan.arch.min_side)
        photo_t = to_tensor(self.inputs.photo, self.device) if s.preserve_colors != "none" else None
        self.colours = colour.Preservation(s.preserve_colors, photo_t)
        self.styles = self._styles()
        self.blend_total = sum(w for _, w in self.styles)
        # Measured after the model and the inputs are in memory: what the scales may add.
        reach = self.plan.arch.reach(self.plan.layers)
        self.memory = MemoryPlan.for_run(s, self.device, self.dtype, reach)
        self.scales = self.memory.tile(scales)
        self.clock = ProgressClock(
            self.scales, self.started, s.preview_every, on_progress,
            preview_sized(self.colours.chroma_source),
        )  # fmt: skip
        self.cache_hits = 0

    def _styles(self) -> list[tuple[Image.Image, float]]:
        """The style images as their targets are taken (recoloured in stats mode)."""
        if self.s.preserve_colors != "stats":
            return self.inputs.styles
        return [
            (to_image(self.colours.recolour(to_tensor(img, self.device))), w)
            for img, w in self.inputs.styles
        ]

    def _target_key(self) -> tuple:
        """What style targets depend on besides the style image, its size and the layers."""
        s = self.s
        return (
            s.backbone, self.source, str(self.device), str(self.dtype), self.channels_last,
            s.preserve_colors, digest(self.inputs.photo) if s.preserve_colors != "none" else "",
        )  # fmt: skip

    @property
    def tiled(self) -> bool:
        """Whether some scale is painted in tiles (the memory budget is tight)."""
        return any(scale.grid is not None for scale in self.scales)

    def _style_targets(self, size: tuple[int, int]) -> Iterator[tuple[Grams, float]]:
        """Each style image's Gram targets at this scale, with its share of the blend."""
        key = self._target_key()
        for img, blend in self.styles:
            ssize = style_size(img.size, size, self.s, self.plan.arch.min_side)
            grams, hit = self.engine.style_grams(
                self.fwd, key, img, ssize, self.plan.style, self.colours.style_tensor,
                self.memory.target_pixels(size, ssize, img.size),
            )  # fmt: skip
            self.cache_hits += hit
            yield grams, blend / self.blend_total

    def _face_mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """The soft mask over the faces at this scale, (1, 1, H, W); None without faces, so a
        photo without one is painted by exactly the code of ``keep_faces=0``."""
        if not self.faces:
            return None
        return torch.from_numpy(faces.face_mask(self.faces, size))[None, None].to(self.device)

    def _objective(self, size: tuple[int, int], mask: torch.Tensor | None) -> SumLoss:
        content_t = self.colours.content_tensor(
            to_tensor(resize(self.inputs.photo, size), self.device)
        )
        targets = self._style_targets(size)
        return build_objective(self.s, self.plan, self.fwd, content_t, targets, mask)

    def _first_image(self, size: tuple[int, int]) -> torch.Tensor:
        """The first scale's start: the photo, seeded noise or the given image."""
        if self.s.init == "content":
            return to_tensor(resize(self.inputs.photo, size), self.device)
        if self.s.init == "noise":
            w, h = size
            return torch.rand((1, 3, h, w), generator=self.gen).to(self.device)
        assert self.inputs.init is not None
        return to_tensor(resize(self.inputs.init, size), self.device)

    def result(self) -> Result:
        image: torch.Tensor | None = None
        losses: dict[str, float] = {}
        steps: list[int] = []
        restored: list[int] = []  # scales whose best evaluated image replaced a worse last one
        for index, scale in enumerate(self.scales):
            memory.release()
            # The previous scale's image goes in a box the scale empties once it has started
            # from it, so that it is not held through the scale's steps.
            previous, image = [image], None
            done = self._whole(index, scale, previous) if scale.grid is None else (
                self._tiled(index, scale, previous)
            )  # fmt: skip
            image, losses = done.image, (done.losses if done.steps else losses)
            steps.append(done.steps)
            if done.restored_best:
                restored.append(index + 1)
            del done  # this scale's state, before the next scale
        assert image is not None
        return Result(
            image=self._output_image(image),
            settings=self.s,
            metadata=self._metadata(steps, restored, losses),
        )

    def _whole(
        self, index: int, scale: ScalePlan, previous: list[torch.Tensor | None]
    ) -> ScaleResult:
        """A scale that fits the memory budget, optimised at once."""
        mask = self._face_mask(scale.size)
        objective = self._objective(scale.size, mask)
        guide = face_guide(self.s, mask) if mask is not None else None
        image = start_image(
            self.s,
            scale.size,
            previous.pop(),
            partial(self._first_image, scale.size),
            self.colours.content_tensor,
        )
        # Trimmed here, after the targets: the steps then reuse their own freed blocks, and
        # the peak stays near what is live (one trim per scale, before its first step).
        memory.release()
        return optimise_scale(
            self.s, self.fwd, self.plan, objective, image, index, self.clock,
            self.should_stop, guide,
        )  # fmt: skip

    def _tiled(
        self, index: int, scale: ScalePlan, previous: list[torch.Tensor | None]
    ) -> ScaleResult:
        """A scale over the memory budget, painted in tiles (core/engine/tiled.py)."""
        targets = list(self._style_targets(scale.size))
        memory.release()  # the targets' freed blocks, before the canvas and the tiles
        canvas = start_canvas(
            scale.size,
            previous.pop(),
            partial(self._first_image, scale.size),
            self.colours.content_tensor,
        )
        photo = resize(self.inputs.photo, scale.size)
        return paint_tiled(
            self.s, self.plan, self.fwd, index, self.clock, self.should_stop, canvas, photo,
            self.colours.content_tensor, targets, self._face_mask(scale.size),
        )  # fmt: skip

    def _output_image(self, image: torch.Tensor) -> Image.Image:
        """The optimised tensor as the output: colours finished, at the requested size, with
        the content's alpha put back."""
        out = to_image(self.colours.finish(image))
        size = fit(self.inputs.photo.size, self.long_side)
        if out.size != size:
            out = out.resize(size, Image.Resampling.LANCZOS)
        if self.inputs.alpha is not None:
            out = out.convert("RGBA")
            out.putalpha(resize(self.inputs.alpha, out.size))
        return images.with_dpi(out, images.dpi_of(self.inputs.photo))

    def _metadata(
        self, steps: list[int], restored: list[int], losses: dict[str, float]
    ) -> dict[str, Any]:
        s, device = self.s, self.device
        metadata: dict[str, Any] = {
            "software": "pastiche",
            "settings": s.to_dict(),
            "backbone": s.backbone,
            "weights": self.source,
            "random_weights": s.backbone == "random",
            "device": str(device),
            "precision": "fp32" if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "channels_last": self.channels_last,
            "winograd": self.speed.winograd,
            "speed": self.speed.metadata(),  # the path, why, and the timings it was chosen by
            "fused_pooling": pick_fused_pooling(s, device),
            "scales": [list(p.size) for p in self.scales],
            "steps": steps,
            "tiles": [p.tiles for p in self.scales],
            "memory": self.memory.describe(),
            "restored_best": restored,
            "losses": losses,
            "style_cache_hits": self.cache_hits,
            "seconds": round(time.perf_counter() - self.started, 3),
            "notes": self.notes,
            "faces": self._faces_metadata(),
        }
        if s.extra:
            metadata["extra"] = s.extra
        return metadata

    def _faces_metadata(self) -> dict[str, Any] | None:
        """The face boxes used, in the painting's pixels (None when keep_faces is off)."""
        if self.s.keep_faces <= 0:
            return None
        return faces.faces_metadata(self.faces, fit(self.inputs.photo.size, self.long_side))


_default: Engine | None = None


def default_engine() -> Engine:
    """This process's engine (workers keep it warm between jobs)."""
    global _default
    if _default is None:
        _default = Engine()
    return _default


def stylize(
    content: ImageInput,
    styles: Sequence[StyleInput],
    settings: Settings | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """``Engine.stylize`` on this process's default engine."""
    return default_engine().stylize(
        content, styles, settings, on_progress=on_progress, should_stop=should_stop
    )
