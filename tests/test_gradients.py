"""Gradient checks of SemiAmortized's four gradient modes (unroll, implicit, first_order, truncated).

Everything that compares gradients runs in float64.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_amor.amortizers import SemiAmortized
from lightning_amor.nets import MLP, LearnedConstant
from lightning_amor.objective import Context, Objective
from lightning_amor.updates import AdamStep, GradientStep, InnerUpdate, LearnedUpdate
from tests.objectives import CoshObjective, ParametricQuadratic, Quadratic, case, contexts

DOUBLE = torch.float64


def _learned(kind: str) -> LearnedUpdate:
    """A learned update whose head is not zero, so that its network shapes the steps."""
    update = LearnedUpdate(kind, hidden=4, lr=0.1, scale=0.1)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        update.head.weight.copy_(0.5 * torch.randn(update.head.weight.shape, generator=generator))
        update.head.bias.fill_(0.05)
    return update


UPDATES: dict[str, Callable[[], InnerUpdate]] = {
    "gradient": lambda: GradientStep(lr=0.1),
    "adam": lambda: AdamStep(lr=0.05),
    "learned_mlp": lambda: _learned("mlp"),
    "learned_gru": lambda: _learned("gru"),
}


def objective_loss(objective: Objective, y: Tensor, x: Context) -> Tensor:
    """The outer loss used throughout: Σ_b f(ŷ_b; x_b) plus a fixed linear term (so that ∂L/∂ŷ is generic)."""
    weights = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)
    return objective(y, x).sum() + 0.3 * (weights * y).sum()


def gradients(model: nn.Module, objective: Objective, x: Context, tensors: list[Tensor]) -> list[Tensor]:
    """∂L/∂t for every t of ``tensors`` (zeros where unused)."""
    loss = objective_loss(objective, model(x, objective).y, x)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]


def graph_nodes(t: Tensor) -> list[torch.autograd.graph.Node]:
    """Every autograd node reachable from ``t.grad_fn``."""
    seen: set = set()
    stack, nodes = [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return nodes


def saved_bytes(t: Tensor) -> int:
    """Bytes of the tensors saved for backward by the graph of ``t`` (what the graph keeps in memory)."""
    total = 0
    for node in graph_nodes(t):
        saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function nodes
            saved.extend(node.saved_tensors)
        for value in saved:
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, Tensor):
                    total += item.numel() * item.element_size()
    return total


# --- (a) unroll against finite differences ---------------------------------------------------------------------


@pytest.mark.parametrize("update_name", list(UPDATES))
@pytest.mark.parametrize("objective_name", ["cosh", "sphere"])
def test_unroll_matches_finite_differences(objective_name: str, update_name: str) -> None:
    """gradcheck on the map (every parameter of the amortizer) -> loss through three unrolled steps."""
    objective_case = case(objective_name)
    objective = objective_case.make().double()
    x = contexts(objective_case, 2, seed=4, dtype=DOUBLE)
    init = MLP(x.shape[1], objective.dim, hidden=(4,), activation="tanh")
    model = SemiAmortized(init, steps=3, update=UPDATES[update_name](), gradient="unroll").double()
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def loss(*values: Tensor) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x, objective))
        return objective_loss(objective, out.y, x)

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)


# --- (b) implicit against a long unroll ------------------------------------------------------------------------


def test_implicit_matches_a_converged_unroll() -> None:
    """With shrinkage λ the inner problem is strongly convex; after many steps the unrolled gradient w.r.t. the
    initial network, the objective's learnable centre and matrix and the contexts is the implicit one."""
    objective = ParametricQuadratic().double()
    x = contexts(case("parametric_quadratic"), 4, seed=5, dtype=DOUBLE).requires_grad_()
    init = MLP(3, 3, hidden=(5,), activation="tanh").double()
    shrinkage = 0.5
    results = {}
    for mode in ("unroll", "implicit"):
        model = SemiAmortized(
            copy.deepcopy(init),
            steps=200,
            update=GradientStep(lr=0.2, learnable=False),
            gradient=mode,
            shrinkage=shrinkage,
            cg_steps=50,
        ).double()
        out = model(x, objective)
        tensors = [*model.init.parameters(), objective.center, objective.factor, x]
        results[mode] = (out, torch.autograd.grad(objective_loss(objective, out.y, x), tensors))

    # The forward pass reached the inner solution (H + λI)⁻¹ (H (x + c) + λ y⁰).
    out = results["unroll"][0]
    with torch.no_grad():
        h = objective.matrix()
        rhs = (x + objective.center) @ h + shrinkage * out.iterates[0]
        exact = torch.linalg.solve(h + shrinkage * torch.eye(3, dtype=DOUBLE), rhs.T).T
    torch.testing.assert_close(out.y, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(results["implicit"][0].y, exact, rtol=0, atol=1e-10)

    for unrolled, implicit in zip(results["unroll"][1], results["implicit"][1], strict=True):
        assert unrolled.abs().max() > 1e-3  # every gradient is informative
        torch.testing.assert_close(implicit, unrolled, rtol=1e-6, atol=1e-9)


def test_implicit_differs_from_a_short_unroll() -> None:
    """The comparison above can fail: two unrolled steps are far from the inner solution."""
    objective = Quadratic().double()
    x = contexts(case("quadratic"), 3, seed=6, dtype=DOUBLE)
    init = LearnedConstant(4, init_scale=1.0).double()
    grads = {}
    for mode, steps in (("unroll", 2), ("implicit", 2)):
        model = SemiAmortized(
            copy.deepcopy(init), steps=steps, update=GradientStep(0.1, learnable=False), gradient=mode, shrinkage=1.0
        ).double()
        grads[mode] = gradients(model, objective, x, [model.init.value])[0]
    assert not torch.allclose(grads["unroll"], grads["implicit"], atol=1e-3)


# --- (c) first_order: the inner Jacobians dropped -----------------------------------------------------------------


def test_first_order_drops_the_inner_jacobian() -> None:
    """One gradient step y¹ = y⁰ − α A (y⁰ − x) on f = ½ (y − x)ᵀ A (y − x) from a learned constant y⁰ = v.

    First order treats ∇f(y⁰) as a constant: ∂L/∂v = Σ_b A (y¹_b − x_b) and ∂L/∂α = −Σ_b ∇f(y⁰_b)ᵀ A (y¹_b − x_b);
    the full unroll has ∂L/∂v = Σ_b (I − αA) A (y¹_b − x_b).
    """
    objective = Quadratic().double()
    a = objective.a
    x = contexts(case("quadratic"), 3, seed=7, dtype=DOUBLE)
    init = LearnedConstant(4, init_scale=1.0).double()
    v = init.value.detach()
    model = SemiAmortized(init, steps=1, update=GradientStep(lr=0.1), gradient="first_order").double()
    alpha = model.update.lr.detach()

    loss = objective(model(x, objective).y, x).sum()
    grad_v, grad_raw = torch.autograd.grad(loss, [init.value, model.update.raw_lr])

    inner_grad = (v - x) @ a  # ∇f(y⁰_b), B x n
    y1 = v - alpha * inner_grad
    outer_grad = (y1 - x) @ a  # ∇f(y¹_b), B x n
    torch.testing.assert_close(grad_v, outer_grad.sum(0), rtol=1e-12, atol=1e-12)
    d_alpha = -(inner_grad * outer_grad).sum()
    torch.testing.assert_close(grad_raw, d_alpha * torch.sigmoid(model.update.raw_lr.detach()), rtol=1e-12, atol=1e-12)

    unrolled = copy.deepcopy(model)
    unrolled.gradient = "unroll"
    (grad_v_unrolled,) = torch.autograd.grad(objective(unrolled(x, objective).y, x).sum(), unrolled.init.value)
    eye = torch.eye(4, dtype=DOUBLE)
    torch.testing.assert_close(grad_v_unrolled, (outer_grad @ (eye - alpha * a)).sum(0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad_v_unrolled, grad_v, atol=1e-3)


# --- (d) truncated --------------------------------------------------------------------------------------------


def _reference_gradient(
    objective: Objective, x: Tensor, v: Tensor, lr: float, steps: int, first_second_order: int
) -> Tensor:
    """∂L/∂v for K gradient steps from y⁰ = v, second-order from step ``first_second_order`` on, by hand."""
    v = v.detach().requires_grad_()
    y = v.expand(x.shape[0], -1)
    for t in range(steps):
        second_order = t >= first_second_order
        point = y if second_order else y.detach().requires_grad_()
        (grad,) = torch.autograd.grad(objective(point, x).sum(), point, create_graph=second_order)
        y = y - lr * grad
    return torch.autograd.grad(objective_loss(objective, y, x), v)[0]


@pytest.mark.parametrize("truncate", [1, 2, 4])
def test_truncated_backpropagates_through_the_last_steps(truncate: int) -> None:
    objective = CoshObjective().double()
    x = contexts(case("cosh"), 3, seed=8, dtype=DOUBLE)
    steps = 4
    init = LearnedConstant(3, init_scale=1.0).double()
    modes = {
        "truncated": SemiAmortized(
            copy.deepcopy(init),
            steps=steps,
            update=GradientStep(0.2, learnable=False),
            gradient="truncated",
            truncate=truncate,
        ).double(),
        "unroll": SemiAmortized(
            copy.deepcopy(init), steps=steps, update=GradientStep(0.2, learnable=False), gradient="unroll"
        ).double(),
        "first_order": SemiAmortized(
            copy.deepcopy(init), steps=steps, update=GradientStep(0.2, learnable=False), gradient="first_order"
        ).double(),
    }
    grads = {mode: gradients(model, objective, x, [model.init.value])[0] for mode, model in modes.items()}
    lr = modes["truncated"].update.lr.item()
    expected = _reference_gradient(objective, x, init.value, lr, steps, first_second_order=steps - truncate)
    torch.testing.assert_close(grads["truncated"], expected, rtol=1e-10, atol=1e-12)
    if truncate == steps:
        torch.testing.assert_close(grads["truncated"], grads["unroll"], rtol=1e-12, atol=1e-12)
    else:
        assert not torch.allclose(grads["truncated"], grads["unroll"], atol=1e-4)
        assert not torch.allclose(grads["truncated"], grads["first_order"], atol=1e-4)


def test_truncated_with_every_step_equals_unroll_for_every_parameter() -> None:
    """truncate == steps is the full unroll, for a learned update rule's parameters too."""
    objective = CoshObjective().double()
    x = contexts(case("cosh"), 3, seed=9, dtype=DOUBLE)
    base = SemiAmortized(MLP(3, 3, hidden=(4,)), steps=3, update=_learned("gru"), gradient="unroll").double()
    truncated = copy.deepcopy(base)
    truncated.gradient, truncated.truncate = "truncated", 3
    expected = gradients(base, objective, x, list(base.parameters()))
    got_all = gradients(truncated, objective, x, list(truncated.parameters()))
    for got, want in zip(got_all, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# --- (e) evaluation under no_grad / inference_mode --------------------------------------------------------------


@pytest.mark.parametrize("guard", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("mode", ["unroll", "first_order", "truncated", "implicit"])
@pytest.mark.parametrize("steps", [0, 3])
def test_forward_without_autograd(mode: str, guard: Callable, steps: int) -> None:
    """Inner gradients are still taken, and nothing returned carries a graph."""
    objective = ParametricQuadratic()
    model = SemiAmortized(
        MLP(3, 3, hidden=(8,)), steps=steps, update=AdamStep(lr=0.1), gradient=mode, truncate=1, shrinkage=0.5
    )
    x = contexts(case("parametric_quadratic"), 5, seed=10)
    expected = model(x, objective)
    with guard():
        x_guarded = x.clone()  # an inference tensor under inference_mode
        out = model(x_guarded, objective)
    assert not out.y.requires_grad
    assert out.y.grad_fn is None
    assert all(not y.requires_grad for y in out.iterates)
    torch.testing.assert_close(out.y, expected.y.detach())
    if steps:
        assert (out.y - out.iterates[0]).abs().max() > 1e-3  # the inner steps moved the prediction


# --- (f) memory: what the graph keeps --------------------------------------------------------------------------


def _model(mode: str, steps: int, init: nn.Module) -> SemiAmortized:
    return SemiAmortized(
        copy.deepcopy(init),
        steps=steps,
        update=GradientStep(0.1, learnable=False),
        gradient=mode,
        truncate=3,
        shrinkage=1.0,
    ).double()


def test_second_order_nodes_count_the_differentiated_steps() -> None:
    """The derivative of cosh is sinh: its node appears once per step differentiated to second order."""
    objective = CoshObjective().double()
    x = contexts(case("cosh"), 4, seed=11, dtype=DOUBLE)
    init = LearnedConstant(3, init_scale=1.0)
    expected = {"unroll": 10, "truncated": 3, "first_order": 0, "implicit": 0}
    for mode, count in expected.items():
        y = _model(mode, 10, init)(x, objective).y
        assert sum(type(node).__name__ == "SinhBackward0" for node in graph_nodes(y)) == count, mode


@pytest.mark.parametrize("mode", ["first_order", "implicit", "truncated"])
def test_graph_memory_does_not_grow_with_steps(mode: str) -> None:
    """first_order (fixed step size), implicit and truncated keep the same saved tensors for 10 or 200 steps;
    the full unroll keeps one set per step."""
    objective = CoshObjective().double()
    x = contexts(case("cosh"), 4, seed=12, dtype=DOUBLE)
    init = LearnedConstant(3, init_scale=1.0)
    short, long = (_model(mode, steps, init)(x, objective).y for steps in (10, 200))
    assert saved_bytes(short) == saved_bytes(long)
    if mode == "implicit":
        assert len(graph_nodes(short)) == len(graph_nodes(long))
    unrolled_short, unrolled_long = (_model("unroll", steps, init)(x, objective).y for steps in (10, 200))
    assert saved_bytes(unrolled_long) > 10 * saved_bytes(unrolled_short) > 0


def test_implicit_backward_with_many_steps() -> None:
    objective = ParametricQuadratic().double()
    x = contexts(case("parametric_quadratic"), 8, seed=13, dtype=DOUBLE)
    model = SemiAmortized(
        MLP(3, 3, hidden=(8,)),
        steps=1000,
        update=GradientStep(0.1, learnable=False),
        gradient="implicit",
        shrinkage=1.0,
    ).double()
    objective_loss(objective, model(x, objective).y, x).backward()
    for p in [*model.init.parameters(), *objective.parameters()]:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert p.grad.abs().max() > 0
