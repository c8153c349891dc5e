"""Amortization models ŷ_θ(x): fully amortized and semi-amortized (differentiable inner steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_amor.autograd_utils import gradients_enabled, usable_context
from lightning_amor.implicit import implicit_solution
from lightning_amor.objective import Context, Objective
from lightning_amor.updates import GradientStep, InnerUpdate

GRADIENT_MODES = ("unroll", "first_order", "truncated", "implicit")


@dataclass
class AmortizedOutput:
    """What an amortizer predicts for a batch.

    Attributes:
        y: ``B x n`` final prediction, on the objective's domain.
        iterates: ``[ŷ^0, ..., ŷ^K]``, each ``B x n`` (``[y]`` for a fully amortized model, ``[ŷ^0, y]`` in
            implicit mode, whose intermediate iterates carry no gradient).
        candidates: for a model that proposes several solutions per context and keeps one
            (:class:`~lightning_amor.multi_hypothesis.MultiHypothesis`), the output of every candidate over the
            contexts repeated ``k`` times (``(B*k) x n``, row ``b*k+j`` is candidate ``j`` of context ``b``);
            ``None`` otherwise.
    """

    y: Tensor
    iterates: list[Tensor] = field(default_factory=list)
    candidates: AmortizedOutput | None = None


class Amortizer(nn.Module):
    """Base class: ``forward(x, objective) -> AmortizedOutput``."""

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """Predict solutions ``B x n`` for contexts ``x``."""
        raise NotImplementedError


class FullyAmortized(Amortizer):
    """ŷ_θ(x) = π(net(x)): a network that never queries the objective.

    Args:
        net: a module mapping contexts (batch ``B``) to ``B x n`` raw solutions, projected onto the objective's
            domain by ``objective.project`` (e.g. an :class:`~lightning_amor.nets.MLP` with ``out_features = n``).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """``π(net(x))``, ``B x n``."""
        y = objective.project_flat(objective.flatten(self.net(x)))
        return AmortizedOutput(y=y, iterates=[y])


