"""Model-based control (tutorial ch. 3, control; §4.3): amortized model-predictive control on Pendulum-v1.

From an observation x = (cos θ, sin θ, θ̇) of gymnasium's Pendulum-v1, the H-step MPC problem through the known,
differentiable dynamics (:class:`~lightning_amor.apps.pendulum.PendulumDynamics`) is

    u*_{1:H}(x) ∈ argmin_u  Σ_{t<H} c(x_t, u_t) + w · c_T(x_H),    x_0 = x,  x_{t+1} = p(x_t, u_t),

with c the environment's cost (−reward) and c_T the state part of it (a terminal cost of weight w). The
solution is an ``H x 1`` action sequence, declared as a structured solution (``solution_shape``). Torques are
bounded by a squashing: the solution holds unconstrained numbers y and the torques are u = max_torque · tanh(y)
(:meth:`PendulumMPC.actions`). The squashing is part of the objective, not its projection: the core's solvers and
inner steps re-project every iterate, so a projection must be idempotent, which 2·tanh is not; with the squashing
inside f every y is feasible, zero actions are y = 0 (Adam from zeros, as the reference), and every solver and
amortizer works unchanged.

Amortizers (any module ``B x 3 -> B x H`` in a :class:`~lightning_amor.FullyAmortized` or as the initial iterate
of a :class:`~lightning_amor.SemiAmortized`):

* an :class:`~lightning_amor.MLP` ``3 -> H``: the whole sequence from the state at once;
* :class:`FeedbackPolicy`: a state-feedback policy u_t = π(x_t) rolled out through the model, as the reference's
  SVG actor is (so it is also a policy for any state it visits, the closed loop's first action included).

Baselines: gradient shooting (:class:`~lightning_amor.solvers.Adam` from zero actions) and the cross-entropy method
(:class:`~lightning_amor.cem.CEM`). The objective has no oracle: the problem is not convex (a swing left or right)
and a solve good enough to be a reference costs seconds per batch, so validation measures the gap against a solver
run from each prediction (``AmortizedModule(refine=...)``), as the VAE does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_amor.apps.pendulum import PendulumDynamics, observation_to_state, state_to_observation
from lightning_amor.module import AmortizedModule, Evaluated
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective, ObjectiveShapeError


class PendulumMPC(Objective):
    """The H-step MPC cost of Pendulum-v1 over squashed action sequences.

    Solutions ``y`` are ``B x H`` (viewed as ``B x H x 1``) unconstrained numbers, torques u = max_torque·tanh(y);
    contexts are observations ``B x 3`` (cos θ, sin θ, θ̇); the value is ``B`` (the summed cost).

    Args:
        horizon: H, the number of actions.
        terminal_weight: w ≥ 0, the weight of the final state's cost.
        dynamics: the model (default: Pendulum-v1's own constants).
    """

    def __init__(self, horizon: int = 20, terminal_weight: float = 1.0,
                 dynamics: Optional[PendulumDynamics] = None) -> None:
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"PendulumMPC: horizon must be a positive integer, got {horizon}")
        if not terminal_weight >= 0:
            raise ValueError(f"PendulumMPC: terminal_weight must be non-negative, got {terminal_weight}")
        super().__init__()
        self.horizon = int(horizon)
        self.terminal_weight = float(terminal_weight)
        self.dynamics = dynamics if dynamics is not None else PendulumDynamics()
        self.set_structure((self.horizon, 1))

    def extra_repr(self) -> str:
        return f"horizon={self.horizon}, terminal_weight={self.terminal_weight}"

    @property
    def max_torque(self) -> float:
        """The torque bound of the dynamics."""
        return self.dynamics.max_torque

    def actions(self, y: Tensor) -> Tensor:
        """Torques max_torque·tanh(y), always inside the bounds: same shape as ``y`` (``B x H x 1`` or ``B x H``)."""
        return self.max_torque * torch.tanh(y)

    def raw(self, actions: Tensor) -> Tensor:
        """The solution numbers of torques strictly inside the bounds (the inverse of :meth:`actions`)."""
        limit = 1.0 - torch.finfo(actions.dtype).eps
        return torch.atanh((actions / self.max_torque).clamp(-limit, limit))

    def _states(self, x: Context) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ObjectiveShapeError(f"PendulumMPC: contexts must be observations of shape (B, 3) = "
                                      f"(cos θ, sin θ, θ̇), got {got}")
        return observation_to_state(x)

    def trajectory(self, y: Tensor, x: Context) -> tuple[Tensor, Tensor, Tensor]:
        """The rollout of solutions ``y`` (``B x H x 1`` or flat ``B x H``) from observations ``x`` (``B x 3``).

        Returns:
            ``(states, costs, torques)``: states ``B x (H+1) x 2``, step costs ``B x H``, torques ``B x H``.
        """
        torques = self.actions(y.reshape(y.shape[0], self.horizon))
        states, costs = self.dynamics.rollout(self._states(x).to(torques.dtype), torques)
        return states, costs, torques

    def value(self, y: Tensor, x: Context) -> Tensor:
        """The H-step cost plus the weighted terminal cost: ``B``."""
        states, costs, _ = self.trajectory(y, x)
        return costs.sum(-1) + self.terminal_weight * self.dynamics.state_cost(states[:, -1])

    def distance(self, y: Tensor, y_ref: Tensor) -> Tensor:
        """The Euclidean distance between the torque sequences (N m), not between the unsquashed numbers, which
        drift where tanh saturates without changing the plan: ``B``."""
        return (self.actions(self.flatten(y)) - self.actions(self.flatten(y_ref))).norm(dim=-1)

    def random_points(self, num: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``num x H`` random solutions whose torques are uniform in the bounds."""
        u = (2.0 * torch.rand(num, self.dim, generator=generator, dtype=like.dtype) - 1.0) * self.max_torque
        return self.raw(u).to(like.device)


class FeedbackPolicy(nn.Module):
    """A state-feedback policy rolled out through the model: ``B x 3`` observations -> ``B x H`` solutions.

    An MLP maps each visited observation x_t to one unconstrained number y_t (torque max_torque·tanh(y_t)); the
    dynamics give x_{t+1}. Differentiable through the whole rollout, so the objective loss trains it as a policy.

    Args:
        horizon: H (the MPC objective's).
        hidden: the MLP's hidden widths.
        activation: the MLP's activation.
        dynamics: the model rolled through (default: Pendulum-v1's).
    """

    def __init__(self, horizon: int = 20, hidden: tuple[int, ...] = (64, 64), activation: str = "relu",
                 dynamics: Optional[PendulumDynamics] = None) -> None:
        super().__init__()
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"FeedbackPolicy: horizon must be a positive integer, got {horizon}")
        self.horizon = int(horizon)
        self.net = MLP(3, 1, hidden=hidden, activation=activation)
        self.dynamics = dynamics if dynamics is not None else PendulumDynamics()

    def forward(self, x: Tensor) -> Tensor:
        """``B x 3`` observations -> ``B x H`` unconstrained solutions (torques max_torque·tanh of them)."""
        state = observation_to_state(x)
        out = []
        for _ in range(self.horizon):
            y = self.net(state_to_observation(state))[:, 0]
            out.append(y)
            state = self.dynamics.step(state, self.dynamics.max_torque * torch.tanh(y))
        return torch.stack(out, dim=1)


class MPCModule(AmortizedModule):
    """An :class:`~lightning_amor.AmortizedModule` for :class:`PendulumMPC` that also logs, on the validation and
    test sets, ``zero_action_objective`` (the cost of doing nothing, what the reference normalises to −1) and
    ``first_torque_abs`` (the mean |u_1|, the action a closed loop applies)."""

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """``{"zero_action_objective": B, "first_torque_abs": B}``."""
        objective = self.objective
        y = objective.flatten(evaluated.y)
        zero = objective(torch.zeros_like(y), evaluated.x)
        first = objective.actions(y[:, 0]).abs()
        return {"zero_action_objective": zero, "first_torque_abs": first}
