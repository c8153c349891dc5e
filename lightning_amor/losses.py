"""Training losses of an amortizer, each returning one value per context (``B``)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_amor.amortizers import AmortizedOutput
from lightning_amor.objective import Context, Objective


class AmortizationLoss(nn.Module):
    """Base class: ``forward(output, x, objective, y_star) -> B`` per-context losses.

    :attr:`needs_target` tells the data module to attach reference solutions y* to training batches.
    """

    needs_target: bool = False

    def forward(
        self, output: AmortizedOutput, x: Context, objective: Objective, y_star: Optional[Tensor] = None
    ) -> Tensor:
        """Per-context loss, ``B``."""
        return self.iterate_loss(output.y, x, objective, y_star)

    def iterate_loss(self, y: Tensor, x: Context, objective: Objective, y_star: Optional[Tensor]) -> Tensor:
        """The loss of one ``B x n`` iterate, ``B``."""
        raise NotImplementedError


class ObjectiveLoss(AmortizationLoss):
    """L_obj = f(ŷ(x); x): needs no reference solutions."""

    def iterate_loss(self, y: Tensor, x: Context, objective: Objective, y_star: Optional[Tensor]) -> Tensor:
        """f(y; x), ``B``."""
        return objective(y, x)


class RegressionLoss(AmortizationLoss):
    """L_reg = ‖ŷ(x) − y*(x)‖²: regression onto reference solutions (computed once and cached)."""

    needs_target = True

    def iterate_loss(self, y: Tensor, x: Context, objective: Objective, y_star: Optional[Tensor]) -> Tensor:
        """Squared Euclidean distance to y*, ``B``."""
        if y_star is None:
            raise ValueError(
                "RegressionLoss needs reference solutions y* in the batch under the key 'y_star'; use a data "
                "module that provides them (ContextDataModule attaches them when the loss asks for targets)"
            )
        return ((y - y_star) ** 2).sum(-1)


class IterateSumLoss(AmortizationLoss):
    """L^Σ = Σ_t w_t L(ŷ^t) over the iterates of a semi-amortized model, normalised by Σ_t w_t.

    Args:
        base: the loss of one iterate (objective or regression).
        weights: ``uniform`` (w_t = 1), ``linear`` (w_t = t + 1, later iterates count more),
            ``last`` (only the final iterate), or an explicit list with one weight per iterate.
        skip_initial: leave out ŷ^0.
    """

    def __init__(
        self, base: AmortizationLoss, weights: Union[str, Sequence[float]] = "uniform", skip_initial: bool = False
    ) -> None:
        super().__init__()
        if isinstance(weights, str) and weights not in ("uniform", "linear", "last"):
            raise ValueError(f"IterateSumLoss: weights must be 'uniform', 'linear', 'last' or a list, got {weights!r}")
        if not isinstance(weights, str) and not (
            all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0
        ):
            raise ValueError(
                f"IterateSumLoss: explicit weights must be finite, non-negative and not all zero (they are normalised "
                f"by their sum), got {list(weights)}"
            )
        self.base = base
        self.weights = weights
        self.skip_initial = skip_initial
        self.needs_target = base.needs_target

    def _weights(self, count: int, like: Tensor) -> Tensor:
        if isinstance(self.weights, str):
            if self.weights == "uniform":
                w = torch.ones(count)
            elif self.weights == "linear":
                w = torch.arange(1, count + 1, dtype=torch.float64)
            else:
                w = torch.zeros(count)
                w[-1] = 1.0
        else:
            if len(self.weights) != count:
                raise ValueError(
                    f"IterateSumLoss: {len(self.weights)} weights were given but the model produced {count} "
                    f"iterates (steps + 1{', without the initial one' if self.skip_initial else ''})"
                )
            w = torch.as_tensor(list(self.weights), dtype=torch.float64)
        return (w / w.sum()).to(device=like.device, dtype=like.dtype)

    def forward(
        self, output: AmortizedOutput, x: Context, objective: Objective, y_star: Optional[Tensor] = None
    ) -> Tensor:
        """Weighted mean over iterates of the base loss, ``B``."""
        iterates = output.iterates[1:] if self.skip_initial else output.iterates
        if not iterates:
            raise ValueError("IterateSumLoss: the model produced no iterates to sum over")
        w = self._weights(len(iterates), iterates[0])
        return sum(w[t] * self.base.iterate_loss(y, x, objective, y_star) for t, y in enumerate(iterates))
