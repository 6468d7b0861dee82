"""Style presets: a folder of style images described by a TOML manifest.

``presets.toml``::

    [[preset]]
    name = "starry-night"
    file = "starry_night.jpg"
    description = "Van Gogh, The Starry Night (1889)"
    strength = 0.6          # optional default strength for this style

Broken entries are collected in ``problems`` at load time so operators see them at start-up,
not when a user asks for the preset.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from core.errors import ImageError, SettingsError
from core.images import validate_image

MANIFEST = "presets.toml"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str = ""
    strength: float | None = None

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class PresetLibrary:
    presets: dict[str, Preset] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def get(self, name: str) -> Preset:
        """The preset called ``name`` (case-insensitive), or a SettingsError listing them."""
        preset = self.presets.get(name.strip().lower())
        if preset is None:
            known = ", ".join(sorted(self.presets)) or "none are installed"
            raise SettingsError(f"There is no style preset called {name!r} (known: {known}).")
        return preset

    def __len__(self) -> int:
        return len(self.presets)


def load_presets(folder: str | Path | None) -> PresetLibrary:
    """Read ``folder/presets.toml``; every unusable entry becomes a line in ``problems``."""
    lib = PresetLibrary()
    if folder is None:
        return lib
    root = Path(folder).expanduser()
    manifest = root / MANIFEST
    if not manifest.is_file():
        lib.problems.append(f"No preset manifest at {manifest}.")
        return lib
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        lib.problems.append(f"Cannot read {manifest}: {exc}.")
        return lib
    entries = data.get("preset", [])
    if not isinstance(entries, list):
        lib.problems.append(f"{manifest}: 'preset' must be an array of tables ([[preset]]).")
        return lib
    for i, entry in enumerate(entries, 1):
        where = f"{manifest} preset #{i}"
        if not isinstance(entry, dict):
            lib.problems.append(f"{where}: not a table.")
            continue
        name = str(entry.get("name", "")).strip().lower()
        if not _NAME.match(name):
            lib.problems.append(f"{where}: name {entry.get('name')!r} must be 1-64 of a-z 0-9 _ -.")
            continue
        if name in lib.presets:
            lib.problems.append(f"{where}: duplicate name {name!r}.")
            continue
        file = entry.get("file")
        if not isinstance(file, str) or not file:
            lib.problems.append(f"{where} ({name}): missing 'file'.")
            continue
        path = (root / file).resolve()
        strength = entry.get("strength")
        if strength is not None and (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not 0 <= strength <= 1
        ):
            lib.problems.append(f"{where} ({name}): strength must be a number from 0 to 1.")
            continue
        try:
            validate_image(path.read_bytes(), name=f"preset {name} ({file})")
        except OSError as exc:
            lib.problems.append(f"{where} ({name}): cannot read {path}: {exc.strerror or exc}.")
            continue
        except ImageError as exc:
            lib.problems.append(f"{where} ({name}): {exc}")
            continue
        lib.presets[name] = Preset(
            name=name,
            path=path,
            description=str(entry.get("description", "")),
            strength=None if strength is None else float(strength),
        )
    return lib
