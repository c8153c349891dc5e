"""The cross-entropy method (CEM): a batched, derivative-free solver.

For each of ``B`` contexts CEM keeps a diagonal Gaussian N(μ, diag σ²) over the flat solution ``y`` (``n``). Each
iteration draws ``population`` samples, clips them into ``[lower, upper]`` (when bounds are given) and projects them
onto the objective's domain, evaluates ``F(y) = objective.projected(y, x)`` on all ``B × population`` of them in one
call, and refits the Gaussian to the ``elites`` lowest:

    μ ← s μ + (1 − s) mean(elites),     σ ← s σ + (1 − s) std(elites)          (s = ``smoothing``)

It needs values only (no gradient), so it works on objectives that are not differentiable or have poor gradients
(saturated squashings, clipped dynamics), which is why model-predictive control uses it as a baseline next to
gradient shooting. The answer is the best sample ever drawn for each context (so F never rises from one iteration
to the next), or the starting mean if no sample beats it.

Random numbers come from a CPU generator seeded by ``seed``: a solve is deterministic under a seed.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective, context_batch_size, context_repeat
from lightning_amor.solvers import STOP_REASONS, Callback, Solver, SolverResult

__all__ = ["CEM"]

Bound = Union[float, Sequence[float], None]


class CEM(Solver):
    """The cross-entropy method on the flat ``B x n`` solution, every context independently (see the module).

    Args:
        iterations: refits of the sampling distribution.
        population: samples per context and iteration (at least 2).
        elites: the lowest samples the distribution is refitted to (1 ≤ elites ≤ population).
        init_std: the initial standard deviation σ₀ (> 0) of every coordinate.
        smoothing: s in [0, 1), the weight of the previous mean and deviation in each refit.
        lower: a lower bound on every coordinate (a number, or ``n`` numbers), or ``None``.
        upper: an upper bound (a number, or ``n`` numbers), or ``None``.
        min_std: a floor on σ after each refit (≥ 0), which keeps CEM exploring.
        seed: the seed of the sampling generator.

    Raises:
        ValueError: a setting out of range (each message names it and its range).
    """

    def __init__(
        self,
        iterations: int = 10,
        population: int = 100,
        elites: int = 10,
        init_std: float = 1.0,
        smoothing: float = 0.1,
        lower: Bound = None,
        upper: Bound = None,
        min_std: float = 0.0,
        seed: int = 0,
    ) -> None:
        if int(iterations) != iterations or iterations < 0:
            raise ValueError(f"CEM: iterations must be a non-negative integer, got {iterations}")
        if int(population) != population or population < 2:
            raise ValueError(f"CEM: population must be an integer >= 2 (samples per iteration), got {population}")
        if int(elites) != elites or not 1 <= elites <= population:
            raise ValueError(f"CEM: elites must be an integer in [1, population={population}], got {elites}")
        if not init_std > 0:
            raise ValueError(f"CEM: init_std must be positive, got {init_std}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"CEM: smoothing must be in [0, 1) (the weight of the previous distribution), got "
                             f"{smoothing}")
        if not min_std >= 0:
            raise ValueError(f"CEM: min_std must be non-negative, got {min_std}")
        self.iterations, self.population, self.elites = int(iterations), int(population), int(elites)
        self.init_std, self.smoothing, self.min_std = float(init_std), float(smoothing), float(min_std)
        self.lower = _bound("lower", lower)
        self.upper = _bound("upper", upper)
        if self.lower is not None and self.upper is not None:
            low, high = torch.tensor(self.lower), torch.tensor(self.upper)
            if low.shape != high.shape and low.numel() != 1 and high.numel() != 1:
                raise ValueError(f"CEM: lower and upper must have the same length, got {low.numel()} and "
                                 f"{high.numel()}")
            if not bool((low < high).all()):
                raise ValueError(f"CEM: every lower bound must be below its upper bound, got lower={self.lower}, "
                                 f"upper={self.upper}")
        self.seed = int(seed)

    def _bounds(self, n: int, like: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        out = []
        for name, bound in (("lower", self.lower), ("upper", self.upper)):
            if bound is None:
                out.append(None)
                continue
            t = torch.tensor(bound, dtype=like.dtype, device=like.device).reshape(-1)
            if t.numel() not in (1, n):
                raise ValueError(f"CEM: {name} has {t.numel()} numbers but the solutions have n = {n}; give one "
                                 f"number or n of them")
            out.append(t.expand(n))
        return out[0], out[1]

    def _clip(self, y: Tensor, lower: Optional[Tensor], upper: Optional[Tensor]) -> Tensor:
        if lower is not None:
            y = torch.maximum(y, lower)
        if upper is not None:
            y = torch.minimum(y, upper)
        return y

    def _solve(self, objective: Objective, x: Context, init: Optional[Tensor],
               callback: Optional[Callback]) -> SolverResult:
        with torch.no_grad():
            start = self._start(objective, x, init)
            batch, n = start.shape
            lower, upper = self._bounds(n, start)
            mean = self._clip(start, lower, upper)
            std = torch.full_like(mean, self.init_std)
            best = objective.project_flat(mean)
            best_value = _sortable(objective.projected(best, x))
            generator = torch.Generator().manual_seed(self.seed)
            x_all = context_repeat(x, self.population)
            if callback is not None:
                callback(0, best)
            for k in range(self.iterations):
                noise = torch.randn((batch, self.population, n), generator=generator, dtype=start.dtype)
                samples = self._clip(mean[:, None] + std[:, None] * noise.to(start.device), lower, upper)
                samples = objective.project_flat(samples.reshape(batch * self.population, n))
                values = _sortable(objective.projected(samples, x_all)).view(batch, self.population)
                samples = samples.view(batch, self.population, n)
                order = values.topk(self.elites, dim=1, largest=False).indices
                elite = samples.gather(1, order[..., None].expand(-1, -1, n))
                s = self.smoothing
                mean = s * mean + (1.0 - s) * elite.mean(1)
                std = (s * std + (1.0 - s) * elite.std(1, unbiased=False)).clamp(min=self.min_std)
                top = values.gather(1, order[:, :1])[:, 0]
                better = top < best_value
                best = torch.where(better[:, None], elite[:, 0], best)
                best_value = torch.where(better, top, best_value)
                if callback is not None:
                    callback(k + 1, best)
            value = objective.projected(best, x)
        finite = torch.isfinite(value)
        stopped = torch.where(finite, STOP_REASONS.index("max_steps"), STOP_REASONS.index("not_finite"))
        iterations = torch.full((context_batch_size(x),), self.iterations, dtype=torch.int64, device=best.device)
        converged = torch.zeros_like(finite)
        return SolverResult(best, value, iterations, converged, stopped.to(torch.int64))


def _bound(name: str, bound: Bound) -> Optional[list[float]]:
    if bound is None:
        return None
    values = [float(bound)] if isinstance(bound, (int, float)) else [float(b) for b in bound]
    if not values or not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"CEM: {name} must be finite numbers, got {bound}")
    return values


def _sortable(values: Tensor) -> Tensor:
    """Values with NaN replaced by +inf, so a failed sample is never an elite."""
    return torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
