"""core.images: every kind of bad input is a clear ImageError, every mode becomes 8-bit RGB(A),
orientation and colour profiles are applied, and outputs carry their metadata."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageFile

from core import images
from core.errors import ImageError
from tests.conftest import image_bytes, make_image


# ---- helpers ---------------------------------------------------------------------------------
def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_header(width: int, height: int) -> bytes:
    """A valid-looking PNG that declares a size but carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def icc_profile(space: str = "RGB", gamma: float = 1.0) -> bytes:
    """A minimal ICC v2 matrix/TRC profile (sRGB primaries, D50) with a pure-gamma curve.

    gamma 1.0 = *linear* RGB (or grey): a mid-grey value of 128 means 50 % light, which is
    about 188 in sRGB, so a correct conversion is easy to see.
    """

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = b"linear test"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text) + 1) + text + b"\0"
    desc += b"\0" * 12 + b"\0" * 67  # empty Unicode and ScriptCode parts
    tags: list[tuple[bytes, bytes]] = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    if space == "RGB":
        tags += [
            (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
            (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
        ]  # fmt: skip
        color = b"RGB "
    else:
        tags += [(b"kTRC", curve)]
        color = b"GRAY"
    table = struct.pack(">I", len(tags))
    body = b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        while len(data) % 4:
            data += b"\0"
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + color
        + b"XYZ " + b"\0" * 12 + b"acsp" + b"APPL" + b"\0" * 4 + b"\0" * 8 + b"\0" * 8
        + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 4
    )  # fmt: skip
    header += b"\0" * (128 - len(header))
    return header + table + body


# ---- bad input -------------------------------------------------------------------------------
def test_load_truncated_flag_is_untouched() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"just some text, certainly not an image\n" * 4, "not an image"),
        (image_bytes("PNG")[:300], "truncated"),
        (image_bytes("JPEG")[:300], "truncated"),
        (image_bytes("PNG")[:30], "not an image"),  # header cut before IHDR ends
        (encoded(make_image(1, 1)), "at least 16"),
        (encoded(make_image(15, 64)), "15x64"),
        (image_bytes("ICO"), "ICO format"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "cut-header", "1x1", "thin", "ico"],
)
def test_bad_bytes_raise_image_error_naming_the_input(data: bytes, words: str) -> None:
    with pytest.raises(ImageError) as err:
        images.load_image(data, name="style image 2")
    message = str(err.value)
    assert "style image 2" in message
    assert words in message
    assert message.endswith(".")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"content image '.*nope\.png' does not exist"):
        images.load_image(tmp_path / "nope.png", name="content image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        images.load_image(str(empty))
    with pytest.raises(ImageError, match="folder"):
        images.load_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not an image"):
        images.load_image(text)


def test_wrong_python_type_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="file path, image bytes or a PIL image"):
        images.load_image(42)  # type: ignore[arg-type]


def test_header_declared_size_is_rejected_before_decoding() -> None:
    # 8000x8000 RGB would be 192 MB once decoded; the data would also be "truncated", so a
    # loader that decoded first would report truncation, not the size.
    with pytest.raises(ImageError, match=r"8000x8000 pixels \(64\.0 megapixels\).*limit is 50\.0"):
        images.load_image(png_with_header(8000, 8000))
    # Far beyond PIL's own bomb limit (PIL refuses while opening).
    with pytest.raises(ImageError, match="too large"):
        images.validate_image(png_with_header(100_000, 100_000))
    # The caller's limit wins over the default.
    with pytest.raises(ImageError, match="limit is 0.0 megapixels"):
        images.load_image(image_bytes(width=64, height=48), max_pixels=1000)


def test_validate_image_reports_the_loaded_result() -> None:
    info = images.validate_image(image_bytes("JPEG", width=40, height=30))
    assert info == images.ImageInfo(width=40, height=30, format="JPEG", mode="RGB")
    info = images.validate_image(encoded(make_image(32, 20, mode="RGBA")))
    assert (info.format, info.mode) == ("PNG", "RGBA")
    with pytest.raises(ImageError, match="truncated"):
        images.validate_image(image_bytes("PNG")[:200], name="upload")


