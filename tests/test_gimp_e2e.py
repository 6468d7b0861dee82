"""The plug-in in a real GIMP 3: installed by our installer into a Debian trixie chroot (built by
``.ci/gimp-chroot.sh``), called NONINTERACTIVE from ``gimp-console-3.0`` in batch mode, and
served by a real helper on the host's loopback (the chroot shares it) with a random-weight
checkpoint. The batch script reports what it saw and exports the new layers; the host checks
them. Skipped, with the reason, where the chroot or root is missing.
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
    common = dict(strength=0.9, size=48, quality="draft")

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
    if reason:
        pytest.skip(reason)
    inside = f"/tmp/pastiche-e2e-{uuid.uuid4().hex[:8]}"
    work = CHROOT / inside.lstrip("/")
    work.mkdir(parents=True)
    # A GIMP home of its own: the chroot is shared, and so would /root's plug-ins folder be.
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
    assert re.findall(r"accepted \(starry_night, \d+ bytes of content, size (\d+)\)", helper_log)[
        :2
    ] == ["64", "48"], helper_log

    part = runs["selection"]
    assert part["status"] == "success", f"{part}\n{log}"
    assert part["layers"][:2] == scaled["layers"][:2]
    new = part["layers"][2]
    assert new["name"] == "Pastiche: starry_night #2"  # GIMP keeps layer names unique
    x0, y0, x1, y1 = report["selection_bounds"]  # the feathered ellipse's bounds
    assert (new["size"], new["offsets"]) == ([x1 - x0, y1 - y0], [x0, y0])
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
