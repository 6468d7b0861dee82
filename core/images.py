"""Reading untrusted images safely and writing results with their settings attached.

Everything that enters Pastiche (CLI paths, Discord attachments, GIMP layers) goes through
:func:`load_image`, so the checks live in one place: a pixel limit taken from the header before
any decoding (decompression bombs), a full decode (truncated uploads fail here, not halfway
through a job), EXIF orientation (phone selfies are stored sideways), ICC profiles converted to
sRGB (the networks were trained on sRGB), and every PIL mode reduced to 8-bit RGB or RGBA.
One list of accepted formats (:data:`INPUT_FORMATS`) feeds every front end's messages.
Pillow and pillow-heif only: front ends import this without torch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, cast

import pillow_heif
from PIL import Image, ImageCms, ImageFile, ImageOps, PngImagePlugin

from core.errors import ImageError

log = logging.getLogger(__name__)

ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image]

MAX_PIXELS: int = 50_000_000
"""Default input limit: a 48-megapixel phone photo passes, a decompression bomb does not."""
MIN_SIDE: int = 16
"""Smallest accepted side; matches the smallest ``Settings.size``."""
METADATA_KEY = "pastiche"
"""PNG text chunk (and JPEG comment prefix) holding the JSON metadata."""


@dataclass(frozen=True)
class InputFormat:
    """An accepted input format: PIL's name for it, the name users know, its MIME types (as
    Discord reports them) and file extensions."""

    pil: str
    label: str
    mime_types: tuple[str, ...]
    extensions: tuple[str, ...]


# Formats accepted as input. Deliberately short: PIL's EPS reader runs Ghostscript and several
# exotic decoders see little fuzzing, and none of them matter for photos and paintings.
# (MPO, the multi-picture JPEG of many phones, is opened by the JPEG plugin.) HEIC/HEIF, what
# iPhones save by default, is read through pillow-heif, which applies the HEIF rotation and
# mirroring and resets the EXIF orientation to match, so orientation and colour profiles are
# then handled here exactly as for a JPEG.
pillow_heif.register_heif_opener()
Image.init()
_FORMATS = (
    InputFormat("PNG", "PNG", ("image/png",), (".png",)),
    InputFormat("JPEG", "JPEG", ("image/jpeg", "image/jpg"), (".jpg", ".jpeg", ".jpe")),
    InputFormat(
        "HEIF",
        "HEIC",
        ("image/heic", "image/heif", "image/heic-sequence", "image/heif-sequence"),
        (".heic", ".heif", ".hif"),
    ),
    InputFormat("WEBP", "WebP", ("image/webp",), (".webp",)),
    InputFormat("AVIF", "AVIF", ("image/avif",), (".avif",)),
    InputFormat("GIF", "GIF", ("image/gif",), (".gif",)),
    InputFormat("BMP", "BMP", ("image/bmp", "image/x-ms-bmp"), (".bmp",)),
    InputFormat("TIFF", "TIFF", ("image/tiff",), (".tif", ".tiff")),
    InputFormat("PPM", "PPM", ("image/x-portable-pixmap",), (".ppm", ".pgm", ".pbm", ".pnm")),
)
INPUT_FORMATS: tuple[InputFormat, ...] = tuple(f for f in _FORMATS if f.pil in Image.OPEN)
"""What every front end accepts (the CLI, the bot and the GIMP helper all read through
:func:`load_image`); only the formats this Pillow can open."""
_READ_FORMATS = tuple(f.pil for f in INPUT_FORMATS)
ACCEPTED_MIME_TYPES: dict[str, str] = {m: f.label for f in INPUT_FORMATS for m in f.mime_types}
ACCEPTED_EXTENSIONS: frozenset[str] = frozenset(e for f in INPUT_FORMATS for e in f.extensions)


def accepted_formats(conjunction: str = "or") -> str:
    """The accepted formats for a user-facing sentence: "PNG, JPEG, HEIC, ... or PPM"."""
    labels = [f.label for f in INPUT_FORMATS]
    return ", ".join(labels[:-1]) + f" {conjunction} {labels[-1]}" if len(labels) > 1 else labels[0]


_WRITE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`validate_image` found: size after EXIF orientation, file format, and the
    mode :func:`load_image` returns ("RGB" or "RGBA")."""

    width: int
    height: int
    format: str
    mode: str


