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
        starts: how many of the best grid points the oracle refines with L-BFGS.
    """

    dim = 3

    def __init__(self, temperature: float = 0.5, grid_points: int = 4096, starts: int = 8) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SphereObjective: temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.grid_points = grid_points
        self.starts = starts

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, grid_points={self.grid_points}, starts={self.starts}"

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

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """Global minimizers ``B x 3``: the best points of a dense grid, refined by batched L-BFGS."""
        with torch.no_grad():
            grid = fibonacci_sphere(self.grid_points, x)
            values = self._values(grid.expand(x.shape[0], -1, -1), x)
            best = values.topk(self.starts, dim=1, largest=False).indices
            starts = grid[best]  # B x k x 3
        if init is not None:
            starts = torch.cat([starts, self.project(init).unsqueeze(1)], dim=1)
        k = starts.shape[1]
        result = LBFGS(steps=100, tol=1e-9).solve(self, context_repeat(x, k), init=starts.reshape(-1, 3))
        choice = result.value.reshape(-1, k).argmin(dim=1)
        return result.y.reshape(-1, k, 3)[torch.arange(x.shape[0], device=x.device), choice]
