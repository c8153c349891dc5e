"""The sphere oracle: grid starts in distinct regions, global minima no worse than a much finer grid, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules import SphereContexts
from datamodules.context import seeded_generator
from lightning_amor.apps.sphere import SphereObjective, fibonacci_sphere


def sphere_contexts(num: int) -> torch.Tensor:
    return SphereContexts().sample(num, seeded_generator(7, num))


def test_grid_starts_are_the_lowest_grid_point_then_separated_ones() -> None:
    objective = SphereObjective(grid_points=1024, starts=4, separation=20.0)
    x = sphere_contexts(16)
    starts = objective.grid_starts(x)
    assert starts.shape == (16, 4, 3)
    grid = fibonacci_sphere(1024, x)
    lowest = objective._values(grid.expand(16, -1, -1), x).argmin(dim=1)
    torch.testing.assert_close(starts[:, 0], grid[lowest])
    cosines = starts @ starts.transpose(1, 2)
    pairs = ~torch.eye(4, dtype=torch.bool).expand(16, 4, 4)
    assert bool((cosines[pairs] < math.cos(math.radians(20.0))).all())


def test_the_oracle_is_no_worse_than_a_much_finer_grid() -> None:
    """f at the oracle's solution, in float64, is at most the minimum of f over 100k grid points (spacing ≈ 0.6°)."""
    objective = SphereObjective()
    x = sphere_contexts(32)
    y = objective.solve(x)
    x64 = x.double()
    fine = fibonacci_sphere(100_000, x64)
    finest = torch.stack([objective._values(fine.unsqueeze(0), x64[i : i + 1]).min() for i in range(32)])
    assert bool((objective.projected(y.double(), x64) <= finest + 1e-9).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solutions_come_in_the_contexts_dtype_on_the_sphere(dtype: torch.dtype) -> None:
    x = sphere_contexts(8).to(dtype)
    y = SphereObjective(grid_points=256, starts=2).solve(x)
    assert y.dtype == dtype and y.shape == (8, 3)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(8, dtype=dtype))


def test_bad_oracle_settings_are_explained() -> None:
    with pytest.raises(ValueError, match="need 1 <= starts <= grid_points"):
        SphereObjective(starts=0)
    with pytest.raises(ValueError, match="need 1 <= starts <= grid_points"):
        SphereObjective(grid_points=4, starts=8)
    with pytest.raises(ValueError, match=r"separation is an angle in degrees in \[0, 180\)"):
        SphereObjective(separation=180.0)
