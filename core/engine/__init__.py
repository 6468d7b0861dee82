"""The engine: the only package of Pastiche that imports torch.

``stylize`` paints one image; everything below it (backbones, weights, losses, colour, and the
CPU speed work in ``core.engine.cpu``) is the engine's own business. Front ends reach it through
the job runner's worker processes or, in the CLI, directly.
"""

import os

# Before torch's first allocation, which reads it once: torch then puts blocks of 2 MiB and
# more on transparent huge pages, which lets a run map its large blocks without a page fault per
# 4 KiB (core/engine/cpu/memory.py). A value the environment set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from core.engine.frames import stylize_animation, stylize_frames
from core.engine.run import Engine, stylize
from core.settings import Settings


def prepare(settings: Settings | None = None) -> str:
    """Make this machine's speed choice for ``settings`` now (the probe on first use, a cached
    read afterwards), so a worker pays it at start-up rather than in its first job; returns
    the choice, described."""
    from core.engine.device import pick_device, pick_speed

    s = settings or Settings()
    return pick_speed(s, pick_device(s.device)).describe()


__all__ = ["Engine", "prepare", "stylize", "stylize_animation", "stylize_frames"]
