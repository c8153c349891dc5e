"""Batched log-domain Sinkhorn for :class:`~lightning_amor.apps.meta_ot.EntropicOT`, from any potential f.

One iteration is two half-steps, ``g ← g(f)`` then ``f ← f(g)``:

    g_j = −ε log Σ_i a_i exp((f_i − C_ij)/ε),        f_i = −ε log Σ_j b_j exp((g_j − C_ij)/ε).

The iterate is f. Iterate k is certified by the marginal error of the plan of (f_k, g(f_k)), whose columns are exact:
``‖P1 − a‖`` with ``(P1)_i = a_i exp((f_k,i − f_k+1,i)/ε)``, so the error of iterate k comes for free with
iterate k + 1. Iterate 0 is the start (zero: the cold start; a prediction: the warm start), so the error at k = 0 is
the start's own. Every problem of the batch stops by itself at the tolerance (its potential then stays put), so a
batch gives each problem the answer it would get alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_amor.apps.meta_ot import EntropicOT, check_histograms, entropic_objective
from lightning_amor.objective import Context, Objective
from lightning_amor.solvers import STOP_REASONS, Callback, Solver, SolverResult


class Sinkhorn(Solver):
    """Log-domain Sinkhorn on a batch of entropic OT problems, stopping each at a marginal error of ``tol``.

    Args:
        steps: the most iterations (each a g and an f half-step).
        tol: the marginal error (the objective's ``marginal_norm``) at which a problem stops; ``None`` runs every
            step.

    ``solve(...)`` returns f (``B x n``), the value F(f) (``B``), the iterations used, ``converged`` (the marginal
    error of the returned f is at most ``tol``) and the stop reason (``converged``, ``max_steps``, ``not_finite``).
    :attr:`last_errors` holds the ``(K + 1) x B`` marginal errors of iterates 0..K of the last solve (the residual
    trace).
    """

    def __init__(self, steps: int = 1000, tol: Optional[float] = 1e-3) -> None:
        if int(steps) != steps or steps < 0:
            raise ValueError(f"Sinkhorn: steps must be a non-negative integer, got {steps}")
        if tol is not None and not tol > 0:
            raise ValueError(f"Sinkhorn: tol must be positive or None, got {tol}")
        self.steps = int(steps)
        self.tol = None if tol is None else float(tol)
        self.last_errors: Optional[Tensor] = None

    def __repr__(self) -> str:
        return f"Sinkhorn(steps={self.steps}, tol={self.tol})"

    def _solve(
        self, objective: Objective, x: Context, init: Optional[Tensor], callback: Optional[Callback]
    ) -> SolverResult:
        ot = entropic_objective(objective, "Sinkhorn")
        check_histograms(x, ot.side, "Sinkhorn")
        with torch.no_grad():
            return self._iterate(ot, x, init, callback)

    def _iterate(self, ot: EntropicOT, x: Tensor, init: Optional[Tensor], callback: Optional[Callback]) -> SolverResult:
        dtype = init.dtype if init is not None else (x.dtype if x.is_floating_point() else torch.get_default_dtype())
        x = x.to(dtype)
        a, b = x[:, 0], x[:, 1]
        log_a, log_b = torch.log(a), torch.log(b)
        eps = ot.epsilon
        f = torch.zeros_like(a) if init is None else init.to(dtype).clone()
        batch = f.shape[0]
        iterations = torch.zeros(batch, dtype=torch.int64, device=f.device)
        active = torch.ones(batch, dtype=torch.bool, device=f.device)
        blew_up = torch.zeros(batch, dtype=torch.bool, device=f.device)  # the next iterate was NaN or infinite
        errors = []

        def step(f: Tensor) -> tuple[Tensor, Tensor]:
            g = -eps * ot.soft_min(log_a + f / eps)
            f_next = -eps * ot.soft_min(log_b + g / eps)
            error = a * (torch.exp((f - f_next) / eps) - 1.0)
            norm = error.abs().sum(-1) if ot.marginal_norm == "l1" else error.norm(dim=-1)
            return f_next, torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))

        if callback is not None:
            callback(0, f)
        f_next, error = step(f)
        errors.append(error)
        for k in range(self.steps):
            blew_up = blew_up | (active & ~torch.isfinite(f_next).all(-1))
            active = active & ~blew_up
            if self.tol is not None:
                active = active & (error > self.tol)
            if not bool(active.any()):
                break
            f = torch.where(active[:, None], f_next, f)
            iterations += active
            if callback is not None:
                callback(k + 1, f)
            f_next, new_error = step(f)
            error = torch.where(active, new_error, error)
            errors.append(error)
        self.last_errors = torch.stack(errors)
        finite = torch.isfinite(f).all(-1) & torch.isfinite(error) & ~blew_up
        converged = finite & (error <= self.tol) if self.tol is not None else torch.zeros_like(finite)
        stopped = torch.full_like(iterations, STOP_REASONS.index("max_steps"))
        stopped = torch.where(converged, STOP_REASONS.index("converged"), stopped)
        stopped = torch.where(finite, stopped, STOP_REASONS.index("not_finite"))
        g = -eps * ot.soft_min(log_a + f / eps)
        value = -(f * a).sum(-1) - (g * b).sum(-1)
        return SolverResult(f, value, iterations, converged, stopped)


class EpsilonScalingSinkhorn(Solver):
    """Sinkhorn with ε-scaling: solve at a large ε first, then at ε·factor, ε·factor², … down to the objective's ε,
    each stage started from the potential of the one before; the last stage is plain :class:`Sinkhorn` at the
    objective's ε to ``tol``, so the answer is certified exactly as Sinkhorn's.

    At small ε, Sinkhorn from zero spends most of its iterations carrying mass across the grid; at a large ε that
    takes a few iterations, and the potentials (of the size of the cost, in this module's convention) change little
    from one ε to the next. An exact speed-up for reference solves (the oracle); it is *not* a cold start to compare
    warm starts against (the benchmarks use plain :class:`Sinkhorn` from zero for that).

    Args:
        steps: the most iterations over all stages together.
        tol: the final marginal error (the objective's ``marginal_norm``) at the objective's ε.
        start_epsilon: the first stage's ε (the squared diagonal of the grid is 2); nothing is scaled when the
            objective's ε is at least this.
        factor: the ratio of two consecutive ε, in (0, 1).
        stage_tol: the marginal error at which an intermediate stage stops (at most ``stage_steps`` iterations).
        stage_steps: the most iterations of an intermediate stage.

    A given ``init`` skips the scaling (a warm start is already at the objective's ε): plain Sinkhorn then runs
    from it. ``iterations`` counts every stage's iterations.
    :attr:`last_errors` is the last stage's ``(K + 1) x B`` trace.
    """

    def __init__(self, steps: int = 20000, tol: float = 1e-5, start_epsilon: float = 1.0, factor: float = 0.5,
                 stage_tol: float = 1e-2, stage_steps: int = 200) -> None:
        if int(steps) != steps or steps < 0 or int(stage_steps) != stage_steps or stage_steps < 0:
            raise ValueError(f"EpsilonScalingSinkhorn: steps and stage_steps must be non-negative integers, got "
                             f"{steps} and {stage_steps}")
        if not tol > 0 or not stage_tol > 0 or not start_epsilon > 0:
            raise ValueError(f"EpsilonScalingSinkhorn: tol, stage_tol and start_epsilon must be positive, got {tol}, "
                             f"{stage_tol} and {start_epsilon}")
        if not 0 < factor < 1:
            raise ValueError(f"EpsilonScalingSinkhorn: factor must lie in (0, 1), got {factor}")
        self.steps, self.tol, self.start_epsilon, self.factor = int(steps), float(tol), float(start_epsilon), factor
        self.stage_tol, self.stage_steps = float(stage_tol), int(stage_steps)
        self.last_errors: Optional[Tensor] = None

    def __repr__(self) -> str:
        return (f"EpsilonScalingSinkhorn(steps={self.steps}, tol={self.tol}, start_epsilon={self.start_epsilon}, "
                f"factor={self.factor})")

    def epsilons(self, epsilon: float) -> list[float]:
        """The intermediate stages' ε, largest first, for a target ``epsilon`` (empty: no scaling)."""
        stages, current = [], self.start_epsilon
        while current > epsilon:
            stages.append(current)
            current *= self.factor
        return stages

    def _solve(
        self, objective: Objective, x: Context, init: Optional[Tensor], callback: Optional[Callback]
    ) -> SolverResult:
        ot = entropic_objective(objective, "EpsilonScalingSinkhorn")
        check_histograms(x, ot.side, "EpsilonScalingSinkhorn")
        used = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        f = init
        if init is None:
            for epsilon in self.epsilons(ot.epsilon):
                budget = min(self.stage_steps, self.steps - int(used.max()))
                stage = EntropicOT(ot.side, epsilon, ot.marginal_norm)
                with torch.no_grad():
                    result = Sinkhorn(budget, self.stage_tol)._iterate(stage, x, f, None)
                f, used = result.y, used + result.iterations
        last = Sinkhorn(max(self.steps - int(used.max()), 0), self.tol)
        with torch.no_grad():
            result = last._iterate(ot, x, f, callback)
        self.last_errors = last.last_errors
        return SolverResult(result.y, result.value, used + result.iterations, result.converged, result.stopped)
