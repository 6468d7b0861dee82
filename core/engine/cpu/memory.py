"""How the engine's process keeps and returns heap memory during a run (glibc on Linux; a
no-op elsewhere).

Why: a step at 512 px frees and re-allocates several hundred megabytes of activations and
gradients. With glibc's defaults, blocks above the (adaptive, at most 32 MB) mmap threshold are
unmapped when freed and the top of the heap is trimmed, so every step faulted tens of thousands
of fresh pages back in; and blocks below it are carved out of one heap whose free holes stay
resident. During a run the engine therefore sets glibc's parameters, in one of two ways:

* **huge pages** (where torch's allocator puts its large blocks on transparent huge pages, see
  ``huge_pages``): blocks of ``MMAP_THRESHOLD`` (8 MiB) or more are mapped on their own and
  given back when freed, and the heap below them is never trimmed on free. The large blocks are
  then exactly what is live, and 2 MiB costs one page fault instead of 512. Measured on a
  default 512 px run with a face: peak 746-818 MiB against 979-1014 with the heap kept whole,
  for 1.02-1.10x the step time (docs/BENCHMARKS.md, "Heap and huge pages").
* **kept heap** (elsewhere): every block comes from the heap and freed blocks stay there
  (``M_MMAP_MAX`` 0), which removes the faults at the cost of the heap's holes; without huge
  pages, mapping the large blocks made steps 1.2x slower.

Either way ``release`` trims explicitly at each pyramid scale and at the end of a run
(``malloc_trim`` also releases free pages inside the heap). Runs painted in tiles within a
memory budget keep freed memory only with huge pages: a heap kept whole fragments between
blocks of different sizes and overshot the budget (core/engine/run.py).

The settings hold only while a run is going (``during_run``): afterwards the parameters go back
to what the process started with, so calling ``stylize`` from another program leaves its
allocator as it was. glibc has no getter, so "what it started with" is glibc's documented
default unless the environment set the parameter (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``); values a program set
itself with ``mallopt`` cannot be read back. One effect cannot be undone by any call: setting
any of them turns off glibc's dynamic mmap threshold for the rest of the process (mallopt(3)).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

# mallopt() parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # never trim on free: release() does it at chosen moments
MMAP_THRESHOLD = 8 << 20
"""With huge pages, blocks from this size up are mapped on their own. At 512 px that is every
activation of the first three VGG stages; 4 MiB measured the same, 16 and 30 MiB left 0.15 GiB
more resident (docs/BENCHMARKS.md, "Heap and huge pages")."""
# glibc's defaults (mallopt(3): M_MMAP_MAX 65536, M_TRIM_THRESHOLD and M_MMAP_THRESHOLD 128 KiB).
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}
_ENV_NAMES = {
    M_MMAP_MAX: "MALLOC_MMAP_MAX_",
    M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
    M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
}
_TUNABLES = {
    M_MMAP_MAX: "glibc.malloc.mmap_max",
    M_TRIM_THRESHOLD: "glibc.malloc.trim_threshold",
    M_MMAP_THRESHOLD: "glibc.malloc.mmap_threshold",
}
HUGE_PAGE = 2 << 20


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
    """The parameters' values at process start: glibc's defaults, unless ``environ`` set
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


@lru_cache(maxsize=1)
def huge_pages() -> bool:
    """Whether torch puts its large CPU blocks on transparent huge pages in this process.

    torch does so when ``THP_MEM_ALLOC_ENABLE=1`` was set before its first allocation (importing
    ``core.engine`` sets it, ``core/engine/__init__.py``): blocks of 2 MiB and more are then
    page-aligned and advised ``MADV_HUGEPAGE`` (otherwise torch aligns to 64 bytes). Whether that
    happened, and whether the kernel serves huge pages at all, is seen, not assumed: the
    alignment of a few fresh blocks (one from the heap is page-aligned by chance 1 time in 64),
    and the kernel's THP mode."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            if "[never]" in f.read():
                return False
    except OSError:
        return False
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    probes = [torch.empty(HUGE_PAGE, dtype=torch.uint8) for _ in range(3)]
    return all(p.data_ptr() % page == 0 for p in probes)


def kept_settings() -> dict[int, int]:
    """The parameters a run sets: large blocks mapped on huge pages where torch uses them,
    otherwise every block from the heap; the heap never trimmed on free either way."""
    if huge_pages():
        return {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD}
    return {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: TRIM_THRESHOLD}


def keep_freed_memory() -> bool:
    """Set ``kept_settings``; returns whether the allocator took them."""
    if _LIBC is None:
        return False
    # A list, not a generator: every parameter is set even when an earlier one is refused.
    return all([bool(_LIBC.mallopt(param, value)) for param, value in kept_settings().items()])


def restore() -> None:
    """Put the parameters a run set back to what the process started with."""
    if _LIBC is not None:
        for param in kept_settings():
            _LIBC.mallopt(param, _STARTED_WITH[param])


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
