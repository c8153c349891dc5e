"""Composite objectives f = g + h: the proximal operators, the prox-gradient residual, the proximal inner update and
the ISTA / FISTA solvers, on a small lasso family checked against scikit-learn."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import Lasso as SklearnLasso
from torch import Tensor

from lightning_amor.amortizers import SemiAmortized
from lightning_amor.certificates import stationarity_residual
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective
from lightning_amor.proximal import (
    L1,
    Box,
    CompositeObjective,
    NonNegative,
    Simplex,
    Zero,
    prox_gradient_residual,
)
from lightning_amor.proximal_solvers import FISTA, ISTA
from lightning_amor.solvers import GradientDescent
from lightning_amor.updates import ProximalStep
from tests.objectives import Quadratic, spd_matrix

SIGNALS, CODES, LAM = 10, 20, 0.2


def _dictionary() -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(SIGNALS, CODES, generator=generator, dtype=torch.float64) / SIGNALS**0.5


class Lasso(CompositeObjective):
    """½‖x − D y‖² + λ‖y‖₁: signals x are ``B x 10``, codes y ``B x 20``, D fixed."""

    dim = CODES

    def __init__(self, lam: float = LAM) -> None:
        super().__init__(prox=L1(lam))
        self.register_buffer("dictionary", _dictionary())

    def smooth(self, y: Tensor, x: Context) -> Tensor:
        """``B``."""
        return 0.5 * ((x - y @ self.dictionary.to(y.dtype).T) ** 2).sum(-1)


def _signals(num: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(num, SIGNALS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sklearn_lasso(x: Tensor) -> Tensor:
    """scikit-learn minimizes (1/(2m))‖x − D y‖² + α‖y‖₁ (m = SIGNALS samples): α = λ/m gives our minimizer."""
    d = _dictionary().numpy()
    rows = []
    for signal in x.numpy():
        fit = SklearnLasso(alpha=LAM / SIGNALS, fit_intercept=False, tol=1e-14, max_iter=200_000).fit(d, signal)
        rows.append(torch.as_tensor(fit.coef_))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def lasso_reference() -> tuple[Tensor, Tensor]:
    x = _signals(4)
    return x, _sklearn_lasso(x)


# --- the proximal operators -------------------------------------------------------------------------------------


def _brute_force_prox(h, v: Tensor, step: float) -> Tensor:
    """argmin_u h(u) + (u − v)²/(2 step) coordinate-wise for separable h, on a fine grid around v: ``B x n``."""
    grid = torch.linspace(-4.0, 4.0, 80_001, dtype=torch.float64)
    values = h(grid[:, None]) + (grid[:, None] - v.reshape(1, -1)) ** 2 / (2 * step)
    return grid[values.argmin(0)].reshape(v.shape)


def test_l1_prox_is_the_soft_threshold_and_minimizes_the_prox_problem():
    v = torch.tensor([[-2.0, -0.3, 0.0, 0.25, 1.5], [0.7, -0.7, 3.0, -0.05, 0.5]], dtype=torch.float64)
    op = L1(0.5)
    out = op(v, 0.8)  # threshold 0.4
    expected = torch.tensor([[-1.6, 0.0, 0.0, 0.0, 1.1], [0.3, -0.3, 2.6, 0.0, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    brute = _brute_force_prox(lambda u: 0.5 * u.abs(), v, 0.8)
    torch.testing.assert_close(out, brute, atol=2e-4, rtol=0)
    torch.testing.assert_close(op.value(v), 0.5 * v.abs().sum(-1))


def test_l1_per_coordinate_weights_and_per_context_steps_broadcast():
    v = torch.full((2, 3), 1.0, dtype=torch.float64)
    op = L1(torch.tensor([0.1, 0.5, 2.0]))
    step = torch.tensor([[1.0], [0.5]], dtype=torch.float64)  # B x 1: one step per context
    expected = torch.tensor([[0.9, 0.5, 0.0], [0.95, 0.75, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(op(v, step), expected)
    torch.testing.assert_close(op.value(v), torch.full((2,), 2.6, dtype=torch.float64))


def test_box_and_nonnegative_clamp_and_have_indicator_values():
    v = torch.tensor([[-1.0, 0.5, 2.0], [0.2, -0.1, 0.9]], dtype=torch.float64)
    box = Box(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([1.0, 0.4, 1.0]))
    torch.testing.assert_close(box(v, 3.0), torch.tensor([[0.0, 0.4, 1.0], [0.2, 0.0, 0.9]], dtype=torch.float64))
    brute = _brute_force_prox(lambda u: torch.where((u >= 0) & (u <= 1), 0.0, torch.inf), v, 1.0)
    torch.testing.assert_close(Box(0.0, 1.0)(v, 1.0), brute, atol=2e-4, rtol=0)
    assert box.value(v).tolist() == [float("inf"), float("inf")]
    assert box.value(box(v, 1.0)).tolist() == [0.0, 0.0]
    torch.testing.assert_close(NonNegative()(v, 0.1), v.clamp(min=0))
    assert NonNegative().value(v.abs()).tolist() == [0.0, 0.0]


def test_simplex_projection_satisfies_the_kkt_conditions():
    generator = torch.Generator().manual_seed(3)
    v = 2.0 * torch.randn(64, 7, generator=generator, dtype=torch.float64)
    v[0] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0], dtype=torch.float64)  # already on the simplex
    for radius in (1.0, 2.5):
        y = Simplex(radius)(v, 0.3)
        assert (y >= 0).all()
        torch.testing.assert_close(y.sum(-1), torch.full((64,), radius, dtype=torch.float64))
        # KKT of min ½‖y − v‖² s.t. y ≥ 0, Σy = r: v − y = τ on the support, v ≤ τ off it.
        tau = (v - y).masked_fill(y == 0, float("nan")).nanmean(-1, keepdim=True)
        support = y > 0
        torch.testing.assert_close((v - y)[support], tau.expand_as(v)[support])
        assert (v[~support] <= tau.expand_as(v)[~support] + 1e-12).all()
    torch.testing.assert_close(Simplex()(v[:1], 1.0), v[:1])
    with_nan = v[:2].clone()
    with_nan[1, 3] = float("nan")
    out = Simplex()(with_nan, 1.0)
    assert torch.isnan(out[1]).all() and torch.allclose(out[0], v[0]), "a NaN row stays NaN, the others are solved"


def test_simplex_projection_agrees_with_a_generic_qp_solver():
    from scipy.optimize import minimize

    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = Simplex(1.0)(v, 1.0)
    for row, mine in zip(v.numpy(), ours, strict=True):
        qp = minimize(lambda u, r=row: 0.5 * ((u - r) ** 2).sum(), x0=[0.2] * 5, jac=lambda u, r=row: u - r,
                      bounds=[(0, None)] * 5, constraints=[{"type": "eq", "fun": lambda u: u.sum() - 1}],
                      method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        torch.testing.assert_close(mine, torch.as_tensor(qp.x), atol=1e-6, rtol=0)


def test_prox_operators_are_differentiable_almost_everywhere():
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    for op in (L1(0.3), Box(-0.5, 0.5), Simplex(1.0)):
        assert torch.autograd.gradcheck(lambda u, op=op: op(u, 0.7), (v,)), op


def test_prox_operators_reject_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be non-negative"):
        L1(-1.0)
    with pytest.raises(ValueError, match="lower bound must be at most its upper bound"):
        Box(1.0, 0.0)
    with pytest.raises(ValueError, match="radius must be positive"):
        Simplex(0.0)


# --- composite objectives and their residual --------------------------------------------------------------------


def test_value_is_smooth_plus_nonsmooth_and_without_prox_the_error_says_how_to_fix_it():
    lasso = Lasso()
    x, y = _signals(3), torch.randn(3, CODES, dtype=torch.float64)
    torch.testing.assert_close(lasso(y, x), lasso.smooth(y, x) + LAM * y.abs().sum(-1))

    class Forgotten(CompositeObjective):
        dim = 2

        def smooth(self, y: Tensor, x: Context) -> Tensor:
            return (y**2).sum(-1)

    with pytest.raises(TypeError, match=r"self\.prox"):
        Forgotten()(torch.zeros(1, 2), torch.zeros(1, 2))


def test_residual_is_zero_at_the_optimum_and_positive_elsewhere(lasso_reference):
    x, reference = lasso_reference
    lasso = Lasso()
    assert lasso.has_residual
    at_optimum = lasso.residual_flat(reference, x)
    assert (at_optimum < 1e-9).all(), at_optimum
    with torch.inference_mode():  # the policy and the metrics call it under inference mode
        elsewhere = lasso.residual_flat(reference + 0.01, x)
    assert (elsewhere > 1e-3).all(), elsewhere
    assert (lasso.residual_flat(torch.zeros_like(reference), x) > 1e-2).all()


def test_residual_with_zero_prox_is_the_gradient_norm():
    class SmoothOnly(CompositeObjective):
        dim = 4

        def __init__(self) -> None:
            super().__init__(prox=Zero())
            self.quadratic = Quadratic()

        def smooth(self, y: Tensor, x: Context) -> Tensor:
            return self.quadratic(y, x)

    x, y = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(SmoothOnly().residual_flat(y, x), stationarity_residual(Quadratic(), y, x))


def test_residual_scaling_by_the_step():
    """The residual is the gradient mapping's norm with the objective's own step η (``residual_step``)."""
    lasso = Lasso()
    x = _signals(2)
    y = torch.randn(2, CODES, dtype=torch.float64)
    lasso.residual_step = 0.5
    grad = torch.func.grad(lambda v: lasso.smooth_projected(v, x).sum())(y)
    torch.testing.assert_close(lasso.residual_flat(y, x), prox_gradient_residual(lasso, y, grad, 0.5))
    lasso.residual_step = 0.0
    with pytest.raises(ValueError, match="residual_step must be positive"):
        lasso.residual_flat(y, x)


def test_cache_key_names_the_nonsmooth_part():
    assert Lasso(0.1).cache_key() != Lasso(0.2).cache_key()
    assert Lasso(0.1).cache_key() == Lasso(0.1).cache_key()


# --- the solvers ------------------------------------------------------------------------------------------------


def test_fista_matches_scikit_learn_lasso(lasso_reference):
    x, reference = lasso_reference
    result = FISTA(steps=5000, tol=1e-9).solve(Lasso(), x)
    assert result.converged.all()
    torch.testing.assert_close(result.y, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.value, Lasso()(reference, x), atol=1e-9, rtol=0)
    assert (result.y == 0).any(), "the soft threshold puts exact zeros in the codes"


def test_ista_matches_scikit_learn_with_many_more_iterations_than_fista(lasso_reference):
    x, reference = lasso_reference
    x, reference = x[:2], reference[:2]
    # A known L (λ_max(DᵀD)) and a fixed step: the other way of choosing it.
    lipschitz = float(torch.linalg.eigvalsh(_dictionary().T @ _dictionary()).max())
    ista = ISTA(steps=20_000, tol=1e-7, lipschitz=lipschitz, backtracking=False).solve(Lasso(), x)
    fista = FISTA(steps=20_000, tol=1e-7).solve(Lasso(), x)
    assert ista.converged.all() and fista.converged.all()
    torch.testing.assert_close(ista.y, reference, atol=1e-5, rtol=0)
    assert (fista.iterations * 4 < ista.iterations).all(), (fista.iterations, ista.iterations)


def test_fista_without_restart_and_ista_with_backtracking_converge():
    x = _signals(1, seed=2)
    reference = _sklearn_lasso(x)
    for solver in (FISTA(steps=5000, tol=1e-8, restart=False), ISTA(steps=5000, tol=1e-5)):
        result = solver.solve(Lasso(), x)
        assert result.converged.all(), solver
        torch.testing.assert_close(result.y, reference, atol=1e-4, rtol=0)


def test_batch_gives_each_context_its_own_answer():
    x = _signals(3, seed=5)
    lasso = Lasso()
    for solver in (FISTA(steps=300, tol=1e-8), ISTA(steps=100, tol=1e-5)):
        batch = solver.solve(lasso, x)
        for i in range(3):
            alone = solver.solve(lasso, x[i : i + 1])
            torch.testing.assert_close(batch.y[i : i + 1], alone.y, atol=1e-12, rtol=0)
            assert batch.iterations[i] == alone.iterations[0]


def test_solvers_report_iterates_to_the_callback_and_stop_per_context():
    x = torch.cat([_signals(1), torch.zeros(1, SIGNALS, dtype=torch.float64)])  # y* = 0 for the zero signal
    seen = []
    result = FISTA(steps=200, tol=1e-8).solve(Lasso(), x, callback=lambda k, y: seen.append((k, y.clone())))
    assert [k for k, _ in seen] == list(range(len(seen)))
    assert result.iterations[1] == 0 and result.converged.all()
    assert result.iterations[0] == len(seen) - 1
    torch.testing.assert_close(seen[-1][1], result.y)


def test_converged_requires_a_finite_value():
    class Exploding(Lasso):
        def smooth(self, y: Tensor, x: Context) -> Tensor:
            value = super().smooth(y, x)
            return torch.where(x[:, 0] > 100, torch.full_like(value, float("nan")), value)

    x = _signals(2)
    x[1, 0] = 1000.0
    for solver in (FISTA(steps=500, tol=1e-6), ISTA(steps=3000, tol=1e-6)):
        result = solver.solve(Exploding(), x)
        assert result.converged.tolist() == [True, False], solver
        assert result.iterations[1] == 0, "a context whose g is not finite stops at once"
        assert result.reasons() == ["converged", "not_finite"]
    assert FISTA(steps=3, tol=1e-12).solve(Lasso(), x[:1]).reasons() == ["max_steps"]


def test_solvers_reduce_to_gradient_descent_on_a_plain_objective():
    objective = Quadratic().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    for solver in (ISTA(steps=2000, tol=1e-9), FISTA(steps=2000, tol=1e-9)):
        result = solver.solve(objective, x)
        assert result.converged.all()
        torch.testing.assert_close(result.y, x, atol=1e-8, rtol=0)
    # A fixed step 1/L is exactly a gradient-descent step.
    ista = ISTA(steps=7, tol=None, lipschitz=4.0, backtracking=False).solve(objective, x)
    descent = GradientDescent(steps=7, lr=0.25).solve(objective, x)
    torch.testing.assert_close(ista.y, descent.y)


def test_solvers_work_under_inference_mode_and_reject_bad_arguments():
    lasso = Lasso()
    with torch.inference_mode():
        result = FISTA(steps=500, tol=1e-6).solve(lasso, _signals(2))
    assert result.converged.all() and not result.y.requires_grad
    with pytest.raises(ValueError, match="lipschitz must be a positive number"):
        ISTA(lipschitz=0.0)
    with pytest.raises(ValueError, match="growth must be greater than 1"):
        FISTA(growth=1.0)
    with pytest.raises(ValueError, match="tol must be non-negative"):
        FISTA(tol=-1.0)


# --- indicators and structured solutions ------------------------------------------------------------------------


class SimplexQuadratic(CompositeObjective):
    """½ (y − x)ᵀ A (y − x) on the probability simplex of R^4 (A fixed SPD)."""

    dim = 4

    def __init__(self) -> None:
        super().__init__(prox=Simplex())
        self.register_buffer("a", spd_matrix(4, 1.0, 3.0))

    def smooth(self, y: Tensor, x: Context) -> Tensor:
        d = y - x
        return 0.5 * ((d @ self.a.to(d.dtype)) * d).sum(-1)


def test_simplex_constrained_problem_solved_by_fista_satisfies_kkt():
    objective = SimplexQuadratic()
    x = 2.0 * torch.randn(8, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    result = FISTA(steps=3000, tol=1e-10).solve(objective, x)
    assert result.converged.all()
    y = result.y
    assert (y >= 0).all() and torch.allclose(y.sum(-1), torch.ones(8, dtype=torch.float64))
    # KKT: ∇g is constant (= −τ) on the support and at least that off it.
    grad = (y - x) @ objective.a
    low = grad.masked_fill(y == 0, float("inf")).amin(-1, keepdim=True)
    high = grad.masked_fill(y == 0, float("-inf")).amax(-1, keepdim=True)
    assert (high - low < 1e-7).all() and (grad >= low - 1e-7).all()
    assert (y == 0).any(), "some coordinates must be clipped for the test to mean something"
    # The indicator is also the domain: any prediction lands in the set, with a finite value and no violation.
    raw = torch.randn(8, 4, dtype=torch.float64)
    projected = objective.project_flat(raw)
    assert torch.isfinite(objective(projected, x)).all()
    assert (objective.violation_flat(projected, x) < 1e-12).all()
    assert (objective.violation_flat(raw, x) > 0).all() and torch.isinf(objective(raw, x)).all()


class StructuredDenoising(CompositeObjective):
    """½‖Y − X‖² + λ‖Y‖₁ with Y a ``B x 3 x 4`` solution; the minimizer is the soft threshold of X."""

    solution_shape = (3, 4)

    def __init__(self) -> None:
        super().__init__(prox=L1(0.5))

    def smooth(self, y: Tensor, x: Context) -> Tensor:
        assert y.shape[1:] == (3, 4), "the hook receives the structured view"
        return 0.5 * ((y - x.reshape(-1, 3, 4)) ** 2).sum((-2, -1))


def test_structured_solutions_work_with_the_prox_on_the_flat_carrier():
    objective = StructuredDenoising()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = torch.sign(x) * (x.abs() - 0.5).clamp(min=0)
    result = FISTA(steps=200, tol=1e-10).solve(objective, x)
    torch.testing.assert_close(result.y, expected)
    assert (objective.residual_flat(expected, x) < 1e-12).all()
    assert (objective.residual(objective.view(expected + 0.1), x) > 0.1).all()


# --- the proximal inner update ----------------------------------------------------------------------------------


def test_proximal_step_is_an_ista_step_and_needs_the_objective():
    lasso = Lasso()
    y, grad = torch.randn(2, CODES, dtype=torch.float64), torch.randn(2, CODES, dtype=torch.float64)
    step = ProximalStep(lr=0.3).double()
    assert step.proximal
    out, _ = step(y, grad, None, 0, objective=lasso)
    torch.testing.assert_close(out, L1(LAM)(y - 0.3 * grad, 0.3))
    with pytest.raises(ValueError, match="needs the objective"):
        step(y, grad, None, 0)
    per_coordinate = ProximalStep(lr=0.3, dim=CODES).double()
    torch.testing.assert_close(per_coordinate(y, grad, None, 0, objective=lasso)[0], out)
    with pytest.raises(ValueError, match="set dim to the objective's dim"):
        ProximalStep(dim=3)(y, grad, None, 0, objective=lasso)
    assert not list(ProximalStep(learnable=False).parameters())


def test_semi_amortized_differentiates_the_smooth_part_only():
    """The update gets ∇g, not ∇f = ∇g + λ sign(y): the step is exactly prox(y⁰ − α∇g(y⁰))."""
    torch.manual_seed(0)
    lasso = Lasso()
    model = SemiAmortized(init=MLP(SIGNALS, CODES, hidden=[8]), update=ProximalStep(lr=0.1), steps=1).double()
    x = _signals(3)
    out = model(x, lasso)
    y0 = out.iterates[0].detach().requires_grad_()
    (grad,) = torch.autograd.grad(lasso.smooth(y0, x).sum(), y0)
    torch.testing.assert_close(out.y, L1(LAM)(y0 - model.update.lr * grad, model.update.lr))


def test_gradients_through_unrolled_proximal_steps_match_finite_differences():
    torch.manual_seed(1)
    lasso = Lasso(lam=0.05)
    model = SemiAmortized(init=MLP(SIGNALS, CODES, hidden=[4]), update=ProximalStep(lr=0.2), steps=3).double()
    x = _signals(2, seed=7)
    params = dict(model.named_parameters())
    loss = lasso(model(x, lasso).y, x).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads) and grads[list(params).index("update.raw_lr")].abs() > 0
    eps = 1e-6
    with torch.no_grad():
        for (name, param), grad in zip(params.items(), grads, strict=True):
            for index in list(range(param.numel()))[:6]:  # a few entries of every tensor
                flat = param.view(-1)
                original = flat[index].item()
                flat[index] = original + eps
                up = lasso(model(x, lasso).y, x).mean()
                flat[index] = original - eps
                down = lasso(model(x, lasso).y, x).mean()
                flat[index] = original
                numeric = (up - down) / (2 * eps)
                assert abs(numeric - grad.view(-1)[index]) < 1e-6 * max(1.0, abs(numeric)), (name, index)


def test_semi_amortized_proximal_model_learns_the_lasso_family():
    torch.manual_seed(0)
    lasso = Lasso().float()
    model = SemiAmortized(init=MLP(SIGNALS, CODES, hidden=[64]), update=ProximalStep(lr=0.1), steps=5)
    held_out = _signals(256, seed=11, dtype=torch.float32)

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            y = model(held_out, lasso).y
        return float(lasso(y, held_out).mean()), float(lasso.residual_flat(y, held_out).mean())

    value_before, residual_before = measure()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(12)
    for _ in range(300):
        x = torch.randn(64, SIGNALS, generator=generator)
        loss = lasso(model(x, lasso).y, x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    value_after, residual_after = measure()
    optimum = float(lasso(FISTA(tol=1e-6).solve(lasso, held_out).y, held_out).mean())
    assert value_after < value_before and residual_after < 0.5 * residual_before, (
        value_before, value_after, residual_before, residual_after
    )
    assert value_after - optimum < 0.5 * (value_before - optimum)
    assert model.update.lr.item() != pytest.approx(0.1), "the step size is learned"


# --- the documentation's example --------------------------------------------------------------------------------


def test_the_composite_docs_example_runs_and_prints_what_the_page_shows(capsys):
    page = (Path(__file__).resolve().parents[1] / "docs" / "composite.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    shown = re.search(r"```text\n(.*?)```", page, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/composite.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "converged: True" in printed and "converged: True" in shown
    zeros = [float(re.search(r"zeros per code: ([\d.]+)", text).group(1)) for text in (printed, shown)]
    assert abs(zeros[0] - zeros[1]) <= 0.5, zeros
    assert float(re.search(r"largest residual: ([\d.e+-]+)", printed).group(1)) <= 1e-4
    assert namespace["prediction"].shape == (64, CODES)
    assert isinstance(namespace["lasso"], Objective)
