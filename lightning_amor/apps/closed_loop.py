"""Controllers in the real gymnasium Pendulum-v1 environment: receding-horizon episodes, returns, timings and
TensorBoard trajectories.

A controller maps a batch of ``N`` observations (``N x 3``, one per episode) to ``N x 1`` torques. Every control
step it plans from the current observation and only the first action is applied (receding horizon); the
environment then moves and the controller plans again. :func:`run_episodes` steps ``N`` environments in lockstep
(one per seed), so a controller plans for all of them in one batch, and records the return of every episode, its
angle and torque against time, and the wall time of every planning call.

Controllers here: :class:`AmortizedController` (a trained :class:`~lightning_amor.AmortizedModule`, fully or
semi-amortized: one forward pass per step) and :class:`SolverController` (a solver of the MPC problem per step:
gradient shooting with :class:`~lightning_amor.solvers.Adam` or the cross-entropy method
:class:`~lightning_amor.cem.CEM`, warm-started from the previous plan shifted by one step).

Bad input stops an episode with a :class:`ClosedLoopError` naming the control step: an observation that is not
finite, or a controller's action of the wrong shape or not finite.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_amor.figures import ValidationFigureCallback, log_figure, new_figure
from lightning_amor.module import AmortizedModule
from lightning_amor.objective import Context, Objective
from lightning_amor.solvers import Solver

ENV_ID = "Pendulum-v1"


class ClosedLoopError(ValueError):
    """An episode met bad input: a non-finite observation, or an action of the wrong shape or not finite."""


class Controller:
    """Maps ``N x 3`` observations (float32 tensor) to ``N x 1`` torques; :meth:`reset` starts new episodes."""

    name = "controller"

    def reset(self, num: int) -> None:
        """Forget any state (a previous plan) before ``num`` new episodes."""

    def __call__(self, obs: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(obs) -> N x 1 torques")


class AmortizedController(Controller):
    """The first action of a trained module's predicted sequence: ``max_torque · tanh(ŷ(x)_1)``.

    Args:
        module: an :class:`~lightning_amor.AmortizedModule` whose objective has ``actions`` (the MPC objective).
        name: the label in tables and TensorBoard.
    """

    def __init__(self, module: AmortizedModule, name: str = "amortized") -> None:
        if not hasattr(module.objective, "actions"):
            raise TypeError(f"AmortizedController needs an objective with actions(y) (a PendulumMPC), got "
                            f"{type(module.objective).__name__}")
        self.module = module
        self.name = name

    def __call__(self, obs: Tensor) -> Tensor:
        """``N x 1`` torques."""
        objective = self.module.objective
        with torch.no_grad():
            y = self.module(obs.to(self.module.device, next(self.module.parameters()).dtype))
            return objective.actions(y.reshape(y.shape[0], -1)[:, :1]).cpu()


class SolverController(Controller):
    """Model-predictive control with a solver: every step, solve the MPC problem from the observation and apply the
    first action. With ``warm_start`` the solver starts from the previous plan shifted by one step (its last
    action repeated), else from zero actions.

    Args:
        objective: the MPC objective (solutions ``B x H``, ``actions`` the torques).
        solver: gradient shooting (``Adam``), ``CEM``, or any :class:`~lightning_amor.solvers.Solver`.
        warm_start: start from the shifted previous plan.
        name: the label in tables and TensorBoard.
    """

    def __init__(self, objective: Objective, solver: Solver, warm_start: bool = True, name: str = "mpc") -> None:
        self.objective, self.solver, self.warm_start, self.name = objective, solver, warm_start, name
        self._plan: Optional[Tensor] = None

    def reset(self, num: int) -> None:
        self._plan = None

    def __call__(self, obs: Tensor) -> Tensor:
        """``N x 1`` torques."""
        init = None
        if self.warm_start and self._plan is not None and self._plan.shape[0] == obs.shape[0]:
            init = torch.cat([self._plan[:, 1:], self._plan[:, -1:]], dim=1)
        plan = self.solver.solve(self.objective, obs, init).y
        self._plan = plan
        return self.objective.actions(plan[:, :1])


@dataclass
class EpisodeResult:
    """``N`` episodes of ``T`` steps.

    Attributes:
        returns: ``N`` sums of the environment's rewards.
        angles: ``N x T`` angles θ (wrapped to (−π, π], 0 upright) of the observations acted on.
        torques: ``N x T`` torques applied (clipped to the environment's bounds, as it applies them).
        step_seconds: ``T`` wall times of the controller's call at each step (all ``N`` episodes planned at once).
        seeds: the ``N`` seeds of the environments' resets.
    """

    returns: np.ndarray
    angles: np.ndarray
    torques: np.ndarray
    step_seconds: np.ndarray
    seeds: list[int]

    @property
    def dt(self) -> float:
        """The environment's time step in seconds."""
        return 0.05


def make_env(seed: int) -> Any:
    """A fresh ``Pendulum-v1`` (gymnasium), not yet reset."""
    import gymnasium

    return gymnasium.make(ENV_ID)


def run_episodes(
    controller: Callable[[Tensor], Tensor],
    seeds: Sequence[int],
    steps: int = 200,
    env_factory: Callable[[int], Any] = make_env,
) -> EpisodeResult:
    """Run ``len(seeds)`` episodes of ``steps`` control steps in lockstep, one environment per seed.

    Args:
        controller: ``N x 3`` observations -> ``N x 1`` torques (a :class:`Controller`, or any callable).
        seeds: the reset seed of every episode's environment.
        steps: control steps per episode (Pendulum-v1 truncates at 200).
        env_factory: ``seed -> env`` (default: ``gymnasium.make("Pendulum-v1")``).

    Raises:
        ClosedLoopError: at control step t, an observation is not finite, or the controller returned torques that
            are not ``N x 1`` or not finite; the message names the step, the episode and its seed.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run_episodes: give at least one seed (one episode per seed)")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"run_episodes: steps must be a positive integer, got {steps}")
    num = len(seeds)
    envs = [env_factory(seed) for seed in seeds]
    if isinstance(controller, Controller):
        controller.reset(num)
    name = getattr(controller, "name", type(controller).__name__)
    try:
        obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds, strict=True)])
        low = np.stack([env.action_space.low for env in envs])
        high = np.stack([env.action_space.high for env in envs])
        returns = np.zeros(num)
        angles, torques, times = np.zeros((num, steps)), np.zeros((num, steps)), np.zeros(steps)
        for t in range(steps):
            _check_observations(obs, t, seeds)
            start = time.perf_counter()
            action = controller(torch.as_tensor(obs, dtype=torch.float32))
            times[t] = time.perf_counter() - start
            action = _check_actions(action, t, num, name)
            applied = np.clip(action, low, high)
            angles[:, t] = np.arctan2(obs[:, 1], obs[:, 0])
            torques[:, t] = applied[:, 0]
            next_obs = []
            for i, env in enumerate(envs):
                o, reward, _, _, _ = env.step(applied[i].astype(np.float32))
                returns[i] += float(reward)
                next_obs.append(o)
            obs = np.stack(next_obs)
    finally:
        for env in envs:
            env.close()
    return EpisodeResult(returns, angles, torques, times, seeds)


def _check_observations(obs: np.ndarray, t: int, seeds: list[int]) -> None:
    bad = ~np.isfinite(obs).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ClosedLoopError(
            f"closed loop, control step {t}: the environment returned a non-finite observation {obs[i].tolist()} "
            f"in episode {i} (seed {seeds[i]}); {int(bad.sum())} of {len(seeds)} episodes are affected. Check the "
            f"environment and its wrappers: a controller cannot plan from NaN or infinite states"
        )


def _check_actions(action: Any, t: int, num: int, name: str) -> np.ndarray:
    array = action.detach().cpu().numpy() if isinstance(action, Tensor) else np.asarray(action)
    if array.shape != (num, 1):
        raise ClosedLoopError(
            f"closed loop, control step {t}: the controller {name!r} returned actions of shape {array.shape}, "
            f"expected ({num}, 1): one torque per episode for the {num} observations it was given"
        )
    if not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array).all(axis=1)).tolist()
        raise ClosedLoopError(
            f"closed loop, control step {t}: the controller {name!r} returned non-finite torques for episodes "
            f"{rows[:10]}; the environment cannot apply NaN or infinite actions"
        )
    return array.astype(np.float64)


def trajectory_figure(results: dict[str, EpisodeResult]) -> Any:
    """Angle and torque against time for every controller's episodes (one column per controller)."""
    figure = new_figure(4.0 * len(results), 5.0)
    axes = figure.subplots(2, len(results), squeeze=False, sharex=True)
    for column, (label, result) in enumerate(results.items()):
        time_axis = np.arange(result.angles.shape[1]) * result.dt
        for i in range(result.angles.shape[0]):
            axes[0, column].plot(time_axis, result.angles[i], lw=1)
            axes[1, column].plot(time_axis, result.torques[i], lw=1)
        mean, std = float(result.returns.mean()), float(result.returns.std())
        axes[0, column].set_title(f"{label}: return {mean:.0f} ± {std:.0f}", fontsize=9)
        axes[0, column].axhline(0.0, color="k", lw=0.5)
        axes[0, column].set_ylim(-math.pi - 0.2, math.pi + 0.2)
        axes[1, column].set_ylim(-2.2, 2.2)
        axes[1, column].set_xlabel("time (s)")
    axes[0, 0].set_ylabel("angle θ (rad, 0 upright)")
    axes[1, 0].set_ylabel("torque (N m)")
    return figure


def log_episodes(experiment: Any, label: str, result: EpisodeResult, step: int = 0,
                 trajectories: bool = True) -> None:
    """Log episodes to a TensorBoard ``SummaryWriter``: ``closed_loop/<label>/return`` (the mean return) and
    ``.../return_std`` at ``step``; with ``trajectories``, the first episode's ``angle`` and ``torque`` against the
    control step, and the figure ``closed_loop/<label>/trajectories`` (every episode)."""
    experiment.add_scalar(f"closed_loop/{label}/return", float(result.returns.mean()), step)
    experiment.add_scalar(f"closed_loop/{label}/return_std", float(result.returns.std()), step)
    experiment.add_scalar(f"closed_loop/{label}/ms_per_step", 1000.0 * float(np.median(result.step_seconds)), step)
    if trajectories:
        for t in range(result.angles.shape[1]):
            experiment.add_scalar(f"closed_loop/{label}/angle", float(result.angles[0, t]), t)
            experiment.add_scalar(f"closed_loop/{label}/torque", float(result.torques[0, t]), t)
        log_figure(experiment, f"closed_loop/{label}/trajectories", trajectory_figure({label: result}), step)


class ClosedLoopEpisodes(ValidationFigureCallback):
    """A callback: at every ``every_n_validations``-th validation, run the module as a controller in the real
    Pendulum-v1 for ``len(seeds)`` episodes and log to TensorBoard the mean return (``closed_loop/return``, against
    the training step) and the figure of angle and torque against time (``closed_loop/trajectories``).

    Args:
        seeds: the reset seeds of the episodes.
        steps: control steps per episode (the environment's 200 by default).
        every_n_validations: run at the 1st, (N+1)-th, ... validation (counting those from ``start_step`` on).
        start_step: skip the validations before this training step: an untrained policy's episodes say little,
            and a semi-amortized policy's cost seconds (K gradient steps per control step).
        prefix: the tag prefix.
    """

    def __init__(self, seeds: Sequence[int] = (0, 1, 2), steps: int = 200, every_n_validations: int = 1,
                 start_step: int = 0, prefix: str = "closed_loop") -> None:
        super().__init__(every_n_validations=every_n_validations, num_contexts=1, prefix=prefix)
        if not seeds or int(steps) != steps or steps < 1:
            raise ValueError(f"ClosedLoopEpisodes: give at least one seed and a positive number of steps, got "
                             f"seeds={list(seeds)}, steps={steps}")
        if int(start_step) != start_step or start_step < 0:
            raise ValueError(f"ClosedLoopEpisodes: start_step must be a non-negative integer, got {start_step}")
        self.seeds, self.steps, self.start_step = [int(s) for s in seeds], int(steps), int(start_step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step < self.start_step:
            self._batch = None
            return
        super().on_validation_epoch_end(trainer, pl_module)

    def draw(self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
             y_star: Optional[Tensor]) -> None:
        """Run the episodes and log their return and trajectories."""
        result = run_episodes(AmortizedController(pl_module), self.seeds, self.steps)
        step = trainer.global_step
        experiment.add_scalar(self.tag("return"), float(result.returns.mean()), step)
        experiment.add_scalar(self.tag("ms_per_step"), 1000.0 * float(np.median(result.step_seconds)), step)
        log_figure(experiment, self.tag("trajectories"), trajectory_figure({"policy": result}), step)
