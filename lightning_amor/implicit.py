"""Implicit differentiation of a shrinkage-regularised inner problem (as iMAML).

The inner problem is  y*(y0) = argmin_y F(y) = f(π(y); x) + (λ/2)‖y − y0‖².  At its solution
∇_y F(y*) = 0, so by the implicit function theorem, for an outer gradient v = ∂L/∂y*,

    w = (∇²_y F(y*))⁻¹ v,   ∂L/∂y0 = λ w,   ∂L/∂φ = −(∂²F/∂φ∂y)ᵀ w

for any learnable parameter φ of the objective. The linear system is solved per sample with
conjugate gradients on Hessian-vector products, so no inner iterate is kept in memory.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def batched_conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int = 20, tol: float = 1e-10
) -> Tensor:
    """Solve ``A w = b`` for a symmetric positive definite, block-diagonal ``A`` (one block per row).

    Args:
        matvec: ``B x n -> B x n``, applies every sample's block.
        b: ``B x n`` right-hand sides.
        steps: the most CG iterations.
        tol: stop once every row's squared residual is below ``tol``.

    Returns:
        ``B x n`` solutions.
    """
    w = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)
    for _ in range(steps):
        if bool((rs <= tol).all()):
            break
        ap = matvec(p)
        curvature = (p * ap).sum(-1, keepdim=True)
        alpha = torch.where(curvature > 0, rs / curvature.clamp_min(1e-30), torch.zeros_like(rs))
        w = w + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(-1, keepdim=True)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return w


class _ImplicitSolution(torch.autograd.Function):
    """Identity on y* forward; the implicit-function-theorem gradient backward."""

    @staticmethod
    def forward(ctx: Any, y_star: Tensor, y0: Tensor, inner: Callable, shrinkage: float, cg_steps: int,
                *params: Tensor) -> Tensor:
        ctx.save_for_backward(y_star, y0, *params)
        ctx.inner, ctx.shrinkage, ctx.cg_steps = inner, shrinkage, cg_steps
        return y_star.clone()

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        y_star, y0, *params = ctx.saved_tensors
        lam = ctx.shrinkage
        with torch.enable_grad():
            y = y_star.detach().requires_grad_()
            y0_ = y0.detach().requires_grad_()
            value = ctx.inner(y) + 0.5 * lam * ((y - y0_) ** 2).sum()
            (g,) = torch.autograd.grad(value, y, create_graph=True)

            def hvp(u: Tensor) -> Tensor:
                return torch.autograd.grad(g, y, u, retain_graph=True)[0]

            w = batched_conjugate_gradient(hvp, v, steps=ctx.cg_steps)
            targets = [y0_, *params]
            grads = torch.autograd.grad(g, targets, -w, retain_graph=False, allow_unused=True)
        grad_y0 = grads[0]
        return (None, grad_y0, None, None, None, *grads[1:])


def implicit_solution(
    y_star: Tensor,
    y0: Tensor,
    inner: Callable[[Tensor], Tensor],
    shrinkage: float,
    params: Sequence[Tensor],
    cg_steps: int = 20,
) -> Tensor:
    """Attach implicit gradients to an (approximate) inner solution.

    Args:
        y_star: ``B x n`` solution of min_y inner(y) + (λ/2)‖y − y0‖², computed without a graph.
        y0: ``B x n`` initial iterate (the anchor of the shrinkage term), part of the graph.
        inner: ``B x n -> scalar``, the sum over the batch of f(π(y); x).
        shrinkage: λ > 0.
        params: tensors that ``inner`` depends on and that should receive gradients.
        cg_steps: conjugate-gradient iterations for the Hessian solve.

    Returns:
        ``y_star`` (``B x n``), whose backward pass applies the implicit function theorem.
    """
    return _ImplicitSolution.apply(y_star.detach(), y0, inner, shrinkage, cg_steps, *params)
