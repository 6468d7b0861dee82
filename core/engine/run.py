"""The optimisation: pyramid, optimiser, precision, progress, cancellation.

``stylize`` is the one entry point every front end uses (directly in the CLI, inside the
runner's worker processes for the bot and the GIMP helper). Loaded backbones and style targets
are cached per process, so a warm worker pays for neither twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core import images
from core.engine import backbones, colour
from core.engine.cpu import fusion, memory, winograd
from core.engine.cpu.lbfgs import LBFGS
from core.engine.losses import (
    ContentLoss,
    LayerApply,
    Scale,
    StyleLoss,
    SumLoss,
    TVLoss,
    gram,
    gram_key,
)
from core.errors import Cancelled, ImageError, SettingsError
from core.settings import Settings
from core.types import ImageInput, Progress, Result, StyleInput

log = logging.getLogger(__name__)


PREVIEW_SIDE = 256
_MODEL_CACHE: OrderedDict[tuple, backbones.FeatureExtractor] = OrderedDict()
_MODEL_CACHE_SIZE = 2
_TARGET_CACHE: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_TARGET_CACHE_SIZE = 32


# ---- devices and precision ------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(
            f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            "CUDA was asked for, but this PyTorch build or machine has no CUDA GPU."
        )
    return device


def cpu_has_amx() -> bool:
    """Only AMX tiles make bf16 convolutions pay off on CPUs: on an AVX512-BF16 Xeon without
    AMX, bf16 autocast was 1.5x slower than fp32 at 512 px (benchmarks/bench.py)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read(1 << 16)
    except OSError:
        return False
    return "amx_bf16" in flags


def pick_precision(settings: Settings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the backbone, or None for fp32 (see benchmarks/ for the numbers)."""
    if settings.precision == "fp32":
        return None
    if settings.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_amx() else None
    return None


def pick_winograd(settings: Settings, device: torch.device) -> bool:
    """Winograd convolutions where they measured faster: fp32 on CPU (core/winograd.py).

    CUDA's cuDNN picks its own algorithms (Winograd among them); MPS has its own kernels."""
    if settings.winograd is not None:
        return settings.winograd
    return device.type == "cpu" and pick_precision(settings, device) is None


def pick_fused_pooling(settings: Settings, device: torch.device) -> bool:
    """ReLU + max pool fused (core/fusion.py) on the CPU only: it was measured there (less
    memory at about the same speed); on a GPU its Python-level backward (four strided kernels
    instead of one) was never timed, so cuDNN's own pooling stays."""
    if settings.fused_pooling is not None:
        return settings.fused_pooling
    return device.type == "cpu"


# ---- image <-> tensor -----------------------------------------------------------------------
def to_tensor(img: Image.Image, device: torch.device) -> torch.Tensor:
    """8-bit RGB PIL image to a (1, 3, H, W) float tensor in [0, 1]."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    t = data.view(img.height, img.width, 3).permute(2, 0, 1).unsqueeze(0)
    return t.to(device=device, dtype=torch.float32).div_(255)


def to_image(t: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) tensor in [0, 1] to an 8-bit RGB PIL image."""
    arr = t.detach()[0].float().clamp(0, 1).mul(255).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).contiguous().cpu()
    return Image.frombuffer("RGB", (arr.shape[1], arr.shape[0]), arr.numpy().tobytes())


