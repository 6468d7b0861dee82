"""Checking a Discord attachment before it is queued: type, size, then a full decode.

The decode runs in a thread (``asyncio.to_thread``): Pillow holds the GIL only in bursts, but a
big JPEG still takes long enough to stall the gateway heartbeat if run on the event loop. A
photo may also be an animated GIF/WebP/PNG or a short video: every frame is then decoded (small,
under the animation limits) the same way, so a broken clip is refused before it is queued.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import discord

from core.animation import AnimationInfo, AnimationLimits, load_animation, probe_animation
from core.errors import ImageError
from core.images import (
    ACCEPTED_EXTENSIONS,
    ACCEPTED_MIME_TYPES,
    ImageInfo,
    accepted_formats,
    validate_image,
)

# The CLI's and the GIMP helper's list: all three read through core.images.load_image.
ACCEPTED_TYPES = ACCEPTED_MIME_TYPES
VIDEO_TYPES = {"video/mp4": "MP4", "video/quicktime": "MOV", "video/webm": "WebM"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".webm"}


@dataclass(frozen=True)
class Upload:
    """A downloaded and fully decoded attachment; ``animation`` is set for a GIF or video."""

    data: bytes
    info: ImageInfo
    filename: str
    animation: AnimationInfo | None = None
    frames: int = 1


def is_image(attachment: Any, *, videos: bool = False) -> bool:
    """True for attachments that claim to be an image we read, by type or by extension (Discord
    labels some phone formats, HEIC among them, application/octet-stream), or with ``videos`` a
    short video; the full decode in :func:`fetch_image` has the last word either way."""
    types = {**ACCEPTED_TYPES, **VIDEO_TYPES} if videos else ACCEPTED_TYPES
    suffixes = ACCEPTED_EXTENSIONS | VIDEO_EXTENSIONS if videos else ACCEPTED_EXTENSIONS
    ctype = (getattr(attachment, "content_type", None) or "").split(";")[0].strip().lower()
    suffix = PurePath(getattr(attachment, "filename", "") or "").suffix.lower()
    return ctype in types or suffix in suffixes


def check_attachment(attachment: Any, *, what: str, max_bytes: int, videos: bool = False) -> None:
    """Cheap checks on the attachment's metadata, before downloading anything."""
    name = getattr(attachment, "filename", "") or "the file"
    if not is_image(attachment, videos=videos):
        ctype = getattr(attachment, "content_type", None) or "an unknown type"
        also = ", or a short MP4, MOV or WebM video" if videos else ""
        raise ImageError(
            f"The {what} ({name}) is {ctype}, not a picture I can read; please send a "
            f"{accepted_formats()} image{also}."
        )
    size = getattr(attachment, "size", 0) or 0
    if size > max_bytes:
        raise ImageError(
            f"The {what} ({name}) is {size / 1048576:.1f} MB; the limit is "
            f"{max_bytes / 1048576:.0f} MB. Please send a smaller file."
        )


async def fetch_image(
    attachment: Any,
    *,
    what: str,
    max_bytes: int,
    max_pixels: int,
    clips: AnimationLimits | None = None,
    clip_side: int | None = None,
) -> Upload:
    """Check, download and decode one attachment; ImageError with a user-facing sentence.

    With ``clips`` an animation or a video is accepted too, every frame decoded under those
    limits (downscaled to ``clip_side`` while reading, which bounds the memory it takes)."""
    check_attachment(attachment, what=what, max_bytes=max_bytes, videos=clips is not None)
    try:
        data = await attachment.read()
    except (discord.HTTPException, discord.DiscordException) as exc:
        raise ImageError(
            f"I could not download the {what} from Discord ({exc}); please try again."
        ) from None
    if len(data) > max_bytes:  # the size Discord reported may have been wrong
        raise ImageError(
            f"The {what} is {len(data) / 1048576:.1f} MB; the limit is "
            f"{max_bytes / 1048576:.0f} MB. Please send a smaller file."
        )
    filename = getattr(attachment, "filename", "") or "image"
    kind = await asyncio.to_thread(probe_animation, data) if clips is not None else None
    if kind is not None:
        assert clips is not None
        clip = await asyncio.to_thread(
            load_animation, data, limits=clips, max_side=clip_side, name=what
        )
        info = ImageInfo(kind.width, kind.height, kind.format, clip.frames[0].mode)
        return Upload(data, info, filename, animation=kind, frames=len(clip))
    info = await asyncio.to_thread(validate_image, data, max_pixels=max_pixels, name=what)
    return Upload(data=data, info=info, filename=filename)
