"""How much memory a scale needs, from its size and settings, and how much a run may use.

The figures are measured, not guessed: ``python -m benchmarks.memory_model`` runs one scale of
``stylize`` per fresh process at several sizes, resets the kernel's peak-RSS mark after the
model is built, and fits the peak over the RSS at the scale's start as a fixed part plus a part
per optimised pixel (least squares); ``tests/test_memory_model.py`` checks predictions against
new measurements. The engine adds the prediction to the process's RSS when a scale starts: a
scale that would exceed the budget is painted in tiles (core/engine/tiles.py) whose largest one
fits.

Model: ``peak = rss_at_start + fixed + per_pixel * pixels (+ canvas_per_pixel * all pixels
when tiled)``. What the per-pixel cost holds: the activations autograd keeps for the backward
pass (VGG19 up to relu5_1), their gradients, the optimiser's state (L-BFGS: ``history + 1``
pairs of image-sized rows), Winograd scratch; the fixed part is what a first step allocates
once (oneDNN and Winograd workspaces, the Gram matrices). Two tables: with the heap kept whole
(measured on Intel Xeon with AMX) and with torch's large blocks on transparent huge pages, the
engine's default where the kernel offers them (measured on AMD EPYC); the planner takes the one
the process runs with. Other allocators and kernels differ by some percent, so the budget keeps
a margin (:data:`SAFETY`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from core.byte_sizes import parse_bytes

MiB = 2**20


@dataclass(frozen=True)
class ScaleCost:
    """What optimising ``pixels`` pixels at once adds to the process's peak, in bytes."""

    fixed: float
    per_pixel: float
    tile_extra: float = 1.2
    """What a tile's steps add per pixel in a print-size run, over this cost of the same pixels
    in a fresh process: the heap that the run's earlier scales and tiles left behind. With the
    heap kept whole, measured from four runs' peaks over the planner's prediction (2048 px at
    1.5GB three times, 4096 px at 3GB once; benchmarks/tiles.py, Intel with AMX): 1.16-1.21x
    the predicted extra (without it, a 2048 px run peaked 8 MB over its budget). 1 where
    torch's large blocks are unmapped when freed (HUGE_PAGE_COSTS)."""

    def extra(self, pixels: int) -> int:
        return int(self.fixed + self.per_pixel * pixels)

    def pixels_within(self, room: float) -> int:
        """The most pixels whose extra memory fits in ``room`` bytes (0 if none)."""
        return max(0, int((room - self.fixed) / self.per_pixel))


