"""Batched classical solvers: B independent problems solved at once, from any initial point.

Every solver descends the landscape ``F(y) = objective.projected(y, x)`` (f composed with the
domain projection), keeps its iterates projected and returns projected points. Gradients of all
samples come from one backward pass of ``F(y).sum()`` w.r.t. the ``B x n`` iterate; step sizes,
line searches and stopping are decided per sample, so solving a batch gives the same answer as
solving each of its problems alone.

Solvers work under ``torch.no_grad`` and ``torch.inference_mode`` (they switch autograd back on
internally), never build a graph back into the caller's tensors, and follow the device and dtype
of the initial point (or of the context when no initial point is given).

They serve as oracles for reference solutions, as baselines in speed-up benchmarks and to refine
an amortized prediction.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lightning_amor.autograd_utils import constant_context, gradients_enabled, usable
from lightning_amor.objective import Context, Objective, context_batch_size, context_index, context_repeat
from lightning_amor.steps import adam_direction, adam_moments, gradient_step

Callback = Callable[[int, Tensor], None]
"""``callback(k, y)``: called with the iterate ``y`` (``B x n``, detached) after ``k`` iterations, k = 0, 1, ..."""

__all__ = ["LBFGS", "STOP_REASONS", "Adam", "Callback", "GradientDescent", "MultiStart", "Solver", "SolverResult",
           "context_seeds"]


STOP_REASONS = ("converged", "max_steps", "no_progress", "not_finite", "underflow")
"""Why a solver stopped on a context (:attr:`SolverResult.stopped` holds indices into this tuple): its gradient norm
reached the tolerance at a finite value; it ran every step; it could not lower f any more (a line search found no
decrease, e.g. on a plateau or at float precision); f or its gradient was NaN or infinite; or the gradient vanished
only in the solve's low precision (exactly zero in float32 or float16, above the tolerance in float64), so the
point is not certified."""


@dataclass
class SolverResult:
    """The outcome of :meth:`Solver.solve` for a batch of ``B`` problems of dimension ``n``.

    Attributes:
        y: ``B x n`` projected solutions (detached).
        value: ``B`` values of ``F = f(project(.); x)`` at ``y``.
        iterations: ``B`` int64 counts of the iterations each sample used.
        converged: ``B`` bool, whether F is finite at ``y`` and its gradient norm there at most the solver's
            ``tol`` (all ``False`` when ``tol`` is ``None``).
        stopped: ``B`` int64 indices into :data:`STOP_REASONS`, why each context stopped (``None``: derived
            from ``converged`` and ``value`` by :meth:`reasons`).
    """

    y: Tensor
    value: Tensor
    iterations: Tensor
    converged: Tensor
    stopped: Optional[Tensor] = None

    def reasons(self) -> list[str]:
        """Per context, why the solver stopped: one of :data:`STOP_REASONS`."""
        if self.stopped is not None:
            return [STOP_REASONS[int(i)] for i in self.stopped.tolist()]
        finite = torch.isfinite(self.value).tolist()
        return ["converged" if c else ("max_steps" if f else "not_finite")
                for c, f in zip(self.converged.tolist(), finite, strict=True)]


class Solver:
    """Base class of the batched solvers.

    Subclasses implement :meth:`_solve`; :meth:`solve` prepares the inputs (autograd switched on,
    inference tensors made usable, everything detached, the initial point checked).
    """

    def solve(
        self,
        objective: Objective,
        x: Context,
        init: Optional[Tensor] = None,
        callback: Optional[Callback] = None,
    ) -> SolverResult:
        """Solve ``min_y f(project(y); x)`` for every context of the batch.

        Args:
            objective: The problem f with its projection.
            x: A batch of ``B`` contexts (a tensor or a dict of tensors leading with ``B``).
            init: ``B x n`` initial points; ``objective.initial_point(x)`` when ``None``.
            callback: Optional ``callback(k, y)`` called with the ``B x n`` iterate after ``k``
                iterations (``k = 0`` is the projected initial point), without autograd history.

        Returns:
            A :class:`SolverResult` with ``B x n`` solutions and ``B`` values, iteration counts
            and convergence flags, all detached.

        Raises:
            ValueError: If ``init`` does not have shape ``(B, objective.dim)``.
        """
        with gradients_enabled():
            x = constant_context(x)
            if init is not None:
                init = self._check_init(objective, x, init)
            return self._solve(objective, x, init, callback)

    def __call__(self, objective: Objective, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """The ``B x n`` projected solutions: ``solve(objective, x, init).y``."""
        return self.solve(objective, x, init).y

    def _solve(
        self,
        objective: Objective,
        x: Context,
        init: Optional[Tensor],
        callback: Optional[Callback],
    ) -> SolverResult:
        """Solve with a detached, autograd-usable context ``x`` and a checked ``init`` (or ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _solve(objective, x, init, callback)")

    def _check_init(self, objective: Objective, x: Context, init: Tensor) -> Tensor:
        batch = context_batch_size(x)
        expected = (batch, objective.dim)
        if not isinstance(init, Tensor) or tuple(init.shape) != expected:
            got = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise ValueError(
                f"{type(self).__name__}: the initial point must have shape (B, n) = {expected} "
                f"for {batch} contexts and {type(objective).__name__}.dim = {objective.dim}, got {got}"
            )
        init = usable(init).detach()
        if not init.is_floating_point():
            init = init.to(torch.get_default_dtype())
        return init

    def _start(self, objective: Objective, x: Context, init: Optional[Tensor]) -> Tensor:
        """The projected, detached ``B x n`` starting point."""
        if init is None:
            return objective.initial_point(x).detach()
        return objective.project_flat(init).detach()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _value_and_grad(objective: Objective, y: Tensor, x: Context, smooth: bool = False) -> tuple[Tensor, Tensor]:
    """``F(y)`` (``B``) and its gradient w.r.t. ``y`` (``B x n``) for every sample at once, detached; with
    ``smooth``, of the smooth part g of a composite f = g + h (``objective.smooth_projected``)."""
    y = y.detach().requires_grad_(True)
    value = objective.smooth_projected(y, x) if smooth else objective.projected(y, x)
    grad = None
    if value.requires_grad:
        (grad,) = torch.autograd.grad(value.sum(), y, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(y)
    return value.detach(), grad.detach()


def _check_tol(name: str, tol: Optional[float]) -> Optional[float]:
    if tol is not None and tol < 0:
        raise ValueError(f"{name}: tol must be non-negative or None, got {tol}")
    return None if tol is None else float(tol)


def _check_steps(name: str, steps: int) -> int:
    if int(steps) != steps or steps < 0:
        raise ValueError(f"{name}: steps must be a non-negative integer, got {steps}")
    return int(steps)


def _converged(grad: Tensor, value: Tensor, tol: Optional[float]) -> Tensor:
    """``B`` bool: a finite value and a gradient norm at most ``tol`` (never with ``tol=None``)."""
    if tol is None:
        return torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    return torch.isfinite(value) & (grad.norm(dim=-1) <= tol)


def _stop_reasons(converged: Tensor, finite: Tensor, no_progress: Optional[Tensor] = None) -> Tensor:
    """``B`` indices into :data:`STOP_REASONS` from the final state of a solve (``finite``: f and its gradient are
    finite at the returned point)."""
    reason = torch.full_like(converged, STOP_REASONS.index("max_steps"), dtype=torch.int64)
    if no_progress is not None:
        reason = torch.where(no_progress, STOP_REASONS.index("no_progress"), reason)
    reason = torch.where(converged, STOP_REASONS.index("converged"), reason)
    return torch.where(finite, reason, STOP_REASONS.index("not_finite"))


def _finish(
    objective: Objective, x: Context, y: Tensor, value: Tensor, grad: Tensor, tol: Optional[float],
    no_progress: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(converged, stopped)`` of a solve's final state, each ``B``.

    A context whose low-precision gradient is exactly zero is checked again in float64: a gradient that underflowed
    (f built from tiny intermediate values) would otherwise certify a point whose float64 gradient is far above the
    tolerance. Such a context is not converged and stops with the reason ``underflow``.
    """
    converged = _converged(grad, value, tol)
    stopped = _stop_reasons(converged, torch.isfinite(value) & torch.isfinite(grad).all(-1), no_progress)
    if tol is None or y.dtype == torch.float64:
        return converged, stopped
    suspect = converged & (grad == 0).all(-1)
    if not bool(suspect.any()):
        return converged, stopped
    rows = suspect.nonzero().flatten()
    try:
        precise = copy.deepcopy(objective).double()
        _, grad64 = _value_and_grad(precise, y[rows].double(), _as_float64(context_index(x, rows)))
    except Exception:  # noqa: BLE001 - an objective that cannot run in float64 keeps its low-precision verdict
        return converged, stopped
    underflow = grad64.norm(dim=-1) > tol
    if bool(underflow.any()):
        bad = rows[underflow]
        converged = converged.clone()
        converged[bad] = False
        stopped = stopped.clone()
        stopped[bad] = STOP_REASONS.index("underflow")
    return converged, stopped


def _as_float64(x: Context) -> Context:
    """A context with its floating-point tensors in float64."""
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}


def _active(grad: Tensor, value: Tensor, tol: float) -> Tensor:
    """``B`` bool: rows that keep iterating: finite, with a gradient norm above ``tol``."""
    return torch.isfinite(value) & (grad.norm(dim=-1) > tol)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``B`` mask so it broadcasts against ``like`` (``B x ...``)."""
    return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))


class GradientDescent(Solver):
    """Projected gradient descent with a fixed step: ``y <- project(y - lr * grad F(y))``.

    Args:
        steps: Maximum number of iterations.
        lr: Step size.
        tol: Samples whose gradient norm of ``F`` is at most ``tol`` stop updating; ``None``
            runs every step.
    """

    def __init__(self, steps: int = 100, lr: float = 0.1, tol: Optional[float] = None) -> None:
        self.steps = _check_steps("GradientDescent", steps)
        if lr <= 0:
            raise ValueError(f"GradientDescent: lr must be positive, got {lr}")
        self.lr = float(lr)
        self.tol = _check_tol("GradientDescent", tol)

    def _solve(
        self,
        objective: Objective,
        x: Context,
        init: Optional[Tensor],
        callback: Optional[Callback],
    ) -> SolverResult:
        y = self._start(objective, x, init)
        value, grad = _value_and_grad(objective, y, x)
        iterations = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        if callback is not None:
            callback(0, y)
        for k in range(self.steps):
            y_new = objective.project_flat(gradient_step(y, grad, self.lr)).detach()
            if self.tol is None:
                y = y_new
                iterations += 1
            else:
                active = _active(grad, value, self.tol)
                if not bool(active.any()):
                    break
                y = torch.where(active[:, None], y_new, y)
                iterations += active
            value, grad = _value_and_grad(objective, y, x)
            if callback is not None:
                callback(k + 1, y)
        converged, stopped = _finish(objective, x, y, value, grad, self.tol)
        return SolverResult(y, value, iterations, converged, stopped)


class Adam(Solver):
    """Projected Adam with bias correction, element-wise on the ``B x n`` iterate.

    Adam is separable, so every sample follows the same trajectory as when solved alone; with
    ``tol=None`` the iterates match ``torch.optim.Adam`` on ``F(y).sum()`` step for step (before
    projection, which is the identity on R^n).

    Args:
        steps: Maximum number of iterations.
        lr: Step size.
        betas: Decay rates of the first and second moment estimates.
        eps: Added to the denominator for numerical stability.
        tol: Samples whose gradient norm of ``F`` is at most ``tol`` stop updating (their moment
            estimates freeze too); ``None`` runs every step.
        decay: ``constant`` step size, or ``linear`` decay from ``lr`` to 0 over ``steps`` (for noisy
            objectives, so the iterates settle instead of jittering).
    """

    def __init__(
        self,
        steps: int = 500,
        lr: float = 5e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        tol: Optional[float] = None,
        decay: str = "constant",
    ) -> None:
        self.steps = _check_steps("Adam", steps)
        if decay not in ("constant", "linear"):
            raise ValueError(f"Adam: decay must be 'constant' or 'linear', got {decay!r}")
        self.decay = decay
        if lr <= 0:
            raise ValueError(f"Adam: lr must be positive, got {lr}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam: betas must be two numbers in [0, 1), got {betas}")
        self.lr = float(lr)
        self.betas = betas
        self.eps = float(eps)
        self.tol = _check_tol("Adam", tol)

    def _solve(
        self,
        objective: Objective,
        x: Context,
        init: Optional[Tensor],
        callback: Optional[Callback],
    ) -> SolverResult:
        y = self._start(objective, x, init)
        value, grad = _value_and_grad(objective, y, x)
        iterations = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        exp_avg = torch.zeros_like(y)
        exp_avg_sq = torch.zeros_like(y)
        if callback is not None:
            callback(0, y)
        for k in range(self.steps):
            active = None
            if self.tol is not None:
                active = _active(grad, value, self.tol)
                if not bool(active.any()):
                    break
            # Samples that converged never resume, so every active sample has taken exactly k steps.
            step = k + 1
            new_avg, new_avg_sq = adam_moments(grad, exp_avg, exp_avg_sq, self.betas)
            lr = self.lr * (1.0 - k / self.steps) if self.decay == "linear" else self.lr
            direction = adam_direction(new_avg, new_avg_sq, step, self.betas, self.eps)
            y_new = objective.project_flat(gradient_step(y, direction, lr)).detach()
            if active is None:
                y, exp_avg, exp_avg_sq = y_new, new_avg, new_avg_sq
                iterations += 1
            else:
                rows = active[:, None]
                y = torch.where(rows, y_new, y)
                exp_avg = torch.where(rows, new_avg, exp_avg)
                exp_avg_sq = torch.where(rows, new_avg_sq, exp_avg_sq)
                iterations += active
            value, grad = _value_and_grad(objective, y, x)
            if callback is not None:
                callback(k + 1, y)
        converged, stopped = _finish(objective, x, y, value, grad, self.tol)
        return SolverResult(y, value, iterations, converged, stopped)


class LBFGS(Solver):
    """Batched projected L-BFGS with a per-sample backtracking Armijo line search.

    Each sample keeps its own history of the last ``history`` curvature pairs (stored as
    ``B x m x n`` tensors) and its own step size. The direction comes from the two-loop recursion;
    a sample falls back to steepest descent (and forgets its history) when the direction is not a
    descent direction or its line search fails. The first step after an empty history is scaled to
    ``min(1, 1 / |g|_1)``; later ones start at 1 and halve up to ``max_backtracks`` times until

        ``F(y_new) <= F(y) + 1e-4 * min(g . (y_new - y), 0)``  with  ``y_new = project(y + t d)``.

    Curvature pairs with ``s . y <= eps |s| |y|`` (``eps`` of the dtype) are skipped, and the
    sample's history restarts (its stale pairs would otherwise keep proposing tiny steps that the
    Armijo test accepts, since there is no Wolfe curvature condition). A sample
    stops updating when its gradient norm reaches ``tol`` (``converged``) or when even a steepest
    descent step cannot make progress (``converged`` stays ``False`` unless the gradient is small). Progress means
    a strictly lower f: an Armijo test alone accepts equal values where the slope rounds to zero (a plateau, or
    float32 near a minimum), and the iterate would drift without end. ``SolverResult.stopped`` says which of these
    ended each context.

    Args:
        steps: Maximum number of iterations (each one a direction and a line search).
        history: Number of curvature pairs m kept per sample.
        tol: Gradient-norm tolerance on ``F``; ``None`` runs until ``steps`` or no progress.
        max_backtracks: Maximum number of step halvings per line search.
    """

    armijo = 1e-4
    """Sufficient-decrease constant of the line search."""

    def __init__(
        self,
        steps: int = 100,
        history: int = 10,
        tol: Optional[float] = 1e-6,
        max_backtracks: int = 20,
    ) -> None:
        self.steps = _check_steps("LBFGS", steps)
        if int(history) != history or history < 1:
            raise ValueError(f"LBFGS: history must be a positive integer, got {history}")
        if int(max_backtracks) != max_backtracks or max_backtracks < 0:
            raise ValueError(f"LBFGS: max_backtracks must be a non-negative integer, got {max_backtracks}")
        self.history = int(history)
        self.tol = _check_tol("LBFGS", tol)
        self.max_backtracks = int(max_backtracks)

    def _solve(
        self,
        objective: Objective,
        x: Context,
        init: Optional[Tensor],
        callback: Optional[Callback],
    ) -> SolverResult:
        y = self._start(objective, x, init)
        value, grad = _value_and_grad(objective, y, x)
        batch, dim = y.shape
        m = self.history
        # History, oldest pair in slot 0 and newest in slot m - 1; empty slots are zero with rho = 0,
        # which makes them no-ops in the two-loop recursion.
        mem_s = y.new_zeros(batch, m, dim)
        mem_y = y.new_zeros(batch, m, dim)
        rho = y.new_zeros(batch, m)
        filled = torch.zeros(batch, m, dtype=torch.bool, device=y.device)
        iterations = torch.zeros(batch, dtype=torch.int64, device=y.device)
        stalled = torch.zeros(batch, dtype=torch.bool, device=y.device)
        converged = _converged(grad, value, self.tol)
        stalled = stalled | ~torch.isfinite(value)  # nothing to descend from a NaN or infinite start
        curvature_eps = torch.finfo(y.dtype).eps
        if callback is not None:
            callback(0, y)
        for k in range(self.steps):
            active = ~(converged | stalled)
            if not bool(active.any()):
                break
            direction = self._direction(grad, mem_s, mem_y, rho, filled)
            slope = (grad * direction).sum(-1)
            not_descent = ~(slope < 0)  # also catches NaN
            if bool(not_descent.any()):
                mem_s, mem_y, rho, filled = _forget(not_descent, mem_s, mem_y, rho, filled)
                direction = torch.where(not_descent[:, None], -grad, direction)
            direction = torch.where(active[:, None], direction, torch.zeros_like(direction))
            has_history = filled[:, -1]
            first_step = (1.0 / grad.abs().sum(-1)).clamp(max=1.0)
            step = torch.where(has_history, torch.ones_like(first_step), first_step)

            y_new, value_new, grad_new, failed = self._line_search(
                objective, x, y, value, grad, direction, step, active
            )

            s = y_new - y
            moved = active & ~failed & (s != 0).any(-1)
            no_progress = active & ~moved
            # Without progress: retry with steepest descent if the direction came from the history,
            # otherwise nothing more can be done for this sample.
            stalled = stalled | (no_progress & ~has_history)
            if bool((no_progress & has_history).any()):
                mem_s, mem_y, rho, filled = _forget(no_progress & has_history, mem_s, mem_y, rho, filled)

            change = grad_new - grad
            curvature = (s * change).sum(-1)
            accept = moved & (curvature > curvature_eps * s.norm(dim=-1) * change.norm(dim=-1))
            if bool(accept.any()):
                mem_s, mem_y, rho, filled = _remember(accept, s, change, curvature, mem_s, mem_y, rho, filled)
            # A step without positive curvature (possible without a Wolfe condition on non-convex F)
            # makes the history stale: its tiny steps would still pass the Armijo test. Restart it.
            reject = moved & ~accept
            if bool(reject.any()):
                mem_s, mem_y, rho, filled = _forget(reject, mem_s, mem_y, rho, filled)

            y, value, grad = y_new, value_new, grad_new
            iterations += active
            if self.tol is not None:
                converged = converged | (active & _converged(grad, value, self.tol))
            if callback is not None:
                callback(k + 1, y)
        converged, stopped = _finish(objective, x, y, value, grad, self.tol, stalled)
        return SolverResult(y, value, iterations, converged, stopped)

    @staticmethod
    def _direction(grad: Tensor, mem_s: Tensor, mem_y: Tensor, rho: Tensor, filled: Tensor) -> Tensor:
        """The two-loop recursion ``d = -H g`` for every sample: ``B x n``."""
        m = mem_s.shape[1]
        q = grad
        alphas = []
        for j in reversed(range(m)):
            alpha = rho[:, j] * (mem_s[:, j] * q).sum(-1)
            q = q - alpha[:, None] * mem_y[:, j]
            alphas.append(alpha)
        # Initial Hessian approximation gamma * I from the newest pair (1 without history).
        newest_y = mem_y[:, -1]
        yy = (newest_y * newest_y).sum(-1)
        safe_rho = torch.where(filled[:, -1], rho[:, -1], torch.ones_like(yy))
        safe_yy = torch.where(filled[:, -1], yy, torch.ones_like(yy))
        gamma = torch.where(filled[:, -1], 1.0 / (safe_rho * safe_yy), torch.ones_like(yy))
        r = gamma[:, None] * q
        for j in range(m):
            beta = rho[:, j] * (mem_y[:, j] * r).sum(-1)
            r = r + (alphas[m - 1 - j] - beta)[:, None] * mem_s[:, j]
        return -r

    def _line_search(
        self,
        objective: Objective,
        x: Context,
        y: Tensor,
        value: Tensor,
        grad: Tensor,
        direction: Tensor,
        step: Tensor,
        active: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample backtracking; returns the new point, its value and gradient, and who failed."""
        y_new, value_new, grad_new = y, value, grad
        searching = active
        for _ in range(self.max_backtracks + 1):
            y_try = objective.project_flat(y + step[:, None] * direction).detach()
            value_try, grad_try = _value_and_grad(objective, y_try, x)
            decrease = (grad * (y_try - y)).sum(-1).clamp(max=0.0)
            # A step must lower f: on a plateau (or where float32 rounds the decrease away) an Armijo test with a
            # zero slope accepts equal values, and the iterate would drift until `steps` without progress.
            ok = searching & torch.isfinite(value_try) & (value_try <= value + self.armijo * decrease) & (
                value_try < value)
            y_new = torch.where(ok[:, None], y_try, y_new)
            value_new = torch.where(ok, value_try, value_new)
            grad_new = torch.where(ok[:, None], grad_try, grad_new)
            searching = searching & ~ok
            if not bool(searching.any()):
                break
            step = torch.where(searching, 0.5 * step, step)
        return y_new, value_new, grad_new, searching


def _forget(
    mask: Tensor, mem_s: Tensor, mem_y: Tensor, rho: Tensor, filled: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty the L-BFGS history of the samples in ``mask``."""
    rows = _rows(mask, mem_s)
    return (
        torch.where(rows, torch.zeros_like(mem_s), mem_s),
        torch.where(rows, torch.zeros_like(mem_y), mem_y),
        torch.where(mask[:, None], torch.zeros_like(rho), rho),
        filled & ~mask[:, None],
    )


def _remember(
    mask: Tensor,
    s: Tensor,
    change: Tensor,
    curvature: Tensor,
    mem_s: Tensor,
    mem_y: Tensor,
    rho: Tensor,
    filled: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Append the pair ``(s, change)`` to the history of the samples in ``mask``, dropping their oldest."""
    rows = _rows(mask, mem_s)
    safe_curvature = torch.where(mask, curvature, torch.ones_like(curvature))
    shifted_s = torch.cat([mem_s[:, 1:], s[:, None]], dim=1)
    shifted_y = torch.cat([mem_y[:, 1:], change[:, None]], dim=1)
    shifted_rho = torch.cat([rho[:, 1:], (1.0 / safe_curvature)[:, None]], dim=1)
    shifted_filled = torch.cat([filled[:, 1:], torch.ones_like(filled[:, :1])], dim=1)
    return (
        torch.where(rows, shifted_s, mem_s),
        torch.where(rows, shifted_y, mem_y),
        torch.where(mask[:, None], shifted_rho, rho),
        torch.where(mask[:, None], shifted_filled, filled),
    )


class MultiStart(Solver):
    """Run a solver from several random starts per context and keep the best solution.

    For ``B`` contexts, ``starts`` random points per context are drawn with
    ``objective.random_points(starts, like, generator)`` from a CPU generator seeded with ``seed`` and a hash of
    the context itself (:meth:`starting_points`: deterministic, and independent of the batch), the given initial
    point is added as one more start when there is one, and all ``B * R`` problems are solved as one batch with the
    contexts repeated. The start with the lowest value (NaN counts as worst) wins; its ``iterations``,
    ``converged`` and ``stopped`` are reported.

    With a callback, the wrapped solver's ``(B * R) x n`` iterates are evaluated (one forward pass
    without autograd) and the callback gets the current best ``B x n`` iterate per context.

    Args:
        solver: The solver run from every start.
        starts: Number of random starts per context.
        seed: Seed of the generator of the random starts.
    """

    def __init__(self, solver: Solver, starts: int = 8, seed: int = 0) -> None:
        if not isinstance(solver, Solver):
            raise TypeError(f"MultiStart: solver must be a Solver, got {type(solver).__name__}")
        if int(starts) != starts or starts < 1:
            raise ValueError(f"MultiStart: starts must be a positive integer, got {starts}")
        self.solver = solver
        self.starts = int(starts)
        self.seed = int(seed)

    def _solve(
        self,
        objective: Objective,
        x: Context,
        init: Optional[Tensor],
        callback: Optional[Callback],
    ) -> SolverResult:
        batch = context_batch_size(x)
        dim = objective.dim
        like = init if init is not None else objective.initial_point(x).detach()
        points = self.starting_points(objective, x, like)
        if init is not None:
            points = torch.cat([points, init[:, None]], dim=1)
        repeats = points.shape[1]
        x_all = context_repeat(x, repeats)

        inner_callback = None
        if callback is not None:

            def inner_callback(k: int, y_all: Tensor) -> None:
                with torch.no_grad():
                    values = objective.projected(y_all, x_all)
                best = _best(values.view(batch, repeats))
                callback(k, y_all.view(batch, repeats, dim)[torch.arange(batch, device=best.device), best])

        result = self.solver.solve(objective, x_all, points.reshape(batch * repeats, dim), inner_callback)
        best = _best(result.value.view(batch, repeats))
        rows = torch.arange(batch, device=best.device)
        return SolverResult(
            y=result.y.view(batch, repeats, dim)[rows, best],
            value=result.value.view(batch, repeats)[rows, best],
            iterations=result.iterations.view(batch, repeats)[rows, best],
            converged=result.converged.view(batch, repeats)[rows, best],
            stopped=None if result.stopped is None else result.stopped.view(batch, repeats)[rows, best],
        )

    def starting_points(self, objective: Objective, x: Context, like: Tensor) -> Tensor:
        """The random starts ``B x starts x n`` of every context, on ``like``'s device and dtype.

        Context b's starts come from a generator seeded by ``seed`` and a hash of b's own numbers, never by its
        position: a context gets the same starts (and so the same answer) alone, in any batch, and in any chunking
        of a reference solve.
        """
        rows = []
        for seed in context_seeds(x, self.seed):
            generator = torch.Generator().manual_seed(seed)
            rows.append(objective.random_points(self.starts, like=like[:1], generator=generator).detach())
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def context_seeds(x: Context, seed: int) -> list[int]:
    """One 63-bit seed per context of a batch, from ``seed`` and a hash of the context's own numbers (its bytes, a
    dict's entries in key order): equal contexts get equal seeds wherever they sit in a batch."""
    tensors = [x] if isinstance(x, Tensor) else [x[k] for k in sorted(x)]
    arrays = [t.detach().reshape(t.shape[0], -1).cpu().contiguous().numpy() for t in tensors]
    key = int(seed).to_bytes(8, "little", signed=True)
    seeds = []
    for b in range(context_batch_size(x)):
        digest = hashlib.blake2b(key=key, digest_size=8)
        for array in arrays:
            digest.update(array[b].tobytes())
        seeds.append(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return seeds


def _best(values: Tensor) -> Tensor:
    """Index of the lowest value of every row of ``B x R`` values, NaN counting as the worst."""
    return torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values).argmin(dim=1)
