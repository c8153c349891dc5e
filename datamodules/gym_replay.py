"""Transitions of a gymnasium environment, stepped by the actor being trained and replayed from a buffer.

:class:`GymReplayStream` is a :class:`~datamodules.stream.ContextStream`: before every training batch it steps the
environment once (uniformly random actions for the first ``learning_starts`` steps, then actions sampled from
the current actor), adds the transition to a :class:`~datamodules.replay.ReplayBuffer` and samples the batch
from the buffer. Its state (the buffer, the step and episode counters, its generator, the current observation
and the environment's physical state) goes into every checkpoint, so a run killed and resumed continues the
same buffer and the same episode. :class:`GymReplayData` is the data module: training batches from the stream,
validation and test sets of random-action transitions from seeded resets.

Transitions are dicts (:data:`lightning_amor.apps.actor_critic.TRANSITION_KEYS`): ``obs`` and ``next_obs``
``B x d``, ``action`` ``B x m`` in [−1, 1] (the environment receives it times the action bound), ``reward`` and
``terminated`` ``B``. A time limit ends an episode without being terminal (the TD target bootstraps through it).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from pytorch_lightning import LightningModule
from torch import Tensor

from datamodules.context import ContextDataModule, seeded_generator
from datamodules.replay import ReplayBuffer
from datamodules.stream import ContextStream
from lightning_amor.objective import Context


class EnvironmentStepError(ValueError):
    """The environment or the actor produced something unusable at an environment step."""


def make_env(env_id: str) -> Any:
    """The gymnasium environment ``env_id`` without its wrappers (the stream keeps the time limit itself), and
    its episode length (the registered ``max_episode_steps``).

    Raises:
        EnvironmentStepError: the environment is unknown or its action space is not a box.
    """
    import gymnasium as gym

    try:
        env = gym.make(env_id)
    except gym.error.Error as error:
        raise EnvironmentStepError(f"gymnasium cannot make the environment {env_id!r}: {error}") from error
    if not isinstance(env.action_space, gym.spaces.Box):
        raise EnvironmentStepError(
            f"{env_id} has a {type(env.action_space).__name__} action space; an actor–critic over continuous actions "
            f"needs a Box"
        )
    limit = env.spec.max_episode_steps if env.spec is not None and env.spec.max_episode_steps else 1000
    return env.unwrapped, int(limit)


def checked_observation(obs: Any, env_id: str, step: int, where: str) -> Tensor:
    """An observation as a float32 tensor ``d``, refusing NaN or infinite numbers with the step it came from."""
    tensor = torch.as_tensor(np.asarray(obs), dtype=torch.float32).flatten()
    if not bool(torch.isfinite(tensor).all()):
        raise EnvironmentStepError(
            f"{env_id} returned a non-finite observation {tensor.tolist()} at {where} environment step {step}; the "
            f"environment diverged (check the actions it received, or its physics settings)"
        )
    return tensor


class GymReplayStream(ContextStream):
    """One environment step per training batch, into a replay buffer that the batch is sampled from.

    Args:
        env_id: the gymnasium environment (a Box action space).
        capacity: the replay buffer's size.
        learning_starts: environment steps with uniformly random actions before the first batch is sampled (the
            first batch also takes one step with the actor, so after batch k the environment has taken
            ``learning_starts + k + 1`` steps).
    """

    def __init__(self, env_id: str = "Pendulum-v1", capacity: int = 100_000, learning_starts: int = 100) -> None:
        if learning_starts < 0:
            raise ValueError(f"GymReplayStream: learning_starts must be >= 0, got {learning_starts}")
        self.env_id, self.learning_starts = env_id, learning_starts
        self.buffer = ReplayBuffer(capacity)
        self.env, self.max_episode_steps = make_env(env_id)
        self.action_dim = int(np.prod(self.env.action_space.shape))
        self.obs_dim = int(np.prod(self.env.observation_space.shape))
        self.high = torch.as_tensor(self.env.action_space.high, dtype=torch.float32).flatten()
        self.seconds = 0.0  # time spent stepping the environment and acting (for overhead measurements)

    def setup(self, seed: int, rank: int, world: int) -> None:
        """Empty the buffer, seed the generator from ``(seed, rank)`` and start the first episode."""
        self.seed, self.rank = seed, rank
        self.generator = seeded_generator(seed, rank, 17)
        self.buffer.reset(seed + rank)
        self.env_steps, self.episodes, self.episode_step, self.episode_return = 0, 0, 0, 0.0
        self.returns: list[float] = []  # the returns of the finished training episodes
        self._reset()

    def _reset(self) -> None:
        # Each episode's reset is seeded by its index, so the episodes are the same after a resume.
        obs, _ = self.env.reset(seed=int(seeded_generator(self.seed, self.rank, self.episodes).initial_seed() % 2**31))
        self.obs = checked_observation(obs, self.env_id, self.env_steps, "reset before")
        self.episode_step, self.episode_return = 0, 0.0

    def _action(self, module: Optional[LightningModule]) -> Tensor:
        """An action in [−1, 1]^m: uniform before ``learning_starts`` (or without a module), else the actor's."""
        if module is None or self.env_steps < self.learning_starts:
            return torch.rand(self.action_dim, generator=self.generator) * 2.0 - 1.0
        action = module.act(self.obs[None].to(module.device), deterministic=False, generator=self.generator)
        if not isinstance(action, Tensor) or action.numel() != self.action_dim:
            got = tuple(action.shape) if isinstance(action, Tensor) else type(action).__name__
            raise EnvironmentStepError(
                f"{type(module).__name__}.act returned an action of shape {got} at environment step {self.env_steps} "
                f"of {self.env_id}, whose actions have {self.action_dim} numbers (shape 1 x {self.action_dim}); fix "
                f"the actor's output size (action_dim)"
            )
        return action.detach().cpu().flatten().float()

    def step(self, module: Optional[LightningModule]) -> None:
        """Take one environment step and add its transition to the buffer (a new episode after the last step)."""
        action = self._action(module)
        if not bool(torch.isfinite(action).all()):
            raise EnvironmentStepError(
                f"the actor's action {action.tolist()} at environment step {self.env_steps} of {self.env_id} is not "
                f"finite; the actor diverged (lower its learning rate, or set nonfinite: raise to find where)"
            )
        obs, reward, terminated, truncated, _ = self.env.step((action.clamp(-1.0, 1.0) * self.high).numpy())
        next_obs = checked_observation(obs, self.env_id, self.env_steps, "")
        self.episode_step += 1
        self.buffer.add({
            "obs": self.obs[None], "action": action[None], "reward": torch.tensor([float(reward)]),
            "next_obs": next_obs[None], "terminated": torch.tensor([float(terminated)]),
        })
        self.env_steps += 1
        self.episode_return += float(reward)
        if terminated or truncated or self.episode_step >= self.max_episode_steps:
            self.returns.append(self.episode_return)
            self.episodes += 1
            self._reset()
        else:
            self.obs = next_obs

    def next_batch(self, batch_size: int, module: Optional[LightningModule]) -> Context:
        """Step the environment (up to ``learning_starts + 1`` steps on the first call, then one), then sample."""
        import time

        start = time.perf_counter()
        while self.env_steps < self.learning_starts:
            self.step(None)
        self.step(module)
        self.seconds += time.perf_counter() - start
        return self.buffer.sample(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The buffer, counters, generator, current observation and the environment's physical state."""
        physical = getattr(self.env, "state", None)
        return {
            "buffer": self.buffer.state_dict(), "generator": self.generator.get_state(), "env_steps": self.env_steps,
            "episodes": self.episodes, "episode_step": self.episode_step, "episode_return": self.episode_return,
            "returns": torch.tensor(self.returns, dtype=torch.float64), "obs": self.obs.clone(),
            "physical": None if physical is None else torch.as_tensor(np.array(physical, dtype=np.float64)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the environment continues its episode where the state was taken when it
        exposes its physical state (``env.unwrapped.state``, as the classic-control tasks), else starts the
        next episode."""
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.env_steps, self.episodes = int(state["env_steps"]), int(state["episodes"])
        self.returns = [float(r) for r in state["returns"]]
        self._reset()
        if state["physical"] is not None and hasattr(self.env, "state"):
            self.env.state = state["physical"].numpy().astype(np.asarray(self.env.state).dtype)
            self.obs = state["obs"].clone()
            self.episode_step, self.episode_return = int(state["episode_step"]), float(state["episode_return"])


class GymReplayData(ContextDataModule):
    """Transitions of a gymnasium environment: training batches replayed from a buffer that the current actor
    fills (:class:`GymReplayStream`), validation and test sets of transitions with random actions.

    The fixed sets are ``num`` transitions of random-action episodes (30 steps each, from resets seeded by the
    split's generator), so their states cover the reset distribution and its first swings; only their states
    matter to the objective.

    The other arguments (``**kwargs``) are :class:`~datamodules.context.ContextDataModule`'s (``num_workers``
    must be 0: the stream steps the environment in the training process).

    Args:
        env_id: the gymnasium environment.
        capacity: the replay buffer's size.
        learning_starts: random-action environment steps before the first batch.
    """

    EPISODE_STEPS = 30

    def __init__(
        self,
        env_id: str = "Pendulum-v1",
        capacity: int = 100_000,
        learning_starts: int = 100,
        batches_per_epoch: int = 1000,
        progress_bar: bool = False,
        **kwargs: Any,
    ) -> None:
        if "stream" in kwargs:
            raise TypeError("GymReplayData makes its own stream (a GymReplayStream of env_id); do not pass stream")
        super().__init__(batches_per_epoch=batches_per_epoch, progress_bar=progress_bar,
                         stream=GymReplayStream(env_id, capacity, learning_starts), **kwargs)
        self.env_id = env_id

    def sample(self, num: int, generator: torch.Generator) -> Context:
        """``num`` random-action transitions (a dict of ``num x ...`` tensors), drawn with ``generator``."""
        env, _ = make_env(self.env_id)
        stream = self.stream
        rows: dict[str, list[Tensor]] = {"obs": [], "action": [], "reward": [], "next_obs": [], "terminated": []}
        step = 0
        while step < num:
            obs, _ = env.reset(seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))
            obs_t = checked_observation(obs, self.env_id, step, "reset of a fixed-set")
            for _ in range(min(self.EPISODE_STEPS, num - step)):
                action = torch.rand(stream.action_dim, generator=generator) * 2.0 - 1.0
                next_obs, reward, terminated, _, _ = env.step((action * stream.high).numpy())
                next_t = checked_observation(next_obs, self.env_id, step, "fixed-set")
                for key, value in (("obs", obs_t), ("action", action), ("reward", torch.tensor(float(reward))),
                                   ("next_obs", next_t), ("terminated", torch.tensor(float(terminated)))):
                    rows[key].append(value)
                obs_t, step = next_t, step + 1
                if terminated:
                    break
        env.close()
        return {k: torch.stack(v) for k, v in rows.items()}
