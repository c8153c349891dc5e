"""Proximal inner problems solved to a stated tolerance, per row, for implicit differentiation.

The implicit function theorem gives the gradient of y*(y0) = argmin_y F(y), F(y) = f(y) + (λ/2)‖y − y0‖², only at
a point where ∇F = 0; a few fixed steps leave a residual that makes the implicit gradient an approximation.
:func:`solve_to_tolerance` runs Nesterov's accelerated gradient with a backtracking (Armijo) line search and an
adaptive restart, one step size and one momentum per row (every row is its own problem: a task, a context), until
each row's gradient norm meets the tolerance. The line search makes no assumption on the curvature, so a problem
that grows sharper during training cannot make it diverge (plain steps of a fixed size do, past 2/L).
:class:`ToleranceSemiAmortized` is :class:`~lightning_amor.SemiAmortized` in ``implicit`` mode with this solver in
place of the K fixed inner steps; it keeps the last solve's per-row report (:class:`InnerSolveReport`) so a module
can log the share of rows that met the tolerance: a row that did not is reported, never silently treated as solved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from lightning_amor.amortizers import AmortizedOutput, SemiAmortized
from lightning_amor.implicit import implicit_solution
from lightning_amor.objective import Context, Objective
from lightning_amor.updates import GradientStep, InnerUpdate

ToleranceKind = Literal["relative", "absolute"]


@dataclass(frozen=True)
class InnerSolveReport:
    """Per-row convergence of one :func:`solve_to_tolerance` call (tensors on the iterate's device, detached).

    Attributes:
        residual: ``B`` gradient norms ‖∇F(y)‖ at the returned points.
        initial_residual: ``B`` gradient norms at the starting points.
        converged: ``B`` booleans, whether each row met the tolerance.
        steps: ``B`` the iterations each row took (``max_steps`` for a row that did not converge).
        evaluations: the batched evaluations of F made in all (gradients and line-search trials).
    """

    residual: Tensor
    initial_residual: Tensor
    converged: Tensor
    steps: Tensor
    evaluations: int

    @property
    def ratio(self) -> Tensor:
        """``B`` residual ratios ‖∇F(y)‖ / ‖∇F(y⁰)‖ (0 where the start was already stationary)."""
        return self.residual / self.initial_residual.clamp_min(torch.finfo(self.residual.dtype).tiny)

    def summary(self) -> dict[str, float]:
        """``converged`` (share of rows), ``median_ratio``, ``max_ratio``, ``mean_steps``, ``evaluations``."""
        ratio = self.ratio.double()
        return {
            "converged": float(self.converged.double().mean()),
            "median_ratio": float(ratio.median()),
            "max_ratio": float(ratio.max()),
            "mean_steps": float(self.steps.double().mean()),
            "evaluations": float(self.evaluations),
        }


def solve_to_tolerance(
    value: Callable[[Tensor], Tensor],
    y0: Tensor,
    tolerance: float = 1e-3,
    kind: ToleranceKind = "relative",
    max_steps: int = 200,
    initial_step: float = 1.0,
    max_backtracks: int = 40,
) -> tuple[Tensor, InnerSolveReport]:
    """Minimise ``B`` independent smooth problems to a gradient-norm tolerance, each row on its own.

    Accelerated gradient (FISTA form): at the extrapolated point z, a trial ``z − s ∇F(z)`` is accepted when it
    lowers F by at least ``(s/2)‖∇F(z)‖²`` (Armijo), else the row's step s is halved and the trial repeated; the
    next iteration's first trial is 1.25 times the accepted step (capped at ``initial_step``), and a step against the
    momentum restarts it. A row stops, at z, as soon as ‖∇F(z)‖ meets the tolerance: ``≤ tolerance · ‖∇F(y0)‖``
    (``relative``) or ``≤ tolerance`` (``absolute``). Gradients are taken by autograd without keeping a graph.

    Args:
        value: ``B x n -> B``, each row's F (row b depends on row b of its input only).
        y0: ``B x n`` starting points.
        tolerance: the gradient-norm tolerance (> 0).
        kind: ``relative`` (to the start's gradient norm) or ``absolute``.
        max_steps: the most iterations; a row still above the tolerance then is reported as not converged.
        initial_step: the first (and largest) step size, e.g. 1/λ for a proximal term of weight λ.
        max_backtracks: the most halvings of a row's step in one iteration.

    Returns:
        ``(y, report)``: ``B x n`` detached points and their :class:`InnerSolveReport`.

    Raises:
        ValueError: for a non-positive tolerance, step or budget, an unknown ``kind``, a ``y0`` that is not
            ``B x n``, or F / its gradient not finite at the start.
    """
    if not tolerance > 0 or not initial_step > 0 or max_steps < 1 or max_backtracks < 1:
        raise ValueError(f"solve_to_tolerance: tolerance, initial_step, max_steps and max_backtracks must be positive, "
                         f"got {tolerance}, {initial_step}, {max_steps}, {max_backtracks}")
    if kind not in ("relative", "absolute"):
        raise ValueError(f"solve_to_tolerance: kind must be 'relative' or 'absolute', got {kind!r}")
    if y0.dim() != 2:
        raise ValueError(f"solve_to_tolerance: y0 must be B x n, got shape {tuple(y0.shape)}")
    evaluations = 0

    def value_and_grad(y: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal evaluations
        evaluations += 1
        with torch.enable_grad():
            point = y.detach().requires_grad_()
            v = value(point)
            (g,) = torch.autograd.grad(v.sum(), point)
        return v.detach(), g.detach()

    def value_only(y: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        with torch.no_grad():
            return value(y.detach())

    y = y0.detach().clone()
    f_y, g = value_and_grad(y)
    if f_y.shape != y.shape[:1]:
        raise ValueError(f"solve_to_tolerance: value must map B x n to B values, got shape {tuple(f_y.shape)} for "
                         f"B = {y.shape[0]}")
    start_norm = g.norm(dim=1)
    if not bool(torch.isfinite(f_y).all() & torch.isfinite(start_norm).all()):
        bad = (~(torch.isfinite(f_y) & torch.isfinite(start_norm))).nonzero().flatten().tolist()
        raise ValueError(f"solve_to_tolerance: F or its gradient is not finite at the start of rows {bad[:10]}; "
                         f"check the problem's data and the starting point")
    threshold = tolerance * start_norm if kind == "relative" else torch.full_like(start_norm, tolerance)
    batch = y.shape[0]
    step = torch.full((batch,), float(initial_step), dtype=y.dtype, device=y.device)
    momentum = torch.ones(batch, dtype=y.dtype, device=y.device)  # FISTA's t_k
    z, f_z, g_z = y.clone(), f_y, g
    residual = g_z.norm(dim=1)
    done = residual <= threshold
    steps = torch.zeros(batch, dtype=torch.long, device=y.device)
    for _ in range(max_steps):
        if bool(done.all()):
            break
        active = ~done
        steps += active.long()
        g_sq = (g_z * g_z).sum(1)
        trial_step = step.clone()
        accepted = done.clone()
        y_new = y.clone()
        for _ in range(max_backtracks):
            candidate = z - trial_step[:, None] * g_z
            f_c = value_only(candidate)
            ok = (f_c <= f_z - 0.5 * trial_step * g_sq) & torch.isfinite(f_c) & ~accepted
            y_new = torch.where(ok[:, None], candidate, y_new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            trial_step = torch.where(accepted, trial_step, 0.5 * trial_step)
        # a row whose line search found no decrease keeps its point (its momentum restarts)
        stuck = active & ~accepted
        y_new = torch.where(stuck[:, None], z, y_new)
        # the next trial starts a little longer than the accepted step, so a row's step follows its curvature down
        # and up again
        step = torch.where(active, torch.clamp(trial_step * 1.25, max=float(initial_step)), step)
        momentum_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * momentum * momentum))
        beta = (momentum - 1.0) / momentum_new
        # adaptive restart (O'Donoghue & Candès): drop the momentum when the step goes against it
        restart = (((y_new - y) * g_z).sum(1) > 0) | stuck
        beta = torch.where(restart, torch.zeros_like(beta), beta)
        momentum_new = torch.where(restart, torch.ones_like(momentum_new), momentum_new)
        z_new = y_new + beta[:, None] * (y_new - y)
        f_new, g_new = value_and_grad(z_new)
        keep = done[:, None]
        y = torch.where(keep, y, y_new)
        z = torch.where(keep, z, z_new)
        f_z = torch.where(done, f_z, f_new)
        g_z = torch.where(keep, g_z, g_new)
        momentum = torch.where(done, momentum, momentum_new)
        residual = g_z.norm(dim=1)
        done = done | (residual <= threshold)
    report = InnerSolveReport(residual=residual, initial_residual=start_norm, converged=residual <= threshold,
                              steps=steps, evaluations=evaluations)
    return z.detach(), report


class ToleranceSemiAmortized(SemiAmortized):
    """iMAML-style implicit semi-amortization whose inner problem is solved to a tolerance, not by K fixed steps.

    The prediction is y*(ŷ⁰) = argmin_y f(π(y); x) + (λ/2)‖y − ŷ⁰‖², found per row by :func:`solve_to_tolerance`
    (first step 1/λ, which the line search shortens where f is sharper); its gradient comes from the implicit
    function theorem by ``cg_steps`` conjugate-gradient steps on Hessian-vector products
    (:func:`~lightning_amor.implicit.implicit_solution`). The last solve's report is kept in :attr:`last_report`.

    Args:
        init: the initial iterate's module ``x -> B x n`` (as :class:`~lightning_amor.SemiAmortized`).
        shrinkage: λ > 0.
        tolerance: the gradient-norm tolerance of the inner problem.
        tolerance_kind: ``relative`` (‖∇F(y)‖ ≤ tolerance · ‖∇F(ŷ⁰)‖) or ``absolute`` (‖∇F(y)‖ ≤ tolerance).
        max_steps: the inner solver's iteration budget per forward pass.
        cg_steps: conjugate-gradient iterations of the backward pass.
        update: unused by the solver; accepted so that the parent's checks and state dict layout hold.
    """

    def __init__(
        self,
        init: torch.nn.Module,
        shrinkage: float = 1.0,
        tolerance: float = 1e-3,
        tolerance_kind: ToleranceKind = "relative",
        max_steps: int = 200,
        cg_steps: int = 20,
        update: Optional[InnerUpdate] = None,
    ) -> None:
        if not tolerance > 0:
            raise ValueError(f"ToleranceSemiAmortized: tolerance must be positive, got {tolerance}")
        if tolerance_kind not in ("relative", "absolute"):
            raise ValueError(f"ToleranceSemiAmortized: tolerance_kind must be 'relative' or 'absolute', got "
                             f"{tolerance_kind!r}")
        if max_steps < 1:
            raise ValueError(f"ToleranceSemiAmortized: max_steps must be >= 1, got {max_steps}")
        update = update if update is not None else GradientStep(learnable=False)
        super().__init__(init, steps=max_steps, update=update, gradient="implicit", shrinkage=shrinkage,
                         cg_steps=cg_steps)
        self.tolerance = float(tolerance)
        self.tolerance_kind = tolerance_kind
        self.last_report: Optional[InnerSolveReport] = None

    def extra_repr(self) -> str:
        return (f"shrinkage={self.shrinkage}, tolerance={self.tolerance}, tolerance_kind={self.tolerance_kind!r}, "
                f"max_steps={self.steps}, cg_steps={self.cg_steps}")

    def _implicit(self, y0: Tensor, x: Context, objective: Objective, differentiate: bool) -> AmortizedOutput:
        anchor = y0.detach()
        lam = self.shrinkage

        def value(y: Tensor) -> Tensor:
            return objective.projected(y, x) + 0.5 * lam * ((y - anchor) ** 2).sum(1)

        y, report = solve_to_tolerance(value, anchor, self.tolerance, self.tolerance_kind, self.steps,
                                       initial_step=1.0 / lam)
        self.last_report = report
        if differentiate:
            params = [p for p in objective.parameters() if p.requires_grad]
            if isinstance(x, Tensor) and x.requires_grad:
                params.append(x)
            y = implicit_solution(y, y0, lambda v: objective.projected(v, x).sum(), lam, params, self.cg_steps)
        y = objective.project_flat(y)
        return AmortizedOutput(y=y, iterates=[y0, y])
