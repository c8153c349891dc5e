"""Batched proximal-gradient solvers for composite objectives f = g + h: ISTA and FISTA.

Both take steps ``y ← P(prox_{αh}(z − α∇g(z)))`` (:func:`~lightning_amor.proximal.prox_gradient_map`) with g the
objective's :meth:`~lightning_amor.objective.Objective.smooth_projected`, h its nonsmooth part
(:meth:`~lightning_amor.objective.Objective.prox_flat`) and P its domain projection; ISTA at ``z = y``, FISTA at a
point extrapolated with Nesterov's momentum. On an objective without a nonsmooth part they are (accelerated)
projected gradient descent. They keep the contract of :mod:`lightning_amor.solvers`: per-context step sizes and
stopping, so a batch gives the same answer as each of its problems alone; autograd switched on inside, even
under ``no_grad`` or ``inference_mode``; detached results.

**Step size.** The step is α = 1/L with L a Lipschitz constant of ∇g, found per context by Beck and Teboulle's
backtracking (2009): starting from ``lipschitz``, L is multiplied by ``growth`` until the step's point p satisfies
the quadratic upper bound ``g(p) ≤ g(z) + ∇g(z)·(p − z) + (L/2)‖p − z‖²``, and L never decreases afterwards. It
needs only values of g (no Hessian-vector products), adapts to each context's curvature, and stays valid for a g
whose curvature varies over the domain, where a constant estimated once (by power iteration on Hessian-vector
products at the start, say) can be too small further on. With ``backtracking=False`` the step is the fixed
``1 / lipschitz``, for a known L (``λ_max(DᵀD)`` for ``½‖x − Dy‖²``).

**Stopping.** A context stops when the norm of its gradient mapping at its iterate,
``‖y − P(prox_{αh}(y − α∇g(y)))‖ / α`` (:func:`~lightning_amor.proximal.prox_gradient_residual`, zero exactly at
the fixed points, the minimizers for a convex g), is at most ``tol``; ``converged`` also requires a finite f. A
context where g is not finite stops there, not converged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective
from lightning_amor.proximal import prox_gradient_map
from lightning_amor.solvers import (
    Callback,
    Solver,
    SolverResult,
    _check_steps,
    _check_tol,
    _stop_reasons,
    _value_and_grad,
)

__all__ = ["FISTA", "ISTA"]


def _smooth_value_and_grad(objective: Objective, y: Tensor, x: Context) -> tuple[Tensor, Tensor]:
    """g(y) (``B``) and ∇g(y) (``B x n``) of the objective's smooth part, for every context at once, detached."""
    return _value_and_grad(objective, y, x, smooth=True)


