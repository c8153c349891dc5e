"""Certificates of solutions: f, the problem's residual, and the constraint violation, computed on a batch.

The residual is the problem's own certificate (:meth:`~lightning_amor.objective.Objective.residual`: zero exactly at
a solution), by default the projected-gradient fixed-point residual ``‖y − P(y − ∇f(y; x))‖`` (P the domain's
projection; ``‖∇f‖`` on R^n), which is zero exactly at a stationary point of f on the domain. The amortize-then-refine
policy, its calibration, the metrics and the evaluation all read it through :func:`certify`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_amor.autograd_utils import constant_context, gradients_enabled, usable
from lightning_amor.objective import Context, Objective

__all__ = ["certify", "nonfinite_rows", "stationarity_residual"]


def stationarity_residual(objective: Objective, y: Tensor, x: Context) -> Tensor:
    """The projected-gradient fixed-point residual ``‖y − P(y − ∇_y f(y; x))‖`` of ``B x n`` solutions: ``B``.

    Zero exactly at the stationary points of f on the domain; ``‖∇f‖`` when P is the identity (R^n). Works under
    ``torch.no_grad`` and ``inference_mode``; a context whose value is not finite gets NaN.
    """
    return _value_and_residual(objective, y, x)[1]


def _value_and_residual(objective: Objective, y: Tensor, x: Context) -> tuple[Tensor, Tensor]:
    """f(y; x) and the :func:`stationarity_residual` from one evaluation of f: each ``B``, detached."""
    with gradients_enabled():
        x = constant_context(x)
        y = usable(y).detach().requires_grad_(True)
        value = objective(y, x)
        grad = None
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value.sum(), y, allow_unused=True)
        grad = torch.zeros_like(y) if grad is None else grad.detach()
        y = y.detach()
        residual = (y - objective.project_flat(y - grad)).norm(dim=-1)
    value = value.detach()
    return value, torch.where(torch.isfinite(value), residual, torch.full_like(residual, math.nan))


def certify(objective: Objective, y: Tensor, x: Context) -> tuple[Tensor, Tensor, Tensor]:
    """The certificate of ``B x n`` solutions: ``(value, residual, violation)``, each ``B``.

    ``value`` is f(y; x); ``residual`` the problem's certificate (:meth:`~lightning_amor.objective.Objective.residual`,
    by default the :func:`stationarity_residual`, then computed from the same evaluation of f); ``violation`` the
    objective's constraint violation (zeros when the domain has no constraints besides its projection).
    """
    if objective.has_residual:
        with torch.no_grad():
            value = objective(usable(y), constant_context(x)).detach()
        residual = objective.residual_flat(y, x)
        residual = torch.where(torch.isfinite(value), residual.to(value.dtype), torch.full_like(value, math.nan))
    else:
        value, residual = _value_and_residual(objective, y, x)
    with torch.no_grad():
        violation = objective.violation_flat(y, x)
    violation = torch.zeros_like(value) if violation is None else violation.detach().to(value.dtype)
    return value, residual, violation


def nonfinite_rows(x: Context) -> dict[int, str]:
    """The rows of a context batch that hold NaN or infinite numbers, each with a sentence saying where."""
    tensors = {"": x} if isinstance(x, Tensor) else dict(x)
    found: dict[int, list[str]] = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() and not tensor.is_complex():
            continue
        flat = tensor.detach().reshape(tensor.shape[0], -1)
        bad = ~torch.isfinite(flat)
        for row in bad.any(-1).nonzero().flatten().tolist():
            columns = bad[row].nonzero().flatten().tolist()
            shown = ", ".join(map(str, columns[:8])) + (", ..." if len(columns) > 8 else "")
            where = f"{key!r} " if key else ""
            found.setdefault(row, []).append(f"{where}at flat position(s) {shown}")
    return {
        row: "the context holds NaN or infinite numbers (" + "; ".join(places) + "); fix or drop it"
        for row, places in sorted(found.items())
    }
