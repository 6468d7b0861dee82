"""The plug-in in a real GIMP 3: installed by our installer into a Debian trixie chroot (built by
``.ci/gimp-chroot.sh``), called NONINTERACTIVE from ``gimp-console-3.0`` in batch mode, and
served by a real helper on the host's loopback (the chroot shares it) with a random-weight
checkpoint. The batch script reports what it saw and exports the new layers; the host checks
them. Skipped, with the reason, where the chroot or root is missing, except under CI (``CI``
set, as ``.ci/run`` does), where a test that cannot run is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from .conftest import make_image

CHROOT = Path(os.environ.get("PASTICHE_GIMP_CHROOT", "/var/tmp/pastiche-gimp-chroot"))
GIMP = "gimp-console-3.0"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the GIMP chroot test runs on Linux only"
    if not (CHROOT / "usr" / "bin" / GIMP).exists():
        return f"no GIMP chroot at {CHROOT} (build it with .ci/gimp-chroot.sh)"
    if os.geteuid() != 0:
        return "entering the GIMP chroot needs root"
    return None


# Runs inside GIMP (python-fu-eval). Paths are inside the chroot; WORK is filled in below.
BATCH = r"""
import json, traceback
from gi.repository import Gimp, Gio

WORK = "@WORK@"
NONINTERACTIVE = Gimp.RunMode.NONINTERACTIVE
report = {"runs": {}}


def export(layer, name):
    img = Gimp.Image.new(layer.get_width(), layer.get_height(), Gimp.ImageBaseType.RGB)
    copy = Gimp.Layer.new_from_drawable(layer, img)
    img.insert_layer(copy, None, 0)
    copy.set_offsets(0, 0)
    if copy.get_mask() is not None:  # the painting itself, not what the mask lets through
        copy.remove_mask(Gimp.MaskApplyMode.DISCARD)
    Gimp.file_save(NONINTERACTIVE, img, Gio.File.new_for_path(WORK + "/" + name), None)
    img.delete()


def above(image, layer):
    layers = image.get_layers()
    return layers[layers.index(layer) - 1]


def describe(layer):
    _, x, y = layer.get_offsets()
    return {"name": layer.get_name(), "size": [layer.get_width(), layer.get_height()],
            "offsets": [x, y], "mask": layer.get_mask() is not None}


def mask_values(layer):
    mask = layer.get_mask()
    return [[round(mask.get_pixel(x, y).get_rgba()[0], 3) for x in range(mask.get_width())]
            for y in range(mask.get_height())]


def call(image, layer, **args):
    proc = Gimp.get_pdb().lookup_procedure("plug-in-pastiche")
    config = proc.create_config()
    config.set_property("run-mode", NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [layer])
    for key, value in args.items():
        config.set_property(key, value)
    result = proc.run(config)
    status = result.index(0)
    out = {"status": status.value_nick, "layers": [describe(l) for l in image.get_layers()]}
    if status != Gimp.PDBStatusType.SUCCESS:
        error = result.index(1)
        out["error"] = getattr(error, "message", None) or str(error)
    return out


try:
    report["registered"] = Gimp.get_pdb().lookup_procedure("plug-in-pastiche") is not None
    image = Gimp.Image.new(96, 72, Gimp.ImageBaseType.RGB)
    source = Gimp.file_load_layer(NONINTERACTIVE, image, Gio.File.new_for_path(WORK + "/photo.png"))
    source.set_name("photo")
    image.insert_layer(source, None, 0)
    source.set_offsets(8, 6)
    style = Gio.File.new_for_path(WORK + "/starry_night.png")
    common = {"strength": 0.9, "size": 48, "quality": "draft", "keep-faces": 0.8}

    run = call(image, source, **{"style-file": style}, **common)  # resolution "auto": full
    report["runs"]["whole"] = run
    if run["status"] == "success":
        export(above(image, source), "whole.png")

    run = call(image, source, **{"style-file": style}, resolution="size", **common)
    report["runs"]["scaled"] = run
    if run["status"] == "success":
        export(above(image, source), "scaled.png")

    image.select_ellipse(Gimp.ChannelOps.REPLACE, 20, 16, 32, 24)
    Gimp.Selection.feather(image, 8.0)
    report["selection_bounds"] = list(Gimp.Selection.bounds(image))[2:]
    run = call(image, source, **{"style-file": style}, **common)
    report["runs"]["selection"] = run
    if run["status"] == "success":
        export(above(image, source), "selection.png")
        report["mask"] = mask_values(above(image, source))
    Gimp.Selection.none(image)
    export(source, "source.png")

    report["runs"]["no_style"] = call(image, source, **common)
    report["runs"]["bad_preset"] = call(image, source, preset="nonesuch", **common)
    report["runs"]["no_helper"] = call(image, source, **{"style-file": style,
        "helper-url": "http://127.0.0.1:9", "helper-token": "x"}, **common)
    image.delete()
