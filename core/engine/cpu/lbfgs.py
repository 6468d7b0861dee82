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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch


class LBFGS:
    """``torch.optim.LBFGS`` with ``max_iter=1`` and ``line_search_fn=None`` for one tensor."""

    def __init__(
        self,
        param: torch.Tensor,
        lr: float = 1.0,
        history_size: int = 10,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
    ) -> None:
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
        self._h_diag: int | torch.Tensor = 1
        self.n_iter = 0

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
        if torch.linalg.vector_norm(g, float("inf")) <= self.tolerance_grad:
            return loss
        self.n_iter += 1
        if self.n_iter == 1:
            torch.neg(g, out=self._d)
            self._h_diag = 1
        else:
            self._update_direction(g)
        self._prev_grad.copy_(g)
        if self.n_iter == 1:
            # torch's own expression: a float 1.0 or a 0-dim tensor, kept as is.
            self._t = cast(float | torch.Tensor, min(1.0, 1.0 / g.abs().sum())) * self.lr
        else:
            self._t = self.lr
        if g.dot(self._d) > -self.tolerance_change:  # not a descent direction: no step
            return loss
        self.param.add_(self._d.view_as(self.param), alpha=self._t)  # type: ignore[arg-type]
        return loss

    def _update_direction(self, g: torch.Tensor) -> None:
        """Store the newest curvature pair (if it has positive curvature) and compute the
        quasi-Newton direction into ``_d`` by the two-loop recursion."""
        row = next(i for i in range(self.history_size + 1) if i not in self._rows)
        y, s = self._y[row], self._s[row]
        torch.sub(g, self._prev_grad, out=y)
        torch.mul(self._d, self._t, out=s)
        ys = y.dot(s)
        if ys > 1e-10:
            if len(self._rows) == self.history_size:
                self._rows.pop(0)
                self._ro.pop(0)
            self._rows.append(row)
            self._ro.append(1.0 / ys)
            self._h_diag = ys / y.dot(y)
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
