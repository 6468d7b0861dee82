"""What a job is (JobRequest) and what happens to it (events); re-exported by core.jobs.

Kept apart from the runner so the backend and the worker process can use the same types
without importing the runner, and so none of this ever imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import SettingsError
from core.settings import Settings

ANIMATION_FORMATS = ("gif", "webp", "png", "mp4")


@dataclass(frozen=True)
class JobRequest:
    """Everything a worker needs, as plain picklable data (image bytes, not decoded images).

    ``content`` may be an animation (GIF, WebP, APNG) or a short video (MP4, MOV, WebM): the
    worker then paints every frame and returns the clip as ``animation_format`` (None = the
    input's own kind: GIF, WebP or APNG as it came, MP4 for a video)."""

    content: bytes
    styles: tuple[tuple[bytes, float], ...]
    settings: Settings = field(default_factory=Settings)
    label: str = ""
    animation_format: str | None = None

    def __post_init__(self) -> None:
        if self.animation_format is not None and self.animation_format not in ANIMATION_FORMATS:
            raise SettingsError(
                f"animation_format must be one of {', '.join(ANIMATION_FORMATS)}; "
                f"got {self.animation_format!r}."
            )
        if not isinstance(self.content, (bytes, bytearray)):
            raise TypeError("JobRequest.content must be the encoded image bytes.")
        styles = tuple((bytes(data), float(weight)) for data, weight in self.styles)
        if not styles:
            raise SettingsError("A job needs at least one style image.")
        if any(weight < 0 for _, weight in styles) or sum(w for _, w in styles) <= 0:
            raise SettingsError("Style blend weights must be non-negative and not all zero.")
        object.__setattr__(self, "styles", styles)
        object.__setattr__(self, "content", bytes(self.content))


@dataclass(frozen=True)
class Queued:
    """Waiting; ``position`` 1 = next to start. Sent on submit and whenever it changes."""

    job_id: str
    position: int


@dataclass(frozen=True)
class Started:
    job_id: str


@dataclass(frozen=True)
class ProgressUpdate:
    """Coalesced optimiser progress (at most a few per second per job)."""

    job_id: str
    percent: float
    step: int
    total_steps: int
    scale: int
    scales: int
    eta: float | None
    losses: dict[str, float] = field(default_factory=dict)
    frame: int = 1  # animations: frame being painted, 1-based, of ``frames``
    frames: int = 1


@dataclass(frozen=True)
class Preview:
    """A small in-progress picture, PNG-encoded in the worker."""

    job_id: str
    png: bytes


@dataclass(frozen=True)
class Done:
    """The result: a PNG for a picture; for an animation the encoded clip (``mime`` says which:
    image/gif, image/webp, image/png (APNG) or video/mp4) with ``frames`` frames. ``png`` keeps
    its name for the pictures every front end started with; ``data`` reads better for clips."""

    job_id: str
    png: bytes
    metadata: dict[str, Any]
    width: int
    height: int
    mime: str = "image/png"
    frames: int = 1

    @property
    def data(self) -> bytes:
        return self.png

    @property
    def animated(self) -> bool:
        return self.frames > 1


@dataclass(frozen=True)
class Failed:
    """``message`` is a complete sentence fit to show the user."""

    job_id: str
    message: str


@dataclass(frozen=True)
class JobCancelled:
    job_id: str
    reason: str


Event = Queued | Started | ProgressUpdate | Preview | Done | Failed | JobCancelled
TerminalEvent = Done | Failed | JobCancelled
TERMINAL_EVENTS = (Done, Failed, JobCancelled)

__all__ = [
    "TERMINAL_EVENTS",
    "Done",
    "Event",
    "Failed",
    "JobCancelled",
    "JobRequest",
    "Preview",
    "ProgressUpdate",
    "Queued",
    "Started",
    "TerminalEvent",
]
