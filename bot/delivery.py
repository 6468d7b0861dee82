"""Getting a finished painting onto Discord: fit it under the upload limit, describe it.

Everything here that touches Pillow is synchronous; callers run it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import discord
from PIL import Image

from core.animation import Animation, encode_animation, load_animation
from core.images import encode_image, fit_within
from core.settings import Settings

DM_UPLOAD_LIMIT = 10 * 1024 * 1024
"""Discord's upload limit outside guilds (and for unboosted guilds)."""
UPLOAD_MARGIN = 16 * 1024
"""Head-room under the limit for the multipart envelope and the embed."""
_ATTEMPTS = (("webp", 90), ("jpeg", 90), ("webp", 80), ("jpeg", 80))


@dataclass(frozen=True)
class Fitted:
    """An encoded image that fits the limit, and what had to be done to it."""

    data: bytes
    format: str  # png | webp | jpeg; for animations gif | webp | png | mp4
    width: int
    height: int
    reencoded: bool
    downscaled: bool
    frames: int = 1
    dropped_frames: int = 0  # an animation sent with fewer frames than were painted
    lower_quality: bool = False

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else self.format

    @property
    def video(self) -> bool:
        return self.format == "mp4"

    def note(self) -> str | None:
        """What had to give to fit the upload limit, for the embed's footer."""
        if not self.reencoded:
            return None
        if self.frames == 1 and not self.lower_quality:
            return f"Sent as {self.format.upper()}" + (
                " at a smaller size" if self.downscaled else ""
            )
        changes = ["at a lower quality"] if self.lower_quality else []
        changes += ["at a smaller size"] if self.downscaled else []
        if self.dropped_frames:
            total = self.frames + self.dropped_frames
            changes.append(f"with {self.frames} of its {total} frames")
        return "Sent " + ", ".join(changes)


def upload_limit(source: Any) -> int:
    """The upload limit for an Interaction or Message: the interaction's own figure when Discord
    sent one, else the guild's, else the DM default."""
    limit = getattr(source, "filesize_limit", None)
    if isinstance(limit, int) and limit > 0:
        return limit
    guild = getattr(source, "guild", None)
    limit = getattr(guild, "filesize_limit", None) if guild is not None else None
    return limit if isinstance(limit, int) and limit > 0 else DM_UPLOAD_LIMIT


def fit_to_limit(png: bytes, limit: int, *, min_side: int = 64) -> Fitted:
    """The PNG as is when it fits ``limit`` bytes; otherwise WebP/JPEG at falling quality, then
    the same at ever smaller sizes. Raises ValueError if even ``min_side`` pixels do not fit."""
    budget = max(1, limit - UPLOAD_MARGIN) if limit > 2 * UPLOAD_MARGIN else limit
    with Image.open(io.BytesIO(png)) as opened:
        opened.load()
        img = opened.copy()
    if len(png) <= budget:
        return Fitted(png, "png", img.width, img.height, reencoded=False, downscaled=False)
    current = img
    while True:
        for fmt, quality in _ATTEMPTS:
            data = encode_image(current, fmt, quality=quality)
            if len(data) <= budget:
                return Fitted(
                    data, fmt, current.width, current.height,
                    reencoded=True, downscaled=current.size != img.size,
                )  # fmt: skip
        longest = max(current.size)
        if longest <= min_side:
            raise ValueError(f"Cannot fit the image into {limit} bytes.")
        # Bytes scale roughly with area: aim straight for the budget, but shrink at least 20 %.
        factor = min(0.8, (budget / max(1, len(data))) ** 0.5)
        current = fit_within(img, max(min_side, int(longest * factor)))


_CLIP_QUALITIES = (90, 75, 60)
"""Encoder qualities tried at each size: WebP and MP4 (x264 CRF 18, 23, 28) quality; GIF
palette size (256, 128, 64 colours; see core.animation)."""