# ---- reading ---------------------------------------------------------------------------------
def load_image(
    source: ImageInput, *, max_pixels: int = MAX_PIXELS, name: str = "image"
) -> Image.Image:
    """Fully decoded, upright, sRGB, 8-bit "RGB" or "RGBA" (alpha only if not fully opaque).

    ``name`` ("content image", "style image 2") appears in every error message.
    Raises :class:`ImageError` for anything a user could have got wrong.
    """
    return _load(source, max_pixels=max_pixels, name=name)[0]


def validate_image(data: bytes, *, max_pixels: int = MAX_PIXELS, name: str = "image") -> ImageInfo:
    """Check an upload completely (including a full decode) before it is queued."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"The {name} must be given as bytes.")
    img, fmt = _load(bytes(data), max_pixels=max_pixels, name=name)
    return ImageInfo(width=img.width, height=img.height, format=fmt, mode=img.mode)


def _load(source: ImageInput, *, max_pixels: int, name: str) -> tuple[Image.Image, str]:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the global; truncation must fail
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False.")
    if isinstance(source, Image.Image):
        subject = f"The {name}"
        img, fmt = source, source.format or "PIL"
        _check_size(img.size, max_pixels, subject)
    else:
        img, subject = _open(source, name)
        fmt = img.format or "?"
        _check_size(img.size, max_pixels, subject)
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{subject} is too large to decode safely.") from None
        except MemoryError:
            raise ImageError(f"{subject} is too large to decode in the available memory.") from None
        except _DECODE_ERRORS as exc:
            raise ImageError(
                f"{subject} is truncated or corrupt and could not be decoded ({_reason(exc)})."
            ) from None
    try:
        out = _normalize(img, subject)
    except _DECODE_ERRORS as exc:  # lazily decoded PIL input, odd modes
        raise ImageError(f"{subject} could not be converted to RGB ({_reason(exc)}).") from None
    _check_size(out.size, max_pixels, subject)
    return out, fmt


def _open(source: ImageInput, name: str) -> tuple[ImageFile.ImageFile, str]:
    """Open lazily (header only) from a path or bytes; the caller decides whether to decode."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        subject = f"The {name}"
        if not data:
            raise ImageError(f"{subject} is empty (0 bytes).")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        subject = f"The {name} '{path}'"
        if not path.exists():
            raise ImageError(f"{subject} does not exist.")
        if path.is_dir():
            raise ImageError(f"{subject} is a folder, not an image file.")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{subject} could not be read: {_reason(exc)}.") from None
        if not data:
            raise ImageError(f"{subject} is empty (0 bytes).")
    else:
        raise ImageError(
            f"The {name} must be a file path, image bytes or a PIL image, "
            f"not {type(source).__name__}."
        )
    try:
        return Image.open(io.BytesIO(data), formats=_READ_FORMATS), subject
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{subject} is far too large ({_reason(exc)}).") from None
    except Image.UnidentifiedImageError:
        pass
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"{subject} is truncated or corrupt and could not be read ({_reason(exc)})."
        ) from None
    # Not an accepted format: say which format it is, if PIL knows it, without decoding it.
    other = None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            other = probe.format
    except Exception:  # noqa: BLE001 - only used to improve the message
        other = None
    accepted = accepted_formats()
    if other:
        raise ImageError(
            f"{subject} is in {other} format, which Pastiche does not accept; use {accepted}."
        )
    raise ImageError(f"{subject} is not an image Pastiche can read; use {accepted}.")


def _check_size(size: tuple[int, int], max_pixels: int, subject: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"{subject} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {max_pixels / 1e6:.1f} megapixels."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{subject} is {width}x{height} pixels; each side must be at least {MIN_SIDE} pixels."
        )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text[:200]


# ---- mode, orientation and colour ------------------------------------------------------------
def normalize(img: Image.Image, *, name: str = "image") -> Image.Image:
    """An already decoded image (an animation's frame) made upright, sRGB, 8-bit RGB or RGBA:
    what :func:`load_image` does after decoding."""
    try:
        return _normalize(img, f"The {name}")
    except _DECODE_ERRORS as exc:
        raise ImageError(f"The {name} could not be converted to RGB ({_reason(exc)}).") from None


