"""Reading and writing animations: round trips keep frames, timing and loop; every broken or
hostile file (built here, byte by byte where needed) gets its own clear ImageError, and nothing
is decoded past a limit."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFilter

from core import animation, video
from core.animation import Animation, AnimationLimits, encode_animation, load_animation
from core.errors import ImageError

from .conftest import image_bytes, make_image

DURATIONS = [40, 50, 60, 70, 80, 90]


def moving_frames(n: int = 6, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """A smooth textured scene sliding right 2 px per frame (compresses like real footage)."""
    wide = make_image(size[0] + 2 * n, size[1], seed=5).filter(ImageFilter.GaussianBlur(1.5))
    return [wide.crop((2 * (n - i), 0, 2 * (n - i) + size[0], size[1])) for i in range(n)]


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(
        np.abs(np.asarray(a, dtype=float) - np.asarray(b.convert("RGB"), dtype=float)).mean()
    )


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "loop", "tolerance"),
    [
        ("gif", 0, 6.0),  # one shared 256-colour palette, no dithering
        ("gif", 1, 6.0),  # plays once: no NETSCAPE block at all
        ("gif", 3, 6.0),
        ("webp", 0, 6.0),  # lossy at quality 90
        ("webp", 2, 6.0),
        ("png", 5, 0.0),  # APNG is lossless
        ("mp4", 0, 6.0),  # H.264 at CRF 18
    ],
)
def test_round_trip_keeps_frames_timing_and_loop(fmt: str, loop: int, tolerance: float) -> None:
    frames = moving_frames()
    data = encode_animation(Animation(frames, DURATIONS, loop=loop), fmt, metadata={"k": 1})
    info = animation.probe_animation(data)
    assert (
        info is not None and info.video == (fmt == "mp4") and (info.width, info.height) == (64, 48)
    )
    back = load_animation(data)
    assert len(back) == len(frames) and back.size == (64, 48)
    assert back.durations == DURATIONS  # exact: every format stores milliseconds or 1/100 s
    # MP4 has no loop count: a video read back loops forever, as chat clients play them.
    assert back.loop == (0 if fmt == "mp4" else loop)
    for original, decoded in zip(frames, back.frames, strict=True):
        # Lossy codecs on a smooth clip: the mean error of a 0-255 channel was 2-3 when this
        # was written; 6 leaves room for other codec builds, and a wrong frame is far above.
        assert mean_abs_diff(original, decoded) <= tolerance


def test_gif_loop_byte_is_the_repeat_count() -> None:
    """A GIF's NETSCAPE value counts repeats after the first play (loop=3 -> 4 plays)."""
    frames = moving_frames(2)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=3)
    assert load_animation(buf.getvalue()).loop == 4
    assert (
        Image.open(io.BytesIO(encode_animation(load_animation(buf.getvalue()), "gif"))).info["loop"]
        == 3
    )


def test_mp4_of_an_odd_sized_transparent_clip_plays() -> None:
    frames = [f.convert("RGBA").resize((65, 47)) for f in moving_frames(3)]
    back = load_animation(encode_animation(Animation(frames, [100] * 3), "mp4"))
    assert back.size == (64, 46) and back.frames[0].mode == "RGB" and back.durations == [100] * 3


def test_webp_and_apng_keep_transparency() -> None:
    frames = [f.convert("RGBA") for f in moving_frames(3)]
    for frame in frames:
        frame.putalpha(Image.linear_gradient("L").resize(frame.size))
    for fmt in ("webp", "png"):
        back = load_animation(encode_animation(Animation(frames, [100] * 3), fmt))
        assert back.frames[0].mode == "RGBA"
        assert back.frames[0].getchannel("A").getextrema()[0] < 10


def test_decimated_keeps_the_playing_time() -> None:
    anim = Animation(moving_frames(6), DURATIONS, loop=0)
    fewer = anim.decimated(3)
    assert len(fewer) == 3 and fewer.duration_ms == anim.duration_ms
    assert fewer.frames == [anim.frames[0], anim.frames[2], anim.frames[4]]
    assert fewer.durations == [90, 130, 170]
    assert anim.decimated(10).durations == DURATIONS


def test_max_side_downscales_while_reading() -> None:
    data = encode_animation(Animation(moving_frames(3), [100] * 3), "gif")
    assert load_animation(data, max_side=32).size == (32, 24)
    data = encode_animation(Animation(moving_frames(3), [100] * 3), "mp4")
    assert load_animation(data, max_side=32).size == (32, 24)


def test_a_still_image_is_not_an_animation() -> None:
    for fmt in ("PNG", "GIF", "WEBP", "JPEG"):
        data = image_bytes(fmt)
        assert animation.probe_animation(data) is None
        with pytest.raises(ImageError, match="single frame|not an animation"):
            load_animation(data)
    assert animation.probe_animation(b"not an image at all") is None


def test_output_format_comes_from_the_extension() -> None:
    assert [animation.format_for_path(f"a.{e}") for e in ("GIF", "webp", "apng", "png", "mp4")] == [
        "gif", "webp", "png", "png", "mp4",
    ]  # fmt: skip
    with pytest.raises(ImageError, match=r"'\.jpg' is not an animation format; use \.gif"):
        animation.format_for_path("out.jpg")


