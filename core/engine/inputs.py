"""A run's input images: loaded and validated once, alpha split off, style weights checked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core import images
from core.errors import SettingsError
from core.settings import Settings
from core.types import ImageInput, StyleInput


@dataclass
class Inputs:
    photo: Image.Image  # the content image, RGB
    alpha: Image.Image | None  # its alpha channel, put back on the output
    styles: list[tuple[Image.Image, float]]  # RGB style images and their blend weights
    init: Image.Image | None  # the start image of ``init="image"``


def split_styles(styles: Sequence[StyleInput]) -> list[tuple[ImageInput, float]]:
    """Each style as (image, blend weight); a bare image weighs 1."""
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


def split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if img.mode == "RGBA":
        return img.convert("RGB"), img.getchannel("A")
    return img.convert("RGB"), None


def load_inputs(content: ImageInput, styles: list[tuple[ImageInput, float]], s: Settings) -> Inputs:
    """Load every image of a run (ImageError names the one that failed)."""
    photo, alpha = split_alpha(images.load_image(content, name="content image"))
    style_imgs = [
        (split_alpha(images.load_image(src, name=f"style image {i}"))[0], w)
        for i, (src, w) in enumerate(styles, 1)
    ]
    init = None
    if s.init == "image":
        assert s.init_image is not None  # Settings' validation: init "image" needs init_image
        init = split_alpha(images.load_image(s.init_image, name="init image"))[0]
    return Inputs(photo, alpha, style_imgs, init)
