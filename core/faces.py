"""Finding faces in the content photo and drawing soft masks over them (torch-free).

The engine keeps faces recognisable by raising the content weight under a soft mask (see
``Settings.keep_faces`` and ``core.engine.losses.MaskedContentLoss``); this module only finds
the faces and draws that mask, at any size and over any part of the image, so the same faces
serve every pyramid scale and every tile.

The detector is the LBP frontal-face cascade that ships inside scikit-image
(``skimage.data.lbp_frontal_face_cascade_filename()``, trained by OpenCV), run by
``skimage.feature.Cascade``: nothing is downloaded at run time. OpenCV 5's wheels no longer
ship Haar cascades or ``CascadeClassifier`` (both moved out of the main package), and its
YuNet detector needs an ONNX model that no wheel bundles, so the cascade that does ship is
this one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DETECTOR = "scikit-image LBP frontal-face cascade"
"""Named in the output metadata next to the boxes it found."""
MIN_FACE = 0.08
"""Smallest face searched for, as a fraction of the photo's short side. A smaller face covers
fewer than two conv4_2 positions at the default 512 px output (1/8 resolution), too few for
the content term to hold it, and the cascade's false positives are mostly small."""
DETECT_SHORT_SIDE = 320
"""Photos are searched with their short side at most this long: a MIN_FACE face is then still
the cascade's 24 px window, a selfie's face 100-300 px, and a 48-megapixel photo takes as long
as a small one. Boxes are mapped back to the original resolution."""
SCALE_STEP, WINDOW_STEP = 1.1, 1.25
"""Window sizes grow 10 % per step and windows move by 1.25x the cascade's stride
(scikit-image's advice: 1 to 1.5); with the smaller search size above, 1.2-1.7x faster than an
exhaustive search of a 640 px copy, with the same results on the images listed below."""
MIN_NEIGHBOURS = 8
"""Overlapping raw detections needed to accept one (scikit-image's default is 4). At 4 the
astronaut photo gets three false faces and the retina image one; at 8 the astronaut's face is
still found upright, rotated by 10 degrees, at half and double size, darker, brighter, with
less contrast, mirrored, padded to 2:1 and cropped to a selfie, and none of scikit-image's
other sample images (coffee, chelsea, camera, rocket, coins, page, retina, hubble,
immunohistochemistry) nor textured noise gets a face."""
MAX_FACES = 8
"""The largest faces kept (a group photo); more would make the mask cover most of the image."""

# The cascade's box runs from the eyebrows to just below the mouth; a face with its forehead
# and chin is an ellipse about 1.1 box widths wide and 1.45 box heights tall, a little lower.
_ELLIPSE_WIDTH = 1.1
_ELLIPSE_HEIGHT = 1.45
_ELLIPSE_DROP = 0.08
_FEATHER = 0.25
"""The mask falls from 1 to 0 between elliptical radius 1 - _FEATHER and 1 + _FEATHER, so
the content term fades out over the hairline, ears and neck instead of leaving a seam."""