def test_save_animation_writes_atomically(tmp_path) -> None:
    path = tmp_path / "out.webp"
    animation.save_animation(Animation(moving_frames(2), [100, 100]), path, metadata={"a": 1})
    assert len(load_animation(path)) == 2 and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ImageError, match="does not exist"):
        animation.save_animation(Animation(moving_frames(2), [1, 1]), tmp_path / "no" / "x.gif")


# ---- hostile and broken files -----------------------------------------------------------------
def gif_file(canvas: tuple[int, int], frames: list[tuple[Image.Image, tuple[int, int], int]],
             loop: int | None = 0) -> bytes:  # fmt: skip
    """A GIF assembled block by block, so frames may lie outside the canvas and delays may be 0.
    ``frames``: (P-mode image, (left, top), delay in 1/100 s)."""
    palette = bytes(v for i in range(256) for v in (i, 255 - i, (7 * i) % 256))
    out = [b"GIF89a", struct.pack("<HHBBB", *canvas, 0xF7, 0, 0), palette]
    if loop is not None:
        out.append(b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", loop) + b"\x00")
    for img, (left, top), delay in frames:
        out.append(b"\x21\xf9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00")
        descriptor, *pixels = GifImagePlugin.getdata(img, offset=(0, 0))
        out.append(b"," + struct.pack("<HHHH", left, top, *img.size) + b"\x00")
        out += pixels
    out.append(b"\x3b")
    return b"".join(out)


def plain(size: tuple[int, int], value: int) -> Image.Image:
    img = Image.new("P", size, value)
    img.putpalette(bytes(v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)))
    return img


def test_gif_zero_delays_play_at_browser_speed() -> None:
    data = gif_file(
        (32, 24), [(plain((32, 24), v), (0, 0), d) for v, d in ((1, 0), (9, 1), (20, 5))]
    )
    anim = load_animation(data)
    assert anim.durations == [100, 100, 50] and anim.loop == 0


def test_gif_frame_reaching_past_its_canvas_is_clipped_to_it() -> None:
    frames = [(plain((32, 24), 3), (0, 0), 4), (plain((40, 30), 200), (10, 4), 4)]
    anim = load_animation(gif_file((32, 24), frames))
    assert anim.size == (32, 24) and len(anim) == 2
    # The second frame's colour covers the part of it inside the canvas.
    assert anim.frames[1].getpixel((20, 10)) == (200, 55, (7 * 200) % 256)


def test_gif_frame_far_outside_its_canvas_is_refused_before_decoding() -> None:
    frames = [(plain((32, 24), 3), (0, 0), 4), (plain((8, 8), 9), (60000, 60000), 4)]
    with pytest.raises(ImageError, match=r"too large|megapixels"):
        load_animation(gif_file((32, 24), frames))


def test_gif_with_a_huge_canvas_is_refused_from_its_header() -> None:
    frames = [(plain((8, 8), 3), (0, 0), 4), (plain((8, 8), 9), (0, 0), 4)]
    with pytest.raises(ImageError, match=r"65000x65000 pixels|too large"):
        load_animation(gif_file((65000, 65000), frames))


def test_gif_with_absurdly_many_frames_is_refused_at_the_cap(monkeypatch) -> None:
    """100 000 one-pixel frames fit in 2 MB; reading stops at the cap, having decoded no more
    frames than the cap allows."""
    tiny = plain((1, 1), 7)
    data = gif_file((16, 16), [(plain((16, 16), 1), (0, 0), 4)] + [(tiny, (0, 0), 4)] * 100_000)
    assert len(data) < 3_000_000
    decoded = []
    real_load = GifImagePlugin.GifImageFile.load

    def counting_load(self):
        decoded.append(self.tell())
        return real_load(self)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load", counting_load)
    with pytest.raises(ImageError, match="more than 300 frames; the limit is 300"):
        load_animation(data)
    assert max(decoded) < 300


