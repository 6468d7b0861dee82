"""Shared fixtures: a VGG19-shaped checkpoint with random weights, settings that use it, and
images made on the fly (tests never use the sample images or real weights)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.engine.backbones import random_state_dict
from core.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def speed_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The engine's speed measurements for this session, never the user's cache: the first
    run that needs them probes this machine once (core/engine/autotune.py), every later run
    and every spawned worker (which inherits the environment) reads them."""
    from core.engine import autotune

    path = tmp_path_factory.mktemp("speed") / "speed.json"
    saved = os.environ.get(autotune.ENV_VAR)
    os.environ[autotune.ENV_VAR] = str(path)
    autotune.forget()
    yield path
    if saved is None:
        os.environ.pop(autotune.ENV_VAR, None)
    else:
        os.environ[autotune.ENV_VAR] = saved
    autotune.forget()


@pytest.fixture(scope="session")
def vgg19_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-layout VGG19 checkpoint (features only) with seeded random weights."""
    path = tmp_path_factory.mktemp("weights") / "vgg19-random.pth"
    torch.save(random_state_dict("vgg19", seed=1234), path)
    return path


def settings_for(checkpoint: Path, **changes) -> Settings:
    """Settings for fast end-to-end runs on tiny images through the real checkpoint loader."""
    base = dict(
        size=64,
        min_size=32,
        iterations=6,
        backbone="vgg19",
        weights=str(checkpoint),
        device="cpu",
        precision="fp32",
        early_stop=0.0,
        preview_every=0,
    )
    base.update(changes)
    return Settings(**base)


@pytest.fixture
def tiny_settings(vgg19_checkpoint: Path) -> Callable[..., Settings]:
    """``settings_for`` the session's random checkpoint."""
    return lambda **changes: settings_for(vgg19_checkpoint, **changes)


def make_image(width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic, textured test image (gradients plus noise) in any PIL mode."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    noise = torch.rand((3, height, width), generator=gen)
    rgb = torch.stack([x, y, (x + y) / 2]) * 0.6 + noise * 0.4
    data = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    img = Image.frombytes("RGB", (width, height), bytes(data.flatten().tolist()))
    if mode == "RGBA":
        img = img.convert("RGBA")
        alpha = Image.linear_gradient("L").resize((width, height))
        img.putalpha(alpha)
        return img
    return img.convert(mode) if mode != "RGB" else img


def image_bytes(fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    make_image(**kwargs).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def content_png() -> bytes:
    return image_bytes(width=64, height=48, seed=1)


@pytest.fixture
def style_png() -> bytes:
    return image_bytes(width=64, height=64, seed=2)


def losses_off_and_on(
    tiny_settings: Callable[..., Settings],
    lever: str,
    iterations: int,
    after_off: Callable[[], None] | None = None,
) -> dict[bool, dict[str, float]]:
    """The engine's loss terms after ``iterations`` single-scale steps with a boolean setting
    off, then on (checking the metadata reports it); ``after_off`` runs between the two."""
    from core.engine import run as engine

    results: dict[bool, dict[str, float]] = {}
    for flag in (False, True):
        s = tiny_settings(
            **{lever: flag}, iterations=iterations, initial_iterations=iterations, pyramid=False
        )
        r = engine.stylize(make_image(64, 48), [make_image(64, 48, seed=3)], s)
        assert r.metadata[lever] is flag
        results[flag] = r.metadata["losses"]
        if not flag and after_off is not None:
            after_off()
    return results