def _normalize(img: Image.Image, subject: str) -> Image.Image:
    icc = img.info.get("icc_profile")
    img = _upright(img)
    img = _to_8bit(img, subject)
    if icc:
        img = _to_srgb(img, icc, subject)
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    if img.mode == "RGBA" and img.getchannel("A").getextrema() == (255, 255):
        img = img.convert("RGB")
    img.info.pop("icc_profile", None)
    img.info.pop("exif", None)
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (always returns a new image, the caller's stays untouched)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - broken EXIF must not reject an otherwise good photo
        log.warning("Ignoring unreadable EXIF orientation: %s", exc)
        return img.copy()


def _to_8bit(img: Image.Image, subject: str) -> Image.Image:
    """Reduce any PIL mode to L, LA, RGB, RGBA or CMYK with 8 bits per channel."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        alpha = mode == "PA" or img.has_transparency_data
        return img.convert("RGBA" if alpha else "RGB")
    if mode in ("RGBa", "La"):
        return img.convert(mode.upper())
    if mode in ("RGBX", "YCbCr"):
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _grey_to_8bit(img)
    if mode == "LAB":
        return _convert_profile(img, ImageCms.createProfile("LAB"))
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageError(
            f"{subject} uses the pixel format {mode}, which is not supported."
        ) from None


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """Scale high-bit-depth grey to 0..255 by its declared or evident range.

    16-bit modes are scaled by 255/65535. For 32-bit int and float images the range is not
    declared, so it is inferred: values in [0, 1] (float) or [0, 255] are taken as is, [0, 65535]
    as 16-bit, anything else is stretched from its minimum to its maximum.
    """
    if img.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        extrema = cast(tuple[float, float], img.convert("F").getextrema())  # one band
        lo, hi = (float(v) for v in extrema)
        if img.mode == "F" and 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif 0.0 <= lo and hi <= 255.0:
            lo, hi = 0.0, 255.0
        elif 0.0 <= lo and hi <= 65535.0:
            lo, hi = 0.0, 65535.0
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    # F -> L truncates and clips, so add 0.5 to round.
    return img.convert("F").point(lambda v: (v - lo) * scale + 0.5).convert("L")


def _converted(img: Image.Image | None) -> Image.Image:
    """ImageCms returns None only for in-place conversions, which are not used here."""
    assert img is not None
    return img


def _to_srgb(img: Image.Image, icc: bytes, subject: str) -> Image.Image:
    """Convert with the embedded profile if it matches the image's colour space.

    A broken or mismatched profile is ignored (and logged): the pixels are then taken as sRGB,
    which is what every browser does too.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s has an unreadable ICC profile, assuming sRGB: %s", subject, exc)
        return img
    space = profile.profile.xcolor_space.strip().upper()
    expected = {"L": "GRAY", "LA": "GRAY", "RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK"}[img.mode]
    if space != expected:
        log.warning("%s has a %s ICC profile on %s pixels; ignoring it.", subject, space, img.mode)
        return img
    alpha = img.getchannel("A") if img.mode in ("LA", "RGBA") else None
    base = img.convert({"LA": "L", "RGBA": "RGB"}.get(img.mode, img.mode)) if alpha else img
    try:
        out = _convert_profile(base, profile)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.warning("%s: ICC conversion failed, assuming sRGB: %s", subject, exc)
        return img
    if alpha is not None:
        out.putalpha(alpha)
    return out


def _convert_profile(
    img: Image.Image, profile: ImageCms.ImageCmsProfile | ImageCms.core.CmsProfile
) -> Image.Image:
    """``img`` from ``profile`` to sRGB, as a new RGB image."""
    out = ImageCms.profileToProfile(img, profile, _SRGB, outputMode="RGB")
    if out is None:  # Pillow returns None only for inPlace=True, which this never asks for
        raise ValueError("the colour conversion returned no image")
    return out


# ---- resizing --------------------------------------------------------------------------------
def fit_within(img: Image.Image, long_side: int, *, upscale: bool = False) -> Image.Image:
    """Resize (LANCZOS, aspect kept) so the longer side is ``long_side``; never enlarges unless
    ``upscale``. Returns a new image either way."""
    if long_side < 1:
        raise ValueError("long_side must be positive")
    width, height = img.size
    longest = max(width, height)
    if longest == long_side or (longest < long_side and not upscale):
        return img.copy()
    factor = long_side / longest
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS)


