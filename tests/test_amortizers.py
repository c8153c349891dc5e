"""FullyAmortized and SemiAmortized: domains, iterates and argument checks."""

from __future__ import annotations

import pytest
import torch

from lightning_amor.amortizers import FullyAmortized, SemiAmortized
from lightning_amor.nets import MLP, LearnedConstant
from lightning_amor.updates import GradientStep
from tests.objectives import OBJECTIVES, ObjectiveCase, Quadratic, case, contexts


def off_domain_constant(dim: int) -> LearnedConstant:
    """A learned constant with entries in [-2, 3]: off the sphere and outside the unit box."""
    net = LearnedConstant(dim)
    with torch.no_grad():
        net.value.copy_(torch.linspace(-2.0, 3.0, dim))
    return net


@pytest.mark.parametrize("objective_case", OBJECTIVES, ids=lambda c: c.name)
def test_fully_amortized_projects_onto_the_domain(objective_case: ObjectiveCase) -> None:
    objective = objective_case.make()
    x = contexts(objective_case, 6)
    net = off_domain_constant(objective.dim)
    out = FullyAmortized(net)(x, objective)
    assert out.y.shape == (6, objective.dim)
    assert bool(objective_case.in_domain(out.y).all())
    torch.testing.assert_close(out.y, objective.project(net(x)), rtol=0, atol=0)
    assert len(out.iterates) == 1 and out.iterates[0] is out.y


def test_fully_amortized_trains_its_network() -> None:
    objective = Quadratic()
    x = contexts(case("quadratic"), 5)
    model = FullyAmortized(MLP(4, 4, hidden=(8,)))
    objective(model(x, objective).y, x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("mode", ["unroll", "first_order", "truncated", "implicit"])
@pytest.mark.parametrize("objective_case", OBJECTIVES, ids=lambda c: c.name)
def test_semi_amortized_iterates_lie_on_the_domain(objective_case: ObjectiveCase, mode: str) -> None:
    """steps + 1 iterates, each projected; implicit mode returns only [ŷ⁰, ŷ^K], the only ones with gradients."""
    objective = objective_case.make()
    x = contexts(objective_case, 6)
    steps = 3
    model = SemiAmortized(
        off_domain_constant(objective.dim),
        steps=steps,
        update=GradientStep(0.05),
        gradient=mode,
        truncate=2,
        shrinkage=0.5,
    )
    out = model(x, objective)
    assert len(out.iterates) == (2 if mode == "implicit" else steps + 1)
    assert out.iterates[-1] is out.y
    torch.testing.assert_close(out.iterates[0], objective.project(model.init(x)), rtol=0, atol=0)
    for y in out.iterates:
        assert y.shape == (6, objective.dim)
        assert bool(objective_case.in_domain(y).all())


@pytest.mark.parametrize("mode", ["unroll", "first_order", "truncated"])
def test_semi_amortized_steps_descend(mode: str) -> None:
    """Gradient steps with a small step size decrease a strongly convex objective at every iterate."""
    objective = Quadratic()
    x = contexts(case("quadratic"), 6)
    model = SemiAmortized(off_domain_constant(4), steps=5, update=GradientStep(0.1), gradient=mode, truncate=2)
    values = torch.stack([objective(y, x) for y in model(x, objective).iterates])
    assert bool((values[1:] < values[:-1]).all()), values


def test_zero_steps_return_the_initial_iterate() -> None:
    objective = case("sphere").make()
    x = contexts(case("sphere"), 4)
    out = SemiAmortized(off_domain_constant(3), steps=0)(x, objective)
    assert len(out.iterates) == 1 and out.y is out.iterates[0]
    torch.testing.assert_close(out.y.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize(
    ("mode", "update_gets_gradient"),
    [("unroll", True), ("first_order", True), ("truncated", True), ("implicit", False)],
)
def test_which_modes_train_the_update_rule(mode: str, update_gets_gradient: bool) -> None:
    objective = Quadratic()
    x = contexts(case("quadratic"), 5)
    model = SemiAmortized(off_domain_constant(4), steps=3, update=GradientStep(0.1), gradient=mode, shrinkage=0.5)
    objective(model(x, objective).y, x).sum().backward()
    assert model.init.value.grad is not None and model.init.value.grad.abs().sum() > 0
    assert (model.update.raw_lr.grad is not None) == update_gets_gradient


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gradient": "second_order"}, "gradient must be one of"),
        ({"gradient": "implicit"}, "needs shrinkage > 0"),
        ({"gradient": "implicit", "shrinkage": 0.0}, "needs shrinkage > 0"),
        ({"gradient": "truncated", "truncate": 0}, r"truncate must be in \[1, steps=3\], got 0"),
        ({"gradient": "truncated", "truncate": 4}, r"truncate must be in \[1, steps=3\], got 4"),
        ({"steps": -1}, "steps must be >= 0, got -1"),
        ({"shrinkage": -0.1}, "shrinkage must be >= 0, got -0.1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    kwargs = {"steps": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        SemiAmortized(LearnedConstant(2), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gradient": "truncated", "truncate": 1},
        {"gradient": "truncated", "truncate": 3},
        {"gradient": "implicit", "shrinkage": 0.1},
        {"gradient": "unroll", "truncate": 10},
        {"steps": 0},
    ],
)
def test_good_arguments_are_accepted(kwargs: dict) -> None:
    kwargs = {"steps": 3, **kwargs}
    model = SemiAmortized(LearnedConstant(2), **kwargs)
    assert model.gradient == kwargs.get("gradient", "unroll")


def test_implicit_gradient_refuses_a_proximal_update() -> None:
    from lightning_amor import ProximalStep

    with pytest.raises(ValueError, match="implicit.*ProximalStep"):
        SemiAmortized(MLP(2, 2), steps=3, update=ProximalStep(), gradient="implicit", shrinkage=1.0)
