"""Short videos (MP4, MOV, WebM, MKV) in and out through PyAV, FFmpeg's Python binding.

Optional: ``pip install 'pastiche[video]'``; without PyAV a video upload is refused with that
hint. Untrusted input is handled the way core.animation handles GIFs: the container is opened
with the demuxer its signature names (so FFmpeg never probes for playlist or concat formats
that could open other files), the header's size, frame count and duration are checked before
anything is decoded, FFmpeg itself is told the largest frame it may allocate, and frames are
decoded one at a time against the running limits. The sound track is ignored.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import Any

from PIL import Image

from core import images
from core.animation import (
    DEFAULT_DELAY_MS,
    Animation,
    AnimationInfo,
    AnimationLimits,
    check_frame_count,
    check_frame_size,
)
from core.errors import ImageError

_MP4_BRANDS = b"ftyp"
_QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip")
_EBML = b"\x1a\x45\xdf\xa3"
_STILL_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avis")
"""ISO-BMFF major brands of still pictures (HEIC/HEIF, AVIF): the same box format as MP4, but
read by the image loader, not as a video."""
INSTALL_HINT = "Reading and writing videos needs PyAV: pip install 'pastiche[video]'."
_CODECS = ("libx264", "h264", "libopenh264", "mpeg4")
"""MP4 video encoders in order of preference (H.264 plays everywhere, Discord included)."""


def looks_like_video(data: bytes) -> bool:
    """An ISO-BMFF/QuickTime (MP4, MOV) or Matroska (MKV, WebM) signature."""
    return _demuxer(data) is not None


def _demuxer(data: bytes) -> str | None:
    if data[4:8] == _MP4_BRANDS and data[8:12] in _STILL_BRANDS:
        return None
    if data[4:8] == _MP4_BRANDS or data[4:8] in _QUICKTIME_ATOMS:
        return "mov"  # FFmpeg's one demuxer for MP4, MOV, 3GP and M4A
    if data[:4] == _EBML:
        return "matroska"
    return None


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ImageError(INSTALL_HINT) from None
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own warnings would go to stderr
    return av


def _open(data: bytes, subject: str) -> tuple[Any, Any]:
    """(container, its first video stream), opened with the demuxer the signature names."""
    av = _av()
    fmt = _demuxer(data)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=fmt)
    except av.FFmpegError as exc:
        raise ImageError(
            f"{subject} is truncated, or not a video Pastiche can read ({_why(exc)})."
        ) from None
    if not container.streams.video:
        container.close()
        raise ImageError(
            f"{subject} has no video track (it may be truncated, or sound only); send a video "
            "with pictures."
        )
    return container, container.streams.video[0]


def _why(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).strip().rstrip(".")[:200]


def _format_name(container: Any) -> str:
    return "WEBM" if "matroska" in container.format.name else "MP4"


def probe(data: bytes, subject: str = "The video") -> AnimationInfo:
    """Size, declared frame count and format from the header, without decoding."""
    container, stream = _open(data, subject)
    try:
        ctx = stream.codec_context
        frames = int(stream.frames or 0) or None
        return AnimationInfo(_format_name(container), ctx.width, ctx.height, frames, True)
    finally:
        container.close()


def _declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _check_header(container: Any, stream: Any, limits: AnimationLimits, subject: str) -> None:
    ctx = stream.codec_context
    check_frame_size((ctx.width, ctx.height), limits, subject)
    if stream.frames:
        check_frame_count(int(stream.frames), limits, subject)
    seconds = _declared_seconds(container, stream)
    if seconds is not None and seconds > limits.max_seconds:
        raise ImageError(
            f"{subject} is {seconds:.0f} seconds long; the limit is {limits.max_seconds:g} "
            "seconds. Please send a shorter clip."
        )


def read(
    data: bytes, *, limits: AnimationLimits, max_side: int | None, subject: str = "The video"
) -> Animation:
    """Every frame as RGB, upright (phone videos carry their rotation as metadata), with
    durations from the presentation timestamps."""
    container, stream = _open(data, subject)
    av = _av()
    try:
        _check_header(container, stream, limits, subject)
        ctx = stream.codec_context
        # FFmpeg refuses to allocate a larger frame than this, whatever the packets claim.
        ctx.options = {"max_pixels": str(limits.max_pixels)}
        stream.thread_type = "AUTO"
        frames, times = _decode(container, stream, limits, max_side, subject)
        end = _declared_seconds(container, stream)
        declared, fmt = int(stream.frames or 0), _format_name(container)
    except av.FFmpegError as exc:
        raise ImageError(
            f"{subject} is truncated or corrupt and could not be decoded ({_why(exc)})."
        ) from None
    except MemoryError:
        raise ImageError(f"{subject} is too large to decode in the available memory.") from None
    finally:
        container.close()
    if not frames or (declared and len(frames) < declared - 1):
        raise ImageError(
            f"{subject} is truncated: it declares {declared} frames and only "
            f"{len(frames)} could be decoded."
        )
    return Animation(frames, durations_from_times(times, end), loop=0, format=fmt)


def _decode(
    container: Any, stream: Any, limits: AnimationLimits, max_side: int | None, subject: str
) -> tuple[list[Image.Image], list[float | None]]:
    frames: list[Image.Image] = []
    times: list[float | None] = []
    pixels = 0
    size: tuple[int, int] | None = None
    for frame in container.decode(stream):
        if len(frames) >= limits.max_frames:
            raise ImageError(
                f"{subject} has more than {limits.max_frames} frames; the limit is "
                f"{limits.max_frames}. Please send a shorter clip."
            )
        t = frame.time
        if t is not None and t > limits.max_seconds:
            raise ImageError(
                f"{subject} plays for more than {limits.max_seconds:g} seconds; the limit is "
                f"{limits.max_seconds:g} seconds. Please send a shorter clip."
            )
        img = _picture(frame, max_side)
        size = size or img.size
        if img.size != size:  # the stream changed resolution mid-way: keep the first size
            img = img.resize(size, Image.Resampling.LANCZOS)
        pixels += img.width * img.height
        if pixels > limits.max_total_pixels:
            raise ImageError(
                f"{subject} has too many pixels over all its frames (more than "
                f"{limits.max_total_pixels / 1e6:g} megapixels); send a shorter or smaller clip."
            )
        frames.append(img)
        times.append(None if t is None else float(t))
    return frames, times


def _picture(frame: Any, max_side: int | None) -> Image.Image:
    """The frame as an upright RGB image, scaled down by FFmpeg's scaler when it is larger than
    ``max_side`` (cheaper than converting the full frame first)."""
    width, height = frame.width, frame.height
    if max_side is not None and max(width, height) > max_side:
        factor = max_side / max(width, height)
        width, height = max(1, round(width * factor)), max(1, round(height * factor))
    img = frame.to_image(width=width, height=height)
    return upright(img, int(getattr(frame, "rotation", 0) or 0))


def upright(img: Image.Image, rotation: int) -> Image.Image:
    """Apply a display-matrix rotation (degrees counter-clockwise, as FFmpeg reports it)."""
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_270}.get(rotation % 360)  # fmt: skip
    return img if turn is None else img.transpose(turn)


def durations_from_times(times: list[float | None], end: float | None) -> list[int]:
    """Milliseconds per frame from presentation times: each frame lasts until the next one;
    the last until the stream's end. Missing, repeated or backwards times (broken or hostile
    files) get the typical step of the others. Rounded on the running total, so a 30 fps clip
    keeps its length (33, 34, 33, ... ms)."""
    steps = [
        b - a
        for a, b in zip(times, times[1:], strict=False)
        if a is not None and b is not None and b > a
    ]
    typical = sorted(steps)[(len(steps) - 1) // 2] if steps else DEFAULT_DELAY_MS / 1000
    starts: list[float] = []
    for t in times:
        previous = starts[-1] if starts else None
        if t is None or not math.isfinite(t) or (previous is not None and t <= previous):
            t = 0.0 if previous is None else previous + typical
        starts.append(t)
    last_end = end if end is not None and end > starts[-1] else starts[-1] + typical
    marks = [round(s * 1000) for s in (*starts, last_end)]
    return [max(1, b - a) for a, b in zip(marks, marks[1:], strict=False)]


# ---- writing -----------------------------------------------------------------------------------
def encode_mp4(anim: Animation, *, quality: int = 90, comment: str | None = None) -> bytes:
    """H.264 in MP4 (yuv420p, what browsers and Discord play), without B-frames so each packet's
    duration is its frame's and the last frame keeps its length. Timestamps in milliseconds.
    ``quality`` 0-100 maps onto x264's constant rate factor: 90 -> CRF 18 (x264's "visually
    lossless"), 75 -> 23 (its default), 3 quality points per CRF step."""
    av = _av()
    codec = next((c for c in _CODECS if c in av.codecs_available), None)
    if codec is None:
        raise ImageError("This PyAV build has no MP4 video encoder (H.264 or MPEG-4).")
    width, height = (s - s % 2 for s in anim.size)  # 4:2:0 needs even sides
    buf = io.BytesIO()
    ms = Fraction(1, 1000)
    with av.open(buf, mode="w", format="mp4") as out:
        if comment is not None:
            out.metadata["comment"] = comment
        stream = out.add_stream(codec, rate=max(1, round(1000 * len(anim) / anim.duration_ms)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = ms
        stream.codec_context.max_b_frames = 0
        if codec == "libx264":
            crf = min(51, max(0, round(18 + (90 - quality) / 3)))
            stream.options = {"crf": str(crf), "preset": "medium"}
        durations: dict[int, int] = {}
        pts = 0
        for img, duration in zip(anim.frames, anim.durations, strict=True):
            picture = images.flatten(img).crop((0, 0, width, height))
            frame = av.VideoFrame.from_image(picture)
            frame.pts, frame.time_base = pts, ms
            durations[pts] = duration
            pts += duration
            _mux(out, stream.encode(frame), durations)
        _mux(out, stream.encode(None), durations)
    return buf.getvalue()


def _mux(out: Any, packets: Any, durations: dict[int, int]) -> None:
    for packet in packets:
        packet.duration = durations.get(packet.pts, packet.duration)
        out.mux(packet)
