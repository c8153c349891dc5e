"""The curvature of an inner objective: a Lipschitz estimate of its gradient by power iteration.

Gradient descent on a function whose gradient is L-Lipschitz lowers it for every step size below 2/L, and the
step 1/L is the classical safe choice (it minimises the quadratic upper bound f(y) + ⟨∇f, d⟩ + L/2 ‖d‖²). On a
twice-differentiable f, L is the largest absolute eigenvalue of the Hessian, which power iteration on
Hessian-vector products finds without forming the Hessian: ``v ← H v / ‖H v‖`` converges to its top eigenvector
at the rate |λ₂/λ₁| per iteration, and the Rayleigh quotient ``vᵀ H v`` to λ₁ at the square of that rate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lightning_amor.autograd_utils import gradients_enabled

POWER_ITERATIONS = 20
"""Power iterations of :func:`hessian_lipschitz` by default (an error below 1e-3 for eigenvalue ratios up to 0.85)."""


def hessian_lipschitz(
    value: Callable[[Tensor], Tensor], y: Tensor, iterations: int = POWER_ITERATIONS, seed: int = 0
) -> Tensor:
    """The largest curvature of ``value`` at ``y`` over the contexts of a batch: a scalar tensor L ≥ 0.

    ``value`` maps ``B x n`` iterates to a scalar, the sum of B independent problems' objectives, so its Hessian
    is block diagonal with one ``n x n`` block per context. Power iteration runs on every block at once (each
    row of ``v`` normalised on its own), and the result is the largest |Rayleigh quotient| over the rows: one
    step size 1/L is then safe for every context of the batch. Power iteration approaches the top eigenvalue
    from below, and the margin between 1/L and the stability limit 2/L absorbs that underestimate.

    Args:
        value: ``B x n -> ()``, twice differentiable in its argument.
        y: the ``B x n`` point where the curvature is measured (not modified, no gradient is kept).
        iterations: power iterations (Hessian-vector products).
        seed: the seed of the random start vector, drawn from its own generator so that the global random
            stream (and so a run's reproducibility) is untouched.
    """
    with gradients_enabled():
        point = y.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(value(point), point, create_graph=True)
        if not grad.requires_grad:  # f is linear in y: no curvature at all
            return torch.zeros((), dtype=y.dtype, device=y.device)
        generator = torch.Generator(device=y.device).manual_seed(seed)
        v = _unit_rows(torch.randn(point.shape, generator=generator, dtype=y.dtype, device=y.device))
        for _ in range(iterations):
            (hv,) = torch.autograd.grad(grad, point, grad_outputs=v, retain_graph=True)
            v = _unit_rows(hv.detach())
        (hv,) = torch.autograd.grad(grad, point, grad_outputs=v)
    rayleigh = (v * hv.detach()).flatten(1).sum(1)
    return rayleigh.abs().max()


def _unit_rows(v: Tensor) -> Tensor:
    """``v`` (``B x ...``) with each row scaled to unit norm (a zero row stays zero)."""
    norm = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norm.view(-1, *([1] * (v.dim() - 1)))
