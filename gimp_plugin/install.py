"""``pastiche gimp install``: copy the plug-in into GIMP 3's plug-ins folder.

GIMP 3 loads a plug-in from a sub-folder named like its executable script, so the files go to
``<plug-ins>/pastiche/``. Beside them goes ``config.json`` with the command that starts the
helper in *this* Python environment (GIMP's own Python cannot import torch), so the plug-in can
start the helper when none is running.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "pastiche"
FILES = ("pastiche.py", "pastiche_client.py")
PLUGIN = "pastiche"
FLATPAK_ID = "org.gimp.GIMP"


def plugin_folders() -> dict[str, Path]:
    """GIMP 3's per-user plug-ins folders by installation kind, for this platform."""
    home = Path.home()
    if sys.platform == "win32":
        appdata = Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming")
        return {"windows": appdata / "GIMP" / "3.0" / "plug-ins"}
    if sys.platform == "darwin":
        return {"macos": home / "Library" / "Application Support" / "GIMP" / "3.0" / "plug-ins"}
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return {
        "linux": config / "GIMP" / "3.0" / "plug-ins",
        "flatpak": home / ".var" / "app" / FLATPAK_ID / "config" / "GIMP" / "3.0" / "plug-ins",
    }


def default_dest(flatpak: bool = False) -> Path:
    """The folder GIMP reads: Flatpak when asked or when only the Flatpak GIMP has been run."""
    folders = plugin_folders()
    if flatpak:
        if "flatpak" not in folders:
            raise SystemExit("--flatpak only applies to Linux.")
        return folders["flatpak"]
    if "flatpak" in folders:
        native_gimp = folders["linux"].parent
        flatpak_gimp = folders["flatpak"].parent
        if flatpak_gimp.is_dir() and not native_gimp.is_dir():
            return folders["flatpak"]
        return folders["linux"]
    return next(iter(folders.values()))


def helper_command(extra: list[str]) -> list[str]:
    """This interpreter running ``pastiche helper`` (works without the console script)."""
    return [sys.executable, "-m", "core", "helper", *extra]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pastiche gimp install",
        description="Install the Pastiche plug-in for GIMP 3 (Filters > Artistic > Pastiche…).",
    )
    p.add_argument("--dest", type=Path, help="GIMP plug-ins folder (default: found for you)")
    p.add_argument("--flatpak", action="store_true", help="install for the Flatpak GIMP")
    p.add_argument(
        "--helper-command",
        default=None,
        help="command that starts the helper (default: this Python with -m core helper)",
    )
    p.add_argument(
        "--helper-args",
        default="",
        help='extra helper options, e.g. "--weights /path/vgg19.pth --device cuda"',
    )
    p.add_argument(
        "--no-autostart",
        action="store_true",
        help="never start the helper from GIMP (start `pastiche helper` yourself)",
    )
    p.add_argument("--helper-url", default=None, help="always use the helper at this URL")
    p.add_argument("--token", default=None, help="token for --helper-url")
    p.add_argument(
        "--discovery-file",
        default=None,
        help="where the plug-in looks for the running helper's URL and token",
    )
    p.add_argument(
        "--idle-exit",
        type=int,
        default=900,
        help="seconds an auto-started helper stays up unused (default: 900)",
    )
    p.add_argument("--uninstall", action="store_true", help="remove the plug-in instead")
    return p


def make_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {"idle_exit": args.idle_exit}
    if not args.no_autostart:
        extra = shlex.split(args.helper_args)
        config["helper_command"] = (
            shlex.split(args.helper_command) + extra
            if args.helper_command
            else helper_command(extra)
        )
    if args.helper_url:
        config["helper_url"] = args.helper_url
        config["token"] = args.token or ""
    if args.discovery_file:
        config["discovery_file"] = args.discovery_file
    else:
        from core.helper.files import default_discovery_file

        config["discovery_file"] = str(default_discovery_file())
    return config


def install(dest: Path, config: dict[str, Any]) -> Path:
    """Copy the plug-in to ``dest/pastiche`` and write its config; returns that folder."""
    target = dest / PLUGIN
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(SOURCE / name, target / name)
    os.chmod(target / "pastiche.py", 0o755)
    tmp = target / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target / "config.json")
    return target


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dest = (args.dest or default_dest(args.flatpak)).expanduser()
    target = dest / PLUGIN
    try:
        if args.uninstall:
            if target.is_dir():
                shutil.rmtree(target)
                print(f"Removed the Pastiche plug-in from {target}.")
            else:
                print(f"The Pastiche plug-in is not installed in {dest}.")
            return 0
        target = install(dest, make_config(args))
    except OSError as exc:
        print(f"Cannot install into {target}: {exc.strerror or exc}.", file=sys.stderr)
        return 1
    print(f"Installed the Pastiche plug-in in {target}.")
    print("Restart GIMP, then use Filters > Artistic > Pastiche… on a layer.")
    if args.flatpak or "flatpak" in str(dest).lower():
        print(
            "The Flatpak GIMP cannot start programs outside its sandbox: "
            "run `pastiche helper` yourself before using the plug-in."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
