"""Animations in and out: animated GIF, WebP and PNG (Pillow), and short videos (core.video).

An :class:`Animation` is what the painting side sees: equally sized RGB (or RGBA) frames, how
long each one shows, and how often the whole plays. Reading is built for untrusted uploads:
every limit (frames, seconds, pixels per frame, pixels over all frames) is checked from the
header where the format declares it and otherwise while streaming, frame by frame, so a hostile
file is refused before it is decoded in full; a truncated frame fails with a clear
:class:`~core.errors.ImageError`. Pillow only (videos: PyAV, imported on demand): front ends
import this without torch.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, PngImagePlugin

from core import images
from core.errors import ImageError

MAX_FRAMES: int = 300
"""Hard cap on frames read: 10 s at 30 frames per second (painting each one costs seconds)."""
MAX_SECONDS: float = 60.0
"""Hard cap on playing time."""
MAX_TOTAL_PIXELS: int = 100_000_000
"""Hard cap on the pixels of all frames kept in memory together (~300 MB as 8-bit RGB)."""
MIN_DELAY_MS: int = 10
"""Frame delays up to this are played as DEFAULT_DELAY_MS, as browsers do (Chromium, Firefox):
GIF encoders write 0 or 1 centisecond meaning 'as fast as possible', which no viewer honours."""
DEFAULT_DELAY_MS: int = 100

# Output formats by extension: Pillow writes GIF, WebP and APNG; PyAV writes MP4.
_WRITE = {"gif": "gif", "webp": "webp", "png": "png", "apng": "png", "mp4": "mp4"}
MIME_TYPES = {"gif": "image/gif", "webp": "image/webp", "png": "image/png", "mp4": "video/mp4"}
_PILLOW_FORMATS = ("GIF", "WEBP", "PNG")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)


@dataclass(frozen=True)
class AnimationLimits:
    """What a reader accepts; anything beyond is refused with a sentence naming the limit."""

    max_frames: int = MAX_FRAMES
    max_seconds: float = MAX_SECONDS
    max_pixels: int = images.MAX_PIXELS
    """Pixels of one decoded frame (before any downscaling)."""
    max_total_pixels: int = MAX_TOTAL_PIXELS
    """Pixels of all frames as kept (after ``max_side`` downscaling)."""


@dataclass(frozen=True)
class AnimationInfo:
    """What a cheap look at the header found (no frame decoded)."""

    format: str  # GIF, WEBP, PNG, MP4, WEBM
    width: int
    height: int
    frames: int | None  # as declared; None where the format does not say (GIF)
    video: bool


@dataclass
class Animation:
    """Frames of one size and mode (RGB or RGBA), each shown ``durations[i]`` milliseconds;
    the whole plays ``loop`` times (0 = forever)."""

    frames: list[Image.Image]
    durations: list[int]
    loop: int = 0
    format: str = ""

    def __post_init__(self) -> None:
        if not self.frames or len(self.frames) != len(self.durations):
            raise ValueError("An animation needs one duration per frame and at least one frame.")

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    @property
    def duration_ms(self) -> int:
        return sum(self.durations)

    def __len__(self) -> int:
        return len(self.frames)

    def with_frames(self, frames: list[Image.Image]) -> Animation:
        """The same timing and loop with other frames (the painted ones)."""
        return replace(self, frames=list(frames))

    def decimated(self, max_frames: int) -> Animation:
        """At most ``max_frames`` frames, evenly spread over the clip, each shown until the next
        kept one (the playing time stays the same)."""
        n = len(self.frames)
        if max_frames >= n:
            return replace(self, frames=list(self.frames), durations=list(self.durations))
        keep = sorted({round(i * n / max_frames) for i in range(max_frames)})
        starts = [sum(self.durations[:k]) for k in keep] + [self.duration_ms]
        return replace(
            self,
            frames=[self.frames[k] for k in keep],
            durations=[b - a for a, b in zip(starts, starts[1:], strict=False)],
        )

    def resized(self, long_side: int) -> Animation:
        """Every frame made ``long_side`` pixels on its long side at most (never enlarged)."""
        if max(self.size) <= long_side:
            return replace(self, frames=list(self.frames), durations=list(self.durations))
        return replace(self, frames=[images.fit_within(f, long_side) for f in self.frames])


# ---- recognising -------------------------------------------------------------------------------
def probe_animation(data: bytes) -> AnimationInfo | None:
    """The header of an animation (more than one frame, or a video), or None for anything else
    (a still image, or bytes no reader recognises: the still-image path reports those)."""
    from core import video

    if video.looks_like_video(data):
        return video.probe(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS) as img:
                if not getattr(img, "is_animated", False):
                    return None
                declared = None if img.format == "GIF" else int(getattr(img, "n_frames", 0))
                return AnimationInfo(img.format or "?", img.width, img.height, declared, False)
    except Image.DecompressionBombError:
        return None  # the still-image path refuses it with its own message
    except (Image.UnidentifiedImageError, *_DECODE_ERRORS):
        return None


# ---- reading -----------------------------------------------------------------------------------
def load_animation(
    source: bytes | str | os.PathLike[str],
    *,
    limits: AnimationLimits | None = None,
    max_side: int | None = None,
    name: str = "animation",
) -> Animation:
    """Every frame, decoded, composited and made RGB/RGBA, optionally downscaled so its long side
    is at most ``max_side`` while reading (that bounds the memory a long clip needs).

    Raises ImageError for anything a user could have got wrong: not an animation, over a limit,
    truncated, corrupt.
    """
    limits = limits or AnimationLimits()
    data, subject = _read_source(source, name)
    from core import video

    if video.looks_like_video(data):
        return video.read(data, limits=limits, max_side=max_side, subject=subject)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS) as img:
                if not getattr(img, "is_animated", False):
                    raise ImageError(f"{subject} has a single frame; it is not an animation.")
                return _read_frames(img, limits, max_side, subject)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{subject} is far too large ({images._reason(exc)}).") from None
        except Image.UnidentifiedImageError:
            raise ImageError(
                f"{subject} is not an animation Pastiche can read; use an animated GIF, WebP or "
                "PNG, or an MP4, WebM or MOV video."
            ) from None
        except MemoryError:
            raise ImageError(f"{subject} is too large to decode in the available memory.") from None
        except _DECODE_ERRORS as exc:
            raise ImageError(
                f"{subject} is truncated or corrupt and could not be read ({images._reason(exc)})."
            ) from None


def _read_source(source: bytes | str | os.PathLike[str], name: str) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, subject = bytes(source), f"The {name}"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        subject = f"The {name} '{path}'"
        if not path.is_file():
            raise ImageError(f"{subject} does not exist or is not a file.")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{subject} could not be read: {images._reason(exc)}.") from None
    else:
        raise ImageError(f"The {name} must be a file path or bytes, not {type(source).__name__}.")
    if not data:
        raise ImageError(f"{subject} is empty (0 bytes).")
    return data, subject


def _read_frames(
    img: ImageFile.ImageFile, limits: AnimationLimits, max_side: int | None, subject: str
) -> Animation:
    canvas = img.size
    check_frame_size(canvas, limits, subject)
    declared = None if img.format == "GIF" else int(getattr(img, "n_frames", 1))
    if declared is not None:
        check_frame_count(declared, limits, subject)
    frames: list[Image.Image] = []
    durations: list[int] = []
    budget = _Budget(limits, subject)
    loops: list[int | None] = []
    for index in _frame_indices(img, limits, subject):
        if img.size != canvas:  # a GIF frame reaching past the logical screen: Pillow grows it
            check_frame_size(img.size, limits, subject, frame=index + 1)
        img.load()
        loops.append(img.info.get("loop"))
        frame = images.normalize(img.crop((0, 0, *canvas)), name=f"frame {index + 1}")
        if max_side is not None:
            frame = images.fit_within(frame, max_side)
        durations.append(budget.add(frame, img.info.get("duration")))
        frames.append(frame)
    return Animation(
        frames=_same_mode(frames),
        durations=durations,
        loop=_plays(img.format or "", loops),
        format=img.format or "?",
    )


def _frame_indices(
    img: ImageFile.ImageFile, limits: AnimationLimits, subject: str
) -> Iterator[int]:
    """0, 1, 2, ... while ``img`` can seek there; the seek reads a frame's header, not its
    pixels, so the frame cap is enforced before an extra frame is decoded."""
    index = 0
    while True:
        if index:
            try:
                img.seek(index)
            except EOFError:
                return
        if index >= limits.max_frames:
            raise ImageError(
                f"{subject} has more than {limits.max_frames} frames; the limit is "
                f"{limits.max_frames}. Please send a shorter animation."
            )
        yield index
        index += 1


class _Budget:
    """Running totals of playing time and kept pixels against the limits."""

    def __init__(self, limits: AnimationLimits, subject: str) -> None:
        self.limits, self.subject = limits, subject
        self.ms = 0
        self.pixels = 0

    def add(self, frame: Image.Image, duration: Any) -> int:
        ms = frame_delay(duration)
        self.ms += ms
        self.pixels += frame.width * frame.height
        if self.ms > self.limits.max_seconds * 1000:
            raise ImageError(
                f"{self.subject} plays for more than {self.limits.max_seconds:g} seconds; the "
                f"limit is {self.limits.max_seconds:g} seconds. Please send a shorter clip."
            )
        if self.pixels > self.limits.max_total_pixels:
            raise ImageError(
                f"{self.subject} has too many pixels over all its frames (more than "
                f"{self.limits.max_total_pixels / 1e6:g} megapixels); send fewer or smaller frames."
            )
        return ms


def frame_delay(value: Any) -> int:
    """Milliseconds a frame shows: missing, non-finite, zero, negative or tiny delays become
    DEFAULT_DELAY_MS (see MIN_DELAY_MS)."""
    try:
        ms = round(float(value))
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_DELAY_MS
    return ms if ms > MIN_DELAY_MS else DEFAULT_DELAY_MS


def check_frame_size(
    size: tuple[int, int], limits: AnimationLimits, subject: str, frame: int | None = None
) -> None:
    width, height = size
    where = f"{subject} (frame {frame})" if frame else subject
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{where} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:.1f} megapixels."
        )
    if min(width, height) < images.MIN_SIDE:
        raise ImageError(
            f"{where} is {width}x{height} pixels; each side must be at least "
            f"{images.MIN_SIDE} pixels."
        )


def check_frame_count(count: int, limits: AnimationLimits, subject: str) -> None:
    if count > limits.max_frames:
        raise ImageError(
            f"{subject} has {count} frames; the limit is {limits.max_frames}. "
            "Please send a shorter animation."
        )


def _same_mode(frames: list[Image.Image]) -> list[Image.Image]:
    """All RGBA when any frame has transparency, else all RGB."""
    if all(f.mode == frames[0].mode for f in frames):
        return frames
    return [f.convert("RGBA") for f in frames]


def _plays(fmt: str, loops: list[int | None]) -> int:
    """How often the animation plays (0 = forever). A GIF's NETSCAPE count is the number of
    repeats after the first play, and a GIF without one plays once; WebP and APNG store the
    number of plays."""
    found = next((v for v in loops if isinstance(v, int)), None)
    if fmt == "GIF":
        if found is None:
            return 1
        return 0 if found == 0 else found + 1
    return found if found is not None and found >= 0 else 0


# ---- writing -----------------------------------------------------------------------------------
def format_for_path(path: str | os.PathLike[str]) -> str:
    """ "gif", "webp", "png" (APNG) or "mp4" from the extension; ImageError for anything else."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in _WRITE:
        shown = f"'.{suffix}'" if suffix else "no extension"
        raise ImageError(
            f"Cannot save the animation as '{path}': {shown} is not an animation format; "
            "use .gif, .webp, .png (APNG) or .mp4."
        )
    return _WRITE[suffix]


