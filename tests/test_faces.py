"""Face detection on a real photo (scikit-image's astronaut, Eileen Collins) and the soft mask
drawn over the faces at any size and over any part of the photo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

from core import faces

from .conftest import make_image

# Where the astronaut's face is in the 512 x 512 photo (eyebrows to mouth, cheek to cheek),
# read off the picture; a detection must overlap it by at least this much (IoU).
ASTRONAUT_FACE = (180, 75, 265, 160)
MIN_IOU = 0.5


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def corners(face: faces.Face, size: tuple[int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = face.box(*size)
    return x, y, x + w, y + h


def test_the_astronauts_face_is_found() -> None:
    found = faces.detect_faces(astronaut())
    assert len(found) == 1, found
    assert iou(corners(found[0], (512, 512)), ASTRONAUT_FACE) >= MIN_IOU


def test_boxes_map_back_to_the_original_resolution() -> None:
    """A 2048 px photo is searched at DETECT_SHORT_SIDE px; its boxes are in its own pixels."""
    big = astronaut().resize((2048, 2048), Image.Resampling.LANCZOS)
    (face,) = faces.detect_faces(big)
    expected = tuple(4 * v for v in ASTRONAUT_FACE)
    assert iou(corners(face, big.size), expected) >= MIN_IOU
    meta = faces.faces_metadata([face], big.size)
    assert meta["detector"] == faces.DETECTOR
    (box,) = meta["boxes"]
    assert box["width"] > 4 * 60 and box["x"] + box["width"] <= 2048


def test_a_face_in_a_wide_photo_keeps_its_place() -> None:
    wide = ImageOps.pad(astronaut(), (1536, 512), color=(90, 120, 150))  # photo at x 512..1024
    (face,) = faces.detect_faces(wide)
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert iou(corners(face, wide.size), (x0 + 512, y0, x1 + 512, y1)) >= MIN_IOU


@pytest.mark.parametrize(
    "photo",
    [
        pytest.param(lambda: Image.fromarray(data.coffee()), id="coffee"),
        pytest.param(lambda: Image.fromarray(data.chelsea()), id="cat"),
        pytest.param(lambda: Image.fromarray(data.rocket()), id="rocket"),
        pytest.param(lambda: make_image(320, 240, seed=5), id="noise"),
        pytest.param(lambda: make_image(20, 18, seed=5), id="tiny"),
    ],
)
def test_no_face_where_there_is_none(photo) -> None:
    assert faces.detect_faces(photo()) == []


def test_mask_is_one_on_the_face_and_zero_far_from_it() -> None:
    (face,) = faces.detect_faces(astronaut())
    mask = faces.face_mask([face], (512, 512))
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert mask[(y0 + y1) // 2, (x0 + x1) // 2] == 1.0  # between the eyes
    assert mask[400:, :].max() == 0.0 and mask[:, :100].max() == 0.0  # suit, flag
    assert 0.0 < mask.min() + mask.mean() < 0.1  # a face, not the picture
    # Feathered: values strictly between 0 and 1 around the face, no hard edge.
    ring = (mask > 0) & (mask < 1)
    assert ring.sum() > 0.3 * (mask == 1).sum()


def test_mask_follows_any_scale_and_tile() -> None:
    face = faces.Face(0.25, 0.2, 0.3, 0.4)
    whole = faces.face_mask([face], (400, 300))
    half = faces.face_mask([face], (200, 150))
    # The same mask at half size: the mean of each 2x2 block, up to sampling of the edge.
    pooled = whole.reshape(150, 2, 200, 2).mean(axis=(1, 3))
    assert np.abs(pooled - half).max() < 0.05
    # A tile (the right half, bottom two thirds) is exactly that crop of the whole mask.
    tile = faces.face_mask([face], (200, 200), region=(0.5, 1 / 3, 1.0, 1.0))
    assert np.abs(tile - whole[100:, 200:]).max() < 1e-5
    assert faces.face_mask([], (30, 20)).max() == 0.0


def test_keep_faces_moves_the_content_to_style_ratio_by_the_strength_scale() -> None:
    """10x per 0.5, as Settings.strength: half on the content weight, half on the style's."""
    for keep, ratio in ((0.0, 1.0), (0.5, 10.0), (1.0, 100.0)):
        assert faces.content_factor(keep) / faces.style_factor(keep) == pytest.approx(ratio)
        assert faces.content_factor(keep) * faces.style_factor(keep) == pytest.approx(1.0)