def test_truncated_gif_is_refused() -> None:
    data = encode_animation(Animation(moving_frames(4), [100] * 4), "gif")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_animation(data[: len(data) * 2 // 3])


def test_animation_limits_on_time_and_pixels() -> None:
    data = gif_file((32, 24), [(plain((32, 24), v), (0, 0), 2000) for v in range(4)])
    with pytest.raises(ImageError, match="more than 60 seconds; the limit is 60 seconds"):
        load_animation(data)
    with pytest.raises(ImageError, match="too many pixels over all its frames"):
        load_animation(data, limits=AnimationLimits(max_seconds=80, max_total_pixels=32 * 24 * 3))
    with pytest.raises(ImageError, match="more than 2 frames"):
        load_animation(data, limits=AnimationLimits(max_seconds=80, max_frames=2))
    assert len(load_animation(data, limits=AnimationLimits(max_seconds=80))) == 4


def png_chunks(data: bytes, kind: bytes, change, nth: int = 0) -> bytes:
    """``data`` with the ``nth`` chunk of type ``kind`` rewritten (CRC recomputed)."""
    pos, seen = 8, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == kind:
            if seen == nth:
                body = change(data[pos + 8 : pos + 8 + length])
                crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
                chunk = struct.pack(">I", len(body)) + kind + body + crc
                return data[:pos] + chunk + data[pos + 12 + length :]
            seen += 1
        pos += 12 + length
    raise AssertionError(f"no chunk {kind!r} #{nth}")


def apng() -> bytes:
    return encode_animation(Animation(moving_frames(3), [40, 40, 40]), "png")


def test_apng_declaring_absurd_frames_is_refused_from_its_header() -> None:
    data = png_chunks(apng(), b"acTL", lambda body: struct.pack(">II", 2**31 - 1, 0))
    with pytest.raises(ImageError, match="has 2147483647 frames; the limit is 300"):
        load_animation(data)


def test_apng_frame_outside_its_canvas_is_refused() -> None:
    data = png_chunks(apng(), b"fcTL", lambda b: b[:4] + struct.pack(">I", 500) + b[8:], nth=1)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_animation(data)


def test_apng_zero_delay_plays_at_browser_speed() -> None:
    data = png_chunks(apng(), b"fcTL", lambda b: b[:20] + struct.pack(">HH", 0, 0) + b[24:], nth=1)
    assert load_animation(data).durations == [40, 100, 40]


# ---- videos ---------------------------------------------------------------------------------------
def webm(frames: int, size: tuple[int, int] = (32, 24), fps: int = 10) -> bytes:
    """A VP8 WebM: Matroska declares no frame count, so only the streaming cap can stop it."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (i * 7 % 256, 90, 30)))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_webm_reads_with_its_frame_rate() -> None:
    data = webm(5)
    info = animation.probe_animation(data)
    assert info is not None and info.video and info.format == "WEBM" and info.frames is None
    anim = load_animation(data)
    assert len(anim) == 5 and anim.durations == [100] * 5 and anim.size == (32, 24)


def test_webm_with_too_many_frames_stops_at_the_cap() -> None:
    with pytest.raises(ImageError, match="more than 4 frames; the limit is 4"):
        load_animation(webm(12), limits=AnimationLimits(max_frames=4))


def test_video_limits_from_the_header() -> None:
    data = encode_animation(Animation(moving_frames(6), [500] * 6), "mp4")
    with pytest.raises(ImageError, match="has 6 frames; the limit is 5"):
        load_animation(data, limits=AnimationLimits(max_frames=5))
    with pytest.raises(ImageError, match="3 seconds long; the limit is 2 seconds"):
        load_animation(data, limits=AnimationLimits(max_seconds=2))
    with pytest.raises(ImageError, match=r"64x48 pixels \(0.0 megapixels\); the limit is 0.0"):
        load_animation(data, limits=AnimationLimits(max_pixels=1000))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda mp4: mp4[: len(mp4) // 2], "is truncated"),
        (lambda mp4: mp4[:40] + bytes(200), "is truncated"),
        (lambda mp4: b"\x00\x00\x00\x18ftypmp42" + bytes(100), "not a video Pastiche can read"),
        (lambda mp4: b"\x1a\x45\xdf\xa3" + bytes(64), "not a video Pastiche can read"),
    ],
)
def test_broken_videos_are_refused(make, needle) -> None:
    mp4 = encode_animation(Animation(moving_frames(6), [40] * 6), "mp4")
    with pytest.raises(ImageError, match=needle):
        load_animation(make(mp4))


def test_sound_only_file_has_no_video_track() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(ImageError, match="has no video track"):
        load_animation(buf.getvalue())


def test_broken_timestamps_get_the_typical_step() -> None:
    times = [0.0, 0.04, 0.04, None, 0.02, 0.2]  # repeated, missing and backwards times
    assert video.durations_from_times(times, end=0.26) == [40, 40, 40, 40, 40, 60]
    # 30 fps: rounding on the running total keeps the length (1000 ms per 30 frames).
    thirty = video.durations_from_times([i / 30 for i in range(30)], end=1.0)
    assert sum(thirty) == 1000 and set(thirty) == {33, 34}
    assert video.durations_from_times([None], end=None) == [100]


def test_display_rotation_is_applied() -> None:
    img = Image.new("RGB", (40, 20))
    img.putpixel((0, 0), (255, 0, 0))
    turned = video.upright(img, -90)  # FFmpeg's counter-clockwise angle of a portrait phone clip
    assert turned.size == (20, 40) and turned.getpixel((19, 0)) == (255, 0, 0)
    assert video.upright(img, 0) is img


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_still_heic_or_avif_is_a_picture_not_a_video(fmt: str) -> None:
    """HEIC and AVIF share MP4's box format ('ftyp'); their brands mark them as stills, which
    the image loader reads (a phone's selfie must not be sent down the video path)."""
    from core.animation import probe_animation
    from core.images import load_image
    from core.video import looks_like_video

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, fmt, quality=90)
    data = buf.getvalue()
    assert data[4:8] == b"ftyp"
    assert not looks_like_video(data) and probe_animation(data) is None
    assert load_image(data).size == (32, 24)
