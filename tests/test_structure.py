"""Structured solutions: named shapes over the flat carrier, used by every part of the framework.

Three problems declare a structure of their own: a MAML-style task whose solution is the weights of a small network
(used through ``torch.func.functional_call``), a linear MPC step whose solution is an ``H x m`` action sequence, and a
pair of named potentials. Solvers, inner updates, losses, distances, certificates, the amortize-then-refine policy and
export all work on them without flattening in the problem's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_amor import (
    MLP,
    AmortizedModule,
    Fallback,
    FullyAmortized,
    GradientStep,
    LearnedConstant,
    ObjectiveLoss,
    RegressionLoss,
    SemiAmortized,
)
from lightning_amor.amortizers import AmortizedOutput
from lightning_amor.certificates import certify
from lightning_amor.export import ExportedAmortizer, check_export, export_torchscript
from lightning_amor.losses import AmortizationLoss
from lightning_amor.objective import Context, Objective
from lightning_amor.solvers import LBFGS, Adam, MultiStart
from lightning_amor.structure import (
    Structure,
    batched_functional_call,
    module_structure,
    parameters_vector,
)

# --- the structure itself --------------------------------------------------------------------------------------


def test_named_view_shares_the_carrier_and_round_trips() -> None:
    structure = Structure({"w": (2, 3), "b": (3,), "s": ()})
    assert structure.numel == 10 and structure.named
    y = torch.arange(20.0).reshape(2, 10)
    view = structure.view(y)
    assert view["w"].shape == (2, 2, 3) and view["b"].shape == (2, 3) and view["s"].shape == (2,)
    assert view["w"].data_ptr() == y.data_ptr()  # a view of the carrier, no copy
    view["b"][0, 0] = -1.0
    assert y[0, 6] == -1.0
    assert torch.equal(structure.flatten(view), y)


def test_single_shape_view_and_flatten() -> None:
    structure = Structure((4, 2))
    y = torch.randn(3, 8)
    assert structure.view(y).shape == (3, 4, 2)
    assert torch.equal(structure.flatten(structure.view(y)), y)
    assert torch.equal(structure.flatten(y), y)  # a flat batch passes


def test_structure_errors_name_what_is_wrong() -> None:
    structure = Structure({"a": (2,), "b": (1,)})
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        structure.flatten({"a": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="'a' must have shape \\(B, 2\\)"):
        structure.flatten({"a": torch.zeros(1, 3), "b": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="shape \\(B, 3\\)"):
        structure.view(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="positive integers"):
        Structure({"a": (0,)})


def test_declared_shapes_set_dim() -> None:
    class Sequence(Objective):
        solution_shape = (5, 2)

        def value(self, y: Tensor, x: Context) -> Tensor:
            return (y**2).sum((1, 2))

    class Pair(Objective):
        solution_shapes = {"f": (3,), "g": (4,)}

        def value(self, y: dict[str, Tensor], x: Context) -> Tensor:
            return y["f"].sum(-1) + y["g"].sum(-1)

    assert Sequence.dim == 10 and Sequence().dim == 10
    assert Pair.dim == 7 and Pair().structure.names == ("f", "g")


# --- an H x m action sequence: linear dynamics, quadratic cost --------------------------------------------------


class LinearMPC(Objective):
    """One MPC step of a double integrator: the solution is an ``H x 1`` sequence of forces, the context the
    ``B x 2`` initial state (position, velocity); the cost sums ``‖s_t‖² + ρ u_t²`` along the rolled-out states.
    Quadratic in u, so the oracle is a linear solve."""

    horizon = 6
    solution_shape = (horizon, 1)

    def __init__(self, rho: float = 0.1) -> None:
        super().__init__()
        self.rho = rho
        self.register_buffer("a", torch.tensor([[1.0, 0.1], [0.0, 1.0]]))
        self.register_buffer("b", torch.tensor([0.005, 0.1]))

    def value(self, u: Tensor, x: Context) -> Tensor:
        assert u.shape[1:] == (self.horizon, 1)  # the hook sees the structured view
        state, cost = x, 0.0
        for t in range(self.horizon):
            state = state @ self.a.to(state.dtype).T + u[:, t] * self.b.to(state.dtype)
            cost = cost + (state**2).sum(-1) + self.rho * (u[:, t] ** 2).sum(-1)
        return cost

    def solve(self, x: Context, init: Tensor | None = None) -> Tensor:
        # f is quadratic: f(u) = ½ uᵀ H u + cᵀ u + const, so u* = −H⁻¹ c (H and c from autograd at u = 0).
        batch = x.shape[0]
        zero = torch.zeros(batch, self.dim, dtype=x.dtype, requires_grad=True)
        with torch.enable_grad():
            (c,) = torch.autograd.grad(self(zero, x).sum(), zero, create_graph=True)
            hessian = torch.stack([torch.autograd.grad(c[:, j].sum(), zero, retain_graph=True)[0]
                                   for j in range(self.dim)], dim=1)
        u = -torch.linalg.solve(hessian.detach(), c.detach())
        return u.reshape(batch, self.horizon, 1)  # structured, as the hooks speak


def test_solvers_and_oracle_agree_on_an_action_sequence() -> None:
    objective = LinearMPC().double()
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u_star = objective.solve_flat(x)
    assert u_star.shape == (5, objective.dim)
    lbfgs = LBFGS(steps=200, tol=1e-7).solve(objective, x)
    torch.testing.assert_close(lbfgs.y, u_star, atol=1e-6, rtol=0)
    assert bool(lbfgs.converged.all())
    # the certificate (default: the stationarity residual) is ~0 at the oracle's answer and not elsewhere
    _, residual, _ = certify(objective, u_star, x)
    assert float(residual.max()) < 1e-8
    assert float(objective.residual_flat(torch.zeros_like(u_star), x).min()) > 1e-3


def test_amortizer_trains_on_an_action_sequence_and_exports(tmp_path) -> None:
    torch.manual_seed(0)
    objective = LinearMPC()
    module = AmortizedModule(objective, FullyAmortized(MLP(2, objective.dim, hidden=[32])), loss=RegressionLoss())
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    y_star = objective.solve_flat(x)
    first = None
    for _ in range(150):
        loss = module.loss(module.predict_batch(x), x, objective, y_star).mean()
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05 * first
    # the metrics' distance runs on the structured view
    assert float(objective.distance_flat(module(x), y_star).detach().mean()) < 0.1
    module.eval()
    path = export_torchscript(module, tmp_path / "mpc.pt", x[:8])
    check_export(path, module, x[:40], atol=1e-5)
    exported = ExportedAmortizer(path)
    assert exported.structure is not None
    solution = exported.predict_solution(x[:3])
    assert solution.shape == (3, objective.horizon, 1)


# --- named potentials -----------------------------------------------------------------------------------------


class SeparablePair(Objective):
    """Two named vectors f (3) and g (2) with f* = x[:, :3], g* = −x[:, 3:] and a custom certificate."""

    solution_shapes = {"f": (3,), "g": (2,)}

    def value(self, y: dict[str, Tensor], x: Context) -> Tensor:
        return 0.5 * ((y["f"] - x[:, :3]) ** 2).sum(-1) + 0.5 * ((y["g"] + x[:, 3:]) ** 2).sum(-1)

    def residual(self, y: dict[str, Tensor], x: Context) -> Tensor:
        # the largest error over both potentials (a "marginal error"-like certificate), not the gradient norm
        return torch.maximum((y["f"] - x[:, :3]).abs().amax(-1), (y["g"] + x[:, 3:]).abs().amax(-1))

    def solve(self, x: Context, init: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {"f": x[:, :3].clone(), "g": -x[:, 3:].clone()}


def test_named_solution_with_a_custom_certificate_goes_through_fallback() -> None:
    torch.manual_seed(0)
    objective = SeparablePair()
    module = AmortizedModule(objective, FullyAmortized(MLP(5, 5, hidden=[8])),
                             inference=Fallback(solver=Adam(steps=2000, lr=0.05, tol=1e-6), tolerance=1e-3))
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    y_star = objective.solve_flat(x)
    assert torch.equal(objective.view(y_star)["g"], -x[:, 3:])
    # the custom residual is what certify reports
    _, residual, _ = certify(objective, y_star + 0.25, x)
    torch.testing.assert_close(residual, torch.full((6,), 0.25))
    result = module.inference(module, x)
    assert result.status.count("refined") == 6  # an untrained model's predictions are refined...
    assert float(result.residual.max()) <= 1e-3  # ...until the custom certificate is met
    torch.testing.assert_close(result.y, y_star, atol=2e-3, rtol=0)


def test_multistart_works_on_named_solutions() -> None:
    objective = SeparablePair()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    result = MultiStart(LBFGS(steps=50, tol=1e-8), starts=2).solve(objective, x)
    torch.testing.assert_close(result.y, objective.solve_flat(x), atol=1e-5, rtol=0)


# --- MAML-style: the solution is the weights of a network --------------------------------------------------------


class SineTask(Objective):
    """A task's support set is the context (``B x K x 2``: inputs and targets); the solution is the weights of a
    1-16-1 MLP, one set per task; f is the MSE of that network on the support set."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)
        self.set_structure(module_structure(self.net))

    def predictions(self, weights: dict[str, Tensor], inputs: Tensor) -> Tensor:
        """``B x K x 1`` outputs of each task's network on its ``B x K x 1`` inputs."""
        return batched_functional_call(self.net, weights, inputs)

    def value(self, weights: dict[str, Tensor], x: Context) -> Tensor:
        return ((self.predictions(weights, x[..., :1]) - x[..., 1:]) ** 2).mean((1, 2))


