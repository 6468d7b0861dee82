"""The engine keeps freed heap memory only while a run goes on, trims at each scale and at the
end, and leaves the allocator's settings as it found them (also after a cancel or an error)."""

from __future__ import annotations

import sys
import threading

import pytest

from core.engine import Engine
from core.engine.cpu import memory
from core.errors import Cancelled, ImageError
from tests.conftest import make_image

KEPT = {**memory.GLIBC_DEFAULTS, **memory.kept_settings()}


class FakeLibc:
    """glibc's two calls, recording the allocator's parameters and every call in order."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.params: dict[int, int] = dict(memory.GLIBC_DEFAULTS)

    def mallopt(self, param: int, value: int) -> int:
        self.params[param] = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.log.append(("trim",))
        return 1


@pytest.fixture
def log() -> list[tuple]:
    return []


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch, log: list[tuple]) -> FakeLibc:
    fake = FakeLibc(log)
    monkeypatch.setattr(memory, "_LIBC", fake)
    monkeypatch.setattr(memory, "_STARTED_WITH", dict(memory.GLIBC_DEFAULTS))
    return fake


def _run(libc: FakeLibc, log: list[tuple], settings, **kwargs):
    """A run that logs each step with the allocator parameters in force during it."""

    def on_progress(p) -> None:
        log.append(("step", p.scale, dict(libc.params)))

    return Engine().stylize(
        make_image(64, 48),
        [make_image(64, 48, seed=2)],
        settings,
        on_progress=on_progress,
        **kwargs,
    )


def _scale_starts(log: list[tuple]) -> list[int]:
    """Positions in ``log`` of each scale's first step."""
    seen: set[int] = set()
    starts = []
    for i, entry in enumerate(log):
        if entry[0] == "step" and entry[1] not in seen:
            seen.add(entry[1])
            starts.append(i)
    return starts


def test_a_run_keeps_freed_memory_only_while_it_goes_on(libc, log, tiny_settings) -> None:
    before = dict(libc.params)
    r = _run(libc, log, tiny_settings(iterations=2))
    steps = [e for e in log if e[0] == "step"]
    assert steps and all(e[2] == KEPT for e in steps)
    assert libc.params == before
    assert len(_scale_starts(log)) == len(r.metadata["scales"]) == 3
    # Freed pages go back before every scale's first step (not only once per run) and at the end.
    previous = 0
    for start in _scale_starts(log):
        assert ("trim",) in log[previous:start]
        previous = start
    assert log[-1] == ("trim",)


def test_a_cancelled_or_failed_run_restores_the_allocator_and_gives_memory_back(
    libc, log, tiny_settings
) -> None:
    before = dict(libc.params)
    steps = iter([False, False, False, True])
    with pytest.raises(Cancelled):
        _run(libc, log, tiny_settings(iterations=2), should_stop=lambda: next(steps))
    assert [e[0] for e in log].count("step") == 3  # it really was mid-run
    assert libc.params == before
    assert log[-1] == ("trim",)
    log.clear()
    with pytest.raises(ImageError):  # too thin for the output size: fails before any step
        Engine().stylize(make_image(64, 2), [make_image()], tiny_settings())
    assert libc.params == before
    assert log == [("trim",)]


def test_overlapping_runs_restore_only_when_the_last_one_ends(libc) -> None:
    with memory.during_run():
        assert libc.params == KEPT
        with memory.during_run():
            assert libc.params == KEPT
        assert libc.params == KEPT  # the outer run still goes on
    assert libc.params == memory.GLIBC_DEFAULTS


def test_the_allocator_lever_leaves_the_settings_alone(libc, log, tiny_settings) -> None:
    Engine(keep_heap=False).stylize(make_image(), [make_image(seed=2)], tiny_settings())
    assert libc.params == memory.GLIBC_DEFAULTS
    assert log[-1] == ("trim",)


