"""Pastiche core: the style-transfer engine and everything that drives it.

The engine's names are imported lazily (PEP 562) so that front ends, the job runner and the
CLI's quick commands can import ``core`` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BusyError,
    Cancelled,
    ImageError,
    LimitError,
    PasticheError,
    SettingsError,
    WeightsError,
)
from .settings import Settings

if TYPE_CHECKING:
    from .engine import Progress, Result, stylize

__version__ = "0.1.0"

_LAZY = {"Progress", "Result", "stylize"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import engine

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