@dataclass(frozen=True)
class Face:
    """One detected face as fractions of the photo (0..1), so it holds at any resolution."""

    x: float
    y: float
    width: float
    height: float

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) in pixels of an image of this size."""
        left, top = round(self.x * width), round(self.y * height)
        return left, top, round(self.width * width), round(self.height * height)

    def to_dict(self, width: int, height: int) -> dict[str, int]:
        """Pixel box for metadata (``x``, ``y``, ``width``, ``height``)."""
        left, top, w, h = self.box(width, height)
        return {"x": left, "y": top, "width": w, "height": h}


@lru_cache(maxsize=1)
def _cascade() -> Any:
    """The cascade, loaded once per process (scikit-image imports SciPy: about 0.3 s)."""
    from skimage import data
    from skimage.feature import Cascade

    return Cascade(data.lbp_frontal_face_cascade_filename())


def detect_faces(photo: Image.Image, *, max_faces: int = MAX_FACES) -> list[Face]:
    """Faces in ``photo`` (upright, any mode), largest first.

    The search runs on a copy whose short side is at most ``DETECT_SHORT_SIDE``; the boxes are
    fractions of the photo, so they map back to its original resolution (and to any other).
    """
    grey = photo.convert("L")
    scale = min(1.0, DETECT_SHORT_SIDE / min(grey.size))
    if scale < 1.0:
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.BOX)
    width, height = grey.size
    short = min(width, height)
    smallest = max(24, round(MIN_FACE * short))
    if short < smallest:
        return []
    pixels = np.asarray(grey, dtype=np.float32) / 255.0
    found = _cascade().detect_multi_scale(
        img=pixels,
        scale_factor=SCALE_STEP,
        step_ratio=WINDOW_STEP,
        min_size=(smallest, smallest),
        max_size=(short, short),
        min_neighbor_number=MIN_NEIGHBOURS,
    )
    faces = [
        Face(d["c"] / width, d["r"] / height, d["width"] / width, d["height"] / height)
        for d in found
    ]
    faces.sort(key=lambda f: f.width * f.height, reverse=True)
    log.debug("found %d face(s) in a %dx%d photo", len(faces), photo.width, photo.height)
    return faces[:max_faces]


def face_mask(
    faces: Sequence[Face],
    size: tuple[int, int],
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> np.ndarray:
    """A soft mask (float32, ``(height, width)``, values in [0, 1]) over ``faces``.

    ``size`` is the (width, height) in pixels to draw at; ``region`` the part of the photo it
    covers as fractions (left, top, right, bottom), so a tile of a larger painting gets the
    same mask as the corresponding crop of the whole one. Each face is a feathered ellipse
    (forehead to chin); where faces overlap the larger value wins.
    """
    width, height = size
    left, top, right, bottom = region
    # Pixel centres in photo fractions.
    xs = left + (np.arange(width, dtype=np.float64) + 0.5) * (right - left) / width
    ys = top + (np.arange(height, dtype=np.float64) + 0.5) * (bottom - top) / height
    mask = np.zeros((height, width), dtype=np.float64)
    for face in faces:
        cx = face.x + face.width / 2
        cy = face.y + face.height * (0.5 + _ELLIPSE_DROP)
        ax = face.width * _ELLIPSE_WIDTH / 2
        ay = face.height * _ELLIPSE_HEIGHT / 2
        radius = np.sqrt(((xs[None, :] - cx) / ax) ** 2 + ((ys[:, None] - cy) / ay) ** 2)
        t = np.clip((1 + _FEATHER - radius) / (2 * _FEATHER), 0.0, 1.0)
        np.maximum(mask, t * t * (3 - 2 * t), out=mask)  # smoothstep: no kink at either end
    return mask.astype(np.float32)


def faces_metadata(faces: Sequence[Face], size: tuple[int, int]) -> dict[str, Any]:
    """What the output's metadata says about faces: the detector and each box in pixels of an
    image of ``size`` (the painting)."""
    width, height = size
    return {"detector": DETECTOR, "boxes": [f.to_dict(width, height) for f in faces]}


def content_factor(keep_faces: float) -> float:
    """Factor on the content weight inside a face: 10x per unit of ``keep_faces``."""
    return math.pow(10.0, keep_faces)


def style_factor(keep_faces: float) -> float:
    """Factor on the style weight inside a face: 1/10 per unit of ``keep_faces``.

    With :func:`content_factor`, the content-to-style ratio inside a face grows 10x per 0.5,
    the scale ``Settings.strength`` uses, so ``keep_faces`` lowers the strength inside faces by
    itself; half of it is taken on each side because lowering the style weight there (guided
    Gram matrices) keeps the face's photo-like statistics out of the style term, so the rest of
    the painting need not over-paint to make up for them.
    """
    return math.pow(10.0, -keep_faces)
