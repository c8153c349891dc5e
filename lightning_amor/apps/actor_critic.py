"""Model-free control (tutorial §3.4, §4.2): soft actor–critic, an actor that amortizes max_u Q(x, u).

For a state s, a critic Q_ψ(s, u) (two Q networks; their minimum, as SAC and TD3 do) and a temperature
α = exp(log α), the actor's problem is over the parameters λ = (μ, log σ) ∈ R^{2m} of a Gaussian whose samples
are squashed into the action box, u = tanh(μ + σ ⊙ ε) ∈ (−1, 1)^m (the environment's action is u times its
bound):

    f(λ; s) = E_ε [ α log π_λ(u) − min(Q1, Q2)_ψ(s, u) ]       (training mode: one reparameterised sample)
    f(λ; s) = −min(Q1, Q2)_ψ(s, tanh μ)                        (evaluation mode: the deterministic action)

So in evaluation mode the objective is −Q at the mean action, the maximisation of Q that the tutorial times
(REFERENCE §4.2), and :meth:`SoftQObjective.max_q` is the same function over actions u directly, for solvers
started from the zero action. The actor λ̂_θ(s) is a :class:`~lightning_amor.FullyAmortized` MLP of the state.

The critic and the temperature are the objective's own parameters, trained by their own loss
(:meth:`ActorCriticModule.objective_loss`: the soft TD error against the slowly moving target critic, and the
temperature's loss towards a target entropy) and their own optimizer (``objective_optimizer``), so the
actor's loss never moves them: the core's two components (``docs/components.md``). The target critic is a
Polyak average of the critic, updated after every training step.

Transitions come from :class:`datamodules.gym_replay.GymReplayData`: the environment is stepped with the
current actor by a stateful context stream that fills a replay buffer kept in every checkpoint.
:class:`EvaluationEpisodes` runs deterministic episodes and logs their returns and a trajectory to TensorBoard.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Optional

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_amor.amortizers import AmortizedOutput
from lightning_amor.figures import new_figure
from lightning_amor.module import AmortizedModule
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
"""The range log σ is clamped to (as Stable-Baselines3's SAC), so σ neither vanishes nor explodes."""
SQUASH_EPS = 1e-6
"""Added inside log(1 − tanh²) so that the log-density stays finite at the edges of the action box."""
TRANSITION_KEYS = ("obs", "action", "reward", "next_obs", "terminated")
"""The keys of a transition context: ``B x d`` states, ``B x m`` actions in [−1, 1], ``B`` rewards,
``B x d`` next states, ``B`` termination flags (1.0 when the episode ended in a terminal state, not a time
limit)."""


class DoubleQCritic(nn.Module):
    """Two Q networks ``(B x d, B x m) -> (B, B)``, MLPs of the concatenated state and action.

    Args:
        obs_dim: d, the size of a state.
        action_dim: m, the size of an action.
        hidden: the widths of each network's hidden layers.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        self.q1 = MLP(obs_dim + action_dim, 1, hidden=list(hidden))
        self.q2 = MLP(obs_dim + action_dim, 1, hidden=list(hidden))

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Q1(s, u) and Q2(s, u), each ``B``."""
        both = torch.cat([obs, action], dim=-1)
        return self.q1(both).squeeze(-1), self.q2(both).squeeze(-1)


class SoftQObjective(Objective):
    """f(λ; s) = α log π_λ(u) − min Q_ψ(s, u), u = tanh(μ + σ ε), over λ = (μ, log σ) (``B x 2m``).

    In evaluation mode (``objective.eval()``) the value is −min Q_ψ(s, tanh μ), deterministic. Contexts are dicts
    with at least ``obs`` (``B x d``); training contexts are whole transitions (:data:`TRANSITION_KEYS`).

    Args:
        obs_dim: d, the size of a state.
        action_dim: m, the size of an action (solutions have 2m numbers: μ then log σ).
        hidden: the hidden widths of each Q network.
        initial_temperature: α at the start (learnt afterwards through log α).
    """

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (256, 256), initial_temperature: float = 1.0
    ) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(f"SoftQObjective: obs_dim and action_dim must be positive, got {obs_dim}, {action_dim}")
        if not initial_temperature > 0:
            raise ValueError(f"SoftQObjective: initial_temperature must be > 0, got {initial_temperature}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.dim = 2 * action_dim
        self.critic = DoubleQCritic(obs_dim, action_dim, tuple(hidden))
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(initial_temperature)))

    def extra_repr(self) -> str:
        return f"obs_dim={self.obs_dim}, action_dim={self.action_dim}"

    @property
    def temperature(self) -> Tensor:
        """α = exp(log α), a scalar."""
        return self.log_temperature.exp()

    def split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """μ and log σ, each ``B x m``, of ``B x 2m`` parameters."""
        return y[:, : self.action_dim], y[:, self.action_dim :]

    def project(self, y: Tensor) -> Tensor:
        """Clamp log σ to [:data:`LOG_STD_MIN`, :data:`LOG_STD_MAX`] (μ is free)."""
        mean, log_std = self.split(y)
        return torch.cat([mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)], dim=-1)

    def sample_action(self, y: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """A reparameterised action u = tanh(μ + σ ε) (``B x m``) and its log-density log π_λ(u) (``B``).

        ε comes from ``generator`` (a CPU generator: a stream's own) or else the global generator.
        """
        mean, log_std = self.split(y)
        if generator is None:
            noise = torch.randn_like(mean)
        else:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        pre = mean + log_std.exp() * noise
        action = torch.tanh(pre)
        # log N(pre; μ, σ²) minus the log-Jacobian of tanh, summed over the action's dimensions
        log_prob = (-0.5 * noise**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - torch.log1p(-action.pow(2) + SQUASH_EPS).sum(-1)
        return action, log_prob

    def mean_action(self, y: Tensor) -> Tensor:
        """The deterministic action tanh μ, ``B x m``."""
        return torch.tanh(self.split(y)[0])

    def max_q(self, action: Tensor, x: Context) -> Tensor:
        """−min(Q1, Q2)(s, u) for actions ``B x m`` (no squashing: a solver's iterates may leave the box)."""
        q1, q2 = self.critic(_obs(x), action)
        return -torch.minimum(q1, q2)

    def value(self, y: Tensor, x: Context) -> Tensor:
        """f(λ; s), ``B``: sampled with the entropy term in training mode, −Q at tanh μ in evaluation mode."""
        if not self.training:
            return self.max_q(self.mean_action(y), x)
        action, log_prob = self.sample_action(y)
        return self.temperature * log_prob + self.max_q(action, x)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """Polyak averaging ψ' ← (1 − τ) ψ' + τ ψ of the target critic."""
        for target, source in zip(self.target_critic.parameters(), self.critic.parameters(), strict=True):
            target.lerp_(source, tau)


def _obs(x: Context) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if "obs" not in x:
        raise ValueError(f"SoftQObjective: contexts must be dicts with an 'obs' tensor (B x d), got keys {sorted(x)}")
    return x["obs"]


class ActorCriticModule(AmortizedModule):
    """Soft actor–critic as an :class:`~lightning_amor.AmortizedModule` with two components.

    The amortizer (the actor) minimises f(λ̂_θ(s); s) of :class:`SoftQObjective` with the critic and the temperature
    held constant; the objective's parameters (the critic ψ and log α) minimise :meth:`objective_loss` with the
    actor held constant, by ``objective_optimizer`` (required). After every training step the target critic
    moves towards the critic by ``tau``.

    Args:
        gamma: the discount factor of the TD target.
        tau: the Polyak rate of the target critic.
        target_entropy: the entropy the temperature steers the actor to (``None``: −m, SAC's heuristic).
        **kwargs: :class:`~lightning_amor.AmortizedModule`'s arguments (``objective`` a
            :class:`SoftQObjective`, ``amortizer``, ``optimizer``, ``objective_optimizer``, ...).

    Logged besides the core's: ``train/critic_loss``, ``train/temperature`` (every ``log_every_n_steps``) and
    ``val/q`` (mean Q of the deterministic action on the validation states).
    """

    def __init__(self, gamma: float = 0.99, tau: float = 0.005, target_entropy: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.objective, SoftQObjective):
            raise TypeError(
                f"ActorCriticModule: the objective must be a SoftQObjective (the critic lives in it), got "
                f"{type(self.objective).__name__}"
            )
        if self.objective_optimizer is None:
            raise ValueError(
                "ActorCriticModule: set objective_optimizer (the critic's and the temperature's optimizer); with one "
                "optimizer the actor's loss would move the critic"
            )
        if not 0.0 <= gamma <= 1.0 or not 0.0 < tau <= 1.0:
            raise ValueError(f"ActorCriticModule: need 0 <= gamma <= 1 and 0 < tau <= 1, got gamma={gamma}, tau={tau}")
        self.gamma, self.tau = gamma, tau
        self.target_entropy = -float(self.objective.action_dim) if target_entropy is None else float(target_entropy)

    def act(self, obs: Tensor, deterministic: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
        """Actions in [−1, 1]^m (``B x m``) for states ``B x d``: tanh μ, or a sample drawn with ``generator``."""
        y = self.amortizer({"obs": obs}, self.objective).y
        if deterministic:
            return self.objective.mean_action(y)
        return self.objective.sample_action(y, generator)[0]

    def objective_loss(self, x: Context, y_star: Optional[Tensor], output: AmortizedOutput) -> Tensor:
        """½ Σ_i (Q_i(s, a) − target)² + the temperature's loss, ``B``.

        target = r + γ (1 − terminated) (min Q'(s', u') − α log π(u' | s')), u' drawn from the actor at s'
        (held constant), Q' the target critic; the temperature's loss is −log α (log π(u | s) + target entropy)
        at a fresh action of the (detached) prediction λ̂(s).
        """
        objective: SoftQObjective = self.objective
        missing = [k for k in TRANSITION_KEYS if k not in x] if isinstance(x, dict) else list(TRANSITION_KEYS)
        if missing:
            raise ValueError(
                f"ActorCriticModule: training contexts must be transitions with keys {TRANSITION_KEYS}; missing "
                f"{missing} (use datamodules.gym_replay.GymReplayData)"
            )
        alpha = objective.temperature.detach()
        with torch.no_grad():
            next_y = self.amortizer({"obs": x["next_obs"]}, objective).y
            next_action, next_log_prob = objective.sample_action(next_y)
            q1_next, q2_next = objective.target_critic(x["next_obs"], next_action)
            soft_next = torch.minimum(q1_next, q2_next) - alpha * next_log_prob
            target = x["reward"] + self.gamma * (1.0 - x["terminated"]) * soft_next
        q1, q2 = objective.critic(x["obs"], x["action"])
        critic_loss = 0.5 * ((q1 - target) ** 2 + (q2 - target) ** 2)
        with torch.no_grad():
            log_prob = objective.sample_action(output.y)[1]
        temperature_loss = -objective.log_temperature * (log_prob + self.target_entropy)
        if self._trainer is not None and self._logging_step():
            batch = len(critic_loss)
            self.log("train/critic_loss", critic_loss.mean().detach(), batch_size=batch)
            self.log("train/temperature", alpha, batch_size=batch)
        return critic_loss + temperature_loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move the target critic towards the critic (after both optimizers stepped)."""
        self.objective.update_target(self.tau)

    def evaluation_metrics(self, evaluated: Any) -> dict[str, Tensor]:
        """``q``: Q of the deterministic action (−f in evaluation mode)."""
        return {"q": -evaluated.value}


class EvaluationEpisodes(Callback):
    """Deterministic evaluation episodes every ``every_n_env_steps`` environment steps of training.

    Runs ``episodes`` episodes of the actor's deterministic action (tanh μ) on a separate environment whose
    resets are seeded ``seed, seed + 1, ...`` (the same states at every evaluation), and logs to TensorBoard, at
    the number of environment steps: ``eval/return`` (mean) and ``eval/return_std`` over episodes, and the figure
    ``eval/trajectory`` of the first episode (the angle θ = atan2(sin θ, cos θ) for Pendulum, else the first
    state component, and the torque against time). :attr:`history` keeps ``(env steps, mean return, returns)``.

    The environment steps are read from the training data module's stream (``trainer.datamodule.stream.env_steps``).

    Args:
        env_id: the gymnasium environment.
        every_n_env_steps: the evaluation period, in environment steps.
        episodes: episodes per evaluation.
        seed: the seed of the first episode's reset.
        figure: log the trajectory figure.
    """

    def __init__(self, env_id: str = "Pendulum-v1", every_n_env_steps: int = 2000, episodes: int = 10,
                 seed: int = 10_000, figure: bool = True) -> None:
        if every_n_env_steps < 1 or episodes < 1:
            raise ValueError(
                f"EvaluationEpisodes: every_n_env_steps and episodes must be at least 1, got {every_n_env_steps}, "
                f"{episodes}"
            )
        self.env_id, self.every, self.episodes = env_id, every_n_env_steps, episodes
        self.seed, self.figure = seed, figure
        self.history: list[tuple[int, float, list[float]]] = []
        self.seconds = 0.0  # time spent evaluating
        self._env: Any = None

    def _env_steps(self, trainer: Trainer) -> int:
        stream = getattr(getattr(trainer, "datamodule", None), "stream", None)
        if not hasattr(stream, "env_steps"):
            raise TypeError(
                "EvaluationEpisodes counts environment steps from the data module's stream (its env_steps); use it "
                "with datamodules.gym_replay.GymReplayData"
            )
        return int(stream.env_steps)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The batch was drawn after the stream's latest environment step: evaluate the actor that acted there.
        steps = self._env_steps(trainer)
        done = self.history[-1][0] // self.every if self.history else 0
        if steps // self.every > done:
            self.evaluate(pl_module, steps, trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One last evaluation when training ends on a multiple of the period not yet evaluated."""
        steps = self._env_steps(trainer)
        if steps % self.every == 0 and (not self.history or self.history[-1][0] < steps):
            self.evaluate(pl_module, steps, trainer)

    @torch.no_grad()
    def run_episodes(self, module: ActorCriticModule) -> tuple[list[float], dict[str, np.ndarray]]:
        """The returns of the episodes and the first one's trajectory (``obs`` ``T x d``, ``action`` ``T x m``)."""
        import gymnasium as gym

        from datamodules.gym_replay import checked_observation

        if self._env is None:
            self._env = gym.make(self.env_id)
        env = self._env
        high = torch.as_tensor(env.action_space.high, dtype=torch.float32)
        was_training = module.training
        module.eval()
        returns, trajectory = [], {"obs": [], "action": []}
        try:
            for episode in range(self.episodes):
                obs, _ = env.reset(seed=self.seed + episode)
                total, done, step = 0.0, False, 0
                while not done:
                    obs_t = checked_observation(obs, self.env_id, step, "evaluation")
                    action = (module.act(obs_t[None].to(module.device)).cpu()[0] * high).numpy()
                    if episode == 0:
                        trajectory["obs"].append(obs_t.numpy())
                        trajectory["action"].append(action)
                    obs, reward, terminated, truncated, _ = env.step(action)
                    total += float(reward)
                    done = terminated or truncated
                    step += 1
                returns.append(total)
        finally:
            module.train(was_training)
        return returns, {k: np.stack(v) for k, v in trajectory.items()}

    def evaluate(self, module: LightningModule, env_steps: int, trainer: Optional[Trainer] = None) -> float:
        """Run the episodes now, log them at ``env_steps``, and return the mean return."""
        start = time.perf_counter()
        returns, trajectory = self.run_episodes(module)
        mean = float(np.mean(returns))
        self.history.append((env_steps, mean, returns))
        experiment = getattr(getattr(trainer, "logger", None), "experiment", None) if trainer is not None else None
        if experiment is not None and hasattr(experiment, "add_scalar"):
            experiment.add_scalar("eval/return", mean, env_steps)
            experiment.add_scalar("eval/return_std", float(np.std(returns)), env_steps)
            if self.figure:
                experiment.add_figure("eval/trajectory", self._trajectory_figure(trajectory, env_steps), env_steps)
        self.seconds += time.perf_counter() - start
        return mean

    def _trajectory_figure(self, trajectory: dict[str, np.ndarray], env_steps: int) -> Any:
        obs, action = trajectory["obs"], trajectory["action"]
        pendulum = self.env_id.startswith("Pendulum") and obs.shape[1] == 3
        fig = new_figure(6, 4)
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.plot(np.arctan2(obs[:, 1], obs[:, 0]) if pendulum else obs[:, 0])
        top.set_ylabel("angle θ (rad)" if pendulum else "state[0]")
        bottom.plot(action)
        bottom.set_ylabel("torque" if pendulum else "action")
        bottom.set_xlabel("time step")
        top.set_title(f"{self.env_id}, deterministic episode 0 after {env_steps} environment steps")
        return fig
