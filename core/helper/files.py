"""Where the GIMP helper keeps its files, and the discovery file that lets the plug-in find it.

The discovery file holds the helper's URL and its bearer token, so it is created owner-only
(mode 0600 passed to ``os.open``: never world-readable, not even between create and chmod) and
replaced atomically so a reader never sees half of it. The plug-in computes the same default
path with the standard library only (``gimp_plugin/pastiche/pastiche_client.py``); a test keeps
the two in step.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any

APP = "pastiche"
DISCOVERY_ENV = "PASTICHE_HELPER_FILE"
LOG_ENV = "PASTICHE_HELPER_LOG"


def config_dir() -> Path:
    """The per-user configuration folder of Pastiche on this platform."""
    if sys.platform == "win32":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / APP
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / APP


def state_dir() -> Path:
    """Where logs go (kept across runs so users can attach them to a bug report)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / APP / "Logs"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Logs" / APP
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / APP


def default_discovery_file() -> Path:
    """``$PASTICHE_HELPER_FILE`` or ``<config dir>/helper.json``."""
    env = os.environ.get(DISCOVERY_ENV)
    return Path(env).expanduser() if env else config_dir() / "helper.json"


def default_log_file() -> Path:
    """``$PASTICHE_HELPER_LOG`` or ``<state dir>/helper.log``."""
    env = os.environ.get(LOG_ENV)
    return Path(env).expanduser() if env else state_dir() / "helper.log"


def write_discovery(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path``, owner-only from the first byte, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(info, out)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_discovery(path: Path) -> dict[str, Any] | None:
    """The discovery file's contents, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_discovery(path: Path, token: str) -> None:
    """Remove the discovery file if it is still ours (a newer helper may have replaced it)."""
    data = read_discovery(path)
    if data is not None and data.get("token") == token:
        path.unlink(missing_ok=True)


def setup_logging(log_file: Path, *, verbose: bool = False) -> logging.Handler:
    """Log to a rotating file (1 MiB x 3) and return the handler so it can be removed."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        log_file, maxBytes=1 << 20, backupCount=3, encoding="utf-8"
    )
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