class QueryLoss(AmortizationLoss):
    """MAML's outer loss: the adapted weights' MSE on a query set of the same task (``y_star`` carries it)."""

    def iterate_loss(self, y: Tensor, x: Context, objective: Objective, y_star: Tensor | None) -> Tensor:
        return objective(y, y_star)


def sine_tasks(num: int, shots: int, seed: int) -> tuple[Tensor, Tensor]:
    """Support and query sets ``num x shots x 2`` of sinusoids with random amplitude and phase."""
    gen = torch.Generator().manual_seed(seed)
    amplitude = 0.5 + 2.0 * torch.rand(num, 1, 1, generator=gen)
    phase = math.pi * torch.rand(num, 1, 1, generator=gen)

    def draw() -> Tensor:
        inputs = 10.0 * torch.rand(num, shots, 1, generator=gen) - 5.0
        return torch.cat([inputs, amplitude * torch.sin(inputs + phase)], dim=-1)

    return draw(), draw()


def test_maml_style_weights_are_the_solution(tmp_path) -> None:
    torch.manual_seed(0)
    objective = SineTask()
    assert objective.dim == sum(p.numel() for p in objective.net.parameters())
    init = LearnedConstant(objective.dim)
    with torch.no_grad():
        init.value.copy_(parameters_vector(objective.net))
    amortizer = SemiAmortized(init, steps=3, update=GradientStep(0.05, learnable=False))
    module = AmortizedModule(objective, amortizer, loss=QueryLoss())
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    held_support, held_query = sine_tasks(64, 10, seed=99)

    def held_out_query_mse() -> float:
        with torch.no_grad():
            return float(objective(module(held_support), held_query).mean())

    before = held_out_query_mse()
    for step in range(150):
        support, query = sine_tasks(25, 10, seed=step)
        output = module.predict_batch(support)
        assert isinstance(output, AmortizedOutput) and output.y.shape == (25, objective.dim)
        loss = module.loss(output, support, objective, query).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_query_mse()
    assert after < 0.8 * before, (before, after)
    # the inner steps adapt: after them the support loss is below the meta-learned initial weights'
    with torch.no_grad():
        start = objective(init(held_support), held_support).mean()
        adapted = objective(module(held_support), held_support).mean()
    assert float(adapted) < float(start)
    # a solver fits each task's weights on its own (batched over tasks), from the meta-learned start
    fitted = Adam(steps=300, lr=1e-2).solve(objective, held_support[:4], init=init(held_support[:4]).detach())
    assert float(fitted.value.mean()) < float(start)
    # export traces the inner steps through functional_call and vmap; the weights come back by name
    module.eval()
    path = export_torchscript(module, tmp_path / "maml.pt", held_support[:8])
    check_export(path, module, held_support[:20], atol=1e-5)
    weights = ExportedAmortizer(path).predict_solution(held_support[:2])
    assert weights["0.weight"].shape == (2, 16, 1) and weights["2.bias"].shape == (2, 1)


def test_objective_loss_and_regression_on_named_weights() -> None:
    objective = SineTask()
    support, _ = sine_tasks(4, 5, seed=0)
    weights = torch.randn(4, objective.dim, requires_grad=True)
    value = ObjectiveLoss()(AmortizedOutput(weights, [weights]), support, objective)
    assert value.shape == (4,)
    (grad,) = torch.autograd.grad(value.sum(), weights)
    assert grad.shape == weights.shape and bool(torch.isfinite(grad).all())
    reg = RegressionLoss()(AmortizedOutput(weights, [weights]), support, objective, torch.zeros_like(weights))
    torch.testing.assert_close(reg, (weights**2).sum(-1))