except Exception:
    report["exception"] = traceback.format_exc()
with open(WORK + "/report.json", "w") as fh:
    json.dump(report, fh)
"""


@pytest.fixture
def chroot_work(vgg19_checkpoint: Path) -> Iterator[tuple[Path, str]]:
    """Plug-in installed into the chroot, helper running on the host, a work folder."""
    reason = _why_not()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the GIMP end-to-end test, but {reason}")
    if reason:
        pytest.skip(reason)
    inside = f"/tmp/pastiche-e2e-{uuid.uuid4().hex[:8]}"
    work = CHROOT / inside.lstrip("/")
    work.mkdir(parents=True)
    # GIMP's configuration (and so the plug-in) lives under this run's own HOME: the chroot is
    # shared, and runs on other branches install their own plug-in at the same time.
    plugins = work / "home/.config/GIMP/3.0/plug-ins"
    disc_inside = f"{inside}/helper.json"
    install = [
        sys.executable,
        "-m",
        "core",
        "gimp",
        "install",
        "--dest",
        str(plugins),
        "--no-autostart",
        "--discovery-file",
        disc_inside,
    ]
    subprocess.run(install, cwd=ROOT, check=True, capture_output=True, timeout=120)
    helper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "core",
            "helper",
            "--discovery-file",
            str(work / "helper.json"),
            "--weights",
            str(vgg19_checkpoint),
            "--device",
            "cpu",
            "--idle-exit",
            "600",
            "--log-file",
            str(work / "helper.log"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(1200):
            if (work / "helper.json").exists() or helper.poll() is not None:
                break
            time.sleep(0.1)
        assert (work / "helper.json").exists(), (
            helper.stderr.read().decode() if helper.poll() else ""
        )
        yield work, inside
    finally:
        helper.send_signal(signal.SIGTERM)
        try:
            helper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        shutil.rmtree(work, ignore_errors=True)


def _run_gimp(inside: str) -> subprocess.CompletedProcess[str]:
    command = [
        "chroot",
        str(CHROOT),
        "/usr/bin/env",
        "-i",
        f"HOME={inside}/home",
        "PATH=/usr/bin:/bin",
        "LANG=C.UTF-8",
        GIMP,
        "-i",
        "--quit",
        "--batch-interpreter=python-fu-eval",
        "-b",
        f"exec(open('{inside}/batch.py').read())",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=500)


def test_plugin_paints_a_new_layer_in_real_gimp(chroot_work: tuple[Path, str]) -> None:
    work, inside = chroot_work
    make_image(64, 48, seed=21).save(work / "photo.png")
    make_image(40, 40, seed=22).save(work / "starry_night.png")
    (work / "batch.py").write_text(BATCH.replace("@WORK@", inside), encoding="utf-8")

    proc = _run_gimp(inside)
    log = f"GIMP output:\n{proc.stdout}\n{proc.stderr}"
    assert (work / "report.json").exists(), log
    report = json.loads((work / "report.json").read_text())
    assert "exception" not in report, report["exception"] + log
    assert report["registered"], log
    runs = report["runs"]

    whole = runs["whole"]
    assert whole["status"] == "success", f"{whole}\n{log}"
    top, photo = whole["layers"][:2]
    assert top == {
        "name": "Pastiche: starry_night", "size": [64, 48], "offsets": [8, 6], "mask": False
    }  # fmt: skip
    assert photo["name"] == "photo" and len(whole["layers"]) == 2

    scaled = runs["scaled"]
    assert scaled["status"] == "success", f"{scaled}\n{log}"
    assert scaled["layers"][0] == top  # each new layer goes right above the source
    assert scaled["layers"][1] == {**top, "name": "Pastiche: starry_night #1"}
    # Full resolution painted the 64x48 layer at its own size; "size" painted 48 px and GIMP
    # scaled it up (the helper logs the size of every job it accepts).
    helper_log = (work / "helper.log").read_text(encoding="utf-8")
    sizes = re.findall(r"accepted \(starry_night, \d+ bytes of content, size (\d+),", helper_log)
    assert sizes[:2] == ["64", "48"] and len(sizes) == 3, helper_log

    part = runs["selection"]
    assert part["status"] == "success", f"{part}\n{log}"
    assert part["layers"][:2] == scaled["layers"][:2]
    new = part["layers"][2]
    assert new["name"] == "Pastiche: starry_night #2"  # GIMP keeps layer names unique
    x0, y0, x1, y1 = report["selection_bounds"]  # the feathered ellipse's bounds
    assert (new["size"], new["offsets"]) == ([x1 - x0, y1 - y0], [x0, y0])
    assert sizes[2] == str(max(x1 - x0, y1 - y0))  # the selection's bounds at full resolution
    assert new["mask"] and part["layers"][3]["name"] == "photo"
    _check_selection_mask(report["mask"], (x0, y0, x1, y1))

    source = Image.open(work / "source.png").convert("RGB")
    painted = Image.open(work / "whole.png").convert("RGB")
    assert painted.size == source.size == (64, 48)
    diff = ImageChops.difference(painted, source)
    # Eight draft steps with random weights move pixels only a little at the layer's own size
    # (max 11 levels measured); the photo unchanged would differ by 0.
    assert max(high for _, high in diff.getextrema()) > 5, "the new layer is the photo unchanged"
    assert Image.open(work / "scaled.png").size == (64, 48)
    crop = Image.open(work / "selection.png").convert("RGB")
    assert crop.size == (x1 - x0, y1 - y0)
    box = (x0 - 8, y0 - 6, x1 - 8, y1 - 6)  # image -> source layer coordinates
    assert ImageChops.difference(crop, source.crop(box)).getbbox() is not None

    # The dialog's Keep faces value reached the helper with each job.
    accepted = [
        line for line in (work / "helper.log").read_text().splitlines() if "accepted" in line
    ]
    assert len(accepted) == 3 and all("keep_faces=0.8" in line for line in accepted), accepted

    for name, expected in (
        ("no_style", "Choose a style image"),
        ("bad_preset", "no style preset called 'nonesuch'"),
        ("no_helper", "Cannot reach the Pastiche helper at http://127.0.0.1:9 ("),
    ):
        run = runs[name]
        assert run["status"] == "execution-error", f"{name}: {run}"
        assert expected in run["error"], f"{name}: {run}"
        assert len(run["layers"]) == 4, f"{name} added a layer: {run}"


def _check_selection_mask(mask: list[list[float]], bounds: tuple[int, int, int, int]) -> None:
    """The layer mask is the feathered ellipse selection: opaque at its centre, clear in the
    bounds' corners (outside the ellipse), and soft in between."""
    x0, y0, x1, y1 = bounds
    assert (len(mask[0]), len(mask)) == (x1 - x0, y1 - y0)
    centre = mask[(16 + 12) - y0][(20 + 16) - x0]  # the ellipse (20, 16, 32, 24)'s centre
    corners = [mask[0][0], mask[0][-1], mask[-1][0], mask[-1][-1]]
    soft = sum(0.05 < v < 0.95 for row in mask for v in row)
    assert centre > 0.95 and max(corners) < 0.05, (centre, corners)
    assert soft >= 2 * ((x1 - x0) + (y1 - y0)), f"only {soft} partly selected pixels: not feathered"


