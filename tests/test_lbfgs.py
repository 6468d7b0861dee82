"""core.engine.cpu.lbfgs: torch.optim.LBFGS(max_iter=1)'s iterates, with state allocated once.

The two implementations do the same arithmetic, but vector kernels may sum in another order
(buffers at other addresses, other SIMD widths: Intel with or without AMX, AMD Zen 4), so they
are compared with a tolerance, never bit for bit. ITERATE_ATOL: on this problem a one-ulp nudge
of the start moves the 30 iterates by at most 4e-6 (the iterates stay within 5 of 0), while a
real difference in the algorithm moves them by far more: lr 0.99 instead of 1 by 2e-3 from the
first step, one history pair fewer by 0.02-0.14.
"""

from __future__ import annotations

import pytest
import torch

from core import stylize
from core.engine import scale
from core.engine.cpu.lbfgs import LBFGS
from tests.conftest import make_image

ITERATE_ATOL = 2e-5


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
def test_iterates_match_torch_lbfgs(history: int) -> None:
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ours = _run(lambda x: LBFGS(x, lr=1, history_size=history), x0, 30)
    ref = _run(lambda x: torch.optim.LBFGS([x], lr=1, max_iter=1, history_size=history), x0, 30)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=ITERATE_ATOL, msg=f"step {i + 1} differs")
    assert (ours[-1] - ours[5]).abs().max() > 100 * ITERATE_ATOL  # it did move


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
        torch.testing.assert_close(x, y, rtol=0, atol=ITERATE_ATOL)
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
    """The engine drives both optimisers alike (closure, in-place zeroed gradient buffer).

    The engine's problem amplifies rounding fast (L-BFGS without a line search on a deep
    network): a one-ulp nudge of the start image moved the losses of these 6 steps by up to 0.3%
    and the image by at most 3 levels (mean 0.4). So the losses are compared at 1% and the
    images loosely; a driver fault shows far above that (a gradient not zeroed between steps
    doubles the loss by step 5). The arithmetic itself is compared step by step above.
    """
    s = tiny_settings(iterations=6, pyramid=False)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        losses: list[float] = []
        r = stylize(
            make_image(),
            [make_image(seed=3)],
            s,
            on_progress=lambda p: losses.append(p.losses["total"]),
        )
        return torch.tensor(losses), torch.tensor(list(r.image.tobytes()), dtype=torch.float32)

    ours, ours_img = run()

    def torch_lbfgs(settings, image):
        return torch.optim.LBFGS(
            [image], lr=1, max_iter=1, history_size=settings.lbfgs_history
        ), None

    monkeypatch.setattr(scale, "make_optimizer", torch_lbfgs)
    ref, ref_img = run()
    assert len(ours) == len(ref) == 6
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=0)
    assert (ours_img - ref_img).abs().mean() <= 1.0
    assert (ours_img - ref_img).abs().max() <= 8


def _scripted(x: torch.Tensor, opt: LBFGS, losses: list[float], grads: list[torch.Tensor]):
    """Steps whose closure reports the given losses and gradients, one per step."""
    for loss, grad in zip(losses, grads, strict=True):

        def closure(loss: float = loss, grad: torch.Tensor = grad) -> torch.Tensor:
            x.grad = grad.clone()
            return torch.tensor(loss)

        before = x.detach().clone()
        opt.step(closure)
        yield before, x.detach().clone()


@pytest.mark.parametrize("restart_above", [None, 2.0])
def test_a_step_that_blows_the_loss_up_is_undone_and_restarted(restart_above) -> None:
    """A loss more than ``restart_above`` times the last one: the step that led there is
    undone and L-BFGS starts again from its start point, with that point's gradient and a
    first step's length, its history dropped. Without ``restart_above`` (torch's behaviour)
    it carries on from the new point."""
    x = torch.zeros(4, requires_grad=True)
    opt = LBFGS(x, lr=1, history_size=5, restart_above=restart_above)
    g1, g2, g3 = (
        torch.tensor([1.0, -2.0, 0.5, 1.0]),
        torch.tensor([0.5, -1.0, 0.2, 0.6]),
        (torch.tensor([3.0, 1.0, -2.0, 4.0])),
    )
    steps = list(_scripted(x, opt, [1.0, 0.9, 5.0], [g1, g2, g3]))
    (_, x1), (at_x1, x2), (at_x2, x3) = steps
    assert torch.equal(at_x1, x1) and torch.equal(at_x2, x2) and not torch.equal(x1, x2)
    if restart_above is None:
        assert opt.restarts == 0 and opt._rows  # its history kept
        assert not torch.allclose(x3, x1 - g2 * min(1.0, 1.0 / float(g2.abs().sum())))
    else:
        assert opt.restarts == 1 and opt._rows == []
        # from x1 (where the loss was 0.9) along -g2, its gradient: a first step's length, or
        # half the undone step's if that is shorter
        first = min(1.0, 1.0 / float(g2.abs().sum()))
        half = 0.5 * float((x2 - x1).norm()) / float(g2.norm())
        torch.testing.assert_close(x3, x1 - g2 * min(first, half))
        assert float((x3 - x1).norm()) <= 0.5 * float((x2 - x1).norm()) + 1e-6
        # the next blow-up is measured against that restart point's loss (0.9): 1.7 is not one
        list(_scripted(x, opt, [1.7], [g2]))
        assert opt.restarts == 1


def test_a_nan_loss_counts_as_a_blow_up() -> None:
    x = torch.zeros(3, requires_grad=True)
    opt = LBFGS(x, lr=1, restart_above=2.0)
    g = torch.tensor([1.0, 2.0, -1.0])
    list(_scripted(x, opt, [1.0, float("nan")], [g, g]))
    assert opt.restarts == 1