def encode_animation(
    anim: Animation, fmt: str, *, quality: int = 90, metadata: dict[str, Any] | None = None
) -> bytes:
    """GIF (one palette for the whole clip, so colours do not flicker; alpha flattened on white),
    WebP (alpha kept), APNG (lossless, alpha kept) or MP4 (H.264, no alpha), keeping each
    frame's duration and, except in MP4, the loop count. Settings go into the PNG's text, the
    GIF's comment and the MP4's comment tag."""
    key = _WRITE.get(fmt.lower().lstrip("."))
    if key is None:
        raise ImageError(f"Cannot encode an animation as '{fmt}'; use gif, webp, png or mp4.")
    text = None
    if metadata is not None:
        text = json.dumps(metadata, ensure_ascii=False, sort_keys=True, allow_nan=False)
    if key == "mp4":
        from core import video

        return video.encode_mp4(anim, quality=quality, comment=text)
    buf = io.BytesIO()
    if key == "gif":
        _save_gif(anim, buf, text, colors=256 if quality >= 90 else 128 if quality >= 75 else 64)
    elif key == "webp":
        frames = [_clean(f) for f in anim.frames]
        frames[0].save(
            buf, "WEBP", save_all=True, append_images=frames[1:], duration=anim.durations,
            loop=anim.loop, quality=quality, method=4,
        )  # fmt: skip
    else:
        info = PngImagePlugin.PngInfo()
        if text is not None:
            info.add_itxt(images.METADATA_KEY, text)
        frames = [_clean(f) for f in anim.frames]
        frames[0].save(
            buf, "PNG", save_all=True, append_images=frames[1:], duration=anim.durations,
            loop=anim.loop, pnginfo=info, default_image=False,
        )  # fmt: skip
    return buf.getvalue()


