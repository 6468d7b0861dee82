"""The memory model's predictions against peaks measured now, on this machine, in fresh
processes (benchmarks/memory_model.py), and the budget it is compared with."""

from __future__ import annotations

import pytest
import torch

from benchmarks import memory_model as measuring
from core.engine import memory_model
from core.engine.cpu import memory
from core.engine.device import pick_precision
from core.settings import Settings

MiB = 2**20


def default_kind() -> str:
    """The kind the engine runs by default on this CPU (bf16 with AMX, else fp32 Winograd)."""
    return "bf16" if pick_precision(Settings(), torch.device("cpu")) is not None else "fp32"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "huge_pages"),
    [(256, False), (512, False), (768, False), (512, True), (768, True), (1024, True)],
)
def test_prediction_bounds_the_measured_peak_of_a_scale(size: int, huge_pages: bool) -> None:
    """Both tables: the heap kept whole, and torch's large blocks on huge pages (the engine's
    default; where the kernel has none, the point says so and the first table applies). The
    huge-page table is checked from 512 px up, where it decides tiles: below, its fixed part
    (set by the 512-768 px points) over-predicts by more than the 100 MiB allowed here."""
    kind = default_kind()
    point = measuring.measure(f"lbfgs/{kind}", size, huge_pages=huge_pages)
    assert point["huge_pages"] == (huge_pages and memory.huge_pages()), point
    cost = memory_model.scale_cost("lbfgs", kind, huge_pages=point["huge_pages"])
    predicted = cost.extra(point["pixels"]) / MiB
    measured = point["extra_mb"]
    # Never under (the budget relies on it; up to 5 % for a heap laid out less kindly than in
    # any of the fitted runs), and not wastefully over: the fit's line sits on its highest
    # points, and repeated runs of one size measured up to 240 MiB apart at 1024 px.
    assert measured <= 1.05 * predicted, (size, measured, predicted)
    assert predicted - measured <= max(0.3 * predicted, 100), (size, measured, predicted)


@pytest.mark.slow
def test_prediction_bounds_the_measured_peak_of_the_targets() -> None:
    kind = default_kind()
    point = measuring.measure(f"targets/{kind}", 768)
    predicted = memory_model.TARGETS[kind].extra(point["pixels"]) / MiB
    assert point["extra_mb"] <= 1.05 * predicted, (point, predicted)
    assert predicted - point["extra_mb"] <= max(0.3 * predicted, 100), (point, predicted)


def test_longer_lbfgs_history_costs_its_rows() -> None:
    base = memory_model.scale_cost("lbfgs", "bf16")
    longer = memory_model.scale_cost("lbfgs", "bf16", lbfgs_history=20)
    assert longer.per_pixel - base.per_pixel == 10 * 2 * 3 * 4
    assert (
        memory_model.scale_cost("adam", "bf16", lbfgs_history=20)
        == memory_model.COSTS[("adam", "bf16")]
    )


def test_huge_pages_have_their_own_costs_where_measured() -> None:
    huge = memory_model.scale_cost("lbfgs", "bf16", huge_pages=True)
    assert huge == memory_model.HUGE_PAGE_COSTS[("lbfgs", "bf16")]
    assert huge.extra(1_000_000) < memory_model.scale_cost("lbfgs", "bf16").extra(1_000_000)
    longer = memory_model.scale_cost("lbfgs", "bf16", lbfgs_history=20, huge_pages=True)
    assert longer.per_pixel - huge.per_pixel == 10 * 2 * 3 * 4
    # Freed large blocks go back to the kernel: nothing is left behind for later tiles, with or
    # without a longer history; the kept heap counts what earlier scales leave.
    assert huge.tile_extra == longer.tile_extra == 1.0
    assert memory_model.scale_cost("lbfgs", "bf16", lbfgs_history=20).tile_extra > 1.0
    # Not measured with huge pages: the kept heap's costs, which bound them from above.
    assert (
        memory_model.scale_cost("adam", "bf16", huge_pages=True)
        == memory_model.COSTS[("adam", "bf16")]
    )


def test_budget_auto_is_a_share_of_what_is_free() -> None:
    assert memory_model.resolve_budget("auto", held=300, free=1000) == 300 + 500
    assert memory_model.resolve_budget("auto", held=300, free=None) is None
    assert memory_model.resolve_budget("2GB", held=300, free=1000) == 2_000_000_000
    assert memory_model.available_ram() is None or memory_model.available_ram() > 0
    assert memory_model.kind_of("bf16", True, True) == "bf16"
    assert memory_model.kind_of("fp32", True, True) == "fp32"
    assert memory_model.kind_of("fp32", False, False) == "plain"


def test_the_tile_budget_leaves_room_for_the_canvas() -> None:
    cost = memory_model.ScaleCost(fixed=100 * MiB, per_pixel=2000)
    room = 100 * MiB + 2000 * 50_000
    assert cost.pixels_within(room) == 50_000
    assert cost.pixels_within(50 * MiB) == 0


def test_every_kind_the_engine_plans_with_has_costs() -> None:
    """CUDA runs are planned with the costs measured on a GPU, not the CPU's."""
    assert memory_model.kind_of("bf16", False, False, cuda=True) == "cuda-bf16"
    assert memory_model.kind_of("fp32", False, False, cuda=True) == "cuda-fp32"
    kinds = {
        memory_model.kind_of(dtype, winograd, pooling, cuda)
        for dtype in ("fp32", "bf16")
        for winograd in (False, True)
        for pooling in (False, True)
        for cuda in (False, True)
    }
    for kind in kinds:
        assert kind in memory_model.TARGETS
        for optimizer in ("lbfgs", "adam"):
            assert memory_model.scale_cost(optimizer, kind).per_pixel > 0
    # A GPU's activations cost less than the CPU's (no Winograd or oneDNN scratch).
    assert (
        memory_model.COSTS[("lbfgs", "cuda-bf16")].per_pixel
        < memory_model.COSTS[("lbfgs", "bf16")].per_pixel
    )
