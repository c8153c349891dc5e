"""The contract every Objective of the project must meet, run over the registry in ``tests/objectives.py``.

As BoTorch's test-problem mixins: one class, parametrized by every registered Objective, checks output
shapes and dtypes, the domain projection, finite gradients, the oracle's solutions and the shape errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective, ObjectiveShapeError, context_batch_size, context_repeat
from tests.objectives import OBJECTIVES, ObjectiveCase, contexts


def raw_points(objective: Objective, num: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """``num x n`` unconstrained points (wide normals), not on the domain in general."""
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(num, objective.dim, generator=generator, dtype=dtype)


def gradient_mapping(objective: Objective, y: Tensor, x: Context, step: float = 1e-4) -> Tensor:
    """``‖y − π(y − η ∇(f∘π)(y))‖ / η`` per sample (``B``): the stationarity measure of a projected problem.

    It is ‖∇f‖ on R^n, the norm of the Riemannian gradient on the sphere (∇(f∘π) is tangent there), and
    zero at a constrained minimizer of a box whose gradient points out of the box.
    """
    y = y.detach().requires_grad_()
    (grad,) = torch.autograd.grad(objective.projected(y, x).sum(), y)
    return (y - objective.project(y - step * grad)).norm(dim=-1) / step


def with_oracle(objective_case: ObjectiveCase) -> Objective:
    """A fresh float64 instance of a case that has an oracle."""
    return objective_case.make().double()


WITH_ORACLE = [case for case in OBJECTIVES if case.make().has_oracle]


class ColumnValue(Objective):
    """Wraps an objective but returns ``B x 1`` values (a common mistake: ``keepdim=True``)."""

    def __init__(self, inner: Objective) -> None:
        super().__init__()
        self.inner = inner
        self.dim = inner.dim

    def value(self, y: Tensor, x: Context) -> Tensor:
        return self.inner.value(y, x).unsqueeze(-1)


class ScalarValue(ColumnValue):
    """Wraps an objective but returns the batch sum, a scalar (a common mistake: reducing over the batch)."""

    def value(self, y: Tensor, x: Context) -> Tensor:
        return self.inner.value(y, x).sum()


@pytest.mark.parametrize("objective_case", OBJECTIVES, ids=lambda c: c.name)
class TestObjectiveContract:
    @pytest.mark.parametrize("batch", [1, 7, 32])
    def test_value_has_one_entry_per_context(self, objective_case: ObjectiveCase, batch: int) -> None:
        objective = objective_case.make()
        x = contexts(objective_case, batch)
        y = raw_points(objective, batch)
        value = objective(objective.project(y), x)
        assert value.shape == (batch,)
        assert bool(torch.isfinite(value).all())
        assert objective.projected(y, x).shape == (batch,)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
    def test_dtype_follows_the_input(self, objective_case: ObjectiveCase, dtype: torch.dtype) -> None:
        objective = objective_case.make().to(dtype)
        x = contexts(objective_case, 5, dtype=dtype)
        y = objective.project(raw_points(objective, 5, dtype))
        assert y.dtype == dtype
        assert objective(y, x).dtype == dtype
        assert objective.initial_point(x).dtype == dtype
        assert objective.random_points(3, like=y).dtype == dtype

    def test_projection_maps_onto_the_domain_and_is_idempotent(self, objective_case: ObjectiveCase) -> None:
        objective = objective_case.make().double()
        raw = raw_points(objective, 64, torch.float64)
        raw[0] = 0.0  # the origin: initial_point projects it, so it must land on the domain too
        raw[1] *= 1e6
        projected = objective.project(raw)
        assert projected.shape == raw.shape
        assert bool(objective_case.in_domain(projected).all()), projected[~objective_case.in_domain(projected)]
        torch.testing.assert_close(objective.project(projected), projected, rtol=0, atol=1e-12)

    def test_initial_and_random_points_lie_on_the_domain(self, objective_case: ObjectiveCase) -> None:
        objective = objective_case.make().double()
        x = contexts(objective_case, 6, dtype=torch.float64)
        start = objective.initial_point(x)
        assert start.shape == (6, objective.dim)
        assert bool(objective_case.in_domain(start).all()), start
        points = objective.random_points(50, like=start, generator=torch.Generator().manual_seed(0))
        assert points.shape == (50, objective.dim)
        assert bool(objective_case.in_domain(points).all())

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
    def test_gradients_are_finite(self, objective_case: ObjectiveCase, dtype: torch.dtype) -> None:
        objective = objective_case.make().to(dtype)
        x = contexts(objective_case, 16, dtype=dtype)
        raw = raw_points(objective, 16, dtype)
        raw[0] = 0.0
        y = raw.clone().requires_grad_()
        (grad_projected,) = torch.autograd.grad(objective.projected(y, x).sum(), y)
        on_domain = objective.project(raw).detach().requires_grad_()
        (grad,) = torch.autograd.grad(objective(on_domain, x).sum(), on_domain)
        assert bool(torch.isfinite(grad_projected).all()), grad_projected
        assert bool(torch.isfinite(grad).all()), grad

    def test_wrong_solution_dimension_is_rejected(self, objective_case: ObjectiveCase) -> None:
        objective = objective_case.make()
        x = contexts(objective_case, 5)
        y = torch.randn(5, objective.dim + 1)
        with pytest.raises(ObjectiveShapeError) as error:
            objective(y, x)
        message = str(error.value)
        assert type(objective).__name__ in message
        assert f"(B, {objective.dim})" in message
        assert str((5, objective.dim + 1)) in message

    def test_batch_size_mismatch_is_rejected(self, objective_case: ObjectiveCase) -> None:
        objective = objective_case.make()
        x = contexts(objective_case, 5)
        y = objective.project(raw_points(objective, 4))
        with pytest.raises(ObjectiveShapeError) as error:
            objective(y, x)
        message = str(error.value)
        assert type(objective).__name__ in message
        assert "5" in message and "4" in message

    @pytest.mark.parametrize("wrapper", [ColumnValue, ScalarValue], ids=lambda w: w.__name__)
    def test_value_of_wrong_shape_is_rejected(self, objective_case: ObjectiveCase, wrapper: type) -> None:
        objective = wrapper(objective_case.make())
        x = contexts(objective_case, 5)
        y = objective.inner.project(raw_points(objective, 5))
        expected_value = objective.inner(y, x)
        with pytest.raises(ObjectiveShapeError) as error:
            objective(y, x)
        message = str(error.value)
        assert wrapper.__name__ in message
        assert "(5,)" in message
        assert str(tuple(objective.value(y, x).shape)) in message
        assert expected_value.shape == (context_batch_size(x),)  # the wrapped objective itself is fine


def test_inconsistent_dict_context_is_rejected() -> None:
    """A dict context whose tensors disagree on the batch size names every size."""
    objective_case = next(c for c in OBJECTIVES if isinstance(contexts(c, 1), dict))
    objective = objective_case.make()
    x = contexts(objective_case, 5)
    key = next(iter(x))
    x[key] = x[key][:3]
    with pytest.raises(ObjectiveShapeError, match="same batch size"):
        objective(objective.project(raw_points(objective, 5)), x)


def test_registry_names_are_unique() -> None:
    names = [c.name for c in OBJECTIVES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("objective_case", WITH_ORACLE, ids=lambda c: c.name)
class TestOracleContract:
    """Every objective with an oracle: its solutions lie on the domain, are stationary and beat random points."""

    def test_oracle_returns_solutions_on_the_domain(self, objective_case: ObjectiveCase) -> None:
        objective = with_oracle(objective_case)
        x = contexts(objective_case, 6, seed=1, dtype=torch.float64)
        y_star = objective.solve(x)
        assert y_star.shape == (6, objective.dim)
        assert y_star.dtype == torch.float64
        assert bool(objective_case.in_domain(y_star).all()), y_star

    def test_oracle_solutions_are_stationary(self, objective_case: ObjectiveCase) -> None:
        objective = with_oracle(objective_case)
        x = contexts(objective_case, 6, seed=2, dtype=torch.float64)
        y_star = objective.solve(x)
        # an objective with a nonsmooth part (‖∇f‖ ≠ 0 at a lasso minimizer) or a certificate of its own is stationary
        # by that certificate (the prox-gradient residual, a KKT or fixed-point residual)
        composite = type(objective).prox_flat is not Objective.prox_flat
        residual = (objective.residual_flat(y_star, x) if composite or objective.has_residual
                    else gradient_mapping(objective, y_star, x))
        assert bool((residual <= objective_case.stationarity_tol).all()), residual

    def test_oracle_beats_random_points(self, objective_case: ObjectiveCase) -> None:
        objective = with_oracle(objective_case)
        batch, per_context = 6, 2000
        x = contexts(objective_case, batch, seed=3, dtype=torch.float64)
        best = objective(objective.solve(x), x)
        like = objective.initial_point(x)
        points = objective.random_points(batch * per_context, like=like, generator=torch.Generator().manual_seed(3))
        random_values = objective(points, context_repeat(x, per_context)).view(batch, per_context)
        assert bool((best <= random_values.min(dim=1).values + 1e-10).all()), (best, random_values.min(dim=1).values)
