"""Training losses against hand computations."""

from __future__ import annotations

import pytest
import torch

from lightning_amor.amortizers import AmortizedOutput
from lightning_amor.losses import IterateSumLoss, ObjectiveLoss, RegressionLoss
from tests.objectives import Quadratic, case, contexts


def three_iterates() -> AmortizedOutput:
    """Iterates y^t = (t + 1) · [[1], [2]] (B = 2, n = 1): squared norms [1, 4, 9] and [4, 16, 36]."""
    iterates = [(t + 1.0) * torch.tensor([[1.0], [2.0]], dtype=torch.float64) for t in range(3)]
    return AmortizedOutput(y=iterates[-1], iterates=iterates)


def regression(loss: torch.nn.Module, output: AmortizedOutput) -> torch.Tensor:
    zeros = torch.zeros_like(output.y)
    return loss(output, zeros, Quadratic(), y_star=zeros)


def test_objective_loss_is_the_objective_at_the_prediction() -> None:
    objective = Quadratic()
    x = contexts(case("quadratic"), 3)
    y = torch.randn(3, 4)
    a = objective.a
    expected = torch.stack([0.5 * (y[b] - x[b]) @ a @ (y[b] - x[b]) for b in range(3)])
    output = AmortizedOutput(y=y, iterates=[torch.zeros(3, 4), y])
    loss = ObjectiveLoss()(output, x, objective)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, expected)
    assert not ObjectiveLoss.needs_target


def test_regression_loss_is_the_squared_distance() -> None:
    y = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y_star = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    loss = RegressionLoss()(AmortizedOutput(y=y, iterates=[y]), torch.zeros(2, 1), Quadratic(), y_star)
    torch.testing.assert_close(loss, torch.tensor([5.0, 25.0]))
    assert RegressionLoss.needs_target


def test_regression_loss_needs_reference_solutions() -> None:
    y = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="RegressionLoss needs reference solutions y\\* .*'y_star'"):
        RegressionLoss()(AmortizedOutput(y=y, iterates=[y]), torch.zeros(2, 1), Quadratic())


@pytest.mark.parametrize(
    ("weights", "skip_initial", "expected"),
    [
        ("uniform", False, [14 / 3, 56 / 3]),
        ("linear", False, [(1 + 2 * 4 + 3 * 9) / 6, (4 + 2 * 16 + 3 * 36) / 6]),
        ("last", False, [9.0, 36.0]),
        ([2.0, 0.0, 1.0], False, [(2 + 9) / 3, (8 + 36) / 3]),
        ("uniform", True, [13 / 2, 52 / 2]),
        ("linear", True, [(4 + 2 * 9) / 3, (16 + 2 * 36) / 3]),
        ([1.0, 3.0], True, [(4 + 27) / 4, (16 + 108) / 4]),
    ],
)
def test_iterate_sum_loss_weights(weights: object, skip_initial: bool, expected: list[float]) -> None:
    loss = regression(IterateSumLoss(RegressionLoss(), weights, skip_initial), three_iterates())
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_iterate_sum_loss_sends_gradients_to_weighted_iterates_only() -> None:
    output = three_iterates()
    for y in output.iterates:
        y.requires_grad_()
    regression(IterateSumLoss(RegressionLoss(), "last"), output).sum().backward()
    assert output.iterates[0].grad is None or not output.iterates[0].grad.any()
    torch.testing.assert_close(output.iterates[2].grad, 2 * output.iterates[2].detach())


def test_iterate_sum_loss_inherits_the_need_for_targets() -> None:
    assert IterateSumLoss(RegressionLoss()).needs_target
    assert not IterateSumLoss(ObjectiveLoss()).needs_target


def test_iterate_sum_loss_with_the_objective() -> None:
    objective = Quadratic()
    x = contexts(case("quadratic"), 3)
    iterates = [torch.randn(3, 4) for _ in range(2)]
    loss = IterateSumLoss(ObjectiveLoss(), "uniform")(AmortizedOutput(iterates[-1], iterates), x, objective)
    torch.testing.assert_close(loss, 0.5 * (objective(iterates[0], x) + objective(iterates[1], x)))


@pytest.mark.parametrize(
    ("weights", "skip_initial", "message"),
    [
        ([1.0, 1.0], False, "2 weights were given but the model produced 3 iterates"),
        ([1.0, 1.0, 1.0, 1.0], False, "4 weights were given but the model produced 3 iterates"),
        ([1.0, 1.0, 1.0], True, "3 weights were given but the model produced 2 iterates .*without the initial one"),
    ],
)
def test_iterate_sum_loss_wrong_number_of_weights(weights: list[float], skip_initial: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        regression(IterateSumLoss(RegressionLoss(), weights, skip_initial), three_iterates())


@pytest.mark.parametrize("weights", ["exponential", [0.0, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, float("nan"), 1.0]])
def test_iterate_sum_loss_rejects_bad_weights(weights: object) -> None:
    with pytest.raises(ValueError, match="IterateSumLoss: .*weights"):
        IterateSumLoss(RegressionLoss(), weights)


def test_iterate_sum_loss_without_iterates() -> None:
    y = torch.zeros(2, 1)
    output = AmortizedOutput(y=y, iterates=[y])
    with pytest.raises(ValueError, match="no iterates"):
        regression(IterateSumLoss(RegressionLoss(), skip_initial=True), output)
