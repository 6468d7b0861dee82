"""Small JPEG thumbnails of the style presets for /styles (Pillow, run in a thread)."""

from __future__ import annotations

from core.images import encode_image, fit_within, load_image

THUMB_SIDE = 128


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """A JPEG at most ``side`` pixels on its long side (alpha flattened on white)."""
    img = load_image(data, name="style preset")
    return encode_image(fit_within(img, side), "jpeg", quality=85)
