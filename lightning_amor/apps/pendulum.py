"""Gymnasium's Pendulum-v1 in torch: batched, differentiable dynamics and cost.

The equations are those of ``gymnasium.envs.classic_control.pendulum.PendulumEnv`` (gymnasium 1.x), for a state
(θ, θ̇) with θ = 0 upright and a torque u:

    u      ← clip(u, −max_torque, max_torque)
    cost   = normalise(θ)² + 0.1 θ̇² + 0.001 u²          (normalise(θ) = ((θ + π) mod 2π) − π, in [−π, π))
    θ̇'     = clip(θ̇ + (3g / (2l) sin θ + 3 / (m l²) u) dt, −max_speed, max_speed)
    θ'     = θ + θ̇' dt

with g = 10, m = l = 1, dt = 0.05, max_speed = 8, max_torque = 2; the cost is charged on the state *before* the
step, and the environment's reward is −cost. Observations are (cos θ, sin θ, θ̇). The clips are the environment's
own: a torque beyond the bound acts as the bound and has no gradient, and so does a speed at its limit.

Everything here works on ``B``-batched tensors of any floating dtype, so gradients flow through whole rollouts
(:meth:`PendulumDynamics.rollout`), which is what the MPC objective (:mod:`lightning_amor.apps.mpc`) descends.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def angle_normalize(theta: Tensor) -> Tensor:
    """θ wrapped to [−π, π): ``((θ + π) mod 2π) − π``, elementwise (gradient 1 almost everywhere)."""
    return torch.remainder(theta + math.pi, 2.0 * math.pi) - math.pi


def observation_to_state(obs: Tensor) -> Tensor:
    """Observations ``B x 3`` (cos θ, sin θ, θ̇) to states ``B x 2`` (θ in (−π, π], θ̇).

    Raises:
        ValueError: ``obs`` is not ``B x 3``.
    """
    if obs.dim() != 2 or obs.shape[1] != 3:
        raise ValueError(f"a pendulum observation batch must have shape (B, 3) = (cos θ, sin θ, θ̇), got "
                         f"{tuple(obs.shape)}")
    return torch.stack([torch.atan2(obs[:, 1], obs[:, 0]), obs[:, 2]], dim=1)


def state_to_observation(state: Tensor) -> Tensor:
    """States ``B x 2`` (θ, θ̇) to observations ``B x 3`` (cos θ, sin θ, θ̇)."""
    if state.dim() != 2 or state.shape[1] != 2:
        raise ValueError(f"a pendulum state batch must have shape (B, 2) = (θ, θ̇), got {tuple(state.shape)}")
    theta, speed = state[:, 0], state[:, 1]
    return torch.stack([torch.cos(theta), torch.sin(theta), speed], dim=1)


class PendulumDynamics(nn.Module):
    """Pendulum-v1's dynamics and cost on batches of states (a module without parameters; its constants are
    settings, so it moves with any device and dtype).

    Args:
        g: gravity (the environment's ``g``, 10 by default).
        mass: m.
        length: l.
        dt: the time step.
        max_speed: the bound of |θ̇|.
        max_torque: the bound of |u|.
    """

    def __init__(self, g: float = 10.0, mass: float = 1.0, length: float = 1.0, dt: float = 0.05,
                 max_speed: float = 8.0, max_torque: float = 2.0) -> None:
        super().__init__()
        for name, value in (("mass", mass), ("length", length), ("dt", dt), ("max_speed", max_speed),
                            ("max_torque", max_torque)):
            if not value > 0:
                raise ValueError(f"PendulumDynamics: {name} must be positive, got {value}")
        self.g, self.mass, self.length, self.dt = float(g), float(mass), float(length), float(dt)
        self.max_speed, self.max_torque = float(max_speed), float(max_torque)

    def extra_repr(self) -> str:
        return (f"g={self.g}, mass={self.mass}, length={self.length}, dt={self.dt}, max_speed={self.max_speed}, "
                f"max_torque={self.max_torque}")

    def cost(self, state: Tensor, u: Tensor) -> Tensor:
        """The environment's cost (−reward) of applying torques ``u`` (``B``) in states ``B x 2``: ``B``."""
        u = u.clamp(-self.max_torque, self.max_torque)
        theta, speed = state[:, 0], state[:, 1]
        return angle_normalize(theta) ** 2 + 0.1 * speed**2 + 0.001 * u**2

    def state_cost(self, state: Tensor) -> Tensor:
        """The cost of states ``B x 2`` at zero torque (a terminal cost): ``B``."""
        return angle_normalize(state[:, 0]) ** 2 + 0.1 * state[:, 1] ** 2

    def step(self, state: Tensor, u: Tensor) -> Tensor:
        """The next states ``B x 2`` after torques ``u`` (``B``) from states ``B x 2``."""
        u = u.clamp(-self.max_torque, self.max_torque)
        theta, speed = state[:, 0], state[:, 1]
        accel = 3.0 * self.g / (2.0 * self.length) * torch.sin(theta) + 3.0 / (self.mass * self.length**2) * u
        speed = (speed + accel * self.dt).clamp(-self.max_speed, self.max_speed)
        return torch.stack([theta + speed * self.dt, speed], dim=1)

    def rollout(self, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Apply a sequence of torques ``B x H`` from states ``B x 2``.

        Returns:
            ``(states, costs)``: the visited states ``B x (H+1) x 2`` (the start first) and the cost of every step
            ``B x H`` (charged on the state before it, as the environment).
        """
        if actions.dim() != 2 or actions.shape[0] != state.shape[0]:
            raise ValueError(f"PendulumDynamics.rollout: actions must be (B, H) with B = {state.shape[0]}, got "
                             f"{tuple(actions.shape)}")
        # θ and θ̇ kept apart inside the loop (no stack per step): the rollout is a chain of small kernels whose
        # launch overhead, not arithmetic, sets its time on a CPU.
        torques = actions.clamp(-self.max_torque, self.max_torque)
        theta, speed = state[:, 0], state[:, 1]
        gain, drive = 3.0 * self.g / (2.0 * self.length), 3.0 / (self.mass * self.length**2)
        thetas, speeds, costs = [theta], [speed], []
        for t in range(actions.shape[1]):
            u = torques[:, t]
            costs.append(angle_normalize(theta) ** 2 + 0.1 * speed**2 + 0.001 * u**2)
            speed = (speed + (gain * torch.sin(theta) + drive * u) * self.dt).clamp(-self.max_speed, self.max_speed)
            theta = theta + speed * self.dt
            thetas.append(theta)
            speeds.append(speed)
        states = torch.stack([torch.stack(thetas, dim=1), torch.stack(speeds, dim=1)], dim=2)
        return states, torch.stack(costs, dim=1)
