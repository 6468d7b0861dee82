"""core.lbfgs: the same iterates as torch.optim.LBFGS(max_iter=1), with state allocated once."""

from __future__ import annotations

import pytest
import torch

from core import stylize
from core.engine import scale
from core.engine.cpu.lbfgs import LBFGS
from tests.conftest import make_image


def _objective(x: torch.Tensor) -> torch.Tensor:
    """Non-convex (cosines give regions of negative curvature, whose pairs L-BFGS rejects)."""
    torch.manual_seed(0)
    a = torch.randn(x.numel(), x.numel())
    a = a @ a.T / x.numel() + 0.1 * torch.eye(x.numel())
    v = x.reshape(-1)
    return v @ a @ v * 0.05 + 0.1 * v.pow(4).sum() + 3 * v.cos().sum()


def _run(make_opt, x0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    x = x0.clone().requires_grad_()
    opt = make_opt(x)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(x)
        loss.backward()
        return loss

    iterates = []
    for _ in range(steps):
        opt.step(closure)
        iterates.append(x.detach().clone())
    return iterates


@pytest.mark.parametrize("history", [1, 3, 10])
def test_iterates_are_identical_to_torch_lbfgs(history: int) -> None:
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ours = _run(lambda x: LBFGS(x, lr=1, history_size=history), x0, 30)
    ref = _run(lambda x: torch.optim.LBFGS([x], lr=1, max_iter=1, history_size=history), x0, 30)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert torch.equal(a, b), f"step {i + 1} differs"
    assert not torch.equal(ours[-1], ours[5])  # it did move


def test_pairs_without_positive_curvature_are_skipped_like_torch() -> None:
    x0 = torch.full((8,), 0.05)  # near a maximum of the cosines: negative curvature first
    ours = LBFGS(x := x0.clone().requires_grad_(), history_size=20)
    ref = torch.optim.LBFGS([y := x0.clone().requires_grad_()], max_iter=1, history_size=20)
    for _ in range(12):
        for opt, v in ((ours, x), (ref, y)):

            def closure(opt=opt, v=v) -> torch.Tensor:
                opt.zero_grad()
                loss = _objective(v)
                loss.backward()
                return loss

            opt.step(closure)
        assert torch.equal(x, y)
    kept = len(ref.state[y]["old_dirs"])
    assert len(ours._rows) == kept < ours.n_iter - 1  # some pairs were rejected


def test_state_is_allocated_once_and_the_gradient_buffer_is_kept() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    opt = LBFGS(x, history_size=2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(x)
        loss.backward()
        return loss

    opt.step(closure)
    names = [n for n, t in vars(opt).items() if isinstance(t, torch.Tensor) and n != "param"]
    names = [n for n in names if getattr(opt, n).dim() > 0]
    assert len(names) == 5  # history pairs, direction, work vector, previous gradient
    buffers = {n: getattr(opt, n).data_ptr() for n in names}
    grad_ptr = x.grad.data_ptr()
    for _ in range(6):  # more steps than history rows: the ring wraps around
        opt.step(closure)
    assert {n: getattr(opt, n).data_ptr() for n in buffers} == buffers
    assert x.grad.data_ptr() == grad_ptr


def test_the_engine_gives_what_torch_lbfgs_gives(tiny_settings, monkeypatch) -> None:
    s = tiny_settings(iterations=8)
    ours = stylize(make_image(), [make_image(seed=3)], s).image.tobytes()

    def torch_lbfgs(settings, image):
        return torch.optim.LBFGS(
            [image], lr=1, max_iter=1, history_size=settings.lbfgs_history
        ), None

    monkeypatch.setattr(scale, "make_optimizer", torch_lbfgs)
    assert stylize(make_image(), [make_image(seed=3)], s).image.tobytes() == ours
