"""The optimisation: pyramid, optimiser, precision, progress, cancellation.

CONTRACT (implementation in progress): the public names and signatures below are fixed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from .settings import Settings

ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image]
StyleInput = Union[ImageInput, tuple[ImageInput, float]]


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

    @property
    def percent(self) -> float:
        return 100.0 * self.step / max(1, self.total_steps)


@dataclass
class Result:
    """The painting (RGB, or RGBA when the content had alpha) and how it was made."""

    image: Image.Image
    settings: Settings
    metadata: dict[str, Any] = field(default_factory=dict)


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
    raise NotImplementedError
