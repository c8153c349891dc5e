"""Tests of the batched classical solvers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective
from lightning_amor.solvers import LBFGS, STOP_REASONS, Adam, GradientDescent, MultiStart, Solver, SolverResult


def _spd_matrix(dim: int = 5) -> Tensor:
    """A fixed SPD matrix with eigenvalues evenly spread in [1, 4]."""
    generator = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(1.0, 4.0, dim, dtype=torch.float64)) @ q.T


class Quadratic(Objective):
    """f(y; x) = 1/2 (y - x)^T A (y - x), minimized at y* = x."""

    dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", _spd_matrix(self.dim))

    def value(self, y: Tensor, x: Context) -> Tensor:
        d = y - x
        return 0.5 * ((d @ self.a.to(d.dtype)) * d).sum(-1)


class ScaledQuadratic(Quadratic):
    """A dict context: f(y; x) = scale/2 (y - center)^T A (y - center), with very different scales."""

    def value(self, y: Tensor, x: Context) -> Tensor:
        return x["scale"] * super().value(y, x["center"])


class Rosenbrock(Objective):
    """2-D Rosenbrock shifted by the context: minimized at y* = x + (1, 1)."""

    dim = 2

    def value(self, y: Tensor, x: Context) -> Tensor:
        u, v = (y - x).unbind(-1)
        return (1.0 - u) ** 2 + 100.0 * (v - u**2) ** 2


class BoxQuadratic(Objective):
    """1/2 |y - x|^2 on the box [0, 1]^3; the solution is clamp(x, 0, 1)."""

    dim = 3

    def value(self, y: Tensor, x: Context) -> Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def project(self, y: Tensor) -> Tensor:
        return y.clamp(0.0, 1.0)


class DoubleWell(Objective):
    """1-D tilted double well shifted by the context: global minimum left (near x - 1), local one right."""

    dim = 1

    def value(self, y: Tensor, x: Context) -> Tensor:
        u = (y - x).squeeze(-1)
        return (u**2 - 1.0) ** 2 + 0.3 * u


def _grad_norm(objective: Objective, y: Tensor, x: Context) -> Tensor:
    y = y.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.projected(y, x).sum(), y)
    return grad.norm(dim=-1)


def _contexts(batch: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SOLVERS = {
    "gd": lambda: GradientDescent(steps=200, lr=0.25),
    "adam": lambda: Adam(steps=1500, lr=0.02),
    "lbfgs": lambda: LBFGS(steps=50, tol=1e-10),
}
"""Solver factories tuned for the quadratic."""


@pytest.mark.parametrize("name", list(SOLVERS))
def test_converges_on_quadratic(name: str) -> None:
    objective, x = Quadratic(), _contexts(6, 5)
    result = SOLVERS[name]().solve(objective, x)
    assert isinstance(result, SolverResult)
    assert result.y.shape == (6, 5) and result.value.shape == (6,)
    assert result.iterations.shape == (6,) and result.iterations.dtype == torch.int64
    assert result.converged.shape == (6,) and result.converged.dtype == torch.bool
    atol = 1e-3 if name == "adam" else 1e-6
    torch.testing.assert_close(result.y, x, atol=atol, rtol=0)
    torch.testing.assert_close(result.value, objective(result.y, x))


def test_lbfgs_quadratic_in_few_iterations() -> None:
    objective, x = Quadratic(), _contexts(8, 5)
    result = LBFGS(tol=1e-6).solve(objective, x)
    assert bool(result.converged.all())
    assert int(result.iterations.max()) <= 20
    assert bool((_grad_norm(objective, result.y, x) <= 1e-6).all())
    torch.testing.assert_close(result.y, x, atol=1e-5, rtol=0)


def test_lbfgs_rosenbrock() -> None:
    # Many starting points relative to the valley (the start is 0, the minimizer x + 1), some of them
    # through regions of negative curvature where curvature pairs are skipped.
    objective, x = Rosenbrock(), _contexts(100, 2, seed=3)
    result = LBFGS(steps=200, tol=1e-9).solve(objective, x)
    torch.testing.assert_close(result.y, x + 1.0, atol=1e-4, rtol=0)
    assert bool(result.converged.all())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_box_projection_solution_on_boundary(name: str) -> None:
    objective = BoxQuadratic()
    x = torch.tensor([[1.5, -0.5, 0.3], [0.2, 2.0, 0.7], [-1.0, -1.0, 3.0]], dtype=torch.float64)
    result = SOLVERS[name]().solve(objective, x, init=torch.full_like(x, 0.5))
    assert bool(((result.y >= 0) & (result.y <= 1)).all())
    torch.testing.assert_close(result.y, x.clamp(0, 1), atol=1e-3 if name == "adam" else 1e-6, rtol=0)


def _independence_cases() -> list[tuple[str, Solver, Objective, Context]]:
    shifts = _contexts(4, 2, seed=2)
    scaled = {"center": _contexts(4, 5, seed=3), "scale": torch.tensor([0.01, 1.0, 30.0, 300.0], dtype=torch.float64)}
    return [
        ("gd-rosenbrock", GradientDescent(steps=40, lr=1e-3, tol=1e-2), Rosenbrock(), shifts),
        ("adam-rosenbrock", Adam(steps=60, lr=1e-2, tol=1.0), Rosenbrock(), shifts),
        ("lbfgs-rosenbrock", LBFGS(steps=60, tol=1e-8), Rosenbrock(), shifts),
        ("lbfgs-scaled", LBFGS(steps=60, tol=1e-8), ScaledQuadratic(), scaled),
        ("adam-scaled", Adam(steps=60, lr=0.05), ScaledQuadratic(), scaled),
    ]


@pytest.mark.parametrize("case", _independence_cases(), ids=lambda case: case[0])
def test_per_sample_independence(case: tuple[str, Solver, Objective, Context]) -> None:
    name, solver, objective, x = case
    batch = 4
    init = 0.5 * _contexts(batch, objective.dim, seed=7)
    together = solver.solve(objective, x, init=init)
    for b in range(batch):
        x_b = x[b : b + 1] if isinstance(x, Tensor) else {k: v[b : b + 1] for k, v in x.items()}
        alone = solver.solve(objective, x_b, init=init[b : b + 1])
        torch.testing.assert_close(together.y[b : b + 1], alone.y, atol=1e-6, rtol=0)
        torch.testing.assert_close(together.value[b : b + 1], alone.value, atol=1e-6, rtol=1e-6)
        assert int(together.iterations[b]) == int(alone.iterations[0])
        assert bool(together.converged[b]) == bool(alone.converged[0])
    if name == "lbfgs-scaled":
        # very different scales still all converge: nothing is shared between samples
        assert bool(together.converged.all())


def test_multistart_batch_matches_its_own_starts() -> None:
    """Each context's MultiStart result equals the inner solver run from that context's starts alone."""
    objective, x, starts = Rosenbrock(), _contexts(3, 2, seed=2), 4
    inner = LBFGS(steps=30)
    multi = MultiStart(inner, starts=starts, seed=11)
    result = multi.solve(objective, x)
    points = multi.starting_points(objective, x, like=x)
    for b in range(3):
        runs = [inner.solve(objective, x[b : b + 1], init=points[b, r : r + 1]) for r in range(starts)]
        best = min(runs, key=lambda run: float(run.value))
        torch.testing.assert_close(result.y[b : b + 1], best.y, atol=1e-6, rtol=0)


def test_adam_matches_torch_optim() -> None:
    objective, x = Rosenbrock(), _contexts(3, 2, seed=4)
    init = _contexts(3, 2, seed=5)
    lr, betas, eps, steps = 1e-2, (0.8, 0.99), 1e-6, 40
    trajectory: list[Tensor] = []
    Adam(steps=steps, lr=lr, betas=betas, eps=eps).solve(
        objective, x, init=init, callback=lambda k, y: trajectory.append(y)
    )
    assert len(trajectory) == steps + 1

    param = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    torch.testing.assert_close(trajectory[0], param.detach(), atol=0, rtol=0)
    for k in range(steps):
        optimizer.zero_grad()
        objective.projected(param, x).sum().backward()
        optimizer.step()
        torch.testing.assert_close(trajectory[k + 1], param.detach(), atol=1e-12, rtol=1e-12)


def test_adam_linear_decay_matches_torch_optim_with_a_linear_schedule() -> None:
    objective, x = Rosenbrock(), _contexts(3, 2, seed=4)
    init = _contexts(3, 2, seed=5)
    lr, steps = 1e-2, 30
    trajectory: list[Tensor] = []
    Adam(steps=steps, lr=lr, decay="linear").solve(objective, x, init=init, callback=lambda k, y: trajectory.append(y))
    param = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 - k / steps)
    for k in range(steps):
        optimizer.zero_grad()
        objective.projected(param, x).sum().backward()
        optimizer.step()
        schedule.step()
        torch.testing.assert_close(trajectory[k + 1], param.detach(), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="decay must be 'constant' or 'linear'"):
        Adam(decay="cosine")


@pytest.mark.parametrize(
    "solver",
    [GradientDescent(steps=500, lr=0.25, tol=1e-4), Adam(steps=3000, lr=0.05, tol=1e-3), LBFGS(steps=100, tol=1e-6)],
    ids=["gd", "adam", "lbfgs"],
)
def test_tol_stops_early_with_per_sample_iterations(solver: Solver) -> None:
    objective = Quadratic()
    x = _contexts(3, 5, seed=6)
    init = x.clone()
    init[1] += 0.1  # close to its minimizer
    init[2] += 10.0  # far from it
    calls: list[int] = []
    result = solver.solve(objective, x, init=init, callback=lambda k, y: calls.append(k))
    assert bool(result.converged.all())
    assert bool((_grad_norm(objective, result.y, x) <= solver.tol).all())
    assert int(result.iterations[0]) == 0  # started at the minimizer
    assert 0 < int(result.iterations[1]) <= int(result.iterations[2]) < solver.steps
    assert calls == list(range(int(result.iterations.max()) + 1))  # the loop ended once all converged


def test_converged_flags() -> None:
    objective, x = Quadratic(), _contexts(2, 5, seed=8)
    init = x.clone()
    init[1] += 5.0
    short = GradientDescent(steps=3, lr=0.25, tol=1e-6).solve(objective, x, init=init)
    assert short.converged.tolist() == [True, False]
    assert short.iterations.tolist() == [0, 3]
    no_tol = GradientDescent(steps=3, lr=0.25).solve(objective, x, init=init)
    assert not bool(no_tol.converged.any())
    assert no_tol.iterations.tolist() == [3, 3]
    assert not bool(LBFGS(steps=50, tol=None).solve(objective, x).converged.any())


ALL_SOLVERS = [
    GradientDescent(steps=20, lr=0.1, tol=1e-8),
    Adam(steps=20, tol=1e-8),
    LBFGS(steps=20),
    MultiStart(LBFGS(steps=20), starts=2),
]
ALL_IDS = ["gd", "adam", "lbfgs", "multistart"]


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=ALL_IDS)
def test_works_without_autograd(solver: Solver, mode: str) -> None:
    objective, x = Quadratic(), _contexts(4, 5, seed=9)
    expected = solver.solve(objective, x)
    expected_from_init = solver.solve(objective, x, init=objective.initial_point(x))  # MultiStart adds it as a start
    guard = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with guard:
        x_inner = x.clone()  # an inference tensor under inference_mode
        init = objective.initial_point(x_inner)
        result = solver.solve(objective, x_inner, init=init)
        y = solver(objective, x_inner)
    torch.testing.assert_close(result.y, expected_from_init.y, atol=1e-12, rtol=0)
    torch.testing.assert_close(y, expected.y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=ALL_IDS)
def test_dtype_follows_inputs(solver: Solver, dtype: torch.dtype) -> None:
    objective, x = Quadratic(), _contexts(3, 5, seed=10, dtype=dtype)
    result = solver.solve(objective, x)
    assert result.y.dtype == dtype and result.value.dtype == dtype
    init = torch.zeros(3, 5, dtype=dtype)
    assert solver(objective, x.double(), init=init).dtype == dtype  # the initial point sets the dtype


class LearnableQuadratic(Quadratic):
    """The quadratic scaled by a learnable weight, which solvers must leave without gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def value(self, y: Tensor, x: Context) -> Tensor:
        return self.weight * super().value(y, x)


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=ALL_IDS)
def test_no_graph_into_the_caller(solver: Solver) -> None:
    objective = LearnableQuadratic()
    x = _contexts(3, 5, seed=12).requires_grad_(True)
    init = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    calls: list[Tensor] = []
    result = solver.solve(objective, x, init=init, callback=lambda k, y: calls.append(y))
    for tensor in (result.y, result.value):
        assert tensor.grad_fn is None and not tensor.requires_grad
    assert calls and all(y.grad_fn is None and y.shape == (3, 5) for y in calls)
    assert x.grad is None and init.grad is None and objective.weight.grad is None


