"""The cross-entropy method: a known optimum, bounds, determinism under a seed, failed samples, bad settings."""

from __future__ import annotations

import pytest
import torch

from lightning_amor.cem import CEM
from lightning_amor.objective import Objective
from tests.objectives import Quadratic


class Bowl(Objective):
    """f(y; x) = ‖y − x‖² on R^3: y*(x) = x, and y* = clamp(x) on a box (separable)."""

    dim = 3

    def value(self, y, x):
        return ((y - x) ** 2).sum(-1)


class HalfNaN(Bowl):
    """The bowl, NaN where y_0 < 0 (a failing simulator): such samples must never become elites."""

    def value(self, y, x):
        f = super().value(y, x)
        return torch.where(y[:, 0] < 0, torch.full_like(f, float("nan")), f)


def contexts(num: int = 5, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed))


def test_cem_finds_the_known_optimum_of_a_quadratic():
    x = contexts()
    result = CEM(iterations=40, population=200, elites=20, init_std=2.0).solve(Quadratic(), x)
    assert (result.y - x).norm(dim=-1).max() < 0.05, (result.y - x).norm(dim=-1)
    assert result.value.max() < 1e-3
    assert result.reasons() == ["max_steps"] * 5 and not bool(result.converged.any())


def test_cem_best_value_never_rises_and_callbacks_see_every_iteration():
    x = contexts(dim=3)
    objective = Bowl()
    seen = []
    CEM(iterations=6, population=32, elites=4).solve(objective, x, callback=lambda k, y: seen.append(
        (k, objective(y, x))))
    assert [k for k, _ in seen] == list(range(7))
    values = torch.stack([v for _, v in seen])
    assert bool((values[1:] <= values[:-1]).all())
    assert bool((values[-1] < values[0]).all())


def test_cem_honours_the_bounds():
    x = 3.0 * contexts(num=6, dim=3)
    inside = []
    solver = CEM(iterations=25, population=100, elites=10, init_std=3.0, lower=-0.5, upper=[0.5, 1.0, 2.0])
    result = solver.solve(Bowl(), x, callback=lambda k, y: inside.append(y))
    upper = torch.tensor([0.5, 1.0, 2.0])
    for y in [*inside, result.y]:
        assert bool((y >= -0.5).all()) and bool((y <= upper).all())
    # the bowl is separable, so its minimizer on the box is the clamped centre
    expected = torch.maximum(torch.minimum(x, upper), torch.tensor(-0.5))
    assert torch.allclose(result.y, expected, atol=0.05), (result.y - expected).abs().max()


def test_cem_is_deterministic_under_a_seed():
    x = contexts(dim=3)
    first = CEM(iterations=3, population=16, elites=4, seed=7).solve(Bowl(), x)
    again = CEM(iterations=3, population=16, elites=4, seed=7).solve(Bowl(), x)
    other = CEM(iterations=3, population=16, elites=4, seed=8).solve(Bowl(), x)
    assert torch.equal(first.y, again.y) and torch.equal(first.value, again.value)
    assert not torch.equal(first.y, other.y)


def test_cem_ignores_samples_whose_value_is_nan():
    x = contexts(dim=3).abs() + 0.5
    result = CEM(iterations=20, population=64, elites=8).solve(HalfNaN(), x, init=x + 0.3)
    assert bool(torch.isfinite(result.value).all()) and bool((result.y[:, 0] >= 0).all())
    assert result.value.max() < 0.05


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"population": 1}, "population must be an integer >= 2"),
    ({"elites": 0}, "elites must be an integer in [1, population=100]"),
    ({"elites": 101}, "elites must be an integer in [1, population=100]"),
    ({"iterations": -1}, "iterations must be a non-negative integer"),
    ({"init_std": 0.0}, "init_std must be positive"),
    ({"smoothing": 1.0}, "smoothing must be in [0, 1)"),
    ({"min_std": -1.0}, "min_std must be non-negative"),
    ({"lower": 1.0, "upper": 0.0}, "every lower bound must be below its upper bound"),
    ({"lower": float("nan")}, "lower must be finite numbers"),
])
def test_bad_settings_are_refused_with_a_message_naming_them(kwargs, message):
    with pytest.raises(ValueError, match="CEM: ") as error:
        CEM(**kwargs)
    assert message in str(error.value)


def test_bounds_of_the_wrong_length_are_refused_at_solve_time():
    with pytest.raises(ValueError, match=r"upper has 2 numbers but the solutions have n = 3"):
        CEM(iterations=1, upper=[1.0, 2.0]).solve(Bowl(), contexts(dim=3))
