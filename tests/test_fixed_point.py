"""The fixed-point solvers, their tolerance and non-convergence contract, and the implicit gradient."""

from __future__ import annotations

import pytest
import torch

from lightning_amor.fixed_point import (
    Anderson,
    FixedPointIteration,
    FixedPointObjective,
    FixedPointResult,
    implicit_fixed_point,
)
from lightning_amor.objective import Objective

DT = torch.float64


def contraction(n: int = 12, rate: float = 0.9, seed: int = 0) -> torch.Tensor:
    """An ``n x n`` matrix of spectral norm ``rate``."""
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return rate * w / torch.linalg.matrix_norm(w, ord=2)


class TanhLayer(FixedPointObjective):
    """z = tanh(W z + x) with ‖W‖₂ = 0.9 on R^12: a contraction."""

    dim = 12

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("w", contraction(self.dim))
        self.scale = scale

    def step(self, z, x):
        return self.scale * torch.tanh((z / self.scale) @ self.w.T + x)


def contexts(batch: int = 16, seed: int = 1) -> torch.Tensor:
    return 2.0 * torch.randn(batch, 12, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_anderson_reaches_the_same_fixed_point_as_plain_iteration_in_fewer_iterations():
    problem, x = TanhLayer(), contexts()
    plain = FixedPointIteration(steps=2000, atol=1e-10).solve(problem, x)
    anderson = Anderson(steps=2000, atol=1e-10, memory=5).solve(problem, x)
    assert bool(plain.converged.all()) and bool(anderson.converged.all())
    assert (plain.y - anderson.y).norm(dim=-1).max() < 1e-8  # ‖z − z*‖ ≤ r / (1 − 0.9)
    assert problem.residual_flat(anderson.y, x).max() <= 1e-10
    assert anderson.iterations.double().median() < 0.7 * plain.iterations.double().median()
    assert bool((anderson.iterations < plain.iterations).all())


@pytest.mark.parametrize("solver_class", [FixedPointIteration, Anderson])
def test_absolute_and_relative_tolerances_are_both_honoured(solver_class):
    problem, x = TanhLayer(scale=100.0), contexts()  # fixed points of norm ~100, so a relative tolerance differs
    z_norm = problem.solve(x).norm(dim=-1)
    for atol, rtol in ((1e-3, 0.0), (0.0, 1e-5), (1e-4, 1e-6)):
        result = solver_class(steps=5000, atol=atol, rtol=rtol).solve(problem, x)
        residual = problem.residual_flat(result.y, x)  # the certificate at the returned point
        threshold = atol + rtol * result.y.norm(dim=-1)
        assert bool(result.converged.all())
        assert bool((residual <= threshold).all()), (atol, rtol)
        # and it did not stop later than it had to: the iterate before the last was above the tolerance
        before = result.residuals[result.iterations - 1, torch.arange(16)]
        assert bool((before > atol + rtol * 0.9 * z_norm).all()), (atol, rtol)
        torch.testing.assert_close(result.residual, residual)
    loose = solver_class(steps=5000, atol=0.0, rtol=1e-5).solve(problem, x)
    strict = solver_class(steps=5000, atol=1e-3 * 1e-5, rtol=0.0).solve(problem, x)
    assert bool((loose.iterations < strict.iterations).all())  # rtol·‖z‖ ≈ 1e-3 ≫ 1e-8


def test_a_batch_is_solved_as_its_contexts_alone():
    problem, x = TanhLayer(), contexts(6)
    solver = Anderson(steps=200, atol=1e-9)
    together = solver.solve(problem, x)
    for b in range(6):
        alone = solver.solve(problem, x[b : b + 1])
        assert int(alone.iterations) == int(together.iterations[b])
        torch.testing.assert_close(alone.y[0], together.y[b], atol=1e-12, rtol=0)


def test_anderson_stalling_at_rounding_level_reports_the_budget_instead_of_crashing():
    # 1e-10 is below what float32 can resolve: the residuals stall at rounding level, where Anderson's
    # least-squares systems become exactly singular
    problem, x = TanhLayer().float(), contexts(64).float()
    result = Anderson(steps=200, atol=1e-10, memory=5).solve(problem, x)
    assert set(result.reasons()) == {"converged", "max_steps"}  # a few land exactly on a float32 fixed point
    assert bool((result.residual[result.converged] <= 1e-10).all())
    assert float(result.residual.max()) < 1e-5  # it got as far as float32 allows, and says it did not converge


def test_the_budget_running_out_is_reported_never_as_converged():
    problem, x = TanhLayer(), contexts()
    result = FixedPointIteration(steps=3, atol=1e-10).solve(problem, x)
    assert not bool(result.converged.any())
    assert result.reasons() == ["max_steps"] * 16
    assert bool((problem.residual_flat(result.y, x) > 1e-10).all())
    assert result.residuals.shape == (4, 16) and bool((result.iterations == 3).all())


class Expanding(FixedPointObjective):
    """z = −2 z + x: the fixed point x / 3 exists, but plain iteration runs away from it (|−2| > 1)."""

    dim = 4

    def step(self, z, x):
        return -2.0 * z + x


def test_divergence_is_reported_with_its_trace_and_the_best_point_returned():
    problem, x = Expanding(), torch.ones(3, 4, dtype=DT)
    result = FixedPointIteration(steps=200, atol=1e-8).solve(problem, x)
    assert not bool(result.converged.any())
    assert set(result.reasons()) == {"no_progress"}
    trace = result.residuals[:, 0]
    assert bool((trace[1:] > trace[:-1]).all()) and float(trace[-1]) > 1e5 * float(trace[0])
    torch.testing.assert_close(result.y, torch.zeros(3, 4, dtype=DT))  # the start had the lowest residual
    assert not bool(result.fell_back.any())
    assert "0/3 converged" in result.summary() and "no_progress" in result.summary()


def test_the_fallback_solves_what_the_first_solver_could_not():
    problem, x = Expanding(), torch.ones(3, 4, dtype=DT)
    damped = FixedPointIteration(steps=400, atol=1e-8, damping=0.3)  # z ← 0.1 z + 0.3 x: a contraction
    result = FixedPointIteration(steps=200, atol=1e-8, fallback=damped).solve(problem, x)
    assert bool(result.converged.all()) and bool(result.fell_back.all())
    torch.testing.assert_close(result.y, x / 3, atol=1e-8, rtol=0)
    first = FixedPointIteration(steps=200, atol=1e-8).solve(problem, x)
    assert result.residuals.shape[0] > first.residuals.shape[0]  # the trace goes on through the fallback
    assert bool((result.iterations > first.iterations).all())


def test_nan_contexts_and_initial_points_are_clear_errors():
    problem, x = TanhLayer(), contexts(4)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"contexts hold NaN or infinite numbers in rows \[2\]"):
        Anderson().solve(problem, x)
    init = torch.zeros(4, 12, dtype=DT)
    init[1] = float("inf")
    with pytest.raises(ValueError, match=r"initial points hold NaN or infinite numbers in rows \[1\]"):
        Anderson().solve(problem, contexts(4), init=init)


