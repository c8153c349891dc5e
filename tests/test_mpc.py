"""Model-based control on Pendulum-v1: the torch dynamics against gymnasium, the MPC objective (gradients, squashing),
the amortizers, CEM on the MPC problem, and the closed loop's episodes, errors and TensorBoard logs."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from datamodules.pendulum_states import PendulumStates
from lightning_amor import MLP, AmortizedModule, FullyAmortized, GradientStep, SemiAmortized
from lightning_amor.apps.closed_loop import (
    AmortizedController,
    ClosedLoopError,
    SolverController,
    log_episodes,
    run_episodes,
)
from lightning_amor.apps.mpc import FeedbackPolicy, PendulumMPC
from lightning_amor.apps.pendulum import PendulumDynamics, observation_to_state, state_to_observation
from lightning_amor.cem import CEM
from lightning_amor.objective import ObjectiveShapeError


def test_dynamics_and_cost_match_gymnasium_step_by_step_with_clipping():
    rng = np.random.default_rng(0)
    dynamics = PendulumDynamics()
    env = gymnasium.make("Pendulum-v1")
    env.reset(seed=0)
    clipped_speed = clipped_torque = 0
    for _ in range(12):
        # states across every angle (several turns) and speeds up to the limit, torques beyond the bounds
        state = np.array([rng.uniform(-3 * math.pi, 3 * math.pi), rng.uniform(-8.0, 8.0)])
        env.unwrapped.state = state.copy()
        for _step in range(15):
            u = rng.uniform(-3.5, 3.5)
            clipped_torque += abs(u) > 2.0
            state = env.unwrapped.state.copy()  # one step at a time, from the environment's own state
            obs, reward, _, _, _ = env.step(np.array([u], dtype=np.float32))
            s = torch.tensor(state[None], dtype=torch.float64)
            a = torch.tensor([float(np.float32(u))], dtype=torch.float64)
            cost = dynamics.cost(s, a)
            state = dynamics.step(s, a)[0].numpy()
            clipped_speed += abs(state[1]) == 8.0
            # gymnasium computes the torque's term in float32 (NumPy's promotion of a float32 action)
            np.testing.assert_allclose(state, env.unwrapped.state, rtol=0, atol=1e-6)
            # the environment squares a float32 torque for the 0.001 u² term
            np.testing.assert_allclose(-cost.item(), reward, rtol=0, atol=1e-8)
            np.testing.assert_allclose(state_to_observation(torch.tensor(state[None]))[0].numpy(), obs, atol=1e-6)
    env.close()
    assert clipped_speed > 5 and clipped_torque > 20  # both clips were exercised


def test_a_rollout_from_an_observation_charges_what_the_environment_rewards():
    objective = PendulumMPC(horizon=12, terminal_weight=0.0).double()
    env = gymnasium.make("Pendulum-v1")
    obs, _ = env.reset(seed=3)
    y = torch.randn(1, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.tensor(obs[None], dtype=torch.float64)
    x[0, :2] = torch.tensor([math.cos(env.unwrapped.state[0]), math.sin(env.unwrapped.state[0])])
    x[0, 2] = env.unwrapped.state[1]
    rewards = sum(env.step(objective.actions(y[0, t : t + 1]).numpy())[1] for t in range(12))
    env.close()
    # the environment acts on float32 torques; the rollout on float64 ones
    assert objective(y, x).item() == pytest.approx(-rewards, rel=1e-5)


def test_observations_and_states_convert_both_ways_and_bad_shapes_are_refused():
    state = torch.tensor([[0.3, -2.0], [-3.0, 7.5]], dtype=torch.float64)
    torch.testing.assert_close(observation_to_state(state_to_observation(state)), state)
    with pytest.raises(ValueError, match=r"must have shape \(B, 3\)"):
        observation_to_state(torch.zeros(4, 2))
    with pytest.raises(ObjectiveShapeError, match=r"contexts must be observations of shape \(B, 3\)"):
        PendulumMPC(horizon=3)(torch.zeros(2, 3), torch.zeros(2, 2))


def test_gradients_flow_through_the_rollout_and_match_finite_differences():
    objective = PendulumMPC(horizon=6).double()
    x = PendulumStates(max_speed=6.0).sample(4, torch.Generator().manual_seed(1)).double()
    y = 0.5 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y.requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(y, x).sum(), y)
    assert bool(torch.isfinite(grad).all()) and bool((grad.abs().sum(-1) > 1e-3).all())
    # the speed clip is inactive away from |θ̇| = 8, so the gradient is that of a smooth function here
    assert torch.autograd.gradcheck(lambda v: objective(v, x), (y,), eps=1e-6, atol=1e-5)


def test_the_squashing_keeps_every_torque_in_the_bounds():
    objective = PendulumMPC(horizon=5)
    y = torch.tensor([[-1e4, -3.0, 0.0, 3.0, 1e4]])
    torques = objective.actions(y)
    assert bool((torques.abs() <= 2.0).all()) and torques[0, 0] == -2.0 and torques[0, -1] == 2.0
    assert bool(torch.isfinite(objective(y, torch.tensor([[1.0, 0.0, 0.0]]))).all())
    points = objective.random_points(64, torch.zeros(1), torch.Generator().manual_seed(0))
    assert bool((objective.actions(points).abs() < 2.0).all())
    torch.testing.assert_close(objective.actions(objective.raw(torch.tensor([-1.5, 0.0, 1.9]))),
                               torch.tensor([-1.5, 0.0, 1.9]))
    # the projection is the identity (idempotent, as the core requires): the squashing lives inside f
    assert torch.equal(objective.project_flat(y), y)


def test_the_semi_amortized_refinement_lowers_the_cost():
    torch.manual_seed(0)
    objective = PendulumMPC(horizon=10)
    x = PendulumStates().sample(64, torch.Generator().manual_seed(0))
    model = SemiAmortized(MLP(3, 10, hidden=[32]), steps=5, update=GradientStep(0.01, learnable=False))
    output = model(x, objective)
    values = [objective(y, x).mean().item() for y in output.iterates]
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < values[0] - 1.0, values


def test_cem_from_a_known_state_beats_zero_actions():
    objective = PendulumMPC(horizon=15)
    x = torch.tensor([[math.cos(0.6), math.sin(0.6), 0.0]])  # tilted, falling: doing nothing lets it fall
    zero = objective(torch.zeros(1, 15), x).item()
    plan = CEM(iterations=8, population=128, elites=12, lower=-3.0, upper=3.0).solve(objective, x)
    assert plan.value.item() < 0.5 * zero, (plan.value.item(), zero)
    assert objective.actions(plan.y[0, 0]).item() < -1.0  # it pushes back towards upright


def test_the_feedback_policy_rolls_its_network_through_the_model():
    policy = FeedbackPolicy(horizon=4, hidden=(16,))
    x = PendulumStates().sample(3, torch.Generator().manual_seed(0))
    y = policy(x)
    assert y.shape == (3, 4)
    torch.testing.assert_close(y[:, 0], policy.net(x)[:, 0])
    states, _ = PendulumDynamics().rollout(observation_to_state(x), 2.0 * torch.tanh(y))
    torch.testing.assert_close(y[:, 2], policy.net(state_to_observation(states[:, 2]))[:, 0])


def test_the_data_module_draws_every_angle_and_speed():
    x = PendulumStates().sample(4000, torch.Generator().manual_seed(0))
    state = observation_to_state(x)
    assert x.shape == (4000, 3) and state[:, 0].abs().max() > 3.1 and state[:, 1].abs().max() > 7.9
    assert state[:, 1].abs().max() <= 8.0
    with pytest.raises(ValueError, match=r"max_angle must be in \(0, π\]"):
        PendulumStates(max_angle=4.0)


class NaNAt(gymnasium.ObservationWrapper):
    """A real Pendulum-v1 whose observations turn NaN from control step ``at`` on (a broken sensor)."""

    def __init__(self, env, at):
        super().__init__(env)
        self.at, self.steps = at, 0

    def reset(self, **kwargs):
        self.steps = 0
        return super().reset(**kwargs)

    def step(self, action):
        self.steps += 1
        return super().step(action)

    def observation(self, observation):
        return observation * np.nan if self.steps >= self.at else observation


def test_a_nan_observation_from_the_environment_names_the_step():
    controller = lambda obs: torch.zeros(obs.shape[0], 1)  # noqa: E731
    factory = lambda seed: NaNAt(gymnasium.make("Pendulum-v1"), at=3)  # noqa: E731
    with pytest.raises(ClosedLoopError, match=r"control step 3: the environment returned a non-finite observation"):
        run_episodes(controller, [0, 1], steps=10, env_factory=factory)


def test_an_action_of_the_wrong_shape_names_the_step():
    wrong = r"control step 0: .* returned actions of shape \(2,\), expected \(2, 1\)"
    with pytest.raises(ClosedLoopError, match=wrong):
        run_episodes(lambda obs: torch.zeros(obs.shape[0]), [0, 1], steps=5)
    calls = []

    def late_nan(obs):
        calls.append(1)
        return torch.full((obs.shape[0], 1), float("nan") if len(calls) == 4 else 0.0)

    with pytest.raises(ClosedLoopError, match=r"control step 3: .* non-finite torques for episodes \[0\]"):
        run_episodes(late_nan, [5], steps=6)


def test_controllers_run_receding_horizon_episodes_and_log_to_tensorboard(tmp_path):
    objective = PendulumMPC(horizon=8)
    module = AmortizedModule(objective, FullyAmortized(MLP(3, 8, hidden=[16]))).eval()
    amortized = run_episodes(AmortizedController(module), [0, 1], steps=12)
    mpc = SolverController(objective, CEM(iterations=2, population=16, elites=4, lower=-3, upper=3), name="cem")
    planned = run_episodes(mpc, [0, 1], steps=12)
    for result in (amortized, planned):
        assert result.returns.shape == (2,) and result.angles.shape == (2, 12) and result.step_seconds.shape == (12,)
        assert bool((np.abs(result.torques) <= 2.0).all()) and bool((result.returns < 0).all())
    assert mpc._plan.shape == (2, 8)  # the plan kept for the next step's warm start
    # the same seeds start from the same states whatever the controller
    np.testing.assert_array_equal(amortized.angles[:, 0], planned.angles[:, 0])
    writer = SummaryWriter(str(tmp_path))
    log_episodes(writer, "cem", planned)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"closed_loop/cem/return", "closed_loop/cem/angle", "closed_loop/cem/torque"} <= set(scalars)
    assert len(events.Scalars("closed_loop/cem/angle")) == 12
    assert "closed_loop/cem/trajectories" in events.Tags()["images"]


def test_the_closed_loop_callback_logs_returns_and_trajectories_during_training(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_amor.apps.closed_loop import ClosedLoopEpisodes

    module = AmortizedModule(PendulumMPC(horizon=6), FullyAmortized(MLP(3, 6, hidden=[16])))
    data = PendulumStates(batch_size=16, batches_per_epoch=4, val_size=16, test_size=16, cache_dir="none")
    callbacks = [ClosedLoopEpisodes(seeds=[0, 1], steps=8, start_step=2)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, val_check_interval=1, check_val_every_n_epoch=None,
                         logger=TensorBoardLogger(str(tmp_path), name="tb"), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, data)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("closed_loop/return")] == [2, 3, 4]  # none before start_step
    assert "closed_loop/trajectories" in events.Tags()["images"]
    with pytest.raises(ValueError, match="start_step must be a non-negative integer"):
        ClosedLoopEpisodes(start_step=-1)


def test_the_distance_between_plans_is_in_torques():
    objective = PendulumMPC(horizon=3)
    saturated = torch.tensor([[10.0, 0.0, 0.0]])
    assert objective.distance_flat(saturated, saturated + torch.tensor([[20.0, 0.0, 0.0]])).item() < 1e-6
    assert objective.distance_flat(torch.zeros(1, 3), saturated).item() == pytest.approx(2.0, abs=1e-6)



def test_the_benchmark_reruns_only_the_semi_amortized_closed_loop_and_marks_the_rows_it_reuses():
    from benchmarks.control import merge_closed_loop

    previous = {"meta": {"date": "2026-11-28"},
                "closed_loop": {"amortized": {"mean": -144.7}, "semi-amortized": {"mean": -540.7},
                                "CEM MPC": {"mean": -143.8, "previous_run": "2026-11-20"}}}
    rows = merge_closed_loop(previous, {"semi-amortized": {"mean": -150.0}})
    assert list(rows) == ["amortized", "semi-amortized", "CEM MPC"]  # the table keeps its order
    assert rows["semi-amortized"] == {"mean": -150.0}  # measured now, not marked
    assert rows["amortized"] == {"mean": -144.7, "previous_run": "2026-11-28"}
    assert rows["CEM MPC"]["previous_run"] == "2026-11-20"  # a row reused twice keeps the date it was measured
    assert merge_closed_loop({}, {"amortized": {"mean": -1.0}}) == {"amortized": {"mean": -1.0}}


def test_the_protocol_normalises_per_state_and_leaves_out_states_the_policy_does_not_beat():
    from benchmarks.control import normalised

    # costs of 3 iterates (row 0: the zero action) on 4 states; policy costs 1, 1, 5 (worse than zero) and 2 (equal)
    curve = torch.tensor([[3.0, 5.0, 4.0, 2.0], [2.0, 1.0, 4.5, 2.0], [0.0, 2.0, 4.0, 2.0]])
    values, left_out = normalised(curve, torch.tensor([1.0, 1.0, 5.0, 2.0]))
    assert left_out == 2  # no scale where the zero action is as good as the policy or better
    torch.testing.assert_close(values, torch.tensor([[-1.0, -1.0], [-0.5, 0.0], [0.0, -0.25]]))  # clamped at 0