# Runs inside GIMP: a 3-frame GIF opened as GIMP opens it (indexed, one layer per frame, delays
# in the layer names) painted into a new image; then a 3-layer RGB image painted in place.
ANIMATION_BATCH = r"""
import json, traceback
from gi.repository import Gimp, Gio

WORK = "@WORK@"
NONINTERACTIVE = Gimp.RunMode.NONINTERACTIVE
report = {}


def export(layer, name):
    img = Gimp.Image.new(layer.get_width(), layer.get_height(), Gimp.ImageBaseType.RGB)
    copy = Gimp.Layer.new_from_drawable(layer, img)
    img.insert_layer(copy, None, 0)
    copy.set_offsets(0, 0)
    Gimp.file_save(NONINTERACTIVE, img, Gio.File.new_for_path(WORK + "/" + name), None)
    img.delete()


def names(image):
    return [l.get_name() for l in image.get_layers()]


def call(image, **args):
    proc = Gimp.get_pdb().lookup_procedure("plug-in-pastiche-animation")
    config = proc.create_config()
    config.set_property("run-mode", NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [image.get_layers()[0]])
    for key, value in args.items():
        config.set_property(key, value)
    result = proc.run(config)
    status = result.index(0)
    out = {"status": status.value_nick}
    if status != Gimp.PDBStatusType.SUCCESS:
        error = result.index(1)
        out["error"] = getattr(error, "message", None) or str(error)
        return out, None
    return out, result.index(1)


try:
    report["registered"] = (
        Gimp.get_pdb().lookup_procedure("plug-in-pastiche-animation") is not None
    )
    style = Gio.File.new_for_path(WORK + "/starry_night.png")
    common = dict(strength=0.9, size=48, quality="draft")
    clip = Gimp.file_load(NONINTERACTIVE, Gio.File.new_for_path(WORK + "/clip.gif"))
    report["gif"] = {"base": clip.get_base_type().value_nick, "layers": names(clip)}
    run, painted = call(clip, **{"style-file": style}, **common)
    report["new_image"] = run
    if painted is not None:
        run["layers"] = names(painted)
        run["size"] = [painted.get_width(), painted.get_height()]
        for i, layer in enumerate(reversed(painted.get_layers())):
            export(layer, "new-%d.png" % i)
        painted.delete()
    report["source_untouched"] = names(clip)

    image = Gimp.Image.new(64, 48, Gimp.ImageBaseType.RGB)
    for i in range(3):
        layer = Gimp.file_load_layer(
            NONINTERACTIVE, image, Gio.File.new_for_path(WORK + "/frame-%d.png" % i)
        )
        layer.set_name("Frame %d (120ms)" % (i + 1))
        image.insert_layer(layer, None, 0)
    run, painted = call(image, **{"style-file": style, "new-image": False}, **common)
    run["layers"] = names(image)
    run["returned_image"] = painted is not None
    report["in_place"] = run
    single = Gimp.Image.new(32, 32, Gimp.ImageBaseType.RGB)
    single.insert_layer(Gimp.Layer.new(single, "only", 32, 32, Gimp.ImageType.RGB_IMAGE, 100,
                                       Gimp.LayerMode.NORMAL), None, 0)
    report["one_frame"] = call(single, **{"style-file": style}, **common)[0]
    single.delete()
    image.delete()
    clip.delete()
except Exception:
    report["exception"] = traceback.format_exc()
with open(WORK + "/report.json", "w") as fh:
    json.dump(report, fh)
"""


