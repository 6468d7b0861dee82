"""Pastiche core: the style-transfer engine and everything that drives it."""

from .engine import Progress, Result, stylize
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

__version__ = "0.1.0"

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