# Measured 2026-11-30 with `python -m benchmarks.memory_model` on the project's CI machine kind
# (Intel Xeon with AMX, 2 cores shared with other jobs, torch 2.13 CPU, glibc), one scale of
# 12 steps at 256, 512, 768 and 1024 px (4:3; bf16 L-BFGS also at 1280 and 1448 px, and 512
# and 1024 px measured again: repeated points differ by up to 240 MiB at 1024 px, the heap's
# layout). Per pixel: the least-squares slope; fixed: raised until every point is on or under
# the line. Extra MiB measured (pixels): lbfgs/fp32 218, 625, 1186, 2118 (49152, 196608,
# 442368, 786432); lbfgs/bf16 144, 433-490, 815, 1425-1665, 2497, 3104 (..., 1228800,
# 1572528); adam/fp32 285, 611, 1160, 2018; adam/bf16 204, 419, 798, 1456.
COSTS: dict[tuple[str, str], ScaleCost] = {
    ("lbfgs", "fp32"): ScaleCost(fixed=123.5 * MiB, per_pixel=2674.8),
    ("lbfgs", "bf16"): ScaleCost(fixed=132.2 * MiB, per_pixel=2043.6),
    ("lbfgs", "plain"): ScaleCost(fixed=123.5 * MiB, per_pixel=2674.8),
    ("adam", "fp32"): ScaleCost(fixed=169.6 * MiB, per_pixel=2464.6),
    ("adam", "bf16"): ScaleCost(fixed=120.0 * MiB, per_pixel=1782.7),
    ("adam", "plain"): ScaleCost(fixed=123.5 * MiB, per_pixel=2674.8),
    # Measured 2026-11-30 with `python -m benchmarks.memory_model --device cuda --sizes
    # 512,1024,2048,3072` on an NVIDIA H200 (torch 2.11 CUDA 13.0, cuDNN 9.19): GPU memory from
    # PyTorch's allocator (peak allocated over allocated at the start), fresh process per point.
    # Extra MiB at 196608, 786432, 3145728, 7077888 pixels: lbfgs/bf16 344, 1154, 4387, 9787;
    # lbfgs/fp32 467, 1636, 6325, 14147; adam/bf16 293, 945, 3559, 7924; adam/fp32 416, 1429,
    # 5497, 12285. The least-squares lines miss by at most 3.1 MiB; fixed parts raised by 4 MiB.
    ("lbfgs", "cuda-bf16"): ScaleCost(fixed=78 * MiB, per_pixel=1438.8),
    ("lbfgs", "cuda-fp32"): ScaleCost(fixed=78 * MiB, per_pixel=2084.8),
    ("adam", "cuda-bf16"): ScaleCost(fixed=78 * MiB, per_pixel=1162.8),
    ("adam", "cuda-fp32"): ScaleCost(fixed=78 * MiB, per_pixel=1808.9),
}
"""(optimizer, kind) -> cost of one optimisation scale. Kind: "bf16" (autocast), "fp32"
(Winograd convolutions and fused pooling, the CPU's fp32 path), "plain" (fp32 without either:
the CPU's with those levers off); "cuda-bf16" and "cuda-fp32" on CUDA GPUs (cuDNN)."""
# Measured 2026-12-01 with `python -m benchmarks.memory_model --huge-pages` on AMD EPYC (Zen 4,
# no AMX; 2 cores, THP "madvise", torch 2.13 CPU, glibc), fresh process per point, 12 steps.
# Extra MiB (pixels): lbfgs/bf16 146-164 (49152), 371-415 (196608, four runs), 617-632
# (442368), 814-835 (786432), 1233 (1228800), 1525 (1572528); least squares 155-183 MiB +
# 895-974 B/pixel. lbfgs/fp32 229, 487, 859, 1241 at 49152 ... 786432 pixels (201.6 MiB +
# 1429 B/pixel). The same machine without huge pages: lbfgs/bf16 409-446 and 1611 MiB at
# 196608 and 786432 pixels, as COSTS (measured on Intel) predicts. Set above every point:
# the 512-768 px points bound the fixed part, the slope is rounded up from the fit's.
HUGE_PAGE_COSTS: dict[tuple[str, str], ScaleCost] = {
    ("lbfgs", "bf16"): ScaleCost(fixed=240 * MiB, per_pixel=1000.0, tile_extra=1.0),
    ("lbfgs", "fp32"): ScaleCost(fixed=260 * MiB, per_pixel=1500.0, tile_extra=1.0),
}
"""(optimizer, kind) -> cost of one optimisation scale where torch's large CPU blocks are on
transparent huge pages (core/engine/cpu/memory.py, the engine's way where the kernel offers
them): those blocks are unmapped when freed, so the peak is what is alive at once, not a heap
kept whole. About half of COSTS from 1024 px up, so a print-size scale is painted in fewer,
larger tiles (less overlap and context to optimise). Kinds not measured this way use COSTS,
which bounds them from above. No heap is left behind for later tiles (``tile_extra`` 1): with
1.2, the 4096 px print at 3GB and the 2048 px one at 1.5GB peaked 0.38 and 0.13 GB under the
prediction (2.287 GB against 2.665, 1.211 against 1.342; AMD EPYC, docs/BENCHMARKS.md)."""
# Measured 2026-11-30 with ``benchmarks.memory_model.measure("targets/<kind>", 768)`` (589824
# pixels, same machine kind as COSTS): extra MiB fp32 520; bf16 419, 471 and, in a CI run, 533
# (the heap's layout varies from run to run). Per pixel set so the fixed part plus it bounds
# those points by a few percent; one size only, so the budget's SAFETY margin covers the rest.
TARGETS: dict[str, ScaleCost] = {
    "fp32": ScaleCost(fixed=50 * MiB, per_pixel=850.0),
    "bf16": ScaleCost(fixed=50 * MiB, per_pixel=900.0),
    "plain": ScaleCost(fixed=50 * MiB, per_pixel=850.0),
    # CUDA: same command and machine as the CUDA rows of COSTS (targets/<kind>, the style image
    # as large as the scale): extra MiB at 262144, 1048576, 4194304, 9437184 pixels: bf16 168,
    # 577, 2212, 4938; fp32 187, 749, 2996, 6742 (fits within 0.3 MiB; fixed parts raised).
    "cuda-bf16": ScaleCost(fixed=36 * MiB, per_pixel=545.1),
    "cuda-fp32": ScaleCost(fixed=4 * MiB, per_pixel=749.1),
}
"""kind -> cost of a forward pass without gradients (the style and content targets), per
pixel of the image passed through."""
MEASURED_HISTORY = 10
"""L-BFGS history the costs were measured with; each further pair adds two float32 rows."""
HISTORY_BYTES_PER_PIXEL = 2 * 3 * 4
CANVAS_BYTES_PER_PIXEL = 3 * 4 + 3 * 4 // 2 + 3 + 4
"""A tiled scale also holds its whole image (float32 RGB), the previous scale's (half the
pixels), the photo resized to the scale (8-bit RGB) and the blending weights of one tile row
at most (bounded here by a float per pixel)."""
SAFETY = 0.9
"""Share of the budget the predictions may fill: the model is fitted on one machine kind."""
AUTO_SHARE = 0.5
"""``max_memory="auto"``: this share of the memory available when the run starts."""


def kind_of(dtype_name: str, winograd: bool, fused_pooling: bool, cuda: bool = False) -> str:
    """The cost table's kind for a run's precision and levers (and device: CUDA or not)."""
    if cuda:
        return "cuda-fp32" if dtype_name == "fp32" else "cuda-bf16"
    if dtype_name != "fp32":
        return "bf16"
    return "fp32" if (winograd or fused_pooling) else "plain"


def scale_cost(
    optimizer: str, kind: str, lbfgs_history: int = MEASURED_HISTORY, huge_pages: bool = False
) -> ScaleCost:
    """The cost of one optimisation scale (with torch's large blocks on huge pages or not);
    L-BFGS's history beyond the measured one added."""
    table = HUGE_PAGE_COSTS if huge_pages and (optimizer, kind) in HUGE_PAGE_COSTS else COSTS
    base = table[(optimizer, kind)]
    if optimizer != "lbfgs":
        return base
    more = (lbfgs_history - MEASURED_HISTORY) * HISTORY_BYTES_PER_PIXEL
    return replace(base, per_pixel=base.per_pixel + more)


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def rss_now() -> int | None:
    """This process's resident set size (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def resolve_budget(setting: str, held: int, free: int | None) -> int | None:
    """The budget in bytes for ``Settings.max_memory``: the given amount, or for ``auto`` what
    the process holds plus AUTO_SHARE of what is free (None when free memory is unknown: no
    limit)."""
    if setting != "auto":
        return parse_bytes(setting, name="max_memory")
    if free is None:
        return None
    return held + int(AUTO_SHARE * free)
