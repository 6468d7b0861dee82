"""PIL images to and from the engine's (1, 3, H, W) float tensors, and the sizes between them."""

from __future__ import annotations

import hashlib

import torch
from PIL import Image


def to_tensor(img: Image.Image, device: torch.device) -> torch.Tensor:
    """8-bit RGB PIL image to a (1, 3, H, W) float tensor in [0, 1]."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    t = data.view(img.height, img.width, 3).permute(2, 0, 1).unsqueeze(0)
    return t.to(device=device, dtype=torch.float32).div_(255)


def to_image(t: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) tensor in [0, 1] to an 8-bit RGB PIL image."""
    # One float copy (clamp's), then in place: a print-size image is ~150 MB per copy.
    arr = t.detach()[0].float().clamp(0, 1).mul_(255).round_().to(torch.uint8)
    arr = arr.permute(1, 2, 0).contiguous().cpu()
    return Image.frombuffer("RGB", (arr.shape[1], arr.shape[0]), arr.numpy().tobytes())


def fit(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(w, h) scaled so the long side is ``long_side`` (up or down), aspect kept."""
    w, h = size
    if w >= h:
        return long_side, max(1, round(h * long_side / w))
    return max(1, round(w * long_side / h)), long_side


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)


def digest(img: Image.Image) -> str:
    """A content hash of an image, for cache keys."""
    h = hashlib.blake2b(img.tobytes(), digest_size=16)
    h.update(repr((img.size, img.mode)).encode())
    return h.hexdigest()
