"""How the engine's process keeps and returns heap memory (glibc on Linux; a no-op elsewhere).

Why: a step at 512 px frees and re-allocates several hundred megabytes of activations and
gradients. With glibc's defaults, blocks above the (adaptive, at most 32 MB) mmap threshold are
unmapped when freed and the top of the heap is trimmed, so every step faulted ~100,000 fresh
pages back in (about 0.1 s of a 0.8 s step on the 2-core CI machine). Keeping freed memory in
the heap during a run removes that, and trimming explicitly at each pyramid scale and at the end
of a run still gives it back (``malloc_trim`` also releases free pages inside the heap).
Measured on that machine (benchmarks, docs/BENCHMARKS.md): 0.80 -> 0.71 s per 512 px step,
faults per step 80,000 -> 3, peak RSS unchanged (1117 vs 1100 MB).
"""

from __future__ import annotations

import os
from typing import Any

# mallopt() parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # never trim on free: release() does it at chosen moments


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


_LIBC = _glibc()
_kept = False


def keep_freed_memory() -> bool:
    """From now on, serve every block from the heap and keep freed blocks for reuse (once per
    process). Returns whether the allocator took the settings."""
    global _kept
    if _LIBC is None:
        return False
    if not _kept:
        _kept = bool(_LIBC.mallopt(M_MMAP_MAX, 0)) & bool(
            _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    return _kept


def release() -> None:
    """Give freed heap pages back to the OS: at each pyramid scale, before its targets and
    again before its first step (the larger scale cannot reuse all of the smaller one's blocks,
    nor its steps all of the targets' ones), and when a run ends, so an idle worker holds only
    what it uses."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
