"""One status message per job, edited at most once every few seconds.

Discord rate-limits message edits (about five per five seconds per channel), and a job emits
progress many times a second, so the newest state is shown at most every ``interval`` seconds;
a state that arrives inside the interval is shown when it ends, and the terminal state is
always shown at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import discord

from .delivery import format_duration

log = logging.getLogger(__name__)

PREVIEW_NAME = "preview.png"


class ThrottledEditor:
    """Edits one message through ``edit(**kwargs)``, never more often than ``interval``.

    ``clock`` and ``sleep`` are injectable so tests can count edits without waiting.
    """

    def __init__(
        self,
        edit: Callable[..., Awaitable[Any]],
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._edit = edit
        self._sleep = sleep
        self._interval = interval
        self._clock = clock
        self._last = clock()  # the message was posted just now
        self._pending: dict[str, Any] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.edits = 0

    async def update(self, **kwargs: Any) -> None:
        """Show this state now if the interval has passed, else when it does (newest wins)."""
        if self._closed:
            return
        self._pending = kwargs
        if self._clock() - self._last >= self._interval:
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later())

    async def final(self, **kwargs: Any) -> None:
        """Show the terminal state now, whatever the interval, and stop editing afterwards."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        self._pending = kwargs
        await self._flush()

    async def _flush_later(self) -> None:
        await self._sleep(max(0.0, self._interval - (self._clock() - self._last)))
        self._timer = None
        await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            kwargs, self._pending = self._pending, None
            if kwargs is None:
                return
            self._last = self._clock()
            self.edits += 1
            try:
                await self._edit(**kwargs)
            except discord.DiscordException as exc:  # a lost edit must not stop the job
                log.warning("Could not edit a status message: %s", exc)
            except Exception:
                log.exception("Unexpected error while editing a status message")


@dataclass
class JobStatus:
    """What the status message shows about one job."""

    job_id: str
    label: str  # the style: preset name or "your image"
    state: str = "queued"  # queued | running | done | failed | cancelled
    position: int | None = None
    percent: float = 0.0
    eta: float | None = None
    preview: bytes | None = None
    message: str = ""  # failure reason or extra note
    frame: int = 1  # animations: the frame being painted, of ``frames``
    frames: int = 1

    @property
    def terminal(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


_COLOURS = {
    "queued": discord.Colour.light_grey(),
    "running": discord.Colour.blue(),
    "done": discord.Colour.green(),
    "failed": discord.Colour.red(),
    "cancelled": discord.Colour.dark_grey(),
}


def render(status: JobStatus, *, requester: str) -> tuple[discord.Embed, list[discord.File]]:
    """The embed (and preview file, if any) for the status message."""
    embed = discord.Embed(colour=_COLOURS.get(status.state), title=_title(status))
    embed.description = _description(status, requester)
    embed.set_footer(text=f"Job {status.job_id}")
    files: list[discord.File] = []
    if status.preview is not None and not status.terminal:
        files.append(discord.File(io.BytesIO(status.preview), filename=PREVIEW_NAME))
        embed.set_thumbnail(url=f"attachment://{PREVIEW_NAME}")
    return embed, files


def _title(status: JobStatus) -> str:
    return {
        "queued": "Waiting in the queue",
        "running": "Painting…",
        "done": "Finished",
        "failed": "That did not work",
        "cancelled": "Cancelled",
    }.get(status.state, status.state)


def _description(status: JobStatus, requester: str) -> str:
    lines = [f"{requester} · style: **{status.label}**"]
    if status.state == "queued":
        if status.position == 1:
            lines.append("You are next.")
        elif status.position is not None:
            lines.append(f"Position in the queue: **{status.position}**")
    elif status.state == "running":
        if status.frames > 1:
            lines.append(f"Frame {status.frame} of {status.frames}")
        lines.append(f"{progress_bar(status.percent)} {status.percent:.0f} %")
        if status.eta is not None:
            lines.append(f"About {format_duration(status.eta)} left.")
        else:
            lines.append("Estimating time left…")
    if status.message:
        lines.append(status.message)
    return "\n".join(lines)


def progress_bar(percent: float, width: int = 12) -> str:
    filled = max(0, min(width, round(width * percent / 100.0)))
    return "▰" * filled + "▱" * (width - filled)