def test_multistart_finds_global_minimum() -> None:
    objective = DoubleWell()
    x = torch.tensor([[-0.2], [0.0], [0.3]], dtype=torch.float64)
    wrong_side = x + 1.0  # in the basin of the local minimum
    single = LBFGS(steps=100).solve(objective, x, init=wrong_side)
    multi_solver = MultiStart(LBFGS(steps=100), starts=8, seed=0)
    multi = multi_solver.solve(objective, x, init=wrong_side)

    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)[:, None]
    for b in range(3):
        values = objective(grid + x[b], x[b].expand(grid.shape[0], 1))
        global_y = grid[values.argmin()] + x[b]
        torch.testing.assert_close(multi.y[b], global_y, atol=1e-3, rtol=0)
        assert float(single.y[b] - x[b]) > 0.5  # the single start stays in the wrong well
        assert float(multi.value[b]) < float(single.value[b]) - 0.1
    again = multi_solver.solve(objective, x, init=wrong_side)
    assert torch.equal(again.y, multi.y)  # deterministic for a fixed seed
    assert MultiStart(LBFGS(steps=100), starts=8, seed=0)(objective, x).shape == (3, 1)


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=ALL_IDS)
def test_wrong_init_shape(solver: Solver) -> None:
    objective, x = Quadratic(), _contexts(4, 5)
    name = type(solver).__name__
    with pytest.raises(ValueError, match=rf"{name}.*\(4, 5\).*\(4, 6\)"):
        solver.solve(objective, x, init=torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"{name}.*\(4, 5\).*\(3, 5\)"):
        solver(objective, x, init=torch.zeros(3, 5, dtype=torch.float64))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="LBFGS"):
        LBFGS(history=0)
    with pytest.raises(ValueError, match="Adam"):
        Adam(betas=(0.9,))
    with pytest.raises(ValueError, match="GradientDescent"):
        GradientDescent(lr=-1.0)
    with pytest.raises(ValueError, match="MultiStart"):
        MultiStart(LBFGS(), starts=0)
    assert "LBFGS(steps=100" in repr(LBFGS())


