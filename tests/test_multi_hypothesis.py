"""MultiHypothesis and MultiHypothesisLoss: shapes on every objective, the lowest-f choice, gradients to every
candidate, evaluation modes, export, and a double well that k = 2 candidates solve and k = 1 cannot."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_amor import (
    MLP,
    AmortizedModule,
    IterateSumLoss,
    LearnedConstant,
    MultiHypothesis,
    MultiHypothesisLoss,
    ObjectiveLoss,
    RegressionLoss,
    SemiAmortized,
)
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.export import check_export, export_torchscript
from lightning_amor.objective import Context, Objective, context_repeat
from lightning_amor.updates import GradientStep
from tests.objectives import OBJECTIVES, ObjectiveCase, Quadratic, case, contexts


class TiltedDoubleWell(Objective):
    """f(y; s) = (y² − 1)² + 0.3·s·y on R with s = ±1: wells near y = −1 and y = +1, the deeper one at −s."""

    dim = 1

    def value(self, y: Tensor, x: Context) -> Tensor:
        return (y[:, 0] ** 2 - 1) ** 2 + 0.3 * x[:, 0] * y[:, 0]


def constants(values: list[float]) -> LearnedConstant:
    """A learned constant that proposes ``values`` (k·n numbers) for every context."""
    net = LearnedConstant(len(values))
    with torch.no_grad():
        net.value.copy_(torch.tensor(values))
    return net


@pytest.mark.parametrize("objective_case", OBJECTIVES, ids=lambda c: c.name)
def test_shapes_and_domain_on_every_objective(objective_case: ObjectiveCase) -> None:
    objective = objective_case.make()
    x = contexts(objective_case, 5)
    k, n, steps = 3, objective.dim, 2
    torch.manual_seed(0)
    model = MultiHypothesis(LearnedConstant(k * n, init_scale=1.0), hypotheses=k, steps=steps,
                            update=GradientStep(0.05))
    out = model(x, objective)
    assert out.y.shape == (5, n) and len(out.iterates) == steps + 1
    assert all(t.shape == (5, n) for t in out.iterates) and out.iterates[-1] is out.y
    assert out.candidates.y.shape == (5 * k, n) and len(out.candidates.iterates) == steps + 1
    assert bool(objective_case.in_domain(out.y).all())


def test_it_keeps_the_lowest_f_candidate_and_its_iterates() -> None:
    """Quadratic f = ½ (y − x)ᵀ A (y − x): with candidates at 3, 1 and 2 along one axis from x the second is kept; a
    NaN candidate counts as the worst."""
    objective = Quadratic()
    x = torch.zeros(2, 4)
    start = [3.0, 0, 0, 0, 1.0, 0, 0, 0, 2.0, 0, 0, 0]
    model = MultiHypothesis(constants(start), hypotheses=3, steps=1, update=GradientStep(0.1, learnable=False))
    out = model(x, objective)
    values = objective(out.candidates.y, context_repeat(x, 3)).reshape(2, 3)
    assert values.argmin(dim=1).tolist() == [1, 1]
    torch.testing.assert_close(out.y, out.candidates.y.reshape(2, 3, 4)[:, 1])
    torch.testing.assert_close(out.iterates[0], torch.tensor([[1.0, 0, 0, 0]]).expand(2, 4))
    nan_first = MultiHypothesis(constants([float("nan"), 0, 0, 0, *start[4:]]), hypotheses=3, steps=0)
    torch.testing.assert_close(nan_first(x, objective).y, torch.tensor([[1.0, 0, 0, 0]]).expand(2, 4))


def test_a_single_hypothesis_is_the_semi_amortized_model() -> None:
    objective_case = case("sphere")
    objective, x = objective_case.make(), contexts(objective_case, 6)
    torch.manual_seed(0)
    net = MLP(16, 3, hidden=[8])
    single = MultiHypothesis(net, hypotheses=1, steps=3, update=GradientStep(0.3))
    plain = SemiAmortized(net, steps=3, update=GradientStep(0.3))
    torch.testing.assert_close(single(x, objective).y, plain(x, objective).y)


@pytest.mark.parametrize("loser_weight", [0.0, 0.05])
def test_gradients_reach_every_head(loser_weight: float) -> None:
    """Under the recipe's loss (regression summed over the iterates, winner-takes-all) with losers weighted, every
    head gets a gradient, even one that never wins; without, only the heads that win some context do."""
    objective = Quadratic()
    e1 = torch.eye(4)[0]
    x = torch.cat([3 * e1.expand(4, 4), -3 * e1.expand(4, 4)])  # y*(x) = x
    heads = constants([2.0, 0, 0, 0, -2.0, 0, 0, 0, 0, 10.0, 0, 0])  # head 0 wins x = 3e1, head 1 wins -3e1
    model = MultiHypothesis(heads, hypotheses=3, steps=2, update=GradientStep(0.1))
    loss = MultiHypothesisLoss(IterateSumLoss(RegressionLoss()), loser_weight=loser_weight)
    loss(model(x, objective), x, objective, x).mean().backward()
    grad = heads.value.grad.reshape(3, 4).abs().sum(dim=1)
    assert bool((grad[:2] > 0).all())
    assert bool(grad[2] > 0) == (loser_weight > 0)
    assert model.refine.update.raw_lr.grad is not None


def test_under_the_sphere_recipes_loss_every_head_of_a_fresh_model_gets_gradients() -> None:
    """Pure winner-takes-all (the recipe's loser_weight 0) trains a head only where it wins: on a batch of sphere
    contexts, every head of a freshly initialised model wins some, so every head learns from the first step."""
    objective_case = case("sphere")
    x = contexts(objective_case, 256)
    objective = SphereObjective(grid_points=1024, starts=2)
    torch.manual_seed(0)
    net = MLP(16, 12, hidden=[128, 128])
    model = MultiHypothesis(net, hypotheses=4, steps=5, update=GradientStep(0.5))
    loss = MultiHypothesisLoss(IterateSumLoss(RegressionLoss()))
    loss(model(x, objective), x, objective, objective.solve(x)).mean().backward()
    grad = net.layers[-1].weight.grad.reshape(4, 3, -1).abs().sum(dim=(1, 2))
    assert bool((grad > 0).all())


def test_the_loss_is_the_kept_candidates_plus_the_weighted_mean_of_the_others() -> None:
    objective, x = Quadratic(), torch.zeros(1, 4)
    model = MultiHypothesis(constants([3.0, 0, 0, 0, 1.0, 0, 0, 0, 2.0, 0, 0, 0]), hypotheses=3, steps=0)
    out = model(x, objective)
    loss = MultiHypothesisLoss(ObjectiveLoss(), loser_weight=0.1)(out, x, objective)
    curvature = float(objective.a[0, 0])  # f = ½ dᵀ A d with d = (t, 0, 0, 0): ½ A₀₀ t²
    torch.testing.assert_close(loss, torch.tensor([curvature * (0.5 + 0.1 * (4.5 + 2.0) / 2)]))


@pytest.mark.parametrize("winner", ["prediction", "lowest_loss"])
def test_the_winner_is_the_kept_candidate_or_the_one_of_lowest_loss(winner: str) -> None:
    """f is lowest at x = 0, so the kept candidate is the one at 1·e₁; the reference 3·e₁ is nearest the one at
    3·e₁. Squared distances to it: 0 (at 3·e₁), 4 (at 1·e₁), 1 (at 2·e₁)."""
    objective, x = Quadratic(), torch.zeros(1, 4)
    model = MultiHypothesis(constants([3.0, 0, 0, 0, 1.0, 0, 0, 0, 2.0, 0, 0, 0]), hypotheses=3, steps=0)
    y_star = torch.tensor([[3.0, 0, 0, 0]])
    loss = MultiHypothesisLoss(RegressionLoss(), loser_weight=0.1, winner=winner)
    expected = {"prediction": 4.0 + 0.1 * (0.0 + 1.0) / 2, "lowest_loss": 0.0 + 0.1 * (4.0 + 1.0) / 2}[winner]
    torch.testing.assert_close(loss(model(x, objective), x, objective, y_star), torch.tensor([expected]))


def test_the_loss_needs_candidates_and_a_valid_weight() -> None:
    objective, x = Quadratic(), torch.zeros(2, 4)
    output = SemiAmortized(LearnedConstant(4), steps=1)(x, objective)
    with pytest.raises(ValueError, match="needs the candidates of a MultiHypothesis"):
        MultiHypothesisLoss(ObjectiveLoss())(output, x, objective)
    with pytest.raises(ValueError, match="loser_weight must be >= 0"):
        MultiHypothesisLoss(ObjectiveLoss(), loser_weight=-1.0)
    with pytest.raises(ValueError, match="winner must be one of"):
        MultiHypothesisLoss(ObjectiveLoss(), winner="closest")
    assert MultiHypothesisLoss(RegressionLoss()).needs_target


def test_bad_arguments_and_network_outputs_are_explained() -> None:
    with pytest.raises(ValueError, match="hypotheses must be a positive integer"):
        MultiHypothesis(LearnedConstant(3), hypotheses=0)
    with pytest.raises(ValueError, match=r"set its output size \(e.g. MLP out_features\) to 12"):
        MultiHypothesis(LearnedConstant(4), hypotheses=3)(torch.zeros(2, 4), Quadratic())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_evaluation_modes_give_the_training_mode_prediction_without_a_graph(mode: str) -> None:
    objective_case = case("sphere")
    objective, x = objective_case.make(), contexts(objective_case, 8)
    torch.manual_seed(0)
    model = MultiHypothesis(MLP(16, 9, hidden=[16]), hypotheses=3, steps=2, update=GradientStep(0.3))
    expected = model(x, objective).y.detach()
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        out = model(x, objective)
    assert not out.y.requires_grad
    torch.testing.assert_close(out.y, expected)


def test_exports_with_a_dynamic_batch(tmp_path) -> None:
    from datamodules import SphereContexts

    torch.manual_seed(0)
    amortizer = MultiHypothesis(MLP(16, 9, hidden=[16]), hypotheses=3, steps=2, update=GradientStep(0.5))
    module = AmortizedModule(SphereObjective(grid_points=64, starts=1), amortizer).eval()
    x = SphereContexts().fixed_set("test", 64, with_targets=False)["x"]
    path = export_torchscript(module, tmp_path / "multi.pt", x[:8])
    assert check_export(path, module, x, atol=1e-5, batch_sizes=(1, 5, 64)) <= 1e-5


def double_well_correct_share(hypotheses: int) -> float:
    """Train k context-blind initial points (learned constants) + 3 gradient steps on the tilted double well with the
    winner-takes-all objective loss, losers weighted 0.05 (with 0, the constant that loses every context at the
    start never moves); the share of held-out contexts whose prediction lies in the deeper well."""
    torch.manual_seed(0)
    objective = TiltedDoubleWell()
    model = MultiHypothesis(LearnedConstant(hypotheses, init_scale=0.3), hypotheses=hypotheses, steps=3,
                            update=GradientStep(0.1, learnable=False))
    loss = MultiHypothesisLoss(ObjectiveLoss(), loser_weight=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = torch.randint(0, 2, (64, 1), generator=generator).float() * 2 - 1
        optimizer.zero_grad()
        loss(model(x, objective), x, objective).mean().backward()
        optimizer.step()
    x = torch.tensor([[1.0], [-1.0]]).repeat(50, 1)
    with torch.no_grad():
        y = model(x, objective).y
    return float((torch.sign(y[:, 0]) == -x[:, 0]).float().mean())


def test_two_hypotheses_find_both_wells_where_one_cannot() -> None:
    """The initial points see no context, so one of them can serve only one well: half the contexts end in the
    shallower one. Two spread over both wells and the lowest f picks the deeper one for every context."""
    assert double_well_correct_share(1) == 0.5
    assert double_well_correct_share(2) == 1.0
