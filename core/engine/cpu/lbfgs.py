"""L-BFGS with one function evaluation per step and no line search, for one tensor, with all of
its state in buffers allocated once.

It computes what ``torch.optim.LBFGS(params, lr, max_iter=1, history_size=m)`` computes (the
engine's configuration: one evaluation per step, no line search; see ``core/settings.py`` for
where it comes from), with the same operations in the same order, so the iterates are identical
(``tests/test_lbfgs.py``).

Why not torch's own: it allocates its history vectors, search direction and gradient copy anew
on every step, and each of those image-sized blocks outlives the step, so it lands in another
hole of the heap each time. The heap's layout then drifts from step to step and a run's peak
memory crept up over its first steps (malloc tracing: the only large blocks that survive a step
were these; the figures are in docs/BENCHMARKS.md). Here the history is a ring of preallocated rows and the
gradient buffer is zeroed in place, so a step leaves the heap as it found it.

One addition, off unless ``reject_above`` is given: a step that multiplies the loss by more
than that is rejected (``_reject``), as a trust-region method rejects a step whose loss its
model did not predict (Nocedal and Wright, *Numerical Optimization*, 2nd ed., ch. 4). Without a
line search nothing else stops a bad curvature estimate from throwing the image far uphill:
with bf16's gradients (about 6 % off fp32's) that happened at most of the 512 px scales
measured on an AMD EPYC, and the default run ended 1.6-2.6x above fp32's loss
(core/engine/scale.py has the figures).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch


class LBFGS:
    """``torch.optim.LBFGS`` with ``max_iter=1`` and ``line_search_fn=None`` for one tensor
    (plus, with ``reject_above``, the rejection of a step that blew the loss up)."""

    def __init__(
        self,
        param: torch.Tensor,
        lr: float = 1.0,
        history_size: int = 10,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        reject_above: float | None = None,
        first_scale: float | None = None,
    ) -> None:
        """``first_scale``: the curvature scale (:attr:`curvature_scale`) of a like problem just
        solved; the first step is then ``-first_scale * g`` at ``lr``, as a later step with an
        empty history would be, not torch's ``lr * min(1, 1/|g|_1)`` along ``-g``. On an image
        torch's first step moves almost nothing: the first two evaluations of every scale and
        tile of an engine trace were equal to 3 digits, one step in five of a print's last
        tiles (docs/BENCHMARKS.md)."""
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        n = param.numel()

        def buffer(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=param.dtype, device=param.device)

        self.param, self.lr, self.history_size = param, lr, history_size
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        # One spare row: a candidate pair is written before it is known whether it is kept.
        self._y, self._s = buffer(history_size + 1, n), buffer(history_size + 1, n)
        self._d, self._q, self._prev_grad = buffer(n), buffer(n), buffer(n)
        self._rows: list[int] = []  # rows of the pairs in use, oldest first
        self._ro: list[torch.Tensor] = []
        self._al: list[torch.Tensor] = [torch.zeros(())] * history_size
        self._t: float | torch.Tensor = lr
        self._h_diag: float | torch.Tensor = 1.0
        self.n_iter = 0
        self.reject_above = reject_above
        self.first_scale = first_scale
        self._last_loss: float | None = None
        self.rejected = 0

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient in place (kept, not re-allocated by every backward pass)."""
        if set_to_none:
            self.param.grad = None
        elif self.param.grad is not None:
            self.param.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Evaluate ``closure`` (which computes the loss and its gradient) and take one step;
        returns the loss at the point before the step, as torch's L-BFGS does."""
        with torch.enable_grad():
            loss = closure()
        grad = self.param.grad
        g = grad.view(-1) if grad is not None else torch.zeros_like(self._d)
        # Reading the loss syncs a GPU; the engine reads it after every step anyway (progress).
        if self.reject_above is not None:
            value = float(loss)
            if self._blew_up(value):
                self._reject(g, learn=math.isfinite(value))
                return loss
        if torch.linalg.vector_norm(g, float("inf")) <= self.tolerance_grad:
            return loss
        self.n_iter += 1
        if self.n_iter == 1:
            self._h_diag = 1.0 if self.first_scale is None else self.first_scale
            torch.mul(g, -self._h_diag, out=self._d)
        else:
            self._store_pair(g)
            self._direction(g)
        self._prev_grad.copy_(g)
        if self.n_iter == 1 and self.first_scale is None:
            # torch's own expression: a float 1.0 or a 0-dim tensor, kept as is.
            self._t = cast(float | torch.Tensor, min(1.0, 1.0 / g.abs().sum())) * self.lr
        else:
            self._t = self.lr
        if g.dot(self._d) > -self.tolerance_change:  # not a descent direction: no step
            return loss
        self.param.add_(self._d.view_as(self.param), alpha=self._t)  # type: ignore[arg-type]
        return loss

    @property
    def curvature_scale(self) -> float | None:
        """``s.y / y.y`` of the newest curvature pair (the scale of the inverse Hessian that
        L-BFGS starts its recursion from; Nocedal and Wright eq. 7.20), None before any."""
        return float(self._h_diag) if self._rows else None

    def _blew_up(self, value: float) -> bool:
        """Whether the last step took the loss above ``reject_above`` times the loss where it
        started (never with ``reject_above`` None, torch's behaviour)."""
        last = self._last_loss
        blew = (
            self.reject_above is not None
            and last is not None
            and self.n_iter > 0
            and not value <= self.reject_above * last  # NaN counts as a blow-up
        )
        if not blew:
            self._last_loss = value  # a retaken step is measured against the same start
        return blew

    def _reject(self, g: torch.Tensor, learn: bool) -> None:
        """Undo the last step and take it again from where it began, with what it taught.

        The step's curvature pair (its length, and the gradient ``g`` where it landed less the
        one where it began) is true of the function wherever the image goes next, so it joins
        the history, and the quasi-Newton direction at the start point (whose gradient is
        ``_prev_grad``) is computed again with it: a trust-region method's rejected step, for no
        extra evaluation. Where the pair shows no positive curvature, or the loss was not finite
        (``learn`` False: its gradient says nothing), the history is unchanged and the step is
        halved instead, as a backtracking line search would. Dropping the history and starting
        again with a first step's length (tried first) threw away what L-BFGS had learnt of the
        scale: at the usual overshoot early in a scale it stalled, and tests/test_tiling.py's
        8-step runs ended 2-4.5x higher.
        """
        self.rejected += 1
        kept = learn and self._store_pair(g)
        self.param.sub_(self._d.view_as(self.param), alpha=self._t)  # type: ignore[arg-type]
        if kept:
            self._direction(self._prev_grad)
            self._t = self.lr
        else:
            self._t = 0.5 * self._t
        self.param.add_(self._d.view_as(self.param), alpha=self._t)  # type: ignore[arg-type]

    def _store_pair(self, g: torch.Tensor) -> bool:
        """Add the last step's curvature pair (``g`` less ``_prev_grad``, over the step) to the
        history if its curvature is positive; whether it was added."""
        row = next(i for i in range(self.history_size + 1) if i not in self._rows)
        y, s = self._y[row], self._s[row]
        torch.sub(g, self._prev_grad, out=y)
        torch.mul(self._d, self._t, out=s)
        ys = y.dot(s)
        if not ys > 1e-10:
            return False
        if len(self._rows) == self.history_size:
            self._rows.pop(0)
            self._ro.pop(0)
        self._rows.append(row)
        self._ro.append(1.0 / ys)
        self._h_diag = ys / y.dot(y)
        return True

    def _direction(self, g: torch.Tensor) -> None:
        """The quasi-Newton direction at a point whose gradient is ``g``, into ``_d``, by the
        two-loop recursion over the history."""
        rows, ro, al = self._rows, self._ro, self._al
        q = torch.neg(g, out=self._q)
        for i in range(len(rows) - 1, -1, -1):
            al[i] = self._s[rows[i]].dot(q) * ro[i]
            # 0-dim tensor alphas, as in torch.optim.LBFGS (same arithmetic; the stubs say Number)
            q.add_(self._y[rows[i]], alpha=-al[i])  # type: ignore[arg-type]
        r = torch.mul(q, self._h_diag, out=self._d)
        for i in range(len(rows)):
            be_i = self._y[rows[i]].dot(r) * ro[i]
            r.add_(self._s[rows[i]], alpha=al[i] - be_i)  # type: ignore[arg-type]