# --- honest answers: batch independence of MultiStart, convergence only at finite values, no drift on plateaus ---


def test_multistart_answer_does_not_depend_on_the_batch() -> None:
    """A context gets the same starts, so the same answer, alone, in a batch, and at another position in it."""
    objective = DoubleWell()
    x = torch.linspace(-2.0, 2.0, 24, dtype=torch.float64)[:, None]
    solver = MultiStart(LBFGS(steps=60, tol=1e-10), starts=3, seed=5)
    together = solver.solve(objective, x)
    reversed_batch = solver.solve(objective, x.flip(0))
    assert torch.equal(reversed_batch.y.flip(0), together.y)
    for b in range(0, 24, 5):
        alone = solver.solve(objective, x[b : b + 1])
        assert torch.equal(alone.y, together.y[b : b + 1]), b
    chunks = torch.cat([solver.solve(objective, x[i : i + 7]).y for i in range(0, 24, 7)])
    assert torch.equal(chunks, together.y)  # the chunk size of a reference solve changes nothing


class LogBarrier(Objective):
    """f(y; x) = ‖y − x‖² − log(y₁): +inf or NaN for y₁ ≤ 0."""

    dim = 2

    def value(self, y: Tensor, x: Context) -> Tensor:
        return ((y - x) ** 2).sum(-1) - torch.log(y[:, 0])


