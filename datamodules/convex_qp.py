"""p(x) of the portfolio QP family: expected-return forecasts driven by factor views."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.context import ContextDataModule
from lightning_amor.apps.convex_qp import sample_portfolio_returns


class PortfolioReturns(ContextDataModule):
    """Contexts μ (``B x n``): expected-return forecasts μ = μ̄ + ``view_scale`` · V s + ``noise`` · ε for the
    portfolio family of :class:`~lightning_amor.apps.convex_qp.PortfolioQP` with the same ``assets``, ``factors``
    and ``family_seed``; s ~ N(0, I_k) are factor views (V the family's view loadings) and ε ~ N(0, I_n)
    asset-specific noise. Forecasts vary mostly along k directions, as forecasts from a factor model do.

    Args:
        assets: n.
        factors: k.
        family_seed: the seed of the family (μ̄ and V); the objective's ``seed``.
        view_scale: the scale of the factor views.
        noise: the scale of the idiosyncratic noise.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(self, assets: int = 50, factors: int = 5, family_seed: int = 0, view_scale: float = 0.05,
                 noise: float = 0.01, **kwargs) -> None:
        if assets < 1 or factors < 1:
            raise ValueError(f"PortfolioReturns: assets and factors must be at least 1, got {assets} and {factors}")
        if view_scale < 0 or noise < 0:
            raise ValueError(f"PortfolioReturns: view_scale and noise must be non-negative, got {view_scale}, {noise}")
        super().__init__(**kwargs)
        self.assets, self.factors, self.family_seed = assets, factors, family_seed
        self.view_scale, self.noise = view_scale, noise

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num x n`` expected returns (float32)."""
        return sample_portfolio_returns(num, self.assets, self.factors, self.family_seed, self.view_scale, self.noise,
                                        generator)
