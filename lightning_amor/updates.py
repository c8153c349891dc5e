"""Inner update rules of semi-amortized models: y_{t+1} = y_t + update(y_t, ∇f(y_t), state)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class InnerUpdate(nn.Module):
    """One step of an inner optimizer on a ``B x n`` iterate.

    Subclasses implement :meth:`init_state` and :meth:`forward`; ``t`` is the step index from 0.
    """

    def init_state(self, y: Tensor) -> Any:
        """The optimizer state before the first step (``None`` when stateless)."""
        return None

    def forward(self, y: Tensor, grad: Tensor, state: Any, t: int) -> tuple[Tensor, Any]:
        """``(y_t, ∇f(y_t), state_t, t) -> (y_{t+1}, state_{t+1})``, every tensor ``B x n``."""
        raise NotImplementedError


class GradientStep(InnerUpdate):
    """Gradient descent y - α∇f with a step size α, learnable by default (kept positive by a softplus).

    Args:
        lr: the initial step size α (> 0).
        learnable: train α along with the amortizer (``false``: keep it fixed).
    """

    def __init__(self, lr: float = 0.1, learnable: bool = True) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"GradientStep: lr must be positive, got {lr}")
        raw = torch.tensor(_inverse_softplus(lr))
        if learnable:
            self.raw_lr = nn.Parameter(raw)
        else:
            self.register_buffer("raw_lr", raw)

    @property
    def lr(self) -> Tensor:
        """The current step size α (a scalar tensor)."""
        return F.softplus(self.raw_lr)

    def forward(self, y: Tensor, grad: Tensor, state: Any, t: int) -> tuple[Tensor, Any]:
        """``y - α grad``."""
        return y - self.lr.to(y.dtype) * grad, state


class AdamStep(InnerUpdate):
    """An Adam step (bias-corrected moments per coordinate) with a learnable step size.

    Args:
        lr: the initial step size α (> 0).
        betas: the decay rates of the first and second moment estimates.
        eps: added to the root of the second moment, for numerical stability.
        learnable: train α along with the amortizer (``false``: keep it fixed).
    """

    def __init__(self, lr: float = 0.05, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 learnable: bool = True) -> None:
        super().__init__()
        self.gradient = GradientStep(lr, learnable)
        self.betas = betas
        self.eps = eps

    def init_state(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """First and second moments, zeros ``B x n``."""
        return torch.zeros_like(y), torch.zeros_like(y)

    def forward(self, y: Tensor, grad: Tensor, state: Any, t: int) -> tuple[Tensor, Any]:
        """``y - α m̂ / (sqrt(v̂) + eps)``."""
        b1, b2 = self.betas
        m, v = state
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        m_hat = m / (1 - b1 ** (t + 1))
        v_hat = v / (1 - b2 ** (t + 1))
        # eps inside the root keeps the second derivative finite where v is zero.
        direction = m_hat / (torch.sqrt(v_hat + self.eps**2) + self.eps)
        return y - self.gradient.lr.to(y.dtype) * direction, (m, v)


class LearnedUpdate(InnerUpdate):
    """A learned, coordinate-wise update rule (Andrychowicz et al. 2016) on top of gradient descent.

    Each coordinate's features (its gradient and, for ``kind="gru"``, a hidden state) go through
    a small MLP or GRU cell shared by all coordinates, so the rule works for any dimension ``n``.
    The network outputs a per-coordinate step size: ``y_{t+1} = y_t - (α + scale · net(features)) ∇f``,
    so a stationary point of f stays a fixed point of the rule. The output layer starts at zero, so an
    untrained rule is plain gradient descent, which keeps early training stable.

    Args:
        kind: the network over each coordinate's features: ``mlp`` (stateless) or ``gru`` (a hidden state per
            coordinate, carried across the steps).
        hidden: the width of the network's hidden layer (or state).
        lr: the initial base step size α (learnable).
        scale: the factor of the network's output added to α.
    """

    def __init__(self, kind: str = "mlp", hidden: int = 32, lr: float = 0.1, scale: float = 0.1) -> None:
        super().__init__()
        if kind not in ("mlp", "gru"):
            raise ValueError(f"LearnedUpdate: kind must be 'mlp' or 'gru', got {kind!r}")
        self.kind = kind
        self.hidden = hidden
        self.scale = scale
        self.gradient = GradientStep(lr, learnable=True)
        features = 3  # gradient, log|gradient|, sign(gradient) (preprocessing as in Andrychowicz et al.)
        if kind == "mlp":
            self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        else:
            self.body = nn.GRUCell(features, hidden)
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def init_state(self, y: Tensor) -> Tensor | None:
        """The GRU's hidden state ``(B*n) x hidden`` (``None`` for the MLP)."""
        if self.kind == "gru":
            return y.new_zeros(y.numel(), self.hidden)
        return None

    def forward(self, y: Tensor, grad: Tensor, state: Any, t: int) -> tuple[Tensor, Any]:
        """A gradient step with the learned coordinate-wise step size."""
        g = grad.reshape(-1, 1)
        feats = torch.cat([g, torch.log(g.abs() + 1e-8) / 10.0, torch.tanh(100.0 * g)], dim=1)
        if self.kind == "gru":
            state = self.body(feats, state)
            h = state
        else:
            h = self.body(feats)
        step = self.gradient.lr.to(y.dtype) + self.scale * self.head(h).reshape(y.shape)
        return y - step * grad, state