@pytest.mark.parametrize("solver", [GradientDescent(steps=30, lr=0.1, tol=1e-3), Adam(steps=30, lr=0.1, tol=1e-3),
                                    LBFGS(steps=30, tol=1e-3)], ids=["gd", "adam", "lbfgs"])
def test_no_convergence_claimed_at_a_non_finite_value(solver: Solver) -> None:
    objective = LogBarrier()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    init = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # the second starts outside the domain
    result = solver.solve(objective, x, init=init)
    assert not bool(result.converged[1])
    assert result.reasons()[1] == "not_finite"
    assert result.reasons()[0] in ("converged", "max_steps") and bool(torch.isfinite(result.value[0]))


class Plateau(Objective):
    """f(y) = 1 + 1e-9 ‖y‖²: in float32 every nearby value rounds to 1, though the gradient is not zero."""

    dim = 3

    def value(self, y: Tensor, x: Context) -> Tensor:
        return 1.0 + 1e-9 * (y**2).sum(-1) + 0.0 * x.sum(-1)


def test_lbfgs_stops_where_float32_makes_no_progress() -> None:
    x = torch.zeros(4, 3)
    init = torch.full((4, 3), 0.5)
    result = LBFGS(steps=500, tol=1e-12).solve(Plateau(), x, init=init)
    assert int(result.iterations.max()) < 10  # not drifting until `steps`
    assert result.reasons() == ["no_progress"] * 4
    assert not bool(result.converged.any())


