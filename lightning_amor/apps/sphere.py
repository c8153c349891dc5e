"""Amortized optimization over the sphere S² (tutorial §4.3, Cohen et al. 2021's c-convex potentials).

f(y; x) = softmin_γ { ½·arccos(z_iᵀy)² + α_i }_{i=1..m}, softmin_γ(a) = −γ log Σ_i exp(−a_i/γ),
with the context x = (z_1, …, z_m, α_1, …, α_m) and y on the unit sphere (projection y/‖y‖).
The squared geodesic distance and the uniform offsets follow the reference code (REFERENCE §4.4, §6).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective, ObjectiveShapeError, context_repeat
from lightning_amor.solvers import LBFGS


def fibonacci_sphere(num: int, like: Tensor) -> Tensor:
    """``num x 3`` nearly uniform points on S² (a Fibonacci lattice), on ``like``'s device and dtype."""
    i = torch.arange(num, dtype=torch.float64) + 0.5
    polar = torch.acos(1 - 2 * i / num)
    azimuth = math.pi * (1 + math.sqrt(5.0)) * i
    points = torch.stack(
        [torch.cos(azimuth) * torch.sin(polar), torch.sin(azimuth) * torch.sin(polar), torch.cos(polar)], dim=1
    )
    return points.to(device=like.device, dtype=like.dtype)


def safe_arccos(cosine: Tensor) -> Tensor:
    """arccos with its argument clamped inside (−1, 1), so the gradient stays finite at the poles."""
    eps = 10 * torch.finfo(cosine.dtype).eps
    return torch.arccos(cosine.clamp(-1 + eps, 1 - eps))


class SphereObjective(Objective):
    """The tutorial's sphere objective, m centres (context ``B x 4m``), solutions ``B x 3`` on S².

    Args:
        temperature: γ of the soft-min (0.5 in the reference).
        grid_points: points of the dense grid that seeds the oracle.
        starts: how many grid points the oracle refines with L-BFGS (see :meth:`grid_starts`).
        separation: the least angle (degrees) between two starts.
    """

    dim = 3
    basin_threshold = math.radians(10.0)  # a prediction 10° from the global minimizer lies in another basin

    def __init__(
        self, temperature: float = 0.5, grid_points: int = 4096, starts: int = 4, separation: float = 10.0
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SphereObjective: temperature must be positive, got {temperature}")
        if starts < 1 or grid_points < starts:
            raise ValueError(
                f"SphereObjective: need 1 <= starts <= grid_points, got starts={starts}, grid_points={grid_points}"
            )
        if not 0 <= separation < 180:
            raise ValueError(f"SphereObjective: separation is an angle in degrees in [0, 180), got {separation}")
        self.temperature = temperature
        self.grid_points = grid_points
        self.starts = starts
        self.separation = separation

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, grid_points={self.grid_points}, starts={self.starts}, "
            f"separation={self.separation}"
        )

    def split_context(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Centres ``B x m x 3`` and offsets ``B x m`` of contexts ``B x 4m``."""
        if x.dim() != 2 or x.shape[1] % 4 != 0:
            raise ObjectiveShapeError(
                f"SphereObjective expects contexts of shape (B, 4m): m centres (3 numbers each) then m offsets, "
                f"got {tuple(x.shape)}"
            )
        m = x.shape[1] // 4
        return x[:, : 3 * m].reshape(-1, m, 3), x[:, 3 * m :]

    def _values(self, points: Tensor, x: Tensor) -> Tensor:
        """f at ``B x P x 3`` unit points for contexts ``B x 4m``: ``B x P``."""
        z, alpha = self.split_context(x)
        cosine = torch.einsum("bpk,bmk->bpm", points, z)
        energy = 0.5 * safe_arccos(cosine) ** 2 + alpha.unsqueeze(1)
        return -self.temperature * torch.logsumexp(-energy / self.temperature, dim=-1)

    def value(self, y: Tensor, x: Context) -> Tensor:
        """f(y; x) for unit ``y`` (``B x 3``): ``B``."""
        return self._values(y.unsqueeze(1), x).squeeze(1)

    def project(self, y: Tensor) -> Tensor:
        """``y / ‖y‖``; the origin, which has no direction, maps to the pole (0, 0, 1) with a zero gradient."""
        norm = y.norm(dim=-1, keepdim=True)
        tiny = torch.finfo(y.dtype).tiny ** 0.5
        pole = torch.zeros_like(y)
        pole[..., -1] = 1.0
        return torch.where(norm > tiny, y / norm.clamp_min(tiny), pole)

    def distance(self, y: Tensor, y_ref: Tensor) -> Tensor:
        """The geodesic angle (radians) between unit vectors: ``B``."""
        return safe_arccos((self.project(y) * self.project(y_ref)).sum(-1))

    def grid_starts(self, x: Tensor) -> Tensor:
        """Starting points ``B x starts x 3``: the lowest point of a Fibonacci grid, then repeatedly the lowest
        grid point at least ``separation`` degrees from those already chosen, so that the starts lie in distinct
        regions (the best grid points of one basin would otherwise all be refined to the same minimum)."""
        grid = fibonacci_sphere(self.grid_points, x)
        values = self._values(grid.expand(x.shape[0], -1, -1), x)  # B x P
        min_cosine = math.cos(math.radians(self.separation))
        chosen = []
        for _ in range(self.starts):
            lowest, index = values.min(dim=1)
            point = grid[index]
            if chosen:  # every grid point is near a chosen one: repeat the best start (refined twice, harmless)
                point = torch.where(torch.isfinite(lowest)[:, None], point, chosen[0])
            chosen.append(point)
            values = values.masked_fill(point @ grid.T >= min_cosine, math.inf)
        return torch.stack(chosen, dim=1)

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """Global minimizers ``B x 3``: the grid's :meth:`grid_starts` (and ``init``), refined by batched L-BFGS
        in float64 (in float32 the gradient cannot reach the tolerance and L-BFGS runs to its step limit)."""
        with torch.no_grad():
            starts = self.grid_starts(x)
        if init is not None:
            starts = torch.cat([starts, self.project(init.detach()).unsqueeze(1)], dim=1)
        k = starts.shape[1]
        wide = x.detach().to(torch.float64)
        result = LBFGS(steps=100, tol=1e-9).solve(self, context_repeat(wide, k), init=starts.reshape(-1, 3).double())
        choice = result.value.reshape(-1, k).argmin(dim=1)
        best = result.y.reshape(-1, k, 3)[torch.arange(x.shape[0], device=x.device), choice]
        return best.to(x.dtype)
