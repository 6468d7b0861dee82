"""Getting a finished painting onto Discord: fit it under the upload limit, describe it.

Everything here that touches Pillow is synchronous; callers run it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import discord
from PIL import Image

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
    format: str  # png | webp | jpeg
    width: int
    height: int
    reencoded: bool
    downscaled: bool

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else self.format


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


def settings_embed(
    settings: Settings,
    *,
    title: str,
    style_label: str,
    fitted: Fitted | None = None,
    elapsed: float | None = None,
    metadata: dict[str, Any] | None = None,
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
    if fitted is not None and fitted.reencoded:
        note = f"Sent as {fitted.format.upper()}"
        note += " at a smaller size" if fitted.downscaled else ""
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
