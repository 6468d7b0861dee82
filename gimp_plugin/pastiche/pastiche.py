#!/usr/bin/env python3
"""Pastiche for GIMP 3: paint the active layer (or the selected part of it) in the style of a
painting, as a new layer above it; or paint every layer of an animation (GIMP holds one frame
per layer, the bottom layer first) with each frame following the last along the motion. The
work is done by the local Pastiche helper (``pastiche helper``), which this plug-in finds or
starts; see pastiche_client.py.

Filters > Artistic > Pastiche… and Pastiche Animation…  Also callable from scripts as
``plug-in-pastiche`` and ``plug-in-pastiche-animation``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from typing import TYPE_CHECKING

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
from gi.repository import Gimp, GimpUi, Gio, GLib, GObject  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if TYPE_CHECKING:  # the type checker knows the client by its package; GIMP runs this folder
    from gimp_plugin.pastiche import pastiche_client as client
else:
    import pastiche_client as client

PROC_NAME = "plug-in-pastiche"
ANIMATION_PROC = "plug-in-pastiche-animation"
RESOLUTION_LABELS = {  # client.RESOLUTIONS, as the dialog shows them
    "auto": "Full resolution up to the helper's limit",
    "full": "Full resolution",
    "size": "Output size, scaled to the layer",
}
SHARED_DIALOG_ARGS = [
    "style-file", "preset", "strength", "keep-faces", "size", "quality", "preserve-colors",
]  # fmt: skip
DIALOG_ARGS = [*SHARED_DIALOG_ARGS[:4], "resolution", *SHARED_DIALOG_ARGS[4:]]
ANIMATION_DIALOG_ARGS = [*SHARED_DIALOG_ARGS, "new-image"]


def _fail(procedure, message: str):
    # GIMP shows a returned error itself ("Execution error for 'Pastiche…'") when the user
    # ran the filter, and hands it to the caller otherwise; a Gimp.message would repeat it.
    return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(message))


def _export_region(image, drawable, folder: str):
    """Save the drawable's pixels inside the selection bounds as an 8-bit PNG in ``folder``.

    Returns (path, x, y, width, height) with x, y relative to the drawable."""
    non_empty, x, y, width, height = drawable.mask_intersect()
    if not non_empty or width < 1 or height < 1:
        raise client.HelperError("The selection does not cover any part of the active layer.")
    tmp_image = Gimp.Image.new(drawable.get_width(), drawable.get_height(), image.get_base_type())
    try:
        layer = Gimp.Layer.new_from_drawable(drawable, tmp_image)
        tmp_image.insert_layer(layer, None, 0)
        layer.set_offsets(0, 0)
        layer.set_opacity(100.0)
        layer.set_visible(True)
        tmp_image.crop(width, height, x, y)
        if tmp_image.get_precision() != Gimp.Precision.U8_NON_LINEAR:
            tmp_image.convert_precision(Gimp.Precision.U8_NON_LINEAR)
        path = os.path.join(folder, "content.png")
        ok = Gimp.file_save(
            Gimp.RunMode.NONINTERACTIVE, tmp_image, Gio.File.new_for_path(path), None
        )
        if not ok or not os.path.exists(path):
            raise client.HelperError("GIMP could not export the layer to send it to Pastiche.")
    finally:
        tmp_image.delete()
    return path, x, y, width, height


def _style_source(config):
    """(style bytes or None, style name, preset name) from the procedure's arguments."""
    preset = (config.get_property("preset") or "").strip()
    gfile = config.get_property("style-file")
    path = gfile.get_path() if gfile is not None else None
    if path:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise client.HelperError(
                f"Cannot read the style image {path}: {exc.strerror or exc}."
            ) from None
        return data, os.path.splitext(os.path.basename(path))[0], ""
    if preset:
        return None, preset, preset
    raise client.HelperError("Choose a style image or the name of a style preset.")


def _progress(fraction: float, text: str) -> None:
    Gimp.progress_set_text(text)
    Gimp.progress_update(fraction)