# ---- modes -----------------------------------------------------------------------------------
def test_inputs_from_path_bytes_and_pil_agree(tmp_path: Path) -> None:
    src = make_image(40, 30)
    path = tmp_path / "in.png"
    src.save(path)
    from_path = images.load_image(path)
    from_str = images.load_image(str(path))
    from_bytes = images.load_image(path.read_bytes())
    from_pil = images.load_image(src)
    assert from_path.tobytes() == from_str.tobytes() == from_bytes.tobytes() == src.tobytes()
    assert from_pil is not src and from_pil.tobytes() == src.tobytes()
    with Image.open(path) as lazy:  # not yet decoded
        assert images.load_image(lazy).tobytes() == src.tobytes()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "PNG"), ("CMYK", "JPEG"),
     ("L", "JPEG"), ("I", "TIFF"), ("F", "TIFF"), ("RGB", "BMP"), ("P", "GIF"), ("RGB", "WEBP")],
)  # fmt: skip
def test_every_mode_becomes_8bit_rgb(mode: str, fmt: str) -> None:
    src = make_image(32, 24, mode=mode)
    out = images.load_image(encoded(src, fmt))
    assert out.mode == "RGB"
    assert out.size == (32, 24)
    grey = make_image(32, 24).convert("L").getpixel((7, 5))
    if mode in ("L", "LA", "I", "F") and fmt != "JPEG":
        r, g, b = out.getpixel((7, 5))
        assert r == g == b == grey


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    src = Image.new("I;16", (20, 20))
    src.putpixel((0, 0), 65535)
    src.putpixel((1, 0), 32896)  # 128.5 * 256: half-way
    src.putpixel((2, 0), 255)  # dark in 16 bits; a clipping converter would make it white
    out = images.load_image(encoded(src, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0))[0] in (127, 128)
    assert out.getpixel((2, 0)) == (1, 1, 1)


def test_32_bit_int_and_float_ranges() -> None:
    sixteen = Image.new("I", (20, 20), 1000)
    sixteen.putpixel((0, 0), 65535)
    out = images.load_image(encoded(sixteen, "TIFF"))
    assert out.getpixel((0, 0))[0] == 255 and out.getpixel((1, 1))[0] == 4  # 1000 / 257
    wide = Image.new("I", (20, 20), -500)
    wide.putpixel((0, 0), 70_000)
    out = images.load_image(encoded(wide, "TIFF"))
    assert out.getpixel((0, 0))[0] == 255 and out.getpixel((1, 1))[0] == 0  # stretched
    unit = Image.new("F", (20, 20), 0.5)
    assert images.load_image(encoded(unit, "TIFF")).getpixel((3, 3))[0] in (127, 128)


def test_alpha_is_kept_only_when_used() -> None:
    translucent = make_image(30, 20, mode="RGBA")
    out = images.load_image(encoded(translucent))
    assert out.mode == "RGBA" and out.tobytes() == translucent.tobytes()
    opaque = make_image(30, 20).convert("RGBA")
    assert images.load_image(encoded(opaque)).mode == "RGB"
    assert images.load_image(encoded(make_image(30, 20).convert("LA"))).mode == "RGB"
    la = make_image(30, 20, mode="RGBA").convert("LA")
    assert images.load_image(encoded(la)).mode == "RGBA"


def test_palette_with_transparency() -> None:
    pal = make_image(30, 20).convert("P")
    index = pal.getpixel((0, 0))
    data = encoded(pal, "PNG", transparency=index)
    out = images.load_image(data)
    assert out.mode == "RGBA"
    assert out.getpixel((0, 0))[3] == 0
    gif = images.load_image(encoded(pal, "GIF", transparency=index))
    assert gif.mode == "RGBA" and gif.getpixel((0, 0))[3] == 0


