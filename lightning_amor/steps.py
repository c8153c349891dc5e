"""The step maths shared by the inner updates of semi-amortized models and the batched solvers.

One implementation of gradient descent and of Adam's moment estimates and direction, so an inner
:class:`~lightning_amor.updates.AdamStep` and the :class:`~lightning_amor.solvers.Adam` solver take the same
step (up to the inner step's smoothed square root, which keeps second derivatives finite for unrolling).
Every function is element-wise on tensors of any shape (``B x n`` iterates in practice) and differentiable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def gradient_step(y: Tensor, grad: Tensor, lr: Tensor | float) -> Tensor:
    """``y − lr · grad``: one gradient-descent step, same shape as ``y``."""
    return y - lr * grad


def adam_moments(grad: Tensor, m: Tensor, v: Tensor, betas: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Adam's exponential moving averages after one more gradient: ``(m, v)``, each shaped like ``grad``.

    ``m ← β₁ m + (1 − β₁) g`` and ``v ← β₂ v + (1 − β₂) g²``.
    """
    beta1, beta2 = betas
    return torch.lerp(m, grad, 1.0 - beta1), v * beta2 + (1.0 - beta2) * grad * grad


def adam_direction(m: Tensor, v: Tensor, step: int, betas: Sequence[float], eps: float, smooth: bool = False) -> Tensor:
    """The bias-corrected Adam direction ``m̂ / (√v̂ + ε)`` after ``step`` (≥ 1) updates of the moments.

    Computed as ``(m / (1 − β₁ᵗ)) / (√v / √(1 − β₂ᵗ) + ε)``, the order of ``torch.optim.Adam``. With ``smooth``
    the root is ``√(v̂ + ε²)``, whose derivative stays finite where ``v`` is zero (needed when a semi-amortized
    model backpropagates through its inner Adam steps).
    """
    beta1, beta2 = betas
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    if smooth:
        return (m / bias1) / (torch.sqrt(v / bias2 + eps**2) + eps)
    return (m / bias1) / (v.sqrt() / bias2**0.5 + eps)
