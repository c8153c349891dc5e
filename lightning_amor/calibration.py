"""Calibration: what a model's in-distribution (validation) contexts and residuals look like.

Quantiles of the certificate residuals of a model's predictions on its validation contexts, and the statistics of
those contexts, kept with the model (saved in its checkpoints), so that the amortize-then-refine policy
(:class:`~lightning_amor.fallback.Fallback`) can tell contexts far outside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_amor.objective import Context, context_batch_size, context_index
from lightning_amor.runtime import evaluation_mode, to_device

if TYPE_CHECKING:
    from lightning_amor.module import AmortizedModule

__all__ = ["CALIBRATION_KEY", "Calibration", "calibrate", "context_features", "context_features_fit",
           "prediction_residuals"]

CALIBRATION_KEY = "residual_calibration"
"""The checkpoint key under which :class:`~lightning_amor.module.AmortizedModule` stores its calibration."""

QUANTILE_LEVELS = 1001
"""How many evenly spaced quantiles of the validation residuals a calibration keeps (0, 0.001, ..., 1)."""

MAX_CONTEXT_FEATURES = 4096
"""Contexts with more features than this are not compared with the calibration contexts (a ``d x d`` covariance)."""

CONTEXT_RIDGE = 1e-3
"""The ridge added to the calibration contexts' covariance, relative to their average variance."""


@dataclass
class Calibration:
    """What a model's in-distribution (validation) contexts look like, to flag contexts far outside them.

    Two scores, each with quantiles over the calibration contexts: the residual of the model's prediction
    (the problem's certificate; a prediction much worse than on validation), and the Mahalanobis distance of
    the context's features (:func:`context_features`) to the calibration contexts' mean under their covariance
    (a context unlike any seen in validation, even where the model still returns a stationary point — a
    semi-amortized model's inner steps find *some* stationary point almost anywhere).

    Attributes:
        quantiles: ``L`` quantiles of the finite residuals at the evenly spaced levels ``0, 1/(L-1), ..., 1``.
        count: how many finite residuals they summarise.
        nonfinite: how many residuals were NaN or infinite (left out of the quantiles).
        step: the global step of the weights whose predictions were measured (``None``: unknown).
        matches_weights: whether those are the weights in use; ``False`` when a checkpoint was saved at another
            step than its last validation (a ``last.ckpt`` written between validations).
        context_mean: ``d`` mean of the calibration contexts' features (``None``: no context statistics).
        context_whitener: ``d x d`` lower-triangular W with ``W Σ Wᵀ = I`` (Σ the features' covariance, with a
            small ridge), so the distance of features ``f`` is ``‖W (f − mean)‖``.
        distance_quantiles: ``L`` quantiles of the calibration contexts' own distances, at the same levels.
    """

    quantiles: Tensor
    count: int
    nonfinite: int = 0
    step: Optional[int] = None
    matches_weights: bool = True
    context_mean: Optional[Tensor] = None
    context_whitener: Optional[Tensor] = None
    distance_quantiles: Optional[Tensor] = None

    @classmethod
    def from_residuals(
        cls, residuals: Tensor, step: Optional[int] = None, features: Optional[Tensor] = None
    ) -> Calibration:
        """Summarise ``N`` residuals (at least one finite) measured at the weights of global step ``step``, and the
        ``N x d`` features of the same contexts (optional; without them contexts are not compared)."""
        residuals = residuals.detach().reshape(-1).to("cpu", torch.float64)
        finite = residuals[torch.isfinite(residuals)]
        if finite.numel() == 0:
            raise ValueError(
                f"cannot calibrate on {residuals.numel()} residuals none of which is finite: the model's predictions "
                "(or the objective) are NaN or infinite on every calibration context"
            )
        levels = torch.linspace(0.0, 1.0, QUANTILE_LEVELS, dtype=torch.float64)
        calibration = cls(torch.quantile(finite, levels), int(finite.numel()), int(residuals.numel() - finite.numel()),
                          step)
        if features is not None:
            calibration._fit_contexts(features.detach().to("cpu", torch.float64), levels)
        return calibration

    def _fit_contexts(self, features: Tensor, levels: Tensor) -> None:
        features = features[torch.isfinite(features).all(-1)]
        if features.shape[0] < 2:
            return
        mean = features.mean(0)
        centred = features - mean
        covariance = centred.T @ centred / (features.shape[0] - 1)
        # A ridge relative to the average variance keeps constant features (an image's always-black border)
        # invertible; a context that varies along them is then far away, as it should be.
        scale = float(covariance.diagonal().mean()) or 1.0
        covariance += CONTEXT_RIDGE * scale * torch.eye(covariance.shape[0], dtype=covariance.dtype)
        cholesky = torch.linalg.cholesky(covariance)
        self.context_mean = mean
        self.context_whitener = torch.linalg.solve_triangular(
            cholesky, torch.eye(cholesky.shape[0], dtype=cholesky.dtype), upper=False)
        self.distance_quantiles = torch.quantile(self.distance(features), levels)

    @property
    def has_contexts(self) -> bool:
        """Whether contexts can be compared with the calibration contexts (:meth:`distance`)."""
        return self.context_mean is not None

    def distance(self, features: Tensor) -> Tensor:
        """The Mahalanobis distance of ``B x d`` context features to the calibration contexts: ``B``."""
        if self.context_mean is None or self.context_whitener is None:
            raise ValueError("this calibration holds no context statistics (calibrated without context features)")
        if features.shape[-1] != self.context_mean.numel():
            raise ValueError(f"contexts with {features.shape[-1]} features cannot be compared with the calibration's "
                             f"{self.context_mean.numel()}; was it made for another model?")
        centred = features.detach().to("cpu", torch.float64) - self.context_mean
        return (centred @ self.context_whitener.T).norm(dim=-1)

    @staticmethod
    def _interpolate(quantiles: Tensor, q: float) -> float:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile level must lie in [0, 1], got {q}")
        levels = np.linspace(0.0, 1.0, quantiles.numel())
        return float(np.interp(q, levels, quantiles.numpy()))

    def quantile(self, q: float) -> float:
        """The ``q``-quantile of the calibration residuals (interpolated between the stored levels)."""
        return self._interpolate(self.quantiles, q)

    def distance_quantile(self, q: float) -> Optional[float]:
        """The ``q``-quantile of the calibration contexts' distances, or ``None`` without context statistics."""
        return None if self.distance_quantiles is None else self._interpolate(self.distance_quantiles, q)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        saved: dict[str, Any] = {"quantiles": self.quantiles.clone(), "count": self.count,
                                 "nonfinite": self.nonfinite, "step": self.step}
        if self.has_contexts:
            saved.update(context_mean=self.context_mean.clone(), context_whitener=self.context_whitener.clone(),
                         distance_quantiles=self.distance_quantiles.clone())
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any], weights_step: Optional[int] = None) -> Calibration:
        """The calibration stored by :meth:`to_dict`, for the weights of global step ``weights_step``."""
        step = saved.get("step")
        matches = weights_step is None or step is None or int(step) == int(weights_step)

        def tensor(name: str) -> Optional[Tensor]:
            value = saved.get(name)
            return None if value is None else torch.as_tensor(value, dtype=torch.float64)

        return cls(tensor("quantiles"), int(saved["count"]), int(saved.get("nonfinite", 0)), step, matches,
                   tensor("context_mean"), tensor("context_whitener"), tensor("distance_quantiles"))