def test_bad_settings_and_objectives_are_clear_errors():
    with pytest.raises(ValueError, match="not both zero"):
        Anderson(atol=0.0, rtol=0.0)
    with pytest.raises(ValueError, match="damping"):
        FixedPointIteration(damping=1.5)
    with pytest.raises(ValueError, match="memory"):
        Anderson(memory=0)

    class NotAFixedPoint(Objective):
        dim = 2

        def value(self, y, x):
            return (y**2).sum(-1)

    with pytest.raises(TypeError, match="solves a FixedPointObjective"):
        Anderson().solve(NotAFixedPoint(), torch.zeros(3, 2))


def test_the_objective_is_the_squared_residual_with_the_solver_as_oracle():
    problem, x = TanhLayer(solver=Anderson(steps=300, atol=1e-11)), contexts(5)
    z = torch.randn(5, 12, dtype=DT)
    r = (problem.step(z, x) - z).norm(dim=-1)
    torch.testing.assert_close(problem(z, x), 0.5 * r**2)
    torch.testing.assert_close(problem.residual_flat(z, x), r)
    solved = problem.solve_flat(x)
    assert problem.residual_flat(solved, x).max() <= 1e-11
    assert problem.has_residual and problem.has_oracle


def test_implicit_gradients_match_gradients_unrolled_to_convergence():
    n, batch = 6, 3
    generator = torch.Generator().manual_seed(3)
    w = contraction(n, 0.8, seed=2).requires_grad_(True)
    x = torch.randn(batch, n, generator=generator, dtype=DT, requires_grad=True)
    weights = torch.randn(batch, n, generator=generator, dtype=DT)

    def g(z):
        return torch.tanh(z @ w.T + x)

    with torch.no_grad():
        z_star = FixedPointIteration(steps=1000, atol=1e-14).iterate(g, torch.zeros(batch, n, dtype=DT)).y
    tight = Anderson(steps=200, atol=1e-13)
    (implicit_fixed_point(g, z_star, tight) * weights).sum().backward()
    implicit = (w.grad.clone(), x.grad.clone())
    w.grad = x.grad = None
    z = torch.zeros(batch, n, dtype=DT)
    for _ in range(300):  # 0.8^300: converged to float64 precision
        z = g(z)
    (z * weights).sum().backward()
    torch.testing.assert_close(implicit[0], w.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(implicit[1], x.grad, atol=1e-10, rtol=1e-8)
    assert float(w.grad.abs().max()) > 1e-2  # a real gradient, not two zeros


def test_a_backward_solve_that_does_not_converge_is_reported():
    w = contraction(6, 0.99, seed=4).requires_grad_(True)
    x = torch.randn(2, 6, dtype=DT)

    def g(z):
        return z @ w.T + x

    with torch.no_grad():
        z_star = Anderson(steps=200, atol=1e-12).iterate(g, torch.zeros(2, 6, dtype=DT)).y
    seen: list[FixedPointResult] = []
    implicit_fixed_point(g, z_star, FixedPointIteration(steps=2, atol=1e-12), seen.append).sum().backward()
    assert len(seen) == 1 and not bool(seen[0].converged.any()) and seen[0].reasons() == ["max_steps"] * 2
    w.grad = None
    with pytest.warns(RuntimeWarning, match="backward solve .* did not converge"):
        implicit_fixed_point(g, z_star, FixedPointIteration(steps=2, atol=1e-12)).sum().backward()
