"""core.engine.cpu.lbfgs: torch.optim.LBFGS(max_iter=1)'s iterates, with state allocated once.

The two implementations do the same arithmetic, but vector kernels may sum in another order
(buffers at other addresses, other SIMD widths: Intel with or without AMX, AMD Zen 4), so they
are compared with a tolerance, never bit for bit. ITERATE_ATOL: on this problem a one-ulp nudge
of the start moves the 30 iterates by at most 4e-6 (the iterates stay within 5 of 0), while a
real difference in the algorithm moves them by far more: lr 0.99 instead of 1 by 2e-3 from the
first step, one history pair fewer by 0.02-0.14.
"""

from __future__ import annotations

import math

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
    torch's L-BFGS rejects no step, so neither does the engine's here.
    """
    monkeypatch.setattr(scale, "REJECT_ABOVE", None)
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

    def torch_lbfgs(settings, image, first_scale=None):
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


def _two_loop(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The L-BFGS direction at gradient ``g`` from curvature pairs (s, y), oldest first, as
    Nocedal and Wright write it (Algorithm 7.4, H0 = s.y / y.y of the newest pair)."""
    q, alphas = -g.clone(), []
    for s, y in reversed(pairs):
        alphas.append(s.dot(q) / y.dot(s))
        q -= alphas[-1] * y
    s, y = pairs[-1]
    r = q * s.dot(y) / y.dot(y)
    for (s, y), a in zip(pairs, reversed(alphas), strict=True):
        r += s * (a - y.dot(r) / y.dot(s))
    return r


G1, G2 = torch.tensor([1.0, -2.0, 0.5, 1.0]), torch.tensor([0.5, -1.0, 0.2, 0.6])


@pytest.mark.parametrize("reject_above", [None, 2.0])
def test_a_step_that_blows_the_loss_up_is_retaken_with_what_it_taught(reject_above) -> None:
    """A loss more than ``reject_above`` times the last one: the step that led there is
    undone, its curvature pair joins the history, and the step is taken again from its start
    point along the direction the history now gives. Without ``reject_above`` (torch's
    behaviour) it carries on from the new point."""
    x = torch.zeros(4, requires_grad=True)
    opt = LBFGS(x, lr=1, history_size=5, reject_above=reject_above)
    g3 = torch.tensor([-1.5, 2.5, -0.5, -1.0])  # overshot: the gradient turned around
    (x0, x1), (_, x2), (_, x3) = _scripted(x, opt, [1.0, 0.9, 5.0], [G1, G2, g3])
    pairs = [(x1 - x0, G2 - G1), (x2 - x1, g3 - G2)]
    assert all(s.dot(y) > 0 for s, y in pairs)  # both kept by L-BFGS
    if reject_above is None:
        assert opt.rejected == 0
        torch.testing.assert_close(x3, x2 + _two_loop(g3, pairs))
        return
    assert opt.rejected == 1
    torch.testing.assert_close(x3, x1 + _two_loop(G2, pairs))
    # the next step is measured against the same start's loss (0.9): 1.7 is no blow-up
    list(_scripted(x, opt, [1.7], [G2]))
    assert opt.rejected == 1


def test_a_blow_up_without_positive_curvature_halves_the_step() -> None:
    """When the rejected step's pair has no positive curvature (here the gradient did not
    change), the history is no help: the same step is taken at half its length."""
    x = torch.zeros(4, requires_grad=True)
    opt = LBFGS(x, lr=1, history_size=5, reject_above=2.0)
    (_, x1), (_, x2), (_, x3) = _scripted(x, opt, [1.0, 0.9, 5.0], [G1, G2, G2])
    assert opt.rejected == 1
    torch.testing.assert_close(x3, x1 + 0.5 * (x2 - x1))


def test_a_nan_loss_counts_as_a_blow_up_and_teaches_nothing() -> None:
    x = torch.zeros(3, requires_grad=True)
    opt = LBFGS(x, lr=1, reject_above=2.0)
    g = torch.tensor([1.0, 2.0, -1.0])
    (x0, x1), (_, x2) = _scripted(x, opt, [1.0, float("nan")], [g, 3 * g])
    assert opt.rejected == 1 and opt._rows == []
    torch.testing.assert_close(x2, x0 + 0.5 * (x1 - x0))


@pytest.mark.parametrize("spike", [1000.0, float("nan")])
def test_a_rejected_step_is_not_reported_nor_taken_for_divergence(
    tiny_settings, monkeypatch, spike
) -> None:
    """The engine reports the losses of the image it holds: after a rejected step that is the
    step's start point, not the blown-up point it evaluated. A NaN there is L-BFGS's to handle
    (the step is halved); the run is not stopped as diverged."""
    real = scale._closure
    calls: list[int] = []

    def spiking(opt, fwd, grams, image, objective, *rest):
        inner = real(opt, fwd, grams, image, objective, *rest)

        def closure() -> torch.Tensor:
            loss = inner()
            calls.append(1)
            if len(calls) == 4:  # the 4th evaluation "blows up"
                objective._parts = {k: v * spike for k, v in objective._parts.items()}
                return loss * spike
            return loss

        return closure

    monkeypatch.setattr(scale, "_closure", spiking)
    seen: list[float] = []
    stylize(
        make_image(),
        [make_image(seed=3)],
        tiny_settings(iterations=6, pyramid=False, early_stop=0.0),
        on_progress=lambda p: seen.append(p.losses["total"]),
    )
    assert len(seen) == 6 and all(math.isfinite(v) for v in seen), seen
    assert seen[3] == seen[2]  # the rejected 4th step: its start point's losses


def test_a_first_step_sized_by_a_like_problems_curvature() -> None:
    """torch's first step, lr * min(1, 1/|g|_1) along -g, hardly moves an image; given the
    curvature scale of a like problem (the tile before), the first step is -scale * g."""
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    x = x0.clone().requires_grad_()
    _objective(x).backward()
    g = x.grad.clone()
    x.grad = None
    opt = LBFGS(x, lr=1, first_scale=0.3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(x)
        loss.backward()
        return loss

    assert opt.curvature_scale is None  # no pair yet
    opt.step(closure)
    torch.testing.assert_close(x.detach(), x0 - 0.3 * g)
    opt.step(closure)
    s, y = opt._s[opt._rows[-1]], opt._y[opt._rows[-1]]
    assert opt.curvature_scale == pytest.approx(float(s.dot(y) / y.dot(y)))
    # Without it, torch's first step: min(1, 1/|g|_1) along -g.
    z = x0.clone().requires_grad_()
    plain = LBFGS(z, lr=1)
    plain.step(lambda: (_objective(z).backward(), _objective(z))[1])
    step = min(1.0, 1.0 / float(g.abs().sum()))
    torch.testing.assert_close(z.detach(), x0 - step * g)
