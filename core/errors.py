"""Errors a user can cause. Each carries a message fit to show as is (CLI, bot, GIMP).

Anything else raised by Pastiche is a bug and is logged with its traceback.
"""

from __future__ import annotations


class PasticheError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing sentence."""


class ImageError(PasticheError):
    """An input image is missing, not an image, truncated, too small or too large."""


class SettingsError(PasticheError):
    """A setting has a value outside its allowed range or set."""


class WeightsError(PasticheError):
    """Pretrained weights are missing, corrupt or of the wrong shape."""


class Cancelled(PasticheError):
    """The caller asked the engine to stop (``should_stop`` returned True)."""

    def __init__(self, message: str = "The job was cancelled.") -> None:
        super().__init__(message)


class BusyError(PasticheError):
    """The job runner cannot take the job now (queue full, per-owner limit)."""


class LimitError(PasticheError):
    """A job broke a limit (pixels, time)."""
