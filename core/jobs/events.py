"""What a job is (JobRequest) and what happens to it (events); re-exported by core.jobs.

Kept apart from the runner so the backend and the worker process can use the same types
without importing the runner, and so none of this ever imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import SettingsError
from core.settings import Settings


@dataclass(frozen=True)
class JobRequest:
    """Everything a worker needs, as plain picklable data (image bytes, not decoded images)."""

    content: bytes
    styles: tuple[tuple[bytes, float], ...]
    settings: Settings = field(default_factory=Settings)
    label: str = ""

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class Preview:
    """A small in-progress picture, PNG-encoded in the worker."""

    job_id: str
    png: bytes


@dataclass(frozen=True)
class Done:
    job_id: str
    png: bytes
    metadata: dict[str, Any]
    width: int
    height: int


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