def flatten(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy with any alpha composited over ``background`` (for JPEG, which has no alpha)."""
    if img.mode not in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


# ---- print resolution ------------------------------------------------------------------------
def dpi_of(img: Image.Image) -> tuple[float, float] | None:
    """The print resolution the image's file declared (PNG pHYs, JFIF or EXIF, TIFF), or None.

    PNG stores pixels per metre, so 300 dpi reads back as 299.9994; two decimals undo that."""
    dpi = img.info.get("dpi")
    try:
        x, y = (round(float(v), 2) for v in dpi)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 else None


def with_dpi(img: Image.Image, dpi: tuple[float, float] | None) -> Image.Image:
    """``img`` marked with ``dpi`` for :func:`encode_image` (in place; returns it). Like GIMP's
    Scale Image, a painting at another pixel size keeps the photo's resolution, not its print
    size."""
    if dpi is not None:
        img.info["dpi"] = dpi
    return img


# ---- writing ---------------------------------------------------------------------------------
def format_for_path(path: str | os.PathLike[str]) -> str:
    """ "png", "jpeg" or "webp" from the file extension; ImageError for anything else.

    Front ends call this before a long job so a typo in ``-o`` fails at once.
    """
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in _WRITE_FORMATS:
        shown = f"'.{suffix}'" if suffix else "no extension"
        raise ImageError(
            f"Cannot save '{path}': {shown} is not a supported output type; "
            "use .png, .jpg or .webp."
        )
    return "jpeg" if suffix == "jpg" else suffix


def encode_image(
    img: Image.Image, fmt: str = "png", *, metadata: dict[str, Any] | None = None, quality: int = 95
) -> bytes:
    """Encode as PNG (metadata in an iTXt chunk), JPEG (RGB, alpha flattened on white; metadata
    in a comment) or WebP (alpha kept; no metadata). PNG and JPEG keep the print resolution
    :func:`dpi_of` finds (WebP has no field for it)."""
    key = fmt.lower().lstrip(".")
    if key not in _WRITE_FORMATS:
        raise ImageError(f"Cannot encode images as '{fmt}'; use png, jpeg or webp.")
    pil_format = _WRITE_FORMATS[key]
    text = None
    if metadata is not None:
        text = json.dumps(metadata, ensure_ascii=False, sort_keys=True, allow_nan=False)
    dpi = dpi_of(img)
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
    buf = io.BytesIO()
    resolution: dict[str, Any] = {"dpi": dpi} if dpi is not None else {}
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        if text is not None:
            info.add_itxt(METADATA_KEY, text)
        img.save(buf, "PNG", pnginfo=info, **resolution)
    elif pil_format == "JPEG":
        extra = {"comment": f"{METADATA_KEY}:{text}".encode()} if text is not None else {}
        flatten(img).save(buf, "JPEG", quality=quality, subsampling=0, **extra, **resolution)
    else:
        img.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def save_image(
    img: Image.Image, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> None:
    """Write by extension (.png, .jpg/.jpeg, .webp) atomically: an interrupted save never leaves
    a half-written file under ``path``."""
    fmt = format_for_path(path)
    data = encode_image(img, fmt, metadata=metadata)
    write_atomically(path, data)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    an interrupted save never leaves a half-written file under ``path``."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ImageError(f"Cannot save '{path}': the folder '{folder}' does not exist.")
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=folder, prefix=f".{target.name}.", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            tmp.write(data)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        raise ImageError(f"Cannot save '{path}': {_reason(exc)}.") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def read_metadata(source: bytes | str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON dict recorded by :func:`encode_image` (PNG or JPEG), or None if there is none."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "The image"
    else:
        where = f"The image '{source}'"
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageError(f"{where} could not be read: {_reason(exc)}.") from None
    try:
        with Image.open(io.BytesIO(data), formats=_READ_FORMATS) as img:
            if img.format == "PNG":
                # Our writer puts the chunk before the pixels; only look further (decoding
                # the image) when it is not there.
                text = img.info.get(METADATA_KEY)
                if text is None and img.width * img.height <= MAX_PIXELS:
                    text = img.text.get(METADATA_KEY)
            else:
                comment = img.info.get("comment", b"")
                prefix = f"{METADATA_KEY}:".encode()
                raw = comment if isinstance(comment, bytes) else comment.encode()
                text = raw[len(prefix) :].decode("utf-8") if raw.startswith(prefix) else None
    except (Image.UnidentifiedImageError, *_DECODE_ERRORS) as exc:
        raise ImageError(f"{where} could not be read ({_reason(exc)}).") from None
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
