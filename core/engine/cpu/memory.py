"""How the engine's process keeps and returns heap memory during a run (glibc on Linux; a
no-op elsewhere).

Why: a step at 512 px frees and re-allocates several hundred megabytes of activations and
gradients. With glibc's defaults, blocks above the (adaptive, at most 32 MB) mmap threshold are
unmapped when freed and the top of the heap is trimmed, so every step faulted tens of thousands
of fresh pages back in. Keeping freed memory in the heap during a run removes that, and trimming
explicitly at each pyramid scale and at the end of a run still gives it back (``malloc_trim``
also releases free pages inside the heap). The measured gain is in docs/BENCHMARKS.md.
Runs painted in tiles within a memory budget do not keep freed memory: there the heap
fragments between blocks of different sizes and overshot the budget (core/engine/run.py).

The settings hold only while a run is going (``during_run``): afterwards the two parameters go
back to what the process started with, so calling ``stylize`` from another program leaves its
allocator as it was. glibc has no getter, so "what it started with" is glibc's documented
default unless the environment set the parameter (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``); values a program set itself with ``mallopt``
cannot be read back. One effect cannot be undone by any call: setting either parameter turns
off glibc's dynamic mmap threshold for the rest of the process (the threshold stays where it
was; mallopt(3)).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

# mallopt() parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # never trim on free: release() does it at chosen moments
# glibc's defaults (mallopt(3): M_MMAP_MAX 65536, M_TRIM_THRESHOLD 128 KiB).
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}
_ENV_NAMES = {M_MMAP_MAX: "MALLOC_MMAP_MAX_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_"}
_TUNABLES = {M_MMAP_MAX: "glibc.malloc.mmap_max", M_TRIM_THRESHOLD: "glibc.malloc.trim_threshold"}


def _glibc() -> Any:
    """glibc's handle (Linux only; musl, macOS and Windows have neither call)."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - raises AttributeError where it is missing
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def started_with(environ: Mapping[str, str]) -> dict[int, int]:
    """The two parameters' values at process start: glibc's defaults, unless ``environ`` set
    them (a GLIBC_TUNABLES entry wins over the older MALLOC_*_ variable, as in glibc)."""
    values = dict(GLIBC_DEFAULTS)
    tunables = dict(
        item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item
    )
    for param in values:
        for raw in (environ.get(_ENV_NAMES[param]), tunables.get(_TUNABLES[param])):
            try:
                values[param] = int(raw, 0) if raw else values[param]
            except ValueError:
                pass  # glibc ignores what it cannot parse too
    return values


_LIBC = _glibc()
_STARTED_WITH = started_with(os.environ)
_lock = threading.Lock()
_runs = 0  # runs going on in this process (they may overlap in threads)
_kept = False  # whether the kept-memory settings are in force


def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep freed blocks for reuse. Returns whether the
    allocator took the settings."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_MAX, 0)) & bool(
        _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def restore() -> None:
    """Put both parameters back to what the process started with."""
    if _LIBC is not None:
        for param, value in _STARTED_WITH.items():
            _LIBC.mallopt(param, value)


@contextmanager
def during_run(keep: bool = True) -> Iterator[None]:
    """Keep freed memory for the duration of the block (``keep``), then restore the allocator's
    settings once the last overlapping run ends, and give freed pages back."""
    global _runs, _kept
    with _lock:
        _runs += 1
        if keep and not _kept:
            _kept = keep_freed_memory()
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0 and _kept:
                restore()
                _kept = False
        release()


def release() -> None:
    """Give freed heap pages back to the OS: at each pyramid scale, before its targets and
    again before its first step (the larger scale cannot reuse all of the smaller one's blocks,
    nor its steps all of the targets' ones), and when a run ends, so an idle worker holds only
    what it uses."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
