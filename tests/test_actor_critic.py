"""The model-free actor–critic (lightning_amor/apps/actor_critic.py) and its replay stream (datamodules/gym_replay.py),
on the real gymnasium Pendulum-v1: the stream's save and restore, the critic left untouched by the actor's loss, the
target critic's update, clear errors naming the environment step, the TD loss learning, and a run killed by SIGKILL
that resumes its replay buffer from the last checkpoint."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.gym_replay import EnvironmentStepError, GymReplayData, GymReplayStream
from lightning_amor import MLP, FullyAmortized
from lightning_amor.apps.actor_critic import ActorCriticModule, EvaluationEpisodes, SoftQObjective
from lightning_amor.module import frozen
from tests.test_faults import finish, load, output, start, wait_until
from tests.test_recipes import recipe_args, smoke_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "control" / "sac_pendulum.yaml"


def small_module(seed: int = 0, actor_lr: float = 1e-3, critic_lr: float = 1e-3) -> ActorCriticModule:
    torch.manual_seed(seed)
    return ActorCriticModule(
        objective=SoftQObjective(obs_dim=3, action_dim=1, hidden=(32, 32)),
        amortizer=FullyAmortized(MLP(3, 2, hidden=[32], context_key="obs")),
        optimizer=lambda p: torch.optim.Adam(p, lr=actor_lr),
        objective_optimizer=lambda p: torch.optim.Adam(p, lr=critic_lr),
    )


def transitions(num: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    return GymReplayData(val_size=8, test_size=8).sample(num, torch.Generator().manual_seed(seed))


# --- the replay stream ------------------------------------------------------------------------------------------


def test_the_stream_restored_from_its_state_continues_exactly_as_the_original():
    module = small_module()
    original = GymReplayStream(capacity=500, learning_starts=30)
    original.setup(seed=3, rank=0, world=1)
    for _ in range(190):  # past an episode's end (200 steps), so the episode bookkeeping is exercised
        original.next_batch(8, module)
    state = original.state_dict()
    assert original.env_steps == 30 + 190 and len(original.buffer) == 220 and original.episodes == 1

    restored = GymReplayStream(capacity=500, learning_starts=30)
    restored.setup(seed=3, rank=0, world=1)
    restored.load_state_dict(state)
    for stream in (original, restored):  # weights_only checkpoints: the state is tensors, numbers and containers
        torch.save(stream.state_dict(), "/dev/null")
    for _ in range(20):
        a, b = original.next_batch(8, module), restored.next_batch(8, module)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for key, value in original.buffer.contents().items():
        torch.testing.assert_close(value, restored.buffer.contents()[key], rtol=0, atol=0)
    assert (original.env_steps, original.episodes, original.episode_step) == (
        restored.env_steps, restored.episodes, restored.episode_step)


def test_the_stream_keeps_time_limits_apart_from_terminal_states_and_chains_observations():
    stream = GymReplayStream(capacity=1000, learning_starts=250)
    stream.setup(seed=0, rank=0, world=1)
    stream.next_batch(4, None)
    data = stream.buffer.contents()
    assert len(stream.buffer) == 251 and stream.episodes == 1 and stream.returns[0] < 0
    assert not data["terminated"].any(), "Pendulum's time limit is no terminal state: the TD target bootstraps"
    inside = [t for t in range(250) if t != 199]  # the episode's last step is followed by a reset
    torch.testing.assert_close(data["next_obs"][inside], data["obs"][[t + 1 for t in inside]], rtol=0, atol=0)
    assert data["action"].abs().max() <= 1.0


# --- the two components ----------------------------------------------------------------------------------------


def test_the_actors_loss_gives_the_critic_no_gradient():
    module = small_module()
    x = transitions()
    with frozen(module.objective.parameters()):
        output_ = module.amortizer(x, module.objective)
        module.loss(output_, x, module.objective).mean().backward()
    assert all(p.grad is None for p in module.objective.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.amortizer.parameters())


def test_training_steps_move_the_actor_and_never_the_critic_through_the_actors_loss(tmp_path):
    # The critic's own optimizer has lr 0, so the critic can only move through the actor's loss: it must not.
    module = small_module(critic_lr=0.0)
    critic = {k: v.clone() for k, v in module.objective.state_dict().items()}
    actor = {k: v.clone() for k, v in module.amortizer.state_dict().items()}
    data = GymReplayData(learning_starts=50, batch_size=32, val_size=8, test_size=8, capacity=1000)
    evaluation = EvaluationEpisodes(every_n_env_steps=53, episodes=1)
    trainer = Trainer(accelerator="cpu", max_steps=5, logger=TensorBoardLogger(tmp_path, name="tb"),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=tmp_path, callbacks=[evaluation])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 5 and data.stream.env_steps == 55
    for name, value in module.objective.state_dict().items():
        torch.testing.assert_close(value, critic[name], rtol=0, atol=0, msg=f"the actor's loss moved {name}")
    assert any(not torch.equal(v, actor[k]) for k, v in module.amortizer.state_dict().items())
    # the evaluation episodes ran once the stream passed 53 environment steps, and TensorBoard has them
    assert [h[0] for h in evaluation.history] == [53]
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/return")] == [53]
    assert events.Scalars("eval/return")[0].value == pytest.approx(evaluation.history[0][1])
    assert "eval/trajectory" in events.Tags()["images"]


def test_the_target_critic_moves_by_tau_towards_the_critic():
    objective = SoftQObjective(obs_dim=3, action_dim=1, hidden=(8,))
    with torch.no_grad():
        for p in objective.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in objective.target_critic.parameters()]
    objective.update_target(0.25)
    for old, new, source in zip(before, objective.target_critic.parameters(), objective.critic.parameters(),
                                strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * source)
    assert not any(p.requires_grad for p in objective.target_critic.parameters())


def test_the_td_loss_of_a_fixed_batch_decreases_under_the_critics_optimizer():
    module = small_module()
    x = transitions(128)
    optimizer = torch.optim.Adam(module.objective.critic.parameters(), lr=3e-3)
    output_ = module.amortizer(x, module.objective)
    losses = []
    for _ in range(150):
        loss = module.objective_loss(x, None, output_).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], f"TD loss from {losses[0]:.3g} to {losses[-1]:.3g}"


def test_the_objective_is_minus_q_at_the_mean_action_in_evaluation_mode_and_sampled_in_training():
    objective = SoftQObjective(obs_dim=3, action_dim=1, hidden=(8,))
    x = transitions(16)
    y = torch.randn(16, 2)
    objective.eval()
    torch.testing.assert_close(objective(y, x), objective.max_q(torch.tanh(y[:, :1]), x))
    objective.train()
    a, b = objective(y, x), objective(y, x)
    assert not torch.equal(a, b), "training mode draws a fresh reparameterised action each call"
    action, log_prob = objective.sample_action(torch.tensor([[0.0, math.log(1e-3)]]))
    assert abs(action.item()) < 0.01 and log_prob.item() > 5.0  # a narrow Gaussian has a large density


# --- errors that name the environment step ----------------------------------------------------------------------


class WrongShapeActor(torch.nn.Module):
    def act(self, obs: torch.Tensor, deterministic: bool = True, generator: Any = None) -> torch.Tensor:
        return torch.zeros(1, 2)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def test_an_action_of_the_wrong_shape_is_an_error_naming_the_step():
    stream = GymReplayStream(capacity=100, learning_starts=7)
    stream.setup(seed=0, rank=0, world=1)
    with pytest.raises(EnvironmentStepError, match=r"shape \(1, 2\) at environment step 7 of Pendulum-v1.*1 numbers"):
        stream.next_batch(4, WrongShapeActor())


def test_a_nan_observation_from_the_environment_is_an_error_naming_the_step():
    stream = GymReplayStream(capacity=100, learning_starts=0)
    stream.setup(seed=0, rank=0, world=1)
    for _ in range(5):
        stream.next_batch(2, None)
    stream.env.state = np.array([np.nan, 0.0])  # the physics diverged
    with pytest.raises(EnvironmentStepError, match=r"non-finite observation .* environment step 5"):
        stream.next_batch(2, None)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="objective_optimizer"):
        ActorCriticModule(objective=SoftQObjective(3, 1, hidden=(8,)),
                          amortizer=FullyAmortized(MLP(3, 2, hidden=[8], context_key="obs")))
    with pytest.raises(ValueError, match="tau"):
        small_module().__class__(objective=SoftQObjective(3, 1, hidden=(8,)),
                                 amortizer=FullyAmortized(MLP(3, 2, hidden=[8], context_key="obs")),
                                 objective_optimizer=torch.optim.Adam, tau=0.0)
    with pytest.raises(EnvironmentStepError, match="Discrete"):
        GymReplayStream("CartPole-v1")
    with pytest.raises(ValueError, match="every_n_env_steps"):
        EvaluationEpisodes(every_n_env_steps=0)


def test_evaluation_episodes_are_deterministic_and_return_the_trajectory():
    evaluation = EvaluationEpisodes(episodes=2, figure=False)
    module = small_module()
    first, trajectory = evaluation.run_episodes(module)
    second, _ = evaluation.run_episodes(module)
    assert first == second and len(first) == 2 and all(-2000 < r < 0 for r in first)
    assert trajectory["obs"].shape == (200, 3) and trajectory["action"].shape == (200, 1)
    assert np.abs(trajectory["action"]).max() <= 2.0


# --- SIGKILL, then resume with --ckpt_path last ------------------------------------------------------------------

EVERY = 20


def fit_args(work: Path, max_steps: int) -> list[str]:
    periodic = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(work / "checkpoints"), "every_n_train_steps": EVERY, "save_top_k": 0, "save_last": True,
        "monitor": None}}
    return [
        "fit", *recipe_args(RECIPE), *smoke_overrides(RECIPE, work), "--trainer.limit_val_batches", "0",
        "--trainer.enable_model_summary", "false", "--trainer.max_steps", str(max_steps),
        "--trainer.callbacks", json.dumps([periodic]), "--trainer.logger", "false",
        "--model.init_args.objective.init_args.hidden", "[32]",
        "--model.init_args.amortizer.init_args.net.init_args.hidden", "[32]",
        "--data.init_args.learning_starts", "30",
    ]


def stream_state(checkpoint: dict) -> dict:
    """The stream's state inside a checkpoint (where Lightning keeps the training loader's state)."""
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "ranks" in node and isinstance(node["ranks"], list):
                found.append(node["ranks"][0]["stream"])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(checkpoint["loops"])
    assert len(found) == 1, "the checkpoint holds one stream state"
    return found[0]


def test_a_run_killed_by_sigkill_resumes_with_the_same_replay_buffer(tmp_path):
    # Two CLI processes (start-up, 20-60 training steps each): about 10 s on an idle 2-core machine; the generous
    # timeouts are for a loaded one.
    work = tmp_path / "run"
    last = work / "checkpoints" / "last.ckpt"
    proc = start(fit_args(work, 10**6), work)
    wait_until(last.exists, proc, work, timeout=180)
    proc.kill()
    assert finish(proc, work) == -signal.SIGKILL
    killed = load(last)
    saved, before = killed["global_step"], stream_state(killed)
    assert saved > 0 and before["env_steps"] == 30 + saved and before["buffer"]["size"] == 30 + saved

    target = saved + 2 * EVERY
    proc = start([*fit_args(work, target), "--ckpt_path", "last"], work)
    assert finish(proc, work, timeout=180) == 0, output(work)[-3000:]
    after = stream_state(load(last))
    assert after["env_steps"] == 30 + target and after["buffer"]["size"] == 30 + target
    for key, value in before["buffer"]["data"].items():  # the same buffer, continued
        torch.testing.assert_close(after["buffer"]["data"][key][: len(value)], value, rtol=0, atol=0)
    # the environment continued the killed run's episode: the first new transition starts where it stopped
    torch.testing.assert_close(after["buffer"]["data"]["obs"][30 + saved], before["obs"], rtol=0, atol=0)
    assert after["episodes"] == (30 + target) // 200