def test_exif_orientation_6_rotates_clockwise() -> None:
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = images.load_image(encoded(src, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) edge is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# ---- HEIC (iPhone photos) --------------------------------------------------------------------
def phone_photo(fmt: str) -> bytes:
    """Left half mid-grey in *linear* RGB, right half blue; stored sideways (EXIF orientation 6,
    "rotate 90 CW to display") with a linear-RGB ICC profile, as a phone would."""
    src = Image.new("RGB", (40, 20), (128, 128, 128))
    src.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(src, fmt, exif=exif.tobytes(), icc_profile=icc_profile("RGB", 1.0), quality=95)


def test_heic_is_turned_upright_and_colour_converted_like_a_jpeg() -> None:
    heic = phone_photo("HEIF")
    assert heic[4:12] == b"ftypheic"
    out = images.load_image(heic)
    info = images.validate_image(heic)
    assert (info.format, info.width, info.height, info.mode) == ("HEIF", 20, 40, "RGB")
    assert out.size == (20, 40) and "icc_profile" not in out.info
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert 180 <= top[0] <= 196 and abs(top[0] - top[2]) <= 6  # linear 128 -> sRGB ~188
    assert bottom[2] > 200 and bottom[0] < 60  # the right (blue) edge is now at the bottom
    # The same photo as a JPEG goes through the same orientation and profile code; both are
    # lossy (HEVC and JPEG at quality 95), so they agree to within a few levels per pixel.
    jpeg = images.load_image(phone_photo("JPEG"))
    diff = [abs(a - b) for a, b in zip(out.tobytes(), jpeg.tobytes(), strict=True)]
    assert sum(diff) / len(diff) < 4


def test_truncated_heic_is_an_image_error() -> None:
    heic = encoded(make_image(64, 48), "HEIF", quality=90)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        images.load_image(heic[: len(heic) // 2], name="photo")


def test_one_list_of_formats_names_heic_and_what_pillow_reads() -> None:
    text = images.accepted_formats()
    assert "HEIC" in text and "JPEG" in text and "PNG" in text
    assert all(f.pil in Image.OPEN for f in images.INPUT_FORMATS)
    assert images.ACCEPTED_MIME_TYPES["image/heic"] == "HEIC"
    assert ".heic" in images.ACCEPTED_EXTENSIONS
    with pytest.raises(ImageError) as err:
        images.load_image(encoded(make_image(32, 32), "ICO"))  # a format PIL knows, refused
    assert "ICO format" in str(err.value) and text in str(err.value)


# ---- colour profiles -------------------------------------------------------------------------
def test_linear_rgb_profile_is_converted_to_srgb() -> None:
    src = Image.new("RGB", (20, 20), (128, 128, 128))
    out = images.load_image(encoded(src, "PNG", icc_profile=icc_profile("RGB", 1.0)))
    r, g, b = out.getpixel((5, 5))
    assert 183 <= r <= 192 and abs(r - g) <= 2 and abs(r - b) <= 2
    assert "icc_profile" not in out.info


def test_grey_profile_on_l_image_is_converted() -> None:
    src = Image.new("L", (20, 20), 128)
    out = images.load_image(encoded(src, "PNG", icc_profile=icc_profile("GRAY", 1.0)))
    assert out.mode == "RGB" and 183 <= out.getpixel((5, 5))[0] <= 192


def test_srgb_profile_is_a_no_op_and_alpha_survives() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = make_image(30, 20, mode="RGBA")
    out = images.load_image(encoded(src, "PNG", icc_profile=srgb))
    assert out.mode == "RGBA" and "icc_profile" not in out.info
    assert out.getchannel("A").tobytes() == src.getchannel("A").tobytes()
    diffs = [abs(a - b) for a, b in zip(out.tobytes(), src.tobytes(), strict=True)]
    assert max(diffs) <= 2


def test_mismatched_or_broken_profiles_are_ignored() -> None:
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    src = make_image(30, 20)
    assert images.load_image(encoded(src, "PNG", icc_profile=lab)).tobytes() == src.tobytes()
    junk = encoded(src, "PNG", icc_profile=b"definitely not a profile")
    assert images.load_image(junk).tobytes() == src.tobytes()


# ---- writing ---------------------------------------------------------------------------------
def test_png_metadata_round_trip(tmp_path: Path) -> None:
    meta = {"settings": {"size": 64, "style_layers": ["relu1_1"]}, "note": "Ölgemälde ✓"}
    data = images.encode_image(make_image(32, 24), "png", metadata=meta)
    assert images.read_metadata(data) == meta
    path = tmp_path / "out.png"
    images.save_image(make_image(32, 24), path, metadata=meta)
    assert images.read_metadata(path) == meta
    assert images.read_metadata(str(path)) == meta
    with Image.open(path) as img:
        assert json.loads(img.text["pastiche"]) == meta
    assert images.read_metadata(encoded(make_image(32, 24))) is None


def test_jpeg_is_quality_95_flattened_on_white_with_metadata() -> None:
    src = make_image(32, 24, mode="RGBA")
    src.putpixel((0, 0), (0, 0, 0, 0))
    data = images.encode_image(src, "jpeg", metadata={"a": 1})
    reference = encoded(make_image(32, 24), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as out, Image.open(io.BytesIO(reference)) as ref:
        assert out.mode == "RGB"
        assert out.quantization == ref.quantization  # type: ignore[attr-defined]
        out.load()
        assert min(out.getpixel((0, 0))) > 200  # transparent pixel became white, not black
    assert images.read_metadata(data) == {"a": 1}


def test_alpha_round_trips_through_png_and_webp(tmp_path: Path) -> None:
    src = make_image(32, 24, mode="RGBA")
    for name in ("a.png", "a.webp"):
        images.save_image(src, tmp_path / name)
        out = images.load_image(tmp_path / name)
        assert out.mode == "RGBA"
        assert out.getchannel("A").tobytes() == src.getchannel("A").tobytes()
    assert images.load_image(tmp_path / "a.png").tobytes() == src.tobytes()


def test_unknown_extension_and_missing_folder(tmp_path: Path) -> None:
    img = make_image(32, 24)
    with pytest.raises(ImageError, match=r"'\.bmp' is not a supported output type"):
        images.save_image(img, tmp_path / "out.bmp")
    with pytest.raises(ImageError, match="no extension"):
        images.save_image(img, tmp_path / "out")
    with pytest.raises(ImageError, match="gif"):
        images.encode_image(img, "gif")
    with pytest.raises(ImageError, match="does not exist"):
        images.save_image(img, tmp_path / "missing" / "out.png")
    assert images.format_for_path("X.JPG") == "jpeg"
    images.save_image(img, tmp_path / "ok.JPEG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.JPEG"]  # no temp files left


def test_read_metadata_of_garbage_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        images.read_metadata(b"nope")
    with pytest.raises(ImageError, match="could not be read"):
        images.read_metadata(tmp_path / "missing.png")


def test_fit_within() -> None:
    img = make_image(64, 48)
    assert images.fit_within(img, 32).size == (32, 24)
    assert images.fit_within(img, 100).size == (64, 48)
    assert images.fit_within(img, 128, upscale=True).size == (128, 96)
    tall = images.fit_within(make_image(30, 90), 45)
    assert tall.size == (15, 45)
    same = images.fit_within(img, 64)
    assert same is not img and same.tobytes() == img.tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_the_print_resolution_of_the_input_reaches_the_output(fmt: str) -> None:
    photo = images.load_image(encoded(make_image(40, 30), fmt, dpi=(300, 300)))
    assert images.dpi_of(photo) == (300.0, 300.0)
    painting = images.with_dpi(Image.new("RGB", (80, 60)), images.dpi_of(photo))
    for out in ("png", "jpeg"):
        with Image.open(io.BytesIO(images.encode_image(painting, out, metadata={}))) as back:
            assert images.dpi_of(back) == (300.0, 300.0)
    assert images.dpi_of(images.load_image(encoded(make_image(40, 30), "PNG"))) is None
    plain = images.encode_image(images.with_dpi(Image.new("RGB", (8, 8)), None), "png")
    assert images.dpi_of(Image.open(io.BytesIO(plain))) is None