def _paint(procedure, image, drawables, config):
    if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer):
        raise client.HelperError("Select exactly one layer for Pastiche to paint.")
    drawable = drawables[0]
    if drawable.is_group():
        raise client.HelperError("Pastiche cannot paint a layer group; select a single layer.")
    style, style_name, preset = _style_source(config)
    helper = _connect(config)
    folder = tempfile.mkdtemp(prefix="pastiche-gimp-")
    try:
        path, x, y, width, height = _export_region(image, drawable, folder)
        with open(path, "rb") as fh:
            content = fh.read()
        size = client.paint_size(
            config.get_property("resolution"),
            config.get_property("size"),
            width,
            height,
            helper.health().get("max_size"),
        )
        settings = _settings(config, size)
        png, label = client.run_job(
            helper,
            content,
            style=style,
            style_name=style_name,
            preset=preset,
            settings=settings,
            quality=config.get_property("quality"),
            on_progress=_progress,
        )
        result_path = os.path.join(folder, "result.png")
        with open(result_path, "wb") as fh:
            fh.write(png)
        Gimp.progress_set_text("Pastiche: adding the new layer…")
        _add_layer(image, drawable, result_path, f"Pastiche: {label}", (x, y, width, height))
        Gimp.progress_end()
        Gimp.displays_flush()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _add_layer(image, drawable, path: str, name: str, region) -> None:
    """The painting as a new layer above ``drawable`` over ``region`` (x, y, width, height
    relative to it), masked by the selection if there is one (feathering kept), in one undo
    step."""
    x, y, width, height = region
    image.undo_group_start()
    try:
        layer = Gimp.file_load_layer(
            Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(path)
        )
        layer.set_name(name)
        image.insert_layer(layer, drawable.get_parent(), image.get_item_position(drawable))
        if (layer.get_width(), layer.get_height()) != (width, height):
            layer.scale(width, height, False)  # painted at the Output size: scaled to the region
        _, off_x, off_y = drawable.get_offsets()
        layer.set_offsets(off_x + x, off_y + y)
        if not Gimp.Selection.is_empty(image):
            # Only the selected part shows painted, as with GIMP's own filters.
            layer.add_mask(layer.create_mask(Gimp.AddMaskType.SELECTION))
    finally:
        image.undo_group_end()


def _connect(config):
    Gimp.progress_init("Pastiche: connecting to the helper…")
    return client.connect(
        url=config.get_property("helper-url") or "",
        token=config.get_property("helper-token") or "",
        config=client.load_config(),
        on_wait=_progress,
    )


def _settings(config, size=None):
    return client.job_settings(
        config.get_property("strength"),
        config.get_property("size") if size is None else size,
        config.get_property("preserve-colors"),
        config.get_property("keep-faces"),
    )


def _export_frames(image, folder: str):
    """Each layer, bottom first, as a PNG the size of the canvas (layers keep their offsets;
    indexed GIFs and high bit depths become 8-bit RGB). Returns (paths, durations in ms)."""
    layers = list(reversed(image.get_layers()))
    if len(layers) < 2:
        raise client.HelperError("An animation needs at least two layers, one per frame.")
    if any(layer.is_group() for layer in layers):
        raise client.HelperError(
            "Pastiche paints one layer per frame and cannot paint layer groups; merge each "
            "group into one layer first."
        )
    copy = image.duplicate()
    try:
        copy.undo_disable()
        if copy.get_base_type() != Gimp.ImageBaseType.RGB:
            copy.convert_rgb()
        if copy.get_precision() != Gimp.Precision.U8_NON_LINEAR:
            copy.convert_precision(Gimp.Precision.U8_NON_LINEAR)
        paths = [
            _export_canvas(copy, layer, os.path.join(folder, f"frame-{i:04d}.png"))
            for i, layer in enumerate(reversed(copy.get_layers()))
        ]
    finally:
        copy.delete()
    return paths, [client.frame_duration(layer.get_name()) for layer in layers]


def _export_canvas(image, layer, path: str) -> str:
    frame = Gimp.Image.new(image.get_width(), image.get_height(), Gimp.ImageBaseType.RGB)
    try:
        copy = Gimp.Layer.new_from_drawable(layer, frame)
        frame.insert_layer(copy, None, 0)
        _, x, y = layer.get_offsets()
        copy.set_offsets(x, y)
        copy.set_opacity(100.0)
        copy.set_visible(True)
        copy.resize_to_image_size()
        ok = Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, frame, Gio.File.new_for_path(path), None)
        if not ok or not os.path.exists(path):
            raise client.HelperError("GIMP could not export a frame to send it to Pastiche.")
    finally:
        frame.delete()
    return path


