"""The parametric QP application: KKT certificate against OSQP's own, warm starts reaching OSQP, the projection,
and clear errors on bad QP data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.convex_qp import PortfolioReturns
from lightning_amor.apps.convex_qp import (
    OSQPWarmStart,
    ParametricQP,
    PortfolioMLP,
    PortfolioQP,
    capped_simplex_projection,
)
from lightning_amor.apps.osqp_solver import OSQPSession, QPDataError, QPInfeasibleError
from lightning_amor.objective import ObjectiveShapeError

ASSETS, FACTORS = 20, 3


@pytest.fixture(scope="module")
def problem() -> tuple[PortfolioQP, torch.Tensor, torch.Tensor]:
    """A small portfolio family, 16 contexts and their float64 reference solutions (primal, dual)."""
    objective = PortfolioQP(assets=ASSETS, factors=FACTORS)
    x = PortfolioReturns(assets=ASSETS, factors=FACTORS).sample(16, torch.Generator().manual_seed(0)).double()
    return objective, x, objective.solve(x)


def flat(batch) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([batch.x, batch.y], axis=1))


def test_reference_solutions_are_kkt_points(problem):
    objective, x, y_star = problem
    n = ASSETS + FACTORS
    assert y_star.shape == (16, n + 1 + n)
    assert objective.residual_flat(y_star, x).max() < 1e-9
    assert bool(objective.feasible(y_star).all())
    # a perturbed dual breaks the certificate even though the primal is optimal
    wrong = y_star.clone()
    wrong[:, objective.n] += 0.01  # the budget's multiplier
    assert bool((objective.residual_flat(wrong, x) > 1e-3).all())


def test_kkt_residuals_match_osqps_own(problem):
    objective, x, _ = problem
    batch = OSQPWarmStart(eps=1e-3).run(objective, x)  # a loose tolerance: residuals well above rounding
    parts = objective.kkt_residuals(objective.view(flat(batch)), x)
    np.testing.assert_allclose(parts["dual"].numpy(), batch.dual_res, rtol=1e-9, atol=1e-15)
    # OSQP's primal residual ‖Az − z̃‖∞ measures the distance to its own split variable z̃ ∈ [l, u]; ours to the
    # nearest point of [l, u], so it is never larger, and equal on most instances
    assert bool((parts["primal"].numpy() <= batch.prim_res * (1 + 1e-12)).all())
    assert np.isclose(parts["primal"].numpy(), batch.prim_res, rtol=1e-9).mean() >= 0.5
    # the complementarity residual is of the same order as OSQP's primal residual at its stopping point
    assert bool((parts["complementarity"].numpy() <= 2 * batch.prim_res).all())
    assert batch.prim_res.max() > 1e-6, "the check needs residuals above rounding"


def test_the_warm_start_reaches_osqp(problem):
    objective, x, y_star = problem
    solver = OSQPWarmStart(eps=1e-5)
    cold = solver.solve(objective, x)
    warm = solver.solve(objective, x, init=y_star)
    primal_only = y_star.clone()
    primal_only[:, objective.n :] = 0.0
    half = solver.solve(objective, x, init=primal_only)
    assert bool(cold.converged.all()) and bool(warm.converged.all())
    assert int(warm.iterations.max()) <= 2 < int(cold.iterations.min())
    assert not torch.equal(half.iterations, warm.iterations)
    assert objective.residual_flat(warm.y, x).max() < 1e-4


def test_the_callback_replays_osqps_iterates_exactly(problem):
    objective, x, _ = problem
    solver = OSQPWarmStart(eps=1e-3)
    seen: list[torch.Tensor] = []
    result = solver.solve(objective, x[:2], callback=lambda k, y: seen.append(y))
    assert len(seen) == int(result.iterations.max()) + 1
    torch.testing.assert_close(seen[-1], result.y, rtol=0, atol=1e-12)
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))


def test_projection_makes_predictions_feasible_and_is_differentiable():
    raw = 3.0 * torch.randn(64, ASSETS, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    raw[0] = 0.0
    raw[1] *= 1e6
    w = capped_simplex_projection(raw, 0.2)
    assert torch.allclose(w.sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-9)
    assert float(w.min()) >= 0.0 and float(w.max()) <= 0.2
    torch.testing.assert_close(w[0], torch.full((ASSETS,), 1.0 / ASSETS, dtype=torch.float64))
    torch.testing.assert_close(capped_simplex_projection(w, 0.2), w, rtol=0, atol=1e-12)
    # it is the Euclidean projection: no feasible point of a random sample is closer
    candidates = capped_simplex_projection(torch.randn(4000, ASSETS, dtype=torch.float64), 0.2)
    assert float((w[2] - raw[2]).norm()) <= float((candidates - raw[2]).norm(dim=-1).min())
    v = (0.05 + 0.1 * torch.randn(2, ASSETS, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    inside = capped_simplex_projection(v, 0.2)
    assert int(((inside > 0) & (inside < 0.2)).sum()) >= 4  # coordinates inside (0, cap): a non-trivial Jacobian
    torch.autograd.gradcheck(lambda t: capped_simplex_projection(t, 0.2), (v.requires_grad_(),))


def test_objective_projection_keeps_duals_and_handles_both_layouts(problem):
    objective, x, y_star = problem
    raw = torch.randn(4, objective.dim, dtype=torch.float64)
    projected = objective.project_flat(raw)
    assert bool(objective.feasible(projected).all())
    torch.testing.assert_close(projected[:, objective.n :], raw[:, objective.n :])
    torch.testing.assert_close(objective.project(raw), projected)
    assert float(objective.violation_flat(raw, x[:4]).min()) > 0.0
    assert float(objective.violation_flat(projected, x[:4]).max()) < 1e-12


def test_nan_parameters_are_one_clear_error(problem):
    objective, x, _ = problem
    bad = x[:3].clone()
    bad[2, 4] = float("nan")
    with pytest.raises(QPDataError, match=r"context 2 make q NaN"):
        objective.solve(bad)
    with pytest.raises(QPDataError, match=r"context 2 make q NaN"):
        OSQPWarmStart().solve(objective, bad)


class CrossedBounds(ParametricQP):
    """A box whose context sets the lower bound: l > u where the context exceeds 1."""

    def __init__(self) -> None:
        super().__init__(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))

    def linear(self, x):
        return torch.zeros_like(x)

    def bounds(self, x):
        return x, torch.ones_like(x)


class Contradiction(CrossedBounds):
    """z₁ ≤ 0 and z₁ ≥ 1 in two different rows: every row has l ≤ u, yet nothing is feasible."""

    def __init__(self) -> None:
        ParametricQP.__init__(self, torch.eye(1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))

    def linear(self, x):
        return torch.zeros(x.shape[0], 1, dtype=x.dtype)

    def bounds(self, x):
        lower = torch.stack([torch.full_like(x[:, 0], -1e30), x[:, 0]], dim=-1)
        upper = torch.stack([torch.zeros_like(x[:, 0]), torch.full_like(x[:, 0], 1e30)], dim=-1)
        return lower, upper


def test_infeasible_parameters_are_named():
    with pytest.raises(QPDataError, match=r"context 1 are infeasible: lower bound l > upper bound u in constraint "
                                          r"rows \[0\]"):
        CrossedBounds().solve(torch.tensor([[0.5, 0.5], [2.0, 0.0]], dtype=torch.float64))
    with pytest.raises(QPInfeasibleError, match=r"context 1 primal infeasible"):
        Contradiction().solve(torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_non_convex_and_infeasible_families_are_refused():
    with pytest.raises(QPDataError, match=r"not positive semidefinite \(smallest eigenvalue -1"):
        OSQPSession(np.diag([1.0, -1.0]), np.eye(2))
    with pytest.raises(QPDataError, match="must be symmetric"):
        OSQPSession(np.array([[1.0, 1.0], [0.0, 1.0]]), np.eye(2))
    with pytest.raises(ValueError, match=r"max_weight=0.01 with 20 assets is infeasible"):
        PortfolioQP(assets=20, max_weight=0.01)
    with pytest.raises(QPDataError, match=r"contexts are expected returns of shape \(B, 20\)"):
        PortfolioQP(assets=20, factors=3).solve(torch.zeros(2, 19))


def test_the_solver_reports_the_iteration_budget(problem):
    objective, x, _ = problem
    result = OSQPWarmStart(eps=1e-8, steps=5).solve(objective, x[:3])
    assert result.iterations.tolist() == [5, 5, 5]
    assert not bool(result.converged.any())
    assert result.reasons() == ["max_steps"] * 3


def test_contexts_follow_the_family():
    data = PortfolioReturns(assets=ASSETS, factors=FACTORS, view_scale=0.0, noise=0.0)
    x = data.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, ASSETS) and torch.equal(x[0], x[1])
    moving = PortfolioReturns(assets=ASSETS, factors=FACTORS).sample(2000, torch.Generator().manual_seed(0))
    spectrum = torch.linalg.svdvals(moving - moving.mean(0))
    assert float(spectrum[FACTORS] / spectrum[0]) < 0.3  # most of the variation lies along the k factor views


def test_a_solution_of_the_wrong_width_is_a_shape_error(problem):
    _, x, _ = problem
    objective = PortfolioQP(assets=ASSETS, factors=FACTORS)  # shapes are checked on an instance's first call
    with pytest.raises(ObjectiveShapeError, match=rf"PortfolioQP expects solutions y of shape \(B, {objective.dim}\)"):
        objective(torch.zeros(16, objective.dim + 1, dtype=torch.float64), x)


def test_the_untrained_network_predicts_the_mean_solution():
    net = PortfolioMLP(assets=ASSETS, factors=FACTORS, hidden=[8], calibration_samples=16)
    torch.nn.init.zeros_(net.mlp.layers[-1].weight)
    torch.nn.init.zeros_(net.mlp.layers[-1].bias)
    objective = PortfolioQP(assets=ASSETS, factors=FACTORS)
    forecasts = PortfolioReturns(assets=ASSETS, factors=FACTORS).sample(16, torch.Generator().manual_seed(12345))
    mean_solution = objective.solve(forecasts.double()).mean(0).float()
    torch.testing.assert_close(net(torch.randn(3, ASSETS)), mean_solution.expand(3, -1))
    assert float(net.scale.min()) >= 1e-3 and float(net.scale.max()) > 1e-2


def test_a_second_network_reuses_the_calibration_without_sharing_buffers(monkeypatch):
    first = PortfolioMLP(assets=ASSETS, factors=FACTORS, hidden=[8], calibration_samples=12)

    def no_solve(self, x, init=None):
        raise AssertionError("the calibration of an identical network was solved again")

    monkeypatch.setattr(PortfolioQP, "solve", no_solve)
    second = PortfolioMLP(assets=ASSETS, factors=FACTORS, hidden=[8], calibration_samples=12)
    torch.testing.assert_close(second.centre, first.centre)
    torch.testing.assert_close(second.scale, first.scale)
    second.centre.add_(1.0)  # training or loading a checkpoint into one network leaves the other as it was
    assert not torch.equal(second.centre, first.centre)
    with pytest.raises(AssertionError, match="solved again"):  # other arguments: a new calibration
        PortfolioMLP(assets=ASSETS, factors=FACTORS, hidden=[8], calibration_samples=13)
