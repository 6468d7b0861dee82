"""The engine's process keeps freed heap memory during a run and gives it back afterwards."""

from __future__ import annotations

import sys

import pytest

from core.engine import run as engine
from core.engine.cpu import memory
from core.errors import Cancelled
from tests.conftest import make_image


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(memory, "_LIBC", fake)
    monkeypatch.setattr(memory, "_kept", False)
    return fake


def test_a_run_keeps_freed_memory_and_trims_at_each_scale_and_at_the_end(
    libc: FakeLibc, tiny_settings
) -> None:
    r = engine.stylize(make_image(64, 48), [make_image(64, 48, seed=2)], tiny_settings())
    settings = [c for c in libc.calls if c[0] == "mallopt"]
    assert settings == [
        ("mallopt", memory.M_MMAP_MAX, 0),
        ("mallopt", memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
    ]
    trims = [c for c in libc.calls if c[0] == "trim"]
    # At each scale's start and before its first step (after the targets), and at the end.
    assert len(trims) == 2 * len(r.metadata["scales"]) + 1
    assert libc.calls[-1][0] == "trim"
    engine.stylize(make_image(64, 48), [make_image(64, 48, seed=2)], tiny_settings())
    assert len([c for c in libc.calls if c[0] == "mallopt"]) == 2  # once per process


def test_a_cancelled_run_gives_its_memory_back_too(libc: FakeLibc, tiny_settings) -> None:
    with pytest.raises(Cancelled):
        engine.stylize(
            make_image(64, 48), [make_image(64, 48)], tiny_settings(), should_stop=lambda: True
        )
    assert libc.calls[-1][0] == "trim"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_takes_the_settings() -> None:
    if memory._LIBC is None:
        pytest.skip("not glibc")
    assert memory.keep_freed_memory()
