"""Checking a Discord attachment before it is queued: type, size, then a full decode.

The decode runs in a thread (``asyncio.to_thread``): Pillow holds the GIL only in bursts, but a
big JPEG still takes long enough to stall the gateway heartbeat if run on the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import discord

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


@dataclass(frozen=True)
class Upload:
    """A downloaded and fully decoded attachment."""

    data: bytes
    info: ImageInfo
    filename: str


def is_image(attachment: Any) -> bool:
    """True for attachments that claim to be an image we read, by type or by extension (Discord
    labels some phone formats, HEIC among them, application/octet-stream); the full decode in
    :func:`fetch_image` has the last word either way."""
    ctype = (getattr(attachment, "content_type", None) or "").split(";")[0].strip().lower()
    suffix = PurePath(getattr(attachment, "filename", "") or "").suffix.lower()
    return ctype in ACCEPTED_TYPES or suffix in ACCEPTED_EXTENSIONS


def check_attachment(attachment: Any, *, what: str, max_bytes: int) -> None:
    """Cheap checks on the attachment's metadata, before downloading anything."""
    name = getattr(attachment, "filename", "") or "the file"
    if not is_image(attachment):
        ctype = getattr(attachment, "content_type", None) or "an unknown type"
        raise ImageError(
            f"The {what} ({name}) is {ctype}, not a picture I can read; please send a "
            f"{accepted_formats()} image."
        )
    size = getattr(attachment, "size", 0) or 0
    if size > max_bytes:
        raise ImageError(
            f"The {what} ({name}) is {size / 1048576:.1f} MB; the limit is "
            f"{max_bytes / 1048576:.0f} MB. Please send a smaller file."
        )


async def fetch_image(attachment: Any, *, what: str, max_bytes: int, max_pixels: int) -> Upload:
    """Check, download and decode one attachment; ImageError with a user-facing sentence."""
    check_attachment(attachment, what=what, max_bytes=max_bytes)
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
    info = await asyncio.to_thread(validate_image, data, max_pixels=max_pixels, name=what)
    return Upload(data=data, info=info, filename=getattr(attachment, "filename", "") or "image")