def test_animation_procedure_paints_every_layer_in_real_gimp(
    chroot_work: tuple[Path, str],
) -> None:
    from core.animation import Animation, encode_animation

    from .test_animation import moving_frames

    work, inside = chroot_work
    frames = moving_frames(3, (64, 48))
    (work / "clip.gif").write_bytes(encode_animation(Animation(frames, [80, 90, 100]), "gif"))
    for i, frame in enumerate(frames):
        frame.save(work / f"frame-{i}.png")
    make_image(40, 40, seed=22).save(work / "starry_night.png")
    (work / "batch.py").write_text(ANIMATION_BATCH.replace("@WORK@", inside), encoding="utf-8")

    proc = _run_gimp(inside)
    log = f"GIMP output:\n{proc.stdout}\n{proc.stderr}"
    assert (work / "report.json").exists(), log
    report = json.loads((work / "report.json").read_text())
    assert "exception" not in report, report["exception"] + log
    assert report["registered"], log
    # GIMP opened the GIF as an indexed image, one layer per frame, last frame on top.
    assert report["gif"]["base"] == "indexed" and len(report["gif"]["layers"]) == 3

    new = report["new_image"]
    assert new["status"] == "success", f"{new}\n{log}"
    assert new["size"] == [64, 48]
    assert new["layers"] == [  # top to bottom: the first frame at the bottom, as it came
        f"Pastiche: starry_night frame {i} ({ms}ms)" for i, ms in ((3, 100), (2, 90), (1, 80))
    ]
    assert report["source_untouched"] == report["gif"]["layers"]
    painted = [Image.open(work / f"new-{i}.png").convert("RGB") for i in range(3)]
    for frame, result in zip(frames, painted, strict=True):
        assert result.size == (64, 48)
        diff = ImageChops.difference(result, frame)
        assert max(high for _, high in diff.getextrema()) > 30, "a frame came back unpainted"
    assert ImageChops.difference(painted[0], painted[2]).getbbox() is not None

    in_place = report["in_place"]
    assert in_place["status"] == "success", f"{in_place}\n{log}"
    assert not in_place["returned_image"]
    # Each painted frame right above its source layer.
    assert in_place["layers"] == [
        "Pastiche: starry_night frame 3 (120ms)", "Frame 3 (120ms)",
        "Pastiche: starry_night frame 2 (120ms)", "Frame 2 (120ms)",
        "Pastiche: starry_night frame 1 (120ms)", "Frame 1 (120ms)",
    ]  # fmt: skip
    one = report["one_frame"]
    assert one["status"] == "execution-error" and "at least two layers" in one["error"]
