"""The bot's configuration: a TOML file plus the DISCORD_TOKEN environment variable.

Example (every key optional except a token from somewhere)::

    token = "..."                 # or set DISCORD_TOKEN, which wins over the file
    presets = "styles/"           # folder holding presets.toml (see docs/BOT.md)
    guild_id = 123456789012345678 # sync slash commands to this guild only (instant; for testing)
    workers = 1                   # worker processes running the engine (with backend =
                                  # "celery": the number of GPU workers serving the broker)
    backend = "local"             # "local" (worker processes on this machine) or "celery"
    broker = "redis://:PASSWORD@redis:6379/0"  # backend = "celery" only; or set
                                  # PASTICHE_BROKER_URL, which wins (docs/SCALING.md)
    message_content = false       # privileged intent; only needed to read images in replied-to
                                  # messages that do not themselves mention the bot
    default_preset = ""           # used when a mention names no preset and attaches no style

    [limits]
    max_queue = 20                # jobs waiting or running, over all users
    max_per_user = 2              # a user's queued + running jobs
    cooldown = 20                 # seconds between a user's submissions
    max_attachment_mb = 10        # largest upload accepted
    max_pixels = 50000000         # largest decoded upload (width x height)
    max_size = 2048               # largest output long side a user may ask for
    job_timeout = 900             # seconds before a running job is stopped
    status_interval = 3           # seconds between edits of a job's status message
    max_frames = 24               # frames of a GIF or video painted (evenly spread over it)
    animation_size = 256          # long side a GIF or video is painted at
    max_clip_seconds = 30         # longest GIF or video accepted

    [engine]
    backbone = "vgg19"
    weights = "/path/to/vgg19.pth"  # local checkpoint; default: the download cache
    device = "auto"
    quality = "standard"          # draft | standard | high (iterations per scale)
    size = 512                    # default output long side
    preview_every = 10            # optimiser steps between previews (0 = none)
    max_memory = "auto"           # peak memory of a job, e.g. "3GB"; larger scales use tiles
    keep_faces = 0.5              # 0..1, keep faces recognisable (users may change it per job)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from core.errors import PasticheError, SettingsError
from core.images import MAX_PIXELS
from core.jobs.broker import BROKER_ENV, BrokerError, normalise_url
from core.requests import request_settings
from core.settings import Backbone, Quality, Settings

TOKEN_ENV = "DISCORD_TOKEN"
CONFIG_ENV = "PASTICHE_BOT_CONFIG"
DEFAULT_CONFIG = "pastiche-bot.toml"


class ConfigError(PasticheError):
    """The bot's configuration file is missing, unreadable or has a bad value."""


@dataclass(frozen=True)
class Limits:
    max_queue: int = 20
    max_per_user: int = 2
    cooldown: float = 20.0
    max_attachment_mb: float = 10.0
    max_pixels: int = MAX_PIXELS
    max_size: int = 2048
    """Memory does not bound it (scales over the budget are painted in tiles); time does:
    2048 px at standard quality takes a few minutes on two CPU cores, within job_timeout."""
    job_timeout: float = 900.0
    status_interval: float = 3.0
    max_frames: int = 24
    """Frames of an animation painted; each costs about what a still of the same size does
    after the first, so 24 frames at 256 px stay within a few minutes on a CPU."""
    animation_size: int = 256
    max_clip_seconds: float = 30.0

    @property
    def max_attachment_bytes(self) -> int:
        return int(self.max_attachment_mb * 1024 * 1024)


@dataclass(frozen=True)
class EngineConfig:
    backbone: Backbone = "vgg19"
    weights: str | None = None
    device: str = "auto"
    quality: Quality = "standard"
    size: int = 512
    preview_every: int = 10
    max_memory: str = "auto"
    keep_faces: float = Settings.keep_faces
    """A selfie bot keeps faces recognisable by default, as the engine does (see Settings)."""

    def base_settings(self) -> Settings:
        """The Settings every bot job starts from (users may change strength, size, colours,
        keep_faces)."""
        options = {
            "size": self.size,
            "backbone": self.backbone,
            "weights": self.weights,
            "device": self.device,
            "preview_every": self.preview_every,
            "keep_faces": self.keep_faces,
            "max_memory": self.max_memory,
        }
        return request_settings("discord", options, quality=self.quality)


