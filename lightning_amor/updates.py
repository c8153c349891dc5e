"""Inner update rules of semi-amortized models: y_{t+1} = y_t + update(y_t, ∇f(y_t), state)."""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_amor.lipschitz import hessian_lipschitz
from lightning_amor.objective import Objective
from lightning_amor.steps import adam_direction, adam_moments, gradient_step


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class InnerUpdate(nn.Module):
    """One step of an inner optimizer on a ``B x n`` iterate.

    Subclasses implement :meth:`init_state` and :meth:`forward`; ``t`` is the step index from 0. ``grad`` is the
    gradient of f (of :meth:`~lightning_amor.objective.Objective.smooth_projected`, the smooth part of a
    composite objective); ``objective`` is passed so that an update can use the problem's own operators (the
    proximal operator of a composite objective's nonsmooth part, say).
    """

    proximal: bool = False
    """Whether ``grad`` is the gradient of the smooth part only
    (:meth:`~lightning_amor.objective.Objective.smooth_projected`), the update applying the nonsmooth part's prox
    itself (``objective.prox_flat``); ``False``: the gradient of all of f."""

    def init_state(self, y: Tensor) -> Any:
        """The optimizer state before the first step (``None`` when stateless)."""
        return None

    def prepare(self, value: Callable[[Tensor], Tensor], y: Tensor) -> None:
        """Called before the inner steps of every forward pass with the inner objective ``value`` (``B x n -> ()``,
        summed over the batch) and the initial iterates ``y`` (``B x n``); an update that sets itself up from the
        problem (:class:`GradientStep` with ``lr="auto"``) does it here. Nothing by default."""

    def forward(
        self, y: Tensor, grad: Tensor, state: Any, t: int, objective: Optional[Objective] = None
    ) -> tuple[Tensor, Any]:
        """``(y_t, ∇f(y_t), state_t, t) -> (y_{t+1}, state_{t+1})``, every tensor ``B x n``."""
        raise NotImplementedError