def _add_frames(target, pngs, durations, label, folder, anchors=None):
    """Load each painted frame as a layer of ``target``, scaled to its canvas, named as GIMP's
    animation export expects ("... (100ms)"). With ``anchors`` each goes right above its
    source layer; else the first frame at the bottom, the last on top."""
    width, height = target.get_width(), target.get_height()
    layers = []
    for i, (png, ms) in enumerate(zip(pngs, durations, strict=True), 1):
        path = os.path.join(folder, f"painted-{i:04d}.png")
        with open(path, "wb") as fh:
            fh.write(png)
        layer = Gimp.file_load_layer(
            Gimp.RunMode.NONINTERACTIVE, target, Gio.File.new_for_path(path)
        )
        layer.set_name(f"Pastiche: {label} frame {i} ({ms}ms)")
        if anchors is None:
            target.insert_layer(layer, None, 0)
        else:
            source = anchors[i - 1]
            target.insert_layer(layer, source.get_parent(), target.get_item_position(source))
        if (layer.get_width(), layer.get_height()) != (width, height):
            layer.scale(width, height, False)
        layer.set_offsets(0, 0)
        layers.append(layer)
    return layers


def _paint_animation(procedure, image, config):
    """Paint every layer as a frame; the result goes into a new image (returned, and shown when
    run from the menu) or above the source layers, either way in one undo group."""
    style, style_name, preset = _style_source(config)
    helper = _connect(config)
    folder = tempfile.mkdtemp(prefix="pastiche-gimp-")
    try:
        paths, durations = _export_frames(image, folder)
        frames = []
        for path in paths:
            with open(path, "rb") as fh:
                frames.append(fh.read())
        (pngs, durations), label = client.run_animation_job(
            helper, frames, durations, style=style, style_name=style_name, preset=preset,
            settings=_settings(config), quality=config.get_property("quality"),
            on_progress=_progress,
        )  # fmt: skip
        Gimp.progress_set_text("Pastiche: adding the painted frames…")
        new_image = None
        if config.get_property("new-image"):
            new_image = Gimp.Image.new(
                image.get_width(), image.get_height(), Gimp.ImageBaseType.RGB
            )
            target, anchors = new_image, None
        else:
            target, anchors = image, list(reversed(image.get_layers()))
        target.undo_group_start()
        try:
            _add_frames(target, pngs, durations, label, folder, anchors)
        finally:
            target.undo_group_end()
        Gimp.progress_end()
        return new_image
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _dialog(procedure, config, name: str, args) -> bool:
    GimpUi.init(name)
    dialog = GimpUi.ProcedureDialog.new(procedure, config, "Pastiche")
    dialog.fill(args)
    accepted = dialog.run()
    dialog.destroy()
    return accepted


def run(procedure, run_mode, image, drawables, config, data):
    if run_mode == Gimp.RunMode.INTERACTIVE and not _dialog(
        procedure, config, PROC_NAME, DIALOG_ARGS
    ):
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    try:
        _paint(procedure, image, drawables, config)
    except client.HelperError as exc:
        return _fail(procedure, str(exc))
    except Exception as exc:  # never take GIMP down with us; say what happened
        traceback.print_exc()
        return _fail(procedure, f"Pastiche failed unexpectedly: {exc!r}.")
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def run_animation(procedure, run_mode, image, drawables, config, data):
    interactive = run_mode == Gimp.RunMode.INTERACTIVE
    if interactive and not _dialog(procedure, config, ANIMATION_PROC, ANIMATION_DIALOG_ARGS):
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    try:
        new_image = _paint_animation(procedure, image, config)
    except client.HelperError as exc:
        return _fail(procedure, str(exc))
    except Exception as exc:  # never take GIMP down with us; say what happened
        traceback.print_exc()
        return _fail(procedure, f"Pastiche failed unexpectedly: {exc!r}.")
    if new_image is not None and interactive:
        Gimp.Display.new(new_image)
    Gimp.displays_flush()
    values = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    values.remove(1)
    values.insert(1, GObject.Value(Gimp.Image, new_image))
    return values


