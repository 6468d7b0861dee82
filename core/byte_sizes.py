"""Amounts of memory written the way people write them: ``1.5GB``, ``800MB``, ``2GiB``.

Decimal units (KB, MB, GB, TB and the bare K, M, G, T) are powers of 1000 and binary ones
(KiB, MiB, GiB, TiB) powers of 1024, as in the SI and IEC standards. A budget given as
``1.5GB`` is therefore 1.5e9 bytes, which holds whichever reading the reader had in mind.
"""

from __future__ import annotations

import math
import re

from core.errors import SettingsError

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_PATTERN = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.I)


def parse_bytes(text: str, *, name: str = "memory size") -> int:
    """``"1.5GB"`` -> 1_500_000_000. Raises SettingsError with an example for anything else."""
    match = _PATTERN.match(text) if isinstance(text, str) else None
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise SettingsError(
            f"{name} must be an amount of memory such as 1.5GB, 800MB or 2GiB; got {text!r}."
        )
    value = float(match["number"]) * _UNITS[unit]
    if not math.isfinite(value):
        raise SettingsError(f"{name} is too large: {text!r}.")
    return int(value)


def format_bytes(count: float) -> str:
    """Short decimal form for messages: ``1.5 GB``, ``800 MB``."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"