@dataclass(frozen=True)
class BotConfig:
    token: str | None = None
    presets: Path | None = None
    guild_id: int | None = None
    workers: int = 1
    message_content: bool = False
    default_preset: str | None = None
    limits: Limits = field(default_factory=Limits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    backend: str = "local"
    """Where jobs are painted: "local" worker processes, or "celery" workers on other
    machines reached through ``broker`` (docs/SCALING.md)."""
    broker: str | None = None
    """Redis URL of the Celery broker (backend = "celery")."""


_TOP = {"token", "presets", "guild_id", "workers", "message_content", "default_preset"}
_TOP |= {"backend", "broker"}
BACKENDS = ("local", "celery")


def load_config(
    path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
) -> BotConfig:
    """Read the TOML file (``path``, else $PASTICHE_BOT_CONFIG, else ./pastiche-bot.toml if it
    exists) and take the token from $DISCORD_TOKEN when set. Raises ConfigError."""
    env = dict(os.environ) if env is None else env
    data: dict[str, Any] = {}
    base = Path.cwd()
    chosen = path or env.get(CONFIG_ENV)
    if chosen is None and Path(DEFAULT_CONFIG).is_file():
        chosen = DEFAULT_CONFIG
    if chosen is not None:
        file = Path(chosen).expanduser()
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"The bot configuration file {file} does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the bot configuration file {file}: {exc}.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"The bot configuration file {file} is not valid TOML: {exc}."
            ) from None
        base = file.resolve().parent
    return config_from_dict(data, env=env, base=base)


def config_from_dict(
    data: dict[str, Any], *, env: dict[str, str] | None = None, base: Path | None = None
) -> BotConfig:
    """Validate a parsed configuration; relative paths are taken from ``base``."""
    env = {} if env is None else env
    base = base or Path.cwd()
    unknown = sorted(set(data) - _TOP - {"limits", "engine"})
    if unknown:
        raise ConfigError(f"Unknown bot configuration key(s): {', '.join(unknown)}.")
    limits = _section(Limits, data.get("limits", {}), "limits")
    engine = _section(EngineConfig, data.get("engine", {}), "engine")
    token = env.get(TOKEN_ENV) or _opt_str(data, "token")
    presets = _opt_str(data, "presets")
    weights = engine.weights
    if weights is not None:
        engine = EngineConfig(**{**engine.__dict__, "weights": str(_path(weights, base))})
    cfg = BotConfig(
        token=token,
        presets=_path(presets, base) if presets else None,
        guild_id=_opt_int(data, "guild_id"),
        workers=_int(data.get("workers", 1), "workers", 1, 64),
        message_content=_bool(data.get("message_content", False), "message_content"),
        default_preset=(_opt_str(data, "default_preset") or None),
        limits=limits,
        engine=engine,
        backend=_opt_str(data, "backend") or "local",
        broker=env.get(BROKER_ENV) or _opt_str(data, "broker"),
    )
    _check(cfg)
    return cfg


_Section = TypeVar("_Section", Limits, EngineConfig)


def _section(cls: type[_Section], raw: Any, name: str) -> _Section:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown key(s) in [{name}]: {', '.join(unknown)}.")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = fields[key].default
        where = f"{name}.{key}"
        if isinstance(default, bool):
            values[key] = _bool(value, where)
        elif isinstance(default, int):
            values[key] = _int(value, where, 0, 2**53)
        elif isinstance(default, float):
            values[key] = _float(value, where)
        elif isinstance(value, str) and value:
            values[key] = value
        else:
            raise ConfigError(f"{where} must be a non-empty string.")
    return cls(**values)


def _check(cfg: BotConfig) -> None:
    lim, eng = cfg.limits, cfg.engine
    for key in ("max_queue", "max_per_user", "max_size", "max_pixels", "max_frames"):
        if getattr(lim, key) < 1:
            raise ConfigError(f"limits.{key} must be at least 1.")
    if not 16 <= lim.animation_size <= lim.max_size:
        raise ConfigError("limits.animation_size must be from 16 to limits.max_size.")
    for key in ("max_attachment_mb", "job_timeout", "max_clip_seconds"):
        if getattr(lim, key) <= 0:
            raise ConfigError(f"limits.{key} must be positive.")
    if lim.cooldown < 0 or lim.status_interval < 0:
        raise ConfigError("limits.cooldown and limits.status_interval must not be negative.")
    try:
        eng.base_settings()
    except SettingsError as exc:
        raise ConfigError(f"Bad [engine] setting: {exc}") from None
    if eng.size > lim.max_size:
        raise ConfigError("engine.size must not exceed limits.max_size.")
    _check_backend(cfg)


def _check_backend(cfg: BotConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}.")
    if cfg.backend == "celery":
        try:
            normalise_url(cfg.broker)
        except BrokerError as exc:
            raise ConfigError(str(exc)) from None


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string.")
    return value


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return None if value in (None, 0, "") else _int(value, key, 1, 2**64)


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.isdigit():  # guild ids are often quoted
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key} must be a whole number from {lo} to {hi}, got {value!r}.")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    return value