class Pastiche(Gimp.PlugIn):
    def do_set_i18n(self, name):
        return False

    def do_query_procedures(self):
        return [PROC_NAME, ANIMATION_PROC]

    def do_create_procedure(self, name):
        if name == ANIMATION_PROC:
            return self._animation_procedure(name)
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        procedure.set_image_types("RGB*, GRAY*")
        procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        procedure.set_menu_label("Pastiche…")
        procedure.add_menu_path("<Image>/Filters/Artistic/")
        procedure.set_documentation(
            "Paint the layer in the style of a painting",
            "Neural style transfer (Gatys et al.) by the local Pastiche helper. The result is "
            "added as a new layer above the active one, covering the selection's bounds and "
            "masked by the selection.",
            name,
        )
        _add_arguments(procedure)
        _add_resolution(procedure)
        return procedure

    def _animation_procedure(self, name):
        rw = GObject.ParamFlags.READWRITE
        procedure = Gimp.ImageProcedure.new(
            self, name, Gimp.PDBProcType.PLUGIN, run_animation, None
        )
        procedure.set_image_types("*")  # an opened GIF is indexed
        procedure.set_sensitivity_mask(
            Gimp.ProcedureSensitivityMask.DRAWABLE
            | Gimp.ProcedureSensitivityMask.DRAWABLES
            | Gimp.ProcedureSensitivityMask.NO_DRAWABLES
        )
        procedure.set_menu_label("Pastiche Animation…")
        procedure.add_menu_path("<Image>/Filters/Artistic/")
        procedure.set_documentation(
            "Paint every layer as a frame of an animation",
            "Each layer is one frame (the bottom layer first, as GIMP plays and exports "
            "animations; a '(100ms)' in a layer's name is its delay). Each frame after the "
            "first starts from the previous painted frame carried along the motion and is "
            "kept close to it (Ruder et al.), so the painting does not flicker. The frames go "
            "into a new image, or above their source layers, in one undo group.",
            name,
        )
        _add_arguments(procedure)
        procedure.add_boolean_argument(
            "new-image",
            "Into a _new image",
            "Put the painted frames into a new image (else above the source layers)",
            True,
            rw,
        )
        procedure.add_image_return_value(
            "painted-image",
            "Painted image",
            "The painted animation (none with new-image off)",
            True,
            rw,
        )
        return procedure


def _add_arguments(procedure):
    rw = GObject.ParamFlags.READWRITE  # Gimp.ParamFlags fails to register in GIMP 3.0.4
    procedure.set_attribution("Pastiche contributors", "MIT licence", "2025")
    procedure.add_file_argument(
        "style-file",
        "_Style image",
        "The painting whose style to copy",
        Gimp.FileChooserAction.OPEN,
        True,
        None,
        rw,
    )
    procedure.add_string_argument(
        "preset",
        "Style _preset",
        "Name of a style preset of the helper (if no style image)",
        "",
        rw,
    )
    procedure.add_double_argument(
        "strength",
        "S_trength",
        "0 keeps close to the photo, 1 is mostly style",
        0.0,
        1.0,
        0.5,
        rw,
    )
    procedure.add_double_argument(
        "keep-faces",
        "Keep _faces",
        "Keep faces recognisable: 0 paints them like the rest, 1 keeps the most of them",
        0.0,
        1.0,
        0.5,
        rw,
    )
    procedure.add_int_argument(
        "size",
        "Output si_ze",
        "Long side in pixels the painting is computed at (a still: unless it is painted at "
        "the layer's own resolution; the result is scaled to the layer)",
        16,
        8192,
        512,
        rw,
    )
    quality = Gimp.Choice.new()
    for i, nick in enumerate(client.QUALITIES):
        quality.add(nick, i, nick.capitalize(), "")
    procedure.add_choice_argument(
        "quality",
        "_Quality",
        "More iterations look better and take longer",
        quality,
        "standard",
        rw,
    )
    procedure.add_boolean_argument(
        "preserve-colors",
        "Keep the photo's _colours",
        "Transfer brush strokes, not colours",
        False,
        rw,
    )
    procedure.add_string_argument(
        "helper-url",
        "Helper URL",
        "URL of a running helper (default: discover it)",
        "",
        rw,
    )
    procedure.add_string_argument(
        "helper-token",
        "Helper token",
        "Token of that helper",
        "",
        rw,
    )


def _add_resolution(procedure):
    resolution = Gimp.Choice.new()
    for i, (nick, label) in enumerate(RESOLUTION_LABELS.items()):
        resolution.add(nick, i, label, "")
    procedure.add_choice_argument(
        "resolution",
        "_Resolution",
        "Paint at the layer's own size, or at the Output size and scale the result to the layer",
        resolution,
        "auto",
        GObject.ParamFlags.READWRITE,
    )


if __name__ == "__main__":
    Gimp.main(Pastiche.__gtype__, sys.argv)