def fit_animation_to_limit(data: bytes, fmt: str, limit: int, *, min_side: int = 64) -> Fitted:
    """The clip as is when it fits ``limit`` bytes; otherwise, in this order, a lower encoder
    quality, then smaller frames (down to half the long side, and never below ``min_side``),
    then every other frame dropped (each kept frame showing for longer, so the clip keeps its
    length). Raises ValueError if even two small frames do not fit."""
    budget = max(1, limit - UPLOAD_MARGIN) if limit > 2 * UPLOAD_MARGIN else limit
    painted = load_animation(data)
    width, height = painted.size
    if len(data) <= budget:
        return Fitted(data, fmt, width, height, False, False, frames=len(painted))
    floor = max(min_side, max(painted.size) // 2)
    current = painted
    while True:
        for quality in _CLIP_QUALITIES:
            encoded = encode_animation(current, fmt, quality=quality)
            if len(encoded) <= budget:
                return _fitted_clip(encoded, fmt, current, painted, quality)
        current = _smaller_clip(current, painted, floor, budget / max(1, len(encoded)))


def _smaller_clip(current: Animation, painted: Animation, floor: int, ratio: float) -> Animation:
    longest = max(current.size)
    if longest > floor:  # bytes scale about with area: aim for the budget, shrink >= 20 %
        side = max(floor, int(longest * min(0.8, ratio**0.5)))
        return painted.decimated(len(current)).resized(side)
    if len(current) > 2:
        return current.decimated((len(current) + 1) // 2)
    raise ValueError("Cannot fit the animation into the upload limit.")


def _fitted_clip(
    data: bytes, fmt: str, sent: Animation, painted: Animation, quality: int
) -> Fitted:
    width, height = sent.size
    if fmt == "mp4":  # H.264 4:2:0 needs even sides; the encoder drops the odd row or column
        width, height = width - width % 2, height - height % 2
    return Fitted(
        data, fmt, width, height, reencoded=True, downscaled=sent.size != painted.size,
        frames=len(sent), dropped_frames=len(painted) - len(sent),
        lower_quality=quality < _CLIP_QUALITIES[0],
    )  # fmt: skip


def settings_embed(
    settings: Settings,
    *,
    title: str,
    style_label: str,
    fitted: Fitted | None = None,
    elapsed: float | None = None,
    metadata: dict[str, Any] | None = None,
    source_frames: int | None = None,
) -> discord.Embed:
    """An embed listing the settings a painting was made with, the faces it kept and the
    engine's notes (from the result's ``metadata``)."""
    embed = discord.Embed(title=title, colour=discord.Colour.blurple())
    embed.add_field(name="Style", value=style_label or "your image")
    embed.add_field(name="Strength", value=f"{settings.strength:.2f}")
    if fitted is not None:
        embed.add_field(name="Size", value=f"{fitted.width}×{fitted.height}")
    embed.add_field(name="Preserve colours", value=settings.preserve_colors)
    embed.add_field(name="Faces", value=_faces_text(settings, metadata))
    embed.add_field(name="Iterations", value=str(settings.iterations))
    embed.add_field(name="Network", value=settings.backbone)
    if elapsed is not None:
        embed.add_field(name="Time", value=format_duration(elapsed))
    for note in (metadata or {}).get("notes") or ():
        embed.add_field(name="Note", value=str(note)[:1024], inline=False)
    if fitted is not None and fitted.frames > 1:
        painted = fitted.frames + fitted.dropped_frames
        value = str(painted)
        if isinstance(source_frames, int) and source_frames > painted:
            value = f"{painted} of {source_frames} (evenly spread)"
        embed.add_field(name="Frames", value=value)
    note = fitted.note() if fitted is not None else None
    if note:
        embed.set_footer(text=note + " to fit Discord's upload limit.")
    return embed


def _faces_text(settings: Settings, metadata: dict[str, Any] | None) -> str:
    if settings.keep_faces <= 0:
        return "painted like the rest"
    found = ((metadata or {}).get("faces") or {}).get("boxes")
    if found is None:
        return f"kept ({settings.keep_faces:.2f})"
    if not found:
        return "none found"
    return f"{len(found)} kept ({settings.keep_faces:.2f})"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
