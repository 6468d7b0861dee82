"""The values that cross between the engine and its callers, importable without torch.

Front ends, the job runner's worker body and test fakes use these exact types (never look-alike
stand-ins), so a field added here is seen by every side at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from core.animation import Animation
from core.settings import Settings

ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image]  # noqa: UP007 (runtime alias)
"""A path, encoded image bytes or a decoded PIL image."""
StyleInput = Union[ImageInput, tuple[ImageInput, float]]  # noqa: UP007
"""A style image, or (style image, blend weight)."""


@dataclass(frozen=True)
class Progress:
    """One optimiser step, passed to ``on_progress``."""

    step: int  # global step, 1-based, over all scales
    total_steps: int  # planned steps over all scales (early stop may end sooner)
    scale: int  # 1-based index of the pyramid scale
    scales: int
    iteration: int  # step within this scale, 1-based
    iterations: int  # planned steps at this scale
    width: int  # size being optimised at this scale
    height: int
    losses: dict[str, float]  # content, style, tv, total
    elapsed: float  # seconds since stylize() started
    eta: float | None  # seconds left, None until it can be estimated
    preview: Image.Image | None = None  # small RGB preview every settings.preview_every steps
    tile: int = 1  # 1-based tile of a scale painted in tiles (see core/engine/tiled.py)
    tiles: int = 1  # tiles of this scale (1: painted whole)
    frame: int = 1  # animations: 1-based frame being painted (step/total_steps span the clip)
    frames: int = 1

    @property
    def percent(self) -> float:
        return 100.0 * self.step / max(1, self.total_steps)


@dataclass
class Result:
    """The painting (RGB, or RGBA when the content had alpha) and how it was made."""

    image: Image.Image
    settings: Settings
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnimationResult:
    """The painted frames with the input's timing and loop count, and how they were made."""

    animation: Animation
    settings: Settings
    metadata: dict[str, Any] = field(default_factory=dict)