def fit(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(w, h) scaled so the long side is ``long_side`` (up or down), aspect kept."""
    w, h = size
    if w >= h:
        return long_side, max(1, round(h * long_side / w))
    return max(1, round(w * long_side / h)), long_side


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)


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


# ---- models and targets ---------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    arch: backbones.Architecture
    content: tuple[str, ...]
    style: tuple[str, ...]
    style_weights: tuple[float, ...]


def layer_plan(settings: Settings) -> LayerPlan:
    arch_name = "squeezenet" if settings.backbone == "squeezenet" else "vgg19"
    arch = backbones.ARCHITECTURES[arch_name][0]
    content = settings.content_layers or arch.content_layers
    style = settings.style_layers or arch.style_layers
    if settings.style_layer_weights is not None:
        weights = settings.style_layer_weights
    elif settings.style_layers is None:
        weights = arch.style_weights
    else:
        weights = tuple(1.0 for _ in style)
    if len(weights) != len(style):
        raise SettingsError("style_layer_weights needs one weight per style layer.")
    if settings.style_depth is not None:
        style, weights = style[: settings.style_depth], weights[: settings.style_depth]
    unknown = [n for n in (*content, *style) if n not in arch.names]
    if unknown:
        raise SettingsError(
            f"{arch.name} has no layer(s) {', '.join(unknown)}; it has {', '.join(arch.names)}."
        )
    total = sum(weights)
    return LayerPlan(arch, tuple(content), tuple(style), tuple(w / total for w in weights))


def load_model(settings: Settings, plan: LayerPlan, device: torch.device, channels_last: bool):
    """The frozen extractor for these settings, built once per process (LRU of two)."""
    if settings.backbone == "random":
        path, normalization, source = None, "imagenet", "random"
    else:
        from core.engine import weights as weight_sources

        src = weight_sources.SOURCES[settings.backbone]
        path = weight_sources.resolve(settings.backbone, settings.weights)
        normalization, source = src.normalization, str(path)
    layers = tuple(dict.fromkeys((*plan.content, *plan.style)))
    mtime = os.path.getmtime(path) if path else 0.0
    use_winograd = pick_winograd(settings, device)
    use_fusion = pick_fused_pooling(settings, device)
    dtype = pick_precision(settings, device)
    key = (
        settings.backbone, source, mtime, normalization, str(device), layers, channels_last,
        use_winograd, use_fusion, dtype,
    )  # fmt: skip
    model = _MODEL_CACHE.get(key)
    if model is None:
        state = None
        if path is not None:
            from core.engine import weights as weight_sources

            state = weight_sources.load_state_dict(path)
        else:
            log.warning("Using RANDOM backbone weights: output will not look like a painting.")
        model = backbones.build(plan.arch.name, state, layers, normalization=normalization)
        model = convert_model(
            model, device, channels_last=channels_last, use_winograd=use_winograd,
            use_fusion=use_fusion, dtype=dtype,
        )  # fmt: skip
        _MODEL_CACHE[key] = model
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    else:
        _MODEL_CACHE.move_to_end(key)
    return model, source


def convert_model(
    model: backbones.FeatureExtractor,
    device: torch.device,
    *,
    channels_last: bool,
    use_winograd: bool,
    use_fusion: bool,
    dtype: torch.dtype | None,
) -> backbones.FeatureExtractor:
    """The extractor moved to ``device`` and converted for the chosen path (in place; the same
    build for a run and for the speed probe, core/engine/probe.py)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if use_winograd:
        winograd.convert(model.features)
    if use_fusion:
        fusion.fuse_relu_pool(model.features, keep=set(model.index.values()))
    if dtype is not None:
        store_weights_in(model, dtype)
    return model


def store_weights_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the convolutions' weights in the autocast dtype: autocast rounds frozen weights
    anew on every forward pass (it caches only leaves that require grad) and autograd keeps
    those copies until the backward pass; rounding once gives the same values without them
    (~25 MB per pass for VGG19 up to conv5_1). Buffers (the input normalisation) stay float32."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(dtype)


def _digest(img: Image.Image) -> str:
    h = hashlib.blake2b(img.tobytes(), digest_size=16)
    h.update(repr((img.size, img.mode)).encode())
    return h.hexdigest()


class Forward:
    """Runs the backbone with the chosen precision and memory layout."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype | None, channels_last: bool
    ) -> None:
        self.model, self.device, self.dtype, self.channels_last = (
            model,
            device,
            dtype,
            channels_last,
        )

    def __call__(
        self, x: torch.Tensor, layers: Sequence[str] | None = None, grams: Collection[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Activations by layer name, plus the Gram matrix of each layer in ``grams`` under
        ``gram_key(layer)``. Each Gram is taken as soon as its layer exists, so autograd (which
        runs the most recently created nodes first) computes its gradient only when the backward
        pass reaches that layer, instead of holding every style layer's gradient through the
        whole backward pass (about 70 MB at 512 px)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        taken: dict[str, torch.Tensor] = {}

        def take_gram(name: str, h: torch.Tensor) -> None:
            if name in grams:
                with torch.autocast(self.device.type, enabled=False):  # Grams stay float32
                    taken[gram_key(name)] = gram(h)

        if self.dtype is None:
            feats = self.model(x, layers, take_gram if grams else None)
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                feats = self.model(x, layers, take_gram if grams else None)
        feats.update(taken)
        return feats


def style_grams(
    fwd: Forward,
    key: tuple,
    img: Image.Image,
    size: tuple[int, int],
    layers: tuple[str, ...],
    prep: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], bool]:
    """Gram targets of one style image at one size (cached: a preset used again is free)."""
    full_key = (*key, _digest(img), size, layers)
    hit = _TARGET_CACHE.get(full_key)
    if hit is not None:
        _TARGET_CACHE.move_to_end(full_key)
        return hit, True
    with torch.no_grad():
        t = prep(to_tensor(resize(img, size), fwd.device))
        feats = fwd(t, layers)
        grams = {n: gram(feats[n]) for n in layers}
    _TARGET_CACHE[full_key] = grams
    while len(_TARGET_CACHE) > _TARGET_CACHE_SIZE:
        _TARGET_CACHE.popitem(last=False)
    return grams, False


# ---- the optimisation -----------------------------------------------------------------------
def _split_styles(styles: Sequence[StyleInput]) -> list[tuple[ImageInput, float]]:
    if isinstance(styles, (str, bytes, Path, Image.Image)):
        styles = [styles]
    out: list[tuple[ImageInput, float]] = []
    for item in styles:
        if isinstance(item, tuple):
            src, weight = item
        else:
            src, weight = item, 1.0
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise SettingsError(f"Style blend weights must be positive numbers, got {weight!r}.")
        out.append((src, float(weight)))
    if not out:
        raise SettingsError("Give at least one style image.")
    return out


def _split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if img.mode == "RGBA":
        return img.convert("RGB"), img.getchannel("A")
    return img.convert("RGB"), None


def stylize(
    content: ImageInput,
    styles: Sequence[StyleInput],
    settings: Settings | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """Paint ``content`` in the style of ``styles`` (each an image or (image, blend weight)).

    Raises ImageError / SettingsError / WeightsError for user errors and Cancelled when
    ``should_stop()`` returns True (checked once per optimiser step).
    """
    memory.keep_freed_memory()  # no page faults from step to step (core/memory.py)
    try:
        return _stylize(content, styles, settings, on_progress, should_stop)
    finally:
        memory.release()


def _stylize(
    content: ImageInput,
    styles: Sequence[StyleInput],
    settings: Settings | None,
    on_progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Result:
    s = settings or Settings()
    started = time.perf_counter()
    style_items = _split_styles(styles)
    plan = layer_plan(s)
    photo, alpha = _split_alpha(images.load_image(content, name="content image"))
    style_imgs = [
        (_split_alpha(images.load_image(src, name=f"style image {i}"))[0], w)
        for i, (src, w) in enumerate(style_items, 1)
    ]
    init_img = None
    if s.init == "image":
        init_img = _split_alpha(images.load_image(s.init_image, name="init image"))[0]

    device = pick_device(s.device)
    dtype = pick_precision(s, device)
    channels_last = s.channels_last if s.channels_last is not None else device.type != "mps"
    model, source = load_model(s, plan, device, channels_last)
    fwd = Forward(model, device, dtype, channels_last)
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)

    # Scales whose short side cannot reach the deepest layer are skipped.
    out_w, out_h = fit(photo.size, s.size)
    min_side = plan.arch.min_side
    if min(out_w, out_h) < min_side:
        raise ImageError(
            f"The content image is too thin for a {s.size} px output: its short side would be "
            f"{min(out_w, out_h)} px, and at least {min_side} px are needed. Use a larger size."
        )
    sizes = [fit(photo.size, side) for side in pyramid(s.min_size, s.size, s.pyramid)]
    sizes = [wh for wh in sizes if min(wh) >= min_side] or [(out_w, out_h)]
    if len(sizes) == 1:
        plan_iters = [s.iterations if s.initial_iterations is None else s.initial_iterations]
    else:
        plan_iters = [s.first_iterations] + [s.iterations] * (len(sizes) - 1)
    total_steps = sum(plan_iters)
    pixel_steps = [n * w * h for n, (w, h) in zip(plan_iters, sizes, strict=True)]

    # Colour preservation works on the inputs (and, for luminance, on the output).
    photo_t_full = to_tensor(photo, device)
    if s.preserve_colors == "stats":
        style_imgs = [
            (to_image(colour.match_colour_stats(to_tensor(img, device), photo_t_full)), w)
            for img, w in style_imgs
        ]
    luminance_mode = s.preserve_colors == "luminance"
    photo_y = colour.luminance(photo_t_full) if luminance_mode else None

    def prep_style(t: torch.Tensor) -> torch.Tensor:
        if photo_y is None:
            return t
        return colour.match_luminance(colour.luminance(t), photo_y)

    def prep_content(t: torch.Tensor) -> torch.Tensor:
        return colour.luminance(t) if luminance_mode else t

    target_key = (
        s.backbone,
        source,
        str(device),
        str(dtype),
        channels_last,
        s.preserve_colors,
        _digest(photo) if s.preserve_colors != "none" else "",
    )
    blend_total = sum(w for _, w in style_imgs)
    image: torch.Tensor | None = None
    losses: dict[str, float] = {}
    done_pixel_steps, opt_time, step, cache_hits = 0, 0.0, 0, 0
    steps_run: list[int] = []
    restored: list[int] = []  # scales whose best evaluated image replaced a worse last one

    for scale_i, ((w, h), iters) in enumerate(zip(sizes, plan_iters, strict=True)):
        memory.release()
        content_t = prep_content(to_tensor(resize(photo, (w, h)), device))
        with torch.no_grad():
            content_feats = fwd(content_t, plan.content)
        content_terms = [
            Scale(
                LayerApply(ContentLoss(content_feats[n]), n),
                s.effective_content_weight / len(plan.content),
            )
            for n in plan.content
        ]
        del content_feats
        # Style targets: the style image is sized relative to this scale, never upscaled.
        style_terms: list[nn.Module] = []
        mixed: dict[str, torch.Tensor] = {}
        for img, blend in style_imgs:
            long_side = max(min_side, round(max(w, h) * s.style_scale))
            ssize = fit(img.size, long_side) if max(img.size) > long_side else img.size
            if min(ssize) < min_side:
                ssize = fit(img.size, round(long_side * min_side / max(1, min(ssize))))
            grams, hit = style_grams(fwd, target_key, img, ssize, plan.style, prep_style)
            cache_hits += hit
            share = blend / blend_total
            if s.style_blend == "gram":
                for n in plan.style:
                    mixed[n] = mixed[n] + grams[n] * share if n in mixed else grams[n] * share
            else:
                style_terms += [
                    Scale(LayerApply(StyleLoss(grams[n]), gram_key(n)), s.style_weight * lw * share)
                    for n, lw in zip(plan.style, plan.style_weights, strict=True)
                ]
        if s.style_blend == "gram":
            style_terms = [
                Scale(LayerApply(StyleLoss(mixed[n]), gram_key(n)), s.style_weight * lw)
                for n, lw in zip(plan.style, plan.style_weights, strict=True)
            ]
        tv_terms = [Scale(LayerApply(TVLoss(), "input"), s.tv_weight)]
        objective = SumLoss({"content": content_terms, "style": style_terms, "tv": tv_terms})

        # Start: the previous scale upsampled, else content / noise / the given image.
        if image is not None:
            start = F.interpolate(image.detach(), size=(h, w), mode="bicubic", align_corners=False)
        elif s.init == "content":
            start = to_tensor(resize(photo, (w, h)), device)
        elif s.init == "noise":
            start = torch.rand((1, 3, h, w), generator=gen).to(device)
        else:
            start = to_tensor(resize(init_img, (w, h)), device)
        image = prep_content(start.clamp(0, 1)).contiguous().requires_grad_(True)

        # Trimmed here, after the targets: the steps then reuse their own freed blocks, and the
        # peak stays near what is live (one trim per scale, before its first step).
        memory.release()
        opt, average = _optimizer(s, image)
        # L-BFGS without a line search (neural-style's and crowsonkb's configuration) is not
        # monotone: a poor curvature estimate can throw the image far uphill for a few steps.
        # The best image evaluated in this scale is kept, so a scale never ends worse than it
        # got (Adam's output is its iterate average instead).
        best_seen: dict[str, Any] = {"loss": math.inf, "image": None, "losses": {}, "last": 0.0}

        def closure(
            opt=opt, image=image, objective=objective, best_seen=best_seen, track=average is None
        ) -> torch.Tensor:
            opt.zero_grad(set_to_none=False)  # one gradient buffer for the whole scale
            feats = fwd(image, grams=plan.style)
            feats["input"] = image
            loss = objective(feats)
            loss.backward()
            if track:
                value = float(loss.detach())
                best_seen["last"] = value
                if value < best_seen["loss"]:
                    best_seen.update(loss=value, losses=objective.values())
                    if best_seen["image"] is None:
                        best_seen["image"] = image.detach().clone()
                    else:
                        best_seen["image"].copy_(image.detach())
            return loss

        best, best_at, it = math.inf, 0, 0
        for it in range(1, iters + 1):
            if should_stop is not None and should_stop():
                raise Cancelled()
            t0 = time.perf_counter()
            opt.step(closure)
            if average is not None:
                with torch.no_grad():
                    image.clamp_(0, 1)  # box constraint for Adam (not L-BFGS) [crowsonkb]
                    # EMA of the iterates, decay 0.99 [crowsonkb avg_decay].
                    average.mul_(0.99).add_(image.detach(), alpha=0.01)
            losses = objective.values()
            if not math.isfinite(losses["total"]):
                raise SettingsError(
                    "The optimisation diverged (the loss is not a number). Lower the learning "
                    "rate or the loss weights."
                )
            opt_time += time.perf_counter() - t0
            step += 1
            done_pixel_steps += w * h
            if losses["total"] < best * (1 - s.early_stop):
                best, best_at = losses["total"], it
            stop_early = s.early_stop > 0 and it - best_at >= s.patience
            if stop_early:  # the rest of this scale's budget is skipped: report it as done
                total_steps -= iters - it
            if on_progress is not None:
                remaining = sum(pixel_steps[scale_i + 1 :]) + (iters - it) * w * h
                eta = opt_time / done_pixel_steps * remaining if step >= 2 else None
                preview = None
                if s.preview_every and step % s.preview_every == 0:
                    preview = _preview(
                        _current(image, average), photo_t_full if luminance_mode else None
                    )
                on_progress(
                    Progress(
                        step=step, total_steps=total_steps, scale=scale_i + 1, scales=len(sizes),
                        iteration=it, iterations=iters, width=w, height=h, losses=dict(losses),
                        elapsed=time.perf_counter() - started, eta=eta, preview=preview,
                    )
                )  # fmt: skip
            if stop_early:
                break
        steps_run.append(it)
        if best_seen["image"] is not None and best_seen["last"] > best_seen["loss"]:
            # The last evaluated image was not the best: the run went uphill at the end, so the
            # final step (never evaluated) is not trusted either.
            image, losses = best_seen["image"], best_seen["losses"]
            restored.append(scale_i + 1)
        else:
            image = _current(image, average).detach()
        best_seen.clear()
        del opt, closure, average  # this scale's optimiser state, before the next scale

    assert image is not None
    out = colour.with_chroma_of(image, photo_t_full) if luminance_mode else image.clamp(0, 1)
    result_img = to_image(out)
    if result_img.size != (out_w, out_h):
        result_img = result_img.resize((out_w, out_h), Image.Resampling.LANCZOS)
    if alpha is not None:
        result_img = result_img.convert("RGBA")
        result_img.putalpha(resize(alpha, result_img.size))
    metadata = {
        "software": "pastiche",
        "settings": s.to_dict(),
        "backbone": s.backbone,
        "weights": source,
        "random_weights": s.backbone == "random",
        "device": str(device),
        "precision": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "winograd": pick_winograd(s, device),
        "fused_pooling": pick_fused_pooling(s, device),
        "scales": [list(wh) for wh in sizes],
        "steps": steps_run,
        "restored_best": restored,
        "losses": losses,
        "style_cache_hits": cache_hits,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if s.extra:
        metadata["extra"] = s.extra
    return Result(image=result_img, settings=s, metadata=metadata)


def _optimizer(
    s: Settings, image: torch.Tensor
) -> tuple[LBFGS | torch.optim.Optimizer, torch.Tensor | None]:
    """The optimiser for one scale, and Adam's iterate average (None for L-BFGS)."""
    if s.optimizer == "lbfgs":
        # One function evaluation per step, history 10 [crowsonkb]; lr 1 is L-BFGS's own.
        # torch.optim.LBFGS's arithmetic with preallocated state (see core/lbfgs.py).
        return LBFGS(image, lr=1, history_size=s.lbfgs_history), None
    # The average starts at the first iterate, a meaningful image, so it needs no bias correction.
    return torch.optim.Adam([image], lr=s.learning_rate), image.detach().clone()


def _current(image: torch.Tensor, average: torch.Tensor | None) -> torch.Tensor:
    """The image to show or carry on: Adam's averaged iterate, L-BFGS's own iterate."""
    return (image if average is None else average).detach().clamp(0, 1)


def _preview(t: torch.Tensor, photo: torch.Tensor | None) -> Image.Image:
    if photo is not None:
        t = colour.with_chroma_of(t, photo)
    img = to_image(t)
    img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return img