@pytest.mark.parametrize("huge", [False, True])
def test_a_run_painted_in_tiles_keeps_freed_memory_only_with_huge_pages(
    libc, log, tiny_settings, monkeypatch, huge
) -> None:
    """A run within a tight memory budget keeps no freed memory where the heap would hold the
    large blocks too (it fragments between tiles); with them mapped on huge pages it does
    (docs/BENCHMARKS.md, print sizes). Either way it gives memory back at the end."""
    from core.engine import memory_model
    from tests.test_tiling import HELD, SIZE, TILE_PIXELS, budget_for

    monkeypatch.setattr(memory, "huge_pages", lambda: huge)
    kept = {**memory.GLIBC_DEFAULTS, **memory.kept_settings()}
    monkeypatch.setattr(memory_model, "rss_now", lambda: HELD)
    s = tiny_settings(size=SIZE[0], min_size=80, iterations=2, precision="fp32")
    s = s.replace(max_memory=budget_for(s, SIZE, TILE_PIXELS))

    def on_progress(p) -> None:
        log.append(("step", p.scale, dict(libc.params)))

    r = Engine().stylize(make_image(*SIZE), [make_image(seed=2)], s, on_progress=on_progress)
    assert max(r.metadata["tiles"]) > 1, r.metadata["tiles"]
    steps = [e for e in log if e[0] == "step"]
    assert steps and all(e[2] == (kept if huge else memory.GLIBC_DEFAULTS) for e in steps)
    assert libc.params == memory.GLIBC_DEFAULTS and log[-1] == ("trim",)
    log.clear()
    _run(libc, log, tiny_settings(iterations=2))  # the same engine, untiled: kept again
    assert all(e[2] == kept for e in log if e[0] == "step")


def test_an_animation_keeps_freed_memory_only_while_it_is_painted(libc, log, tiny_settings) -> None:
    """Clips go through the same rule as stills: kept during the frames' steps, the
    allocator's settings put back afterwards (they were left changed before)."""
    from core.engine import stylize_frames

    def on_progress(p) -> None:
        log.append(("step", p.frame, dict(libc.params)))

    frames = [make_image(64, 48, seed=k) for k in (3, 4)]
    settings = tiny_settings(iterations=2)
    stylize_frames(frames, [make_image(seed=2)], settings, on_progress=on_progress)
    steps = [e for e in log if e[0] == "step"]
    assert {e[1] for e in steps} == {1, 2} and all(e[2] == KEPT for e in steps)
    assert libc.params == memory.GLIBC_DEFAULTS and log[-1] == ("trim",)


def test_the_values_restored_are_those_the_environment_set_at_start() -> None:
    assert memory.started_with({}) == memory.GLIBC_DEFAULTS
    env = {"MALLOC_TRIM_THRESHOLD_": "4096", "MALLOC_MMAP_MAX_": "bad"}
    assert memory.started_with(env) == {**memory.GLIBC_DEFAULTS, memory.M_TRIM_THRESHOLD: 4096}
    env["GLIBC_TUNABLES"] = "glibc.malloc.check=0:glibc.malloc.mmap_max=0x10:glibc.malloc.x"
    assert memory.started_with(env) == {
        **memory.GLIBC_DEFAULTS,
        memory.M_MMAP_MAX: 16,
        memory.M_TRIM_THRESHOLD: 4096,
    }
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    assert memory.started_with(env)[memory.M_MMAP_THRESHOLD] == 65536


def test_large_blocks_are_mapped_only_where_torch_puts_them_on_huge_pages(monkeypatch) -> None:
    """Without huge pages, mapping each large block made steps 1.2x slower (a fault per 4 KiB),
    so the heap is kept whole there; with them, large blocks are mapped and the heap is never
    trimmed on free (docs/BENCHMARKS.md, "Heap and huge pages")."""
    monkeypatch.setattr(memory, "huge_pages", lambda: True)
    huge = memory.kept_settings()
    assert huge[memory.M_MMAP_THRESHOLD] == memory.MMAP_THRESHOLD
    assert huge[memory.M_TRIM_THRESHOLD] == memory.TRIM_THRESHOLD
    assert memory.M_MMAP_MAX not in huge  # mapping stays allowed
    monkeypatch.setattr(memory, "huge_pages", lambda: False)
    assert memory.kept_settings() == {memory.M_MMAP_MAX: 0, memory.M_TRIM_THRESHOLD: 1 << 30}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_importing_the_engine_puts_torchs_large_blocks_on_huge_pages() -> None:
    """``core.engine`` sets THP_MEM_ALLOC_ENABLE before torch's first allocation, in a process
    that imports torch first too; huge pages are used wherever the kernel offers them."""
    import os
    import subprocess
    from pathlib import Path

    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        pytest.skip("this kernel has no transparent huge pages")
    code = (
        "import torch, core.engine; from core.engine.cpu import memory; print(memory.huge_pages())"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def huge_pages_in_a_fresh_process() -> str:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        ).stdout.split()[-1]

    assert huge_pages_in_a_fresh_process() == str("[never]" not in mode)
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # what the environment set is kept: the heap kept whole
    assert huge_pages_in_a_fresh_process() == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_takes_the_settings_and_the_defaults_back() -> None:
    if memory._LIBC is None:
        pytest.skip("not glibc")
    done = threading.Event()

    def run() -> None:  # in a thread: the real allocator, then its defaults back
        with memory.during_run():
            assert memory._kept
        done.set()

    run()
    assert done.is_set() and not memory._kept
