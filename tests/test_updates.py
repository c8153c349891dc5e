"""Inner update rules: gradient steps, Adam steps and learned updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_amor.updates import AdamStep, GradientStep, InnerUpdate, LearnedUpdate
from tests.objectives import spd_matrix


def _batch(seed: int = 0, shape: tuple[int, int] = (3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_gradient_step_is_gradient_descent() -> None:
    y, grad = _batch()
    update = GradientStep(lr=0.3)
    y_new, state = update(y, grad, None, 0)
    torch.testing.assert_close(update.lr, torch.tensor(0.3))
    torch.testing.assert_close(y_new, y - 0.3 * grad)
    assert state is None


def test_gradient_step_size_is_learnable_and_positive() -> None:
    update = GradientStep(lr=0.3)
    assert [name for name, _ in update.named_parameters()] == ["raw_lr"]
    y, grad = _batch()
    y_new, _ = update(y, grad, None, 0)
    y_new.sum().backward()
    torch.testing.assert_close(update.raw_lr.grad, -grad.sum() * torch.sigmoid(update.raw_lr.detach()))
    with torch.no_grad():
        update.raw_lr.fill_(-60.0)
    assert update.lr.item() > 0
    with torch.no_grad():
        update.raw_lr.fill_(60.0)
    torch.testing.assert_close(update.lr, torch.tensor(60.0))


def test_fixed_gradient_step_has_no_parameters() -> None:
    update = GradientStep(lr=0.2, learnable=False)
    assert list(update.parameters()) == []
    assert "raw_lr" in dict(update.named_buffers())
    torch.testing.assert_close(update.lr, torch.tensor(0.2))


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_gradient_step_rejects_a_non_positive_step_size(lr: float) -> None:
    with pytest.raises(ValueError, match="lr must be positive"):
        GradientStep(lr=lr)


def test_updates_follow_the_dtype_of_the_iterate() -> None:
    """Step sizes are cast to the iterate's dtype; a learned update's network follows the module's dtype."""
    y, grad = (t.double() for t in _batch())
    for update in (GradientStep(), AdamStep(), LearnedUpdate("gru", hidden=4).double()):
        state = update.init_state(y)
        y_new, _ = update(y, grad, state, 0)
        assert y_new.dtype == torch.float64, type(update).__name__


def test_adam_step_matches_torch_adam() -> None:
    """Five steps on a quadratic, against torch.optim.Adam on the same parameter."""
    a = spd_matrix(4)
    target = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    y0 = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.1, 0.2, -0.3, 0.4]], dtype=torch.float64)

    def grad_of(y: torch.Tensor) -> torch.Tensor:
        return (y - target) @ a

    update = AdamStep(lr=0.05, betas=(0.8, 0.99), eps=1e-8).double()
    reference = y0.clone().requires_grad_()
    optimizer = torch.optim.Adam([reference], lr=update.gradient.lr.item(), betas=(0.8, 0.99), eps=1e-8)
    y, state = y0, update.init_state(y0)
    for t in range(5):
        y, state = update(y, grad_of(y), state, t)
        optimizer.zero_grad()
        reference.grad = grad_of(reference.detach())
        optimizer.step()
        torch.testing.assert_close(y, reference.detach(), rtol=0, atol=1e-10)
    m, v = state
    assert m.shape == v.shape == y0.shape


def test_adam_state_starts_at_zero() -> None:
    y, _ = _batch()
    m, v = AdamStep().init_state(y)
    assert m.shape == v.shape == y.shape
    assert not m.any() and not v.any()


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_learned_update_starts_as_gradient_descent(kind: str) -> None:
    y, grad = _batch()
    update = LearnedUpdate(kind, hidden=8, lr=0.2)
    state = update.init_state(y)
    for t in range(3):
        y_new, state = update(y, grad, state, t)
        torch.testing.assert_close(y_new, y - update.gradient.lr * grad)
    # Once the head has learned something, the rule departs from gradient descent.
    with torch.no_grad():
        update.head.bias.fill_(1.0)
    y_new, _ = update(y, grad, update.init_state(y), 0)
    torch.testing.assert_close(y_new, y - (update.gradient.lr + update.scale) * grad)


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_learned_update_keeps_stationary_points_fixed(kind: str) -> None:
    """A learned step size, not an additive correction: where the gradient vanishes, the iterate stays."""
    torch.manual_seed(0)
    update = LearnedUpdate(kind, hidden=8)
    torch.nn.init.normal_(update.head.weight)
    torch.nn.init.normal_(update.head.bias)
    y = torch.randn(3, 4)
    y_new, _ = update(y, torch.zeros_like(y), update.init_state(y), 0)
    torch.testing.assert_close(y_new, y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_learned_update_is_coordinatewise(kind: str) -> None:
    """The network is shared by all coordinates: updating a B x n batch equals updating B*n scalars."""
    torch.manual_seed(0)
    update = LearnedUpdate(kind, hidden=8)
    torch.nn.init.normal_(update.head.weight)
    y, grad = _batch(shape=(3, 4))
    flat_y, flat_grad = y.reshape(-1, 1), grad.reshape(-1, 1)
    state, flat_state = update.init_state(y), update.init_state(flat_y)
    for t in range(2):
        y, state = update(y, grad, state, t)
        flat_y, flat_state = update(flat_y, flat_grad, flat_state, t)
        torch.testing.assert_close(y.reshape(-1, 1), flat_y)


def test_gru_state_has_one_row_per_coordinate() -> None:
    y, grad = _batch(shape=(3, 4))
    update = LearnedUpdate("gru", hidden=5)
    state = update.init_state(y)
    assert state.shape == (12, 5) and not state.any()
    _, state = update(y, grad, state, 0)
    assert state.shape == (12, 5) and state.abs().sum() > 0
    assert LearnedUpdate("mlp").init_state(y) is None


def test_learned_update_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be 'mlp' or 'gru', got 'lstm'"):
        LearnedUpdate("lstm")


def test_base_update_must_be_implemented() -> None:
    y, grad = _batch()
    assert InnerUpdate().init_state(y) is None
    with pytest.raises(NotImplementedError):
        InnerUpdate()(y, grad, None, 0)


def test_softplus_parametrisation_round_trips() -> None:
    for lr in (1e-4, 0.05, 1.0, 10.0):
        torch.testing.assert_close(GradientStep(lr).lr, F.softplus(torch.tensor(GradientStep(lr).raw_lr.item())))
        torch.testing.assert_close(GradientStep(lr).lr, torch.tensor(lr))
