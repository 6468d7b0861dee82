#!/usr/bin/env python3
"""Pastiche for GIMP 3: paint the active layer (or the selected part of it) in the style of a
painting, as a new layer above it. The work is done by the local Pastiche helper
(``pastiche helper``), which this plug-in finds or starts; see pastiche_client.py.

Filters > Artistic > Pastiche…  Also callable from scripts as ``plug-in-pastiche``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
from gi.repository import Gimp, GimpUi, Gio, GLib, GObject  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pastiche_client as client  # noqa: E402

PROC_NAME = "plug-in-pastiche"
RESOLUTION_LABELS = {  # client.RESOLUTIONS, as the dialog shows them
    "auto": "Full resolution up to the helper's limit",
    "full": "Full resolution",
    "size": "Output size, scaled to the layer",
}
DIALOG_ARGS = [
    "style-file", "preset", "strength", "resolution", "size", "quality", "preserve-colors"
]  # fmt: skip


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
    Gimp.progress_init("Pastiche: connecting to the helper…")
    helper = client.connect(
        url=config.get_property("helper-url") or "",
        token=config.get_property("helper-token") or "",
        config=client.load_config(),
        on_wait=_progress,
    )
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
        settings = client.job_settings(
            config.get_property("strength"), size, config.get_property("preserve-colors")
        )
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


def run(procedure, run_mode, image, drawables, config, data):
    if run_mode == Gimp.RunMode.INTERACTIVE:
        GimpUi.init(PROC_NAME)
        dialog = GimpUi.ProcedureDialog.new(procedure, config, "Pastiche")
        dialog.fill(DIALOG_ARGS)
        accepted = dialog.run()
        dialog.destroy()
        if not accepted:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    try:
        _paint(procedure, image, drawables, config)
    except client.HelperError as exc:
        return _fail(procedure, str(exc))
    except Exception as exc:  # never take GIMP down with us; say what happened
        traceback.print_exc()
        return _fail(procedure, f"Pastiche failed unexpectedly: {exc!r}.")
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


class Pastiche(Gimp.PlugIn):
    def do_set_i18n(self, name):
        return False

    def do_query_procedures(self):
        return [PROC_NAME]

    def do_create_procedure(self, name):
        rw = GObject.ParamFlags.READWRITE  # Gimp.ParamFlags fails to register in GIMP 3.0.4
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
        resolution = Gimp.Choice.new()
        for i, (nick, label) in enumerate(RESOLUTION_LABELS.items()):
            resolution.add(nick, i, label, "")
        procedure.add_choice_argument(
            "resolution",
            "_Resolution",
            "Paint at the layer's own size, or at the Output size and scale up",
            resolution,
            "auto",
            rw,
        )
        procedure.add_int_argument(
            "size",
            "Output si_ze",
            "Long side in pixels the painting is computed at when it is not painted at the "
            "layer's own size (then scaled to the layer)",
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
        return procedure


if __name__ == "__main__":
    Gimp.main(Pastiche.__gtype__, sys.argv)