def context_features(x: Context) -> Tensor:
    """A batch of contexts as ``B x d`` features: a tensor flattened per context; for a dict, its floating-point
    entries flattened and concatenated in key order."""
    if isinstance(x, Tensor):
        flat = x.detach().reshape(x.shape[0], -1)
        return flat if flat.is_floating_point() else flat.to(torch.get_default_dtype())
    parts = [v.detach().reshape(v.shape[0], -1) for _, v in sorted(x.items()) if v.is_floating_point()]
    if not parts:
        raise ValueError("the contexts hold no floating-point entries to compare")
    return torch.cat([p.to(parts[0].dtype) for p in parts], dim=-1)


def context_features_fit(x: Context) -> bool:
    """Whether the contexts are small enough (at most :data:`MAX_CONTEXT_FEATURES` features) for a covariance."""
    try:
        return context_features(context_index(x, slice(0, 1))).shape[-1] <= MAX_CONTEXT_FEATURES
    except ValueError:
        return False


def calibrate(module: AmortizedModule, x: Context, batch_size: int = 1024) -> Calibration:
    """Calibrate ``module`` on in-distribution contexts ``x`` (e.g. its validation set): the quantiles of the
    residuals of its predictions and the statistics of the contexts. Also stored as ``module.calibration``, and
    saved with its next checkpoint."""
    residuals, features = [], []
    compare = context_features_fit(x)
    with evaluation_mode(module):
        for start in range(0, context_batch_size(x), batch_size):
            part = to_device(context_index(x, slice(start, start + batch_size)), module.device)
            residuals.append(prediction_residuals(module, part).cpu())
            if compare:
                features.append(context_features(part).cpu())
    module.calibration = Calibration.from_residuals(
        torch.cat(residuals), step=module.global_step, features=torch.cat(features) if compare else None)
    return module.calibration


def prediction_residuals(module: AmortizedModule, x: Context) -> Tensor:
    """The certificate residuals (:meth:`~lightning_amor.objective.Objective.residual_flat`) of the module's
    predictions for contexts ``x``: ``B``."""
    with torch.no_grad():
        y = module(x)
    return module.objective.residual_flat(y, x)