class GradientStep(InnerUpdate):
    """Gradient descent y - α∇f with a step size α, learnable by default (kept positive by a softplus).

    The steps lower f only for α < 2/L, L the Lipschitz constant of ∇f (the largest curvature), and nothing
    warns when α is too large: the inner steps then raise f, and the model trains to a poor answer (the
    tutorial's Rosenbrock family curves as 12·b·y₁², so α = 0.01 is too large away from its minimum).
    ``lr="auto"`` avoids that: on its first forward pass (the first training batch, or the sanity check's
    validation batch before it) it estimates L by power iteration on Hessian-vector products of the inner
    objective at the batch's initial iterates
    (:func:`~lightning_amor.lipschitz.hessian_lipschitz`, the largest over its contexts, and over DDP ranks) and
    starts from α = 1/L, which minimises the quadratic upper bound of f and leaves a factor 2 of margin against
    the estimate's error and curvature that grows away from the first iterates. A learnable α then trains from
    there. The estimate is part of the state dict, so a resumed run or a loaded model keeps it. It is chosen
    over a normalised or a backtracking step because it keeps the update a plain, smooth function of y (cheap
    to unroll and to export) and costs a few Hessian-vector products once, not every step.

    Args:
        lr: the initial step size α (> 0), or ``"auto"`` for 1/L as above.
        learnable: train α along with the amortizer (``false``: keep it fixed).
        dim: ``None`` for one step size, or n for a step size per coordinate of ``B x n`` iterates.
    """

    def __init__(
        self, lr: Union[float, Literal["auto"]] = 0.1, learnable: bool = True, dim: Optional[int] = None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.auto = lr == "auto"
        if isinstance(lr, str) and not self.auto:
            raise ValueError(f"{name}: lr must be a positive number or 'auto' (1/L from the curvature), got {lr!r}")
        if self.auto:
            lr = 1.0  # replaced by 1/L on the first forward pass
            # Only auto steps hold the flag, so the state dicts (and checkpoints) of fixed steps are unchanged.
            self.register_buffer("estimated", torch.tensor(False))
            self.register_load_state_dict_post_hook(_remember_estimate)
        self._estimated = False  # the buffer's value, kept in Python to avoid a device sync every forward
        if lr <= 0:
            raise ValueError(f"{name}: lr must be positive, got {lr}")
        if dim is not None and (int(dim) != dim or dim < 1):
            raise ValueError(f"{name}: dim must be None or a positive integer (the solution size n), got {dim}")
        raw = torch.full(() if dim is None else (int(dim),), _inverse_softplus(lr))
        if learnable:
            self.raw_lr = nn.Parameter(raw)
        else:
            self.register_buffer("raw_lr", raw)

    @property
    def lr(self) -> Tensor:
        """The current step size α: a scalar tensor, or ``n`` per-coordinate step sizes."""
        return F.softplus(self.raw_lr)

    def prepare(self, value: Callable[[Tensor], Tensor], y: Tensor) -> None:
        """With ``lr="auto"`` and no estimate yet: set α = 1/L from the curvature of ``value`` at ``y``
        (``B x n``); otherwise nothing."""
        if not self.auto or self._estimated:
            return
        lipschitz = hessian_lipschitz(value, y).to(self.raw_lr.device, torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One step size on every rank, or their weights drift apart: the largest curvature of any rank's batch.
            torch.distributed.all_reduce(lipschitz, op=torch.distributed.ReduceOp.MAX)
        estimate = float(lipschitz)
        if not math.isfinite(estimate) or estimate <= 0:
            raise ValueError(
                f"{type(self).__name__}(lr='auto'): the curvature of the inner objective at the first batch's "
                f"initial iterates is {estimate:g}, so 1/L is no step size (f is linear there, or not finite); "
                f"give lr a number instead"
            )
        with torch.no_grad():
            self.raw_lr.fill_(_inverse_softplus(1.0 / estimate))
            self.estimated.fill_(True)
        self._estimated = True

    def forward(
        self, y: Tensor, grad: Tensor, state: Any, t: int, objective: Optional[Objective] = None
    ) -> tuple[Tensor, Any]:
        """``y - α grad``."""
        return gradient_step(y, grad, self.lr.to(y.dtype)), state


def _remember_estimate(module: nn.Module, incompatible_keys: Any) -> None:
    """After a state dict is loaded into a :class:`GradientStep` with ``lr="auto"``: whether it held an estimate."""
    module._estimated = bool(module.estimated)


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

    def forward(
        self, y: Tensor, grad: Tensor, state: Any, t: int, objective: Optional[Objective] = None
    ) -> tuple[Tensor, Any]:
        """``y - α m̂ / (sqrt(v̂ + eps²) + eps)``."""
        m, v = adam_moments(grad, *state, self.betas)
        # eps inside the root keeps the second derivative finite where v is zero.
        direction = adam_direction(m, v, t + 1, self.betas, self.eps, smooth=True)
        return gradient_step(y, direction, self.gradient.lr.to(y.dtype)), (m, v)


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

    def forward(
        self, y: Tensor, grad: Tensor, state: Any, t: int, objective: Optional[Objective] = None
    ) -> tuple[Tensor, Any]:
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


class ProximalStep(GradientStep):
    """A proximal-gradient (ISTA) step ``y ← prox_{αh}(y − α ∇g(y))`` for a composite objective f = g + h.

    ``grad`` is the gradient of the smooth part g only (:attr:`proximal` is ``True``, so
    :class:`~lightning_amor.amortizers.SemiAmortized` differentiates ``objective.smooth_projected``), and the step
    applies the nonsmooth part's prox ``objective.prox_flat`` itself, so the iterate stays where h wants it (sparse
    for ℓ1, in the set for an indicator). On an objective without a nonsmooth part it is a gradient step.

    The step size α is learnable by default (kept positive by a softplus, as :class:`GradientStep`), one for all
    coordinates or, with ``dim``, one per coordinate: with ℓ1 that learns a threshold ``α_i · λ`` per coordinate,
    the θ of a LISTA-style update (which also learns the linear maps in place of ``y − α∇g``). The operator is
    differentiable almost everywhere, so unrolled steps backpropagate through it.

    Args:
        lr: the initial step size α (> 0), about 1/L for a g with L-Lipschitz gradient.
        learnable: train α along with the amortizer (``false``: keep it fixed).
        dim: ``None`` for one step size, or n for a step size per coordinate of ``B x n`` iterates.
    """

    proximal = True

    def forward(
        self, y: Tensor, grad: Tensor, state: Any, t: int, objective: Optional[Objective] = None
    ) -> tuple[Tensor, Any]:
        """``prox_{αh}(y − α grad)`` with the objective's prox: ``B x n``."""
        if objective is None:
            raise ValueError(
                "ProximalStep needs the objective to apply its proximal operator: call it as "
                "update(y, grad, state, t, objective=objective) (SemiAmortized does)"
            )
        if self.raw_lr.dim() == 1 and self.raw_lr.shape[0] != y.shape[-1]:
            raise ValueError(
                f"ProximalStep: it has {self.raw_lr.shape[0]} per-coordinate step sizes but the iterate has "
                f"{y.shape[-1]} coordinates; set dim to the objective's dim ({y.shape[-1]})"
            )
        step = self.lr.to(y.dtype)
        return objective.prox_flat(gradient_step(y, grad, step), step), state