def test_stop_reasons_of_a_normal_run() -> None:
    objective, x = Quadratic(), _contexts(3, 5)
    assert LBFGS(steps=100, tol=1e-8).solve(objective, x).reasons() == ["converged"] * 3
    assert GradientDescent(steps=2, lr=0.01, tol=1e-8).solve(objective, x).reasons() == ["max_steps"] * 3


class Underflow(Objective):
    """f(y) = c · Σ y with c = e^-104 · 1e38 ≈ 6.8e-8, computed in that order: in float32 e^-104 rounds to 0, so f
    and its gradient are exactly 0, while the float64 gradient is c per coordinate, above a tolerance of 1e-8."""

    dim = 2

    def value(self, y: Tensor, x: Context) -> Tensor:
        tiny = torch.exp(torch.tensor(-104.0, dtype=torch.float64)).to(y.dtype)
        return (y * tiny * 1e38).sum(-1) + 0.0 * x.sum(-1)


@pytest.mark.parametrize("solver", [GradientDescent(steps=5, tol=1e-8), Adam(steps=5, tol=1e-8),
                                    LBFGS(steps=5, tol=1e-8)], ids=["gd", "adam", "lbfgs"])
def test_a_gradient_that_underflows_in_float32_certifies_nothing(solver: Solver) -> None:
    x = torch.zeros(3, 2)
    result = solver.solve(Underflow(), x, init=torch.ones(3, 2))
    assert not bool(result.converged.any())
    assert result.reasons() == ["underflow"] * 3
    exact = solver.solve(Quadratic(), _contexts(2, 5))  # an exactly zero float64 gradient is still converged
    assert not bool((exact.stopped == STOP_REASONS.index("underflow")).any())
