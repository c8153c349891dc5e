"""Quality metrics of an amortizer on a fixed set of contexts, reduced correctly across ranks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric


class AmortizationMetrics(Metric):
    """Means over every context seen: f(ŷ), the amortization gap f(ŷ) − f(y*), the distance d(ŷ, y*),
    the constraint violation and the inference time per batch.

    States are sums and counts (reduced by summation under DDP), so the result over several
    ranks equals the result of one process over the same contexts.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("objective", "gap", "distance", "violation", "inference_ms"):
            self.add_state(f"{name}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, name: str, values: Tensor) -> None:
        values = values.detach().to(torch.float64).reshape(-1)
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + values.sum())
        setattr(self, f"{name}_count", getattr(self, f"{name}_count") + values.numel())

    def update(
        self,
        f_pred: Tensor,
        f_star: Optional[Tensor] = None,
        distance: Optional[Tensor] = None,
        violation: Optional[Tensor] = None,
        inference_ms: Optional[float] = None,
    ) -> None:
        """Add a batch: ``f_pred``, ``f_star``, ``distance`` and ``violation`` are ``B`` tensors.

        ``inference_ms`` is the wall time of the batch's prediction, counted once per batch.
        """
        self._add("objective", f_pred)
        if f_star is not None:
            self._add("gap", f_pred - f_star)
        if distance is not None:
            self._add("distance", distance)
        if violation is not None:
            self._add("violation", violation)
        if inference_ms is not None:
            self._add("inference_ms", torch.tensor([inference_ms]))

    def compute(self) -> dict[str, Tensor]:
        """The means of every quantity that was given at least once."""
        out = {}
        for name in ("objective", "gap", "distance", "violation", "inference_ms"):
            count = getattr(self, f"{name}_count")
            if count > 0:
                out[name] = (getattr(self, f"{name}_sum") / count).float()
        return out