class ISTA(Solver):
    """Batched proximal gradient descent (ISTA): ``y ← P(prox_{αh}(y − α∇g(y)))`` with α = 1/L per context.

    See the module docstring for the step size (backtracking or fixed) and the stopping rule.

    Args:
        steps: the maximum number of iterations.
        tol: a context whose gradient-mapping norm is at most ``tol`` stops; ``None`` runs every step.
        lipschitz: the initial (with backtracking) or fixed (without) Lipschitz constant L of ∇g, > 0.
        backtracking: find L per context by Beck and Teboulle's backtracking (``False``: the fixed ``1/lipschitz``).
        growth: the factor (> 1) by which backtracking increases L.
        max_backtracks: the most increases of L per iteration; the last L is used when they run out.
    """

    def __init__(
        self,
        steps: int = 1000,
        tol: Optional[float] = 1e-6,
        lipschitz: float = 1.0,
        backtracking: bool = True,
        growth: float = 2.0,
        max_backtracks: int = 40,
    ) -> None:
        name = type(self).__name__
        self.steps = _check_steps(name, steps)
        self.tol = _check_tol(name, tol)
        if not lipschitz > 0 or not math.isfinite(lipschitz):
            raise ValueError(f"{name}: lipschitz must be a positive number (L of the smooth part), got {lipschitz}")
        if not growth > 1:
            raise ValueError(f"{name}: growth must be greater than 1 (the factor that increases L), got {growth}")
        if int(max_backtracks) != max_backtracks or max_backtracks < 0:
            raise ValueError(f"{name}: max_backtracks must be a non-negative integer, got {max_backtracks}")
        self.lipschitz = float(lipschitz)
        self.backtracking = bool(backtracking)
        self.growth = float(growth)
        self.max_backtracks = int(max_backtracks)

    def _step(
        self, objective: Objective, x: Context, z: Tensor, value: Tensor, grad: Tensor, lipschitz: Tensor,
        active: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The proximal-gradient step from ``z`` (``B x n``, with g's ``B`` values and ``B x n`` gradients there)
        for the ``active`` contexts: the new point, g's values and gradients at it, and the ``B`` Lipschitz
        estimates it used (backtracked where the quadratic upper bound fails)."""
        point = prox_gradient_map(objective, z, grad, 1.0 / lipschitz[:, None])
        point_value, point_grad = _smooth_value_and_grad(objective, point, x)
        if not self.backtracking:
            return point, point_value, point_grad, lipschitz
        searching = active.clone()
        for _ in range(self.max_backtracks):
            fits = _upper_bound_holds(z, value, grad, point, point_value, point_grad, lipschitz)
            searching = searching & ~fits
            if not bool(searching.any()):
                break
            lipschitz = torch.where(searching, lipschitz * self.growth, lipschitz)
            retry = prox_gradient_map(objective, z, grad, 1.0 / lipschitz[:, None])
            retry_value, retry_grad = _smooth_value_and_grad(objective, retry, x)
            rows = searching[:, None]
            point = torch.where(rows, retry, point)
            point_value = torch.where(searching, retry_value, point_value)
            point_grad = torch.where(rows, retry_grad, point_grad)
        return point, point_value, point_grad, lipschitz

    def _start_state(self, objective: Objective, x: Context, init: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y = self._start(objective, x, init)
        return y, torch.full((y.shape[0],), self.lipschitz, dtype=y.dtype, device=y.device)

    def _result(
        self, objective: Objective, x: Context, y: Tensor, iterations: Tensor, residual: Tensor, nonfinite: Tensor
    ) -> SolverResult:
        """The result at ``y`` (``B x n``), with ``nonfinite`` (``B`` bool) the contexts stopped by a non-finite g."""
        with torch.no_grad():
            value = objective.projected(y, x).detach()
        if self.tol is None:
            converged = torch.zeros_like(iterations, dtype=torch.bool)
        else:
            converged = (residual <= self.tol) & torch.isfinite(value)
        stopped = _stop_reasons(converged, ~nonfinite & torch.isfinite(value))
        return SolverResult(y, value, iterations, converged, stopped)

    def _solve(
        self, objective: Objective, x: Context, init: Optional[Tensor], callback: Optional[Callback]
    ) -> SolverResult:
        y, lipschitz = self._start_state(objective, x, init)
        iterations = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        residual = torch.full((y.shape[0],), math.inf, dtype=y.dtype, device=y.device)
        nonfinite = torch.zeros_like(active)
        value, grad = _smooth_value_and_grad(objective, y, x)
        if callback is not None:
            callback(0, y)
        for k in range(self.steps + 1):
            if k == self.steps and self.tol is None:
                break  # no residual to report: skip the last step's evaluation
            nonfinite = nonfinite | (active & ~torch.isfinite(value))
            active = active & ~nonfinite  # no step can be trusted from a non-finite g
            point, point_value, point_grad, lipschitz_new = self._step(objective, x, y, value, grad, lipschitz, active)
            # The gradient mapping of this step is the stopping residual at y (with the step it settled on).
            residual = torch.where(active, ((y - point) * lipschitz_new[:, None]).norm(dim=-1), residual)
            if self.tol is not None:
                active = active & ~(residual <= self.tol)
            if k == self.steps or not bool(active.any()):
                break
            rows = active[:, None]
            y = torch.where(rows, point, y)
            value = torch.where(active, point_value, value)
            grad = torch.where(rows, point_grad, grad)
            lipschitz = torch.where(active, lipschitz_new, lipschitz)
            iterations += active
            if callback is not None:
                callback(k + 1, y)
        return self._result(objective, x, y, iterations, residual, nonfinite)


class FISTA(ISTA):
    """Batched accelerated proximal gradient descent (FISTA, Beck and Teboulle 2009), optionally restarted.

    Each iteration takes the proximal-gradient step from the extrapolated point ``z``, then
    ``t' = (1 + √(1 + 4t²)) / 2`` and ``z' = y' + ((t − 1) / t') (y' − y)``, per context. With ``restart``
    (O'Donoghue and Candès 2015, the gradient scheme), a context whose step goes against its momentum,
    ``(z − y')·(y' − y) > 0``, restarts it (``t = 1``, ``z = y'``), which keeps the fast rate and recovers the
    linear rate of strongly convex problems. The stopping residual is the gradient mapping at the iterate y itself
    (whose gradient comes with the step's evaluation), so ``converged`` certifies the point returned.

    Args:
        steps: the maximum number of iterations.
        tol: a context whose gradient-mapping norm at its iterate is at most ``tol`` stops; ``None`` runs every step.
        lipschitz: the initial (with backtracking) or fixed (without) Lipschitz constant L of ∇g, > 0.
        backtracking: find L per context by Beck and Teboulle's backtracking (``False``: the fixed ``1/lipschitz``).
        growth: the factor (> 1) by which backtracking increases L.
        max_backtracks: the most increases of L per iteration; the last L is used when they run out.
        restart: restart the momentum of a context when its step goes against it.
    """

    def __init__(
        self,
        steps: int = 1000,
        tol: Optional[float] = 1e-6,
        lipschitz: float = 1.0,
        backtracking: bool = True,
        growth: float = 2.0,
        max_backtracks: int = 40,
        restart: bool = True,
    ) -> None:
        super().__init__(steps, tol, lipschitz, backtracking, growth, max_backtracks)
        self.restart = bool(restart)

    def _solve(
        self, objective: Objective, x: Context, init: Optional[Tensor], callback: Optional[Callback]
    ) -> SolverResult:
        y, lipschitz = self._start_state(objective, x, init)
        z = y
        value_z, grad_z = _smooth_value_and_grad(objective, z, x)
        grad_y = grad_z
        momentum = torch.ones_like(lipschitz)
        iterations = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        residual = torch.full((y.shape[0],), math.inf, dtype=y.dtype, device=y.device)
        nonfinite = torch.zeros_like(active)
        if callback is not None:
            callback(0, y)
        for k in range(self.steps + 1):
            nonfinite = nonfinite | (active & ~torch.isfinite(value_z))
            active = active & ~nonfinite  # no step can be trusted from a non-finite g
            if self.tol is not None:
                check = prox_gradient_map(objective, y, grad_y, 1.0 / lipschitz[:, None])
                residual = torch.where(active, ((y - check) * lipschitz[:, None]).norm(dim=-1), residual)
                active = active & ~(residual <= self.tol)
            if k == self.steps or not bool(active.any()):
                break
            point, _, point_grad, lipschitz_new = self._step(objective, x, z, value_z, grad_z, lipschitz, active)
            momentum_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * momentum * momentum))
            extrapolated = point + ((momentum - 1.0) / momentum_new)[:, None] * (point - y)
            if self.restart:
                against = ((z - point) * (point - y)).sum(-1) > 0
                momentum_new = torch.where(against, torch.ones_like(momentum_new), momentum_new)
                extrapolated = torch.where(against[:, None], point, extrapolated)
            rows = active[:, None]
            y = torch.where(rows, point, y)
            grad_y = torch.where(rows, point_grad, grad_y)
            z = torch.where(rows, extrapolated, z)
            momentum = torch.where(active, momentum_new, momentum)
            lipschitz = torch.where(active, lipschitz_new, lipschitz)
            iterations += active
            value_z, grad_z = _smooth_value_and_grad(objective, z, x)
            if callback is not None:
                callback(k + 1, y)
        return self._result(objective, x, y, iterations, residual, nonfinite)


def _upper_bound_holds(
    z: Tensor, value: Tensor, grad: Tensor, point: Tensor, point_value: Tensor, point_grad: Tensor, lipschitz: Tensor
) -> Tensor:
    """Whether ``g(p) ≤ g(z) + ∇g(z)·(p − z) + (L/2)‖p − z‖²`` holds for every context: ``B`` bool.

    The curvature term ``g(p) − g(z) − ∇g(z)·(p − z)`` is a difference of values that rounding swamps near a
    solution, where ``‖p − z‖`` is tiny; there it is replaced by ``½ (∇g(p) − ∇g(z))·(p − z)``, equal for a
    quadratic g and free of that cancellation (as TFOCS does), so backtracking does not inflate L on noise.
    """
    move = point - z
    squared = (move * move).sum(-1)
    allowed = 0.5 * lipschitz * squared
    by_values = point_value - value - (grad * move).sum(-1)
    by_gradients = 0.5 * ((point_grad - grad) * move).sum(-1)
    noise = 16 * torch.finfo(z.dtype).eps * (point_value.abs() + value.abs())
    curvature = torch.where(noise < 0.1 * allowed, by_values, by_gradients)
    return torch.isfinite(point_value) & (curvature <= allowed)