def _clean(frame: Image.Image) -> Image.Image:
    """A copy without the reader's info (a stale "loop" or "duration" would override ours)."""
    out = frame.convert("RGBA" if frame.mode in ("RGBA", "LA", "PA") else "RGB")
    out.info = {}
    return out


def _save_gif(anim: Animation, buf: io.BytesIO, text: str | None, colors: int) -> None:
    """One adaptive palette from all frames, applied without dithering: per-frame palettes and
    dither noise both change from frame to frame, which reads as flicker. ``quality`` below 90
    means a smaller palette (128 colours, below 75: 64), the one lever GIF has on file size."""
    rgb = [images.flatten(f) for f in anim.frames]
    palette = _shared_palette(rgb, colors)
    frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in rgb]
    extra: dict[str, Any] = {}
    if anim.loop != 1:  # no NETSCAPE block: plays once
        extra["loop"] = 0 if anim.loop == 0 else anim.loop - 1
    if text is not None:
        extra["comment"] = f"{images.METADATA_KEY}:{text}".encode()
    frames[0].save(
        buf, "GIF", save_all=True, append_images=frames[1:], duration=anim.durations,
        disposal=1, optimize=False, **extra,
    )  # fmt: skip


def _shared_palette(frames: list[Image.Image], colors: int, sample_side: int = 128) -> Image.Image:
    """A palette image from small copies of (up to 32 of) the frames side by side."""
    step = max(1, len(frames) // 32)
    thumbs = [images.fit_within(f, sample_side) for f in frames[::step]]
    sheet = Image.new("RGB", (sum(t.width for t in thumbs), max(t.height for t in thumbs)))
    x = 0
    for thumb in thumbs:
        sheet.paste(thumb, (x, 0))
        x += thumb.width
    return sheet.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)


def save_animation(
    anim: Animation, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> None:
    """Write by extension (.gif, .webp, .png, .mp4) atomically, like images.save_image."""
    data = encode_animation(anim, format_for_path(path), metadata=metadata)
    images.write_atomically(path, data)
