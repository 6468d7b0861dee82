"""Pastiche core: the style-transfer engine and everything that drives it.

``stylize`` is imported lazily (PEP 562): ``core.engine`` is the only package that imports
torch, so front ends, the job runner and the CLI's quick commands import ``core`` without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.errors import (
    BusyError,
    Cancelled,
    ImageError,
    LimitError,
    PasticheError,
    SettingsError,
    WeightsError,
)
from core.settings import Settings
from core.types import Progress, Result

if TYPE_CHECKING:
    from core.engine.run import stylize

__version__ = "0.1.0"

_LAZY = {"stylize"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from core.engine import run as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'core' has no attribute {name!r}")


__all__ = [
    "BusyError",
    "Cancelled",
    "ImageError",
    "LimitError",
    "PasticheError",
    "Progress",
    "Result",
    "Settings",
    "SettingsError",
    "WeightsError",
    "stylize",
    "__version__",
]
