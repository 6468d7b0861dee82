"""A front end's request -> :class:`~core.settings.Settings`, written once for every front end.

The CLI, the Discord bot and the GIMP helper each speak of the same few things in their own
words: a quality tier rather than an iteration count, a preset whose default strength applies
unless the user picks one, a largest size the operator allows, a colour option, and who asked.
They hand them to :func:`request_settings` as given and get validated Settings back, so none of
them redefines a default or a rule.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from core.errors import SettingsError
from core.settings import QUALITY_ITERATIONS, Settings

FrontEnd = Literal["cli", "discord", "gimp"]
FRONT_END_KEY = "front_end"
"""The key of ``Settings.extra`` (and so of the output's metadata) naming the front end."""


def request_settings(
    front_end: FrontEnd,
    options: Mapping[str, Any] | None = None,
    *,
    base: Settings | None = None,
    quality: str | None = None,
    preset_strength: float | None = None,
    max_size: int | None = None,
    locked: Collection[str] = (),
    notes: Mapping[str, Any] | None = None,
) -> Settings:
    """``base`` (the operator's defaults; else Settings()) overlaid with the user's choices.

    ``options`` holds the Settings fields the user set, as given (JSON values are fine: lists
    become tuples); a field left alone is simply absent. ``quality`` is a tier of
    QUALITY_ITERATIONS and sets ``iterations`` unless ``options`` has them. ``preset_strength``
    (the chosen preset's default) applies unless ``options`` sets a strength. ``max_size`` is the
    largest size a user may ask for; the default size is clipped to it. ``locked`` fields are
    chosen by whoever starts the service, never per request. ``notes`` (style label, file names)
    go into ``extra`` next to the front end's name. Raises SettingsError, worded for the user.
    """
    chosen = dict(options or {})
    refused = sorted(set(locked) & set(chosen))
    if refused:
        raise SettingsError(
            f"{', '.join(refused)} can only be set when the {_SERVICE[front_end]} is started, "
            "not per job."
        )
    if quality is not None:
        chosen.setdefault("iterations", quality_iterations(quality))
    if preset_strength is not None:
        chosen.setdefault("strength", preset_strength)
    base = base or Settings()
    if max_size is not None:
        _limit_size(chosen, base, max_size)
    extra = {**base.extra, **(notes or {}), FRONT_END_KEY: front_end}
    return Settings.from_dict({**base.to_dict(), **chosen, "extra": extra})


def quality_iterations(quality: str) -> int:
    """Iterations per scale of a quality tier, named by a user (case and spaces forgiven)."""
    wanted = str(quality).strip().lower()
    for tier, iterations in QUALITY_ITERATIONS.items():
        if tier == wanted:
            return iterations
    raise SettingsError(f"quality must be one of {', '.join(QUALITY_ITERATIONS)}; got {quality!r}.")


def _limit_size(chosen: dict[str, Any], base: Settings, max_size: int) -> None:
    size = chosen.get("size")
    if size is None:
        chosen["size"] = min(base.size, max_size)
    elif isinstance(size, (int, float)) and size > max_size:
        raise SettingsError(
            f"The largest size allowed here is {max_size} pixels; pick a smaller one."
        )


_SERVICE: dict[FrontEnd, str] = {"cli": "command", "discord": "bot", "gimp": "helper"}
