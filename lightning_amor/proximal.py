"""Composite objectives f = g + h: a smooth part g and a nonsmooth part h given by its proximal operator.

The proximal operator of h with step α maps a point v to ``prox_{αh}(v) = argmin_u h(u) + ‖u − v‖² / (2α)``.
The operators here act on flat ``B x n`` points, coordinate-wise or per row, are exact, batched, and
differentiable almost everywhere, so unrolled proximal steps (ISTA, LISTA) backpropagate through them:

- :class:`L1`: h = α‖y‖₁, the soft threshold;
- :class:`Box`, :class:`NonNegative`: the indicator of a box, a clamp;
- :class:`Simplex`: the indicator of ``{y ≥ 0, Σ y = r}``, the sort-based Euclidean projection;
- :class:`Zero`: h = 0, the identity (a composite objective with it is plain smooth minimization).

A :class:`CompositeObjective` implements g in :meth:`~CompositeObjective.smooth` and holds one of these as
``prox``; proximal inner updates (:class:`~lightning_amor.updates.ProximalStep`) and the ISTA and FISTA solvers
(:mod:`lightning_amor.proximal_solvers`) differentiate g only and apply the operator themselves, and its
certificate is the prox-gradient residual (:func:`prox_gradient_residual`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lightning_amor.objective import Context, Objective
from lightning_amor.steps import gradient_step
from lightning_amor.structure import Solution

Step = Union[Tensor, float]
"""A step size: a float, or a tensor broadcastable to ``B x n`` (``B x 1`` per context, ``n`` per coordinate)."""

__all__ = [
    "Box",
    "CompositeObjective",
    "Indicator",
    "L1",
    "NonNegative",
    "ProxOperator",
    "Simplex",
    "Step",
    "Zero",
    "prox_gradient_map",
    "prox_gradient_residual",
]


def _as_tensor(value: Union[Tensor, float], name: str, owner: str) -> Tensor:
    """A float64 tensor copy of a number or tensor argument (moved to the module's dtype with it)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if torch.isnan(tensor).any():
        raise ValueError(f"{owner}: {name} must not be NaN, got {value}")
    return tensor


def _describe(value: Tensor) -> str:
    """A short, exact description of a tensor argument for :meth:`~torch.nn.Module.extra_repr` and cache keys."""
    if value.numel() == 1:
        return repr(float(value))
    digest = hashlib.sha1(value.detach().cpu().double().contiguous().numpy().tobytes()).hexdigest()[:12]
    return f"tensor{tuple(value.shape)}:{digest}"


class ProxOperator(nn.Module):
    """The nonsmooth part h of a composite objective, given by its value and its proximal operator.

    Subclasses implement :meth:`value` (h at ``B x n`` points: ``B``) and :meth:`forward`, the proximal operator
    ``prox_{step·h}``: ``B x n`` points and a :data:`Step` to ``B x n`` points. An operator is a module, so its
    tensors follow the objective's device and dtype.
    """

    indicator: bool = False
    """Whether h is the indicator of a set (0 on it, +inf off it): its prox is the projection onto the set, for
    any step, and a :class:`CompositeObjective` then also uses it as the domain's projection."""

    def value(self, y: Tensor) -> Tensor:
        """h(y) for ``B x n`` points: ``B``."""
        raise NotImplementedError(f"{type(self).__name__} must implement value(y) returning a B tensor")

    def forward(self, y: Tensor, step: Step) -> Tensor:
        """``prox_{step·h}(y)`` for ``B x n`` points: ``B x n``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(y, step) returning B x n points")


class Indicator(ProxOperator):
    """The indicator of a closed convex set (0 on it, +inf off it), whose prox is the projection onto the set.

    Subclasses implement :meth:`project`; the value and the violation follow from it.
    """

    indicator = True

    def project(self, y: Tensor) -> Tensor:
        """The Euclidean projection of ``B x n`` points onto the set: ``B x n``. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement project(y) returning B x n points")

    def violation(self, y: Tensor) -> Tensor:
        """The distance of ``B x n`` points to the set: ``B`` (0 on it)."""
        return (y - self.project(y)).norm(dim=-1)

    def value(self, y: Tensor) -> Tensor:
        """0 for ``B x n`` points on the set up to rounding (a relative √eps of the dtype), +inf off it: ``B``."""
        tolerance = math.sqrt(torch.finfo(y.dtype).eps) * (1.0 + y.detach().abs().amax(dim=-1))
        inside = self.violation(y.detach()) <= tolerance
        return torch.where(inside, torch.zeros_like(tolerance), torch.full_like(tolerance, math.inf))

    def forward(self, y: Tensor, step: Step) -> Tensor:
        """The projection onto the set (the prox of an indicator, whatever the step): ``B x n``."""
        return self.project(y)


class Zero(ProxOperator):
    """h = 0: the prox is the identity, so a composite objective with it is plain smooth minimization of g."""

    def value(self, y: Tensor) -> Tensor:
        """Zeros: ``B``."""
        return y.new_zeros(y.shape[0])

    def forward(self, y: Tensor, step: Step) -> Tensor:
        """``y`` itself: ``B x n``."""
        return y


class L1(ProxOperator):
    """h(y) = Σᵢ αᵢ |yᵢ|, whose prox is the soft threshold ``sign(y) · max(|y| − step·α, 0)``.

    Args:
        alpha: the weight α ≥ 0: a number, or an ``n`` tensor of per-coordinate weights.
    """

    def __init__(self, alpha: Union[Tensor, float] = 1.0) -> None:
        super().__init__()
        alpha = _as_tensor(alpha, "alpha", "L1")
        if (alpha < 0).any():
            raise ValueError(f"L1: alpha must be non-negative (it weighs |y|), got {alpha.tolist()}")
        self.register_buffer("alpha", alpha)

    def value(self, y: Tensor) -> Tensor:
        """``Σᵢ αᵢ |yᵢ|``: ``B``."""
        return (self.alpha.to(y.dtype) * y.abs()).sum(-1)

    def forward(self, y: Tensor, step: Step) -> Tensor:
        """The soft threshold at ``step · α``: ``B x n`` (its derivative is 0 or 1, a.e.)."""
        threshold = step * self.alpha.to(y.dtype)
        return torch.sign(y) * torch.relu(y.abs() - threshold)

    def extra_repr(self) -> str:
        return f"alpha={_describe(self.alpha)}"


class Box(Indicator):
    """The indicator of the box ``lower ≤ y ≤ upper``; its prox is the clamp.

    Args:
        lower: the lower bound: a number, an ``n`` tensor, or ``None`` (unbounded below).
        upper: the upper bound: a number, an ``n`` tensor, or ``None`` (unbounded above).
    """

    def __init__(self, lower: Union[Tensor, float, None] = 0.0, upper: Union[Tensor, float, None] = 1.0) -> None:
        super().__init__()
        low = _as_tensor(-math.inf if lower is None else lower, "lower", type(self).__name__)
        high = _as_tensor(math.inf if upper is None else upper, "upper", type(self).__name__)
        if (low > high).any():
            raise ValueError(
                f"{type(self).__name__}: every lower bound must be at most its upper bound, got lower={low.tolist()}"
                f" and upper={high.tolist()}; swap them or fix the bounds"
            )
        self.register_buffer("lower", low)
        self.register_buffer("upper", high)

    def project(self, y: Tensor) -> Tensor:
        """``min(max(y, lower), upper)``: ``B x n``."""
        return torch.clamp(y, self.lower.to(y.dtype), self.upper.to(y.dtype))

    def extra_repr(self) -> str:
        return f"lower={_describe(self.lower)}, upper={_describe(self.upper)}"


class NonNegative(Box):
    """The indicator of the non-negative orthant ``y ≥ 0``; its prox is ``max(y, 0)``."""

    def __init__(self) -> None:
        super().__init__(lower=0.0, upper=None)

    def extra_repr(self) -> str:
        return ""


class Simplex(Indicator):
    """The indicator of the simplex ``{y ≥ 0, Σᵢ yᵢ = radius}``; its prox is the Euclidean projection.

    The projection is exact and batched (the sort-based algorithm of Held, Wolfe and Crowder 1974, see Duchi et al.
    2008): sort each row in decreasing order ``u``, find the largest k with ``u_k > (Σ_{j≤k} u_j − r) / k``, and
    subtract that threshold τ from every coordinate before clipping at 0. It costs O(n log n) per row and is
    differentiable almost everywhere (through τ).

    Args:
        radius: the sum r > 0 of every point of the simplex (1: the probability simplex).
    """

    def __init__(self, radius: float = 1.0) -> None:
        super().__init__()
        if not radius > 0:
            raise ValueError(f"Simplex: radius must be positive (the sum of the coordinates), got {radius}")
        self.radius = float(radius)

    def project(self, y: Tensor) -> Tensor:
        """The Euclidean projection of every row of ``B x n`` points onto the simplex: ``B x n``."""
        ordered, _ = torch.sort(y, dim=-1, descending=True)
        excess = torch.cumsum(ordered, dim=-1) - self.radius
        ranks = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
        # The condition holds on a prefix of the sorted coordinates (always for k = 1), so its count is the largest k.
        # clamp: a row with NaN has no such k; it stays NaN instead of failing the whole batch.
        support = (ordered * ranks > excess).sum(dim=-1, keepdim=True).clamp(min=1)
        tau = excess.gather(-1, support - 1) / support.to(y.dtype)
        return torch.relu(y - tau)

    def extra_repr(self) -> str:
        return f"radius={self.radius}"


def prox_gradient_map(objective: Objective, y: Tensor, grad: Tensor, step: Step) -> Tensor:
    """One proximal-gradient step ``P(prox_{step·h}(y − step · grad))`` on flat ``B x n`` points: ``B x n``.

    ``grad`` is ``∇g(y)`` (of :meth:`~lightning_amor.objective.Objective.smooth_projected`), ``h`` the objective's
    nonsmooth part (:meth:`~lightning_amor.objective.Objective.prox_flat`) and P its domain projection
    (:meth:`~lightning_amor.objective.Objective.project_flat`, the identity on R^n). On an objective without a
    nonsmooth part it is a projected gradient step.
    """
    return objective.project_flat(objective.prox_flat(gradient_step(y, grad, step), step))


def prox_gradient_residual(objective: Objective, y: Tensor, grad: Tensor, step: Step) -> Tensor:
    """The norm of the gradient mapping ``‖y − prox_gradient_map(y)‖ / step`` of flat ``B x n`` points: ``B``.

    Zero exactly at the fixed points of the proximal-gradient step, which for a convex g are the minimizers of
    g + h, whatever the step; ``‖∇g(y)‖`` when h = 0 on R^n. ``step`` is a float or a ``B`` / ``B x 1`` tensor.
    """
    if isinstance(step, Tensor) and step.dim() == 1:
        step = step[:, None]
    return ((y - prox_gradient_map(objective, y, grad, step)) / step).norm(dim=-1)


class CompositeObjective(Objective):
    """f(y; x) = g(y; x) + h(y): a smooth part g and a nonsmooth part h known by its proximal operator.

    Subclasses implement :meth:`smooth` (g, on the structured view of y like every hook) and set the operator h
    as ``prox`` (a :class:`ProxOperator`: :class:`L1`, :class:`Box`, :class:`NonNegative`, :class:`Simplex`,
    :class:`Zero`), passed to this constructor or assigned in theirs. Then :meth:`value` is ``g + h``, proximal
    updates and solvers differentiate :meth:`smooth_projected` and apply :meth:`prox_flat`, and the certificate
    :meth:`residual` is the prox-gradient residual.

    The operator acts on the flat ``B x n`` carrier of a solution, coordinate-wise for :class:`L1` and
    :class:`Box`, which is what a structured solution needs too. A :class:`Simplex` acts on the whole flat vector:
    a simplex over one named entry of a structured solution is not supported (a custom :class:`ProxOperator`
    that slices the flat vector can do it).

    When h is an indicator (:class:`Box`, :class:`NonNegative`, :class:`Simplex`), its projection is also the
    domain's projection (after the subclass's own :meth:`project`, if any), so every prediction lies in the set
    and f stays finite on it; its distance to the set is the default :meth:`violation`.

    Args:
        prox: the operator of h (or assign ``self.prox`` in the subclass's constructor).
    """

    residual_step: float = 1.0
    """The step η of the prox-gradient residual ``‖y − prox_{ηh}(y − η∇g(y))‖ / η``."""

    def __init__(self, prox: Optional[ProxOperator] = None) -> None:
        super().__init__()
        if prox is not None:
            self.prox = prox

    def _operator(self) -> ProxOperator:
        operator = self._modules.get("prox")
        if not isinstance(operator, ProxOperator):
            got = "nothing" if operator is None else type(operator).__name__
            raise TypeError(
                f"{type(self).__name__}: a CompositeObjective needs its nonsmooth part as a ProxOperator in "
                f"`self.prox` (e.g. `lightning_amor.proximal.L1(alpha)`), got {got}; pass it to "
                f"CompositeObjective.__init__(prox=...) or assign self.prox after super().__init__()"
            )
        return operator

    def smooth(self, y: Solution, x: Context) -> Tensor:
        """g(y; x), the smooth part: ``y`` is ``B x n`` (or the structured view); returns ``B``. Implemented by
        subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement smooth(y, x) returning a B tensor")

    def value(self, y: Solution, x: Context) -> Tensor:
        """``g(y; x) + h(y)``: ``B``."""
        return self.smooth(y, x) + self._operator().value(self.flatten(y))

    def project_flat(self, y: Tensor) -> Tensor:
        """The subclass's :meth:`project`, then the projection onto h's set when h is an indicator: ``B x n``."""
        y = super().project_flat(y)
        operator = self._operator()
        return operator(y, 1.0) if operator.indicator else y

    def smooth_projected(self, y: Tensor, x: Context) -> Tensor:
        """g at the subclass's :meth:`project` of flat ``B x n`` points: ``B`` (not through h's projection, whose
        Jacobian would hide the gradient of the coordinates it clips)."""
        return self.smooth(self.view(Objective.project_flat(self, y)), x)

    def prox_flat(self, y: Tensor, step: Step) -> Tensor:
        """``prox_{step·h}`` of flat ``B x n`` points: ``B x n``."""
        return self._operator()(y, step)

    def violation(self, y: Solution, x: Context) -> Optional[Tensor]:
        """The distance to h's set when h is an indicator (``B``), ``None`` otherwise."""
        operator = self._operator()
        if not operator.indicator:
            return None
        return operator.violation(self.flatten(y))

    def residual(self, y: Solution, x: Context) -> Tensor:
        """The prox-gradient residual ``‖y − prox_{ηh}(y − η∇g(y; x))‖ / η`` with η = :attr:`residual_step`: ``B``.

        It is zero exactly at the fixed points of the proximal-gradient step (the minimizers, for a convex g),
        whatever η > 0. Dividing by η makes it the norm of the gradient mapping, in the units of a gradient: it
        is ``‖∇g(y)‖`` where h = 0, so it compares with the default stationarity residual and does not shrink
        just because η does. Computed with autograd (enabled here even under ``no_grad`` or ``inference_mode``);
        NaN where g is not finite.
        """
        from lightning_amor.autograd_utils import constant_context, gradients_enabled, usable

        step = float(self.residual_step)
        if not step > 0:
            raise ValueError(f"{type(self).__name__}: residual_step must be positive, got {self.residual_step}")
        with gradients_enabled():
            x = constant_context(x)
            flat = usable(self.flatten(y)).detach().requires_grad_(True)
            smooth = self.smooth_projected(flat, x)
            (grad,) = torch.autograd.grad(smooth.sum(), flat, allow_unused=True)
            grad = torch.zeros_like(flat) if grad is None else grad
            flat = flat.detach()
            residual = prox_gradient_residual(self, flat, grad.detach(), step)
        smooth = smooth.detach()
        return torch.where(torch.isfinite(smooth), residual, torch.full_like(residual, math.nan))

    def cache_key(self) -> Optional[str]:
        """The base key with h's description appended, so two objectives that differ only in h never share
        cached reference solutions (``None`` when the objective has learnable parameters)."""
        key = super().cache_key()
        if key is None:
            return None
        operator = self._operator()
        return f"{key}+{type(operator).__name__}({operator.extra_repr()})"
