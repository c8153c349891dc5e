"""p(x) of the pendulum MPC problem: observations of uniformly drawn pendulum states."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from datamodules.context import ContextDataModule
from lightning_amor.apps.pendulum import state_to_observation


class PendulumStates(ContextDataModule):
    """Contexts ``B x 3``: Pendulum-v1 observations (cos θ, sin θ, θ̇) of states with θ uniform in
    [−max_angle, max_angle] and θ̇ uniform in [−max_speed, max_speed] (default: every angle, every speed the
    environment allows).

    Args:
        max_angle: the bound of |θ| (at most π).
        max_speed: the bound of |θ̇| (the environment's 8 by default).
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments (``batch_size``, ``val_size``, ...).
    """

    def __init__(self, max_angle: float = math.pi, max_speed: float = 8.0, **kwargs) -> None:
        if not 0 < max_angle <= math.pi + 1e-12:
            raise ValueError(f"PendulumStates: max_angle must be in (0, π], got {max_angle}")
        if not max_speed >= 0:
            raise ValueError(f"PendulumStates: max_speed must be non-negative, got {max_speed}")
        super().__init__(**kwargs)
        self.max_angle = float(max_angle)
        self.max_speed = float(max_speed)

    def sample_states(self, num: int, generator: torch.Generator) -> Tensor:
        """``num x 2`` states (θ, θ̇)."""
        uniform = 2.0 * torch.rand(num, 2, generator=generator) - 1.0
        return uniform * torch.tensor([self.max_angle, self.max_speed])

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num x 3`` observations (cos θ, sin θ, θ̇)."""
        return state_to_observation(self.sample_states(num, generator))