class SemiAmortized(Amortizer):
    """An initial iterate ŷ⁰ = π(init(x)) refined by K differentiable steps on f.

    Each step is ``y ← π(update(y, ∇_y F(y)))`` with F(y) = f(π(y); x) + (λ/2)‖y − ŷ⁰‖²
    (λ = ``shrinkage``, 0 by default). Gradients w.r.t. y come from autograd, so any
    differentiable Objective works.

    Args:
        init: a module ``x -> B x n`` for the initial iterate (an MLP, or
            :class:`~lightning_amor.nets.LearnedConstant` for a MAML-style learned constant).
        steps: the number K of inner steps.
        update: the inner update rule (default: gradient descent with a learnable step size).
        gradient: how the outer gradient passes through the inner steps:
            ``unroll`` (full second-order backpropagation through every step);
            ``first_order`` (the Jacobian of each gradient is dropped, as first-order MAML;
            the identity path to ŷ⁰ and the update's parameters still get gradients);
            ``truncated`` (second-order through the last ``truncate`` steps only, first-order before);
            ``implicit`` (the inner problem with shrinkage λ > 0 is solved by the K steps without
            keeping a graph, and the implicit function theorem gives the gradient, as iMAML;
            only ŷ⁰ and the objective's parameters receive gradients).
        truncate: H, the number of last steps differentiated to second order in ``truncated`` mode.
        shrinkage: λ ≥ 0, required > 0 for ``implicit``.
        cg_steps: conjugate-gradient iterations of the implicit backward pass.
    """

    def __init__(
        self,
        init: nn.Module,
        steps: int = 5,
        update: InnerUpdate | None = None,
        gradient: str = "unroll",
        truncate: int = 1,
        shrinkage: float = 0.0,
        cg_steps: int = 20,
    ) -> None:
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"SemiAmortized: gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if steps < 0:
            raise ValueError(f"SemiAmortized: steps must be >= 0, got {steps}")
        if gradient == "truncated" and not 1 <= truncate <= max(steps, 1):
            raise ValueError(f"SemiAmortized: truncate must be in [1, steps={steps}], got {truncate}")
        if shrinkage < 0:
            raise ValueError(f"SemiAmortized: shrinkage must be >= 0, got {shrinkage}")
        if gradient == "implicit" and shrinkage <= 0:
            raise ValueError(
                "SemiAmortized: gradient='implicit' needs shrinkage > 0 (the proximal weight λ that ties the "
                "inner solution to the initial iterate; with λ = 0 the solution does not depend on it)"
            )
        update = update if update is not None else GradientStep()
        if gradient == "implicit" and update.proximal:
            raise ValueError(
                f"SemiAmortized: gradient='implicit' differentiates the optimality condition of a smooth inner "
                f"problem, which a proximal update ({type(update).__name__}) of a nonsmooth f does not have; use "
                f"gradient='unroll', 'truncated' or 'first_order' with it"
            )
        self.init = init
        self.steps = steps
        self.update = update
        self.gradient = gradient
        self.truncate = truncate
        self.shrinkage = shrinkage
        self.cg_steps = cg_steps

    def _inner_value(self, y: Tensor, y0: Tensor, x: Context, objective: Objective) -> Tensor:
        # A proximal update differentiates only the smooth part g of f = g + h and applies h's prox itself.
        value = (objective.smooth_projected(y, x) if self.update.proximal else objective.projected(y, x)).sum()
        if self.shrinkage > 0:
            value = value + 0.5 * self.shrinkage * ((y - y0) ** 2).sum()
        return value

    def _second_order(self, t: int) -> bool:
        if self.gradient == "unroll":
            return True
        if self.gradient == "truncated":
            return t >= self.steps - self.truncate
        return False

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """``B x n`` prediction after K inner steps, with every iterate."""
        differentiate = torch.is_grad_enabled()
        with gradients_enabled():
            x = usable_context(x)
            y0 = objective.project_flat(objective.flatten(self.init(x)))
            if not differentiate:
                y0 = y0.detach()  # autograd is on for the inner gradients only; return no graph
            start = y0.detach()
            self.update.prepare(lambda y: self._inner_value(y, start, x, objective), start)
            if self.gradient == "implicit":
                return self._implicit(y0, x, objective, differentiate)
            y, state, iterates = y0, self.update.init_state(y0), [y0]
            for t in range(self.steps):
                second_order = differentiate and self._second_order(t) and y.requires_grad
                point = y if second_order else y.detach().requires_grad_()
                anchor = y0 if second_order else y0.detach()
                (grad,) = torch.autograd.grad(
                    self._inner_value(point, anchor, x, objective), point, create_graph=second_order
                )
                if not differentiate:
                    y, grad = y.detach(), grad.detach()
                y, state = self.update(y, grad, state, t, objective=objective)
                y = objective.project_flat(y)
                if not differentiate:
                    y = y.detach()
                    state = _detach(state)
                iterates.append(y)
        return AmortizedOutput(y=y, iterates=iterates)

    def _implicit(self, y0: Tensor, x: Context, objective: Objective, differentiate: bool) -> AmortizedOutput:
        anchor = y0.detach()
        y, state = anchor, self.update.init_state(anchor)
        for t in range(self.steps):
            point = y.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self._inner_value(point, anchor, x, objective), point)
            y, state = self.update(y.detach(), grad.detach(), _detach(state), t, objective=objective)
            y, state = y.detach(), _detach(state)
        if differentiate:
            params = [p for p in objective.parameters() if p.requires_grad]
            if isinstance(x, Tensor) and x.requires_grad:
                params.append(x)
            y = implicit_solution(
                y, y0, lambda v: objective.projected(v, x).sum(), self.shrinkage, params, self.cg_steps
            )
        y = objective.project_flat(y)
        return AmortizedOutput(y=y, iterates=[y0, y])


def _detach(state: object) -> object:
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state
