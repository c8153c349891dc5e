"""The tutorial's model-free protocol (REFERENCE §4.2, Fig. 4.2) on a trained Pendulum-v1 actor–critic: how much
faster is the actor than Adam from zero actions at maximising the trained critic's Q?

States: ``num_states`` states visited by the trained actor itself (deterministic episodes from seeded resets,
200 states each: the reference's "expert trajectory"). On them:

* the actor's time per batch: its deterministic action tanh μ(s) for all states in one forward pass, under
  ``torch.no_grad``, median of 20 timed calls after 3 warm-ups;
* Adam from u = 0 (lr 5e-3, the reference's baseline) on the batch-mean of −min(Q1, Q2)(s, u) over actions in the
  environment's box (the iterates are clipped to [−1, 1]: the critic was only trained there), 500 iterations;
* values normalised per state so that the actor's action is 0 and the zero action −1, (Q − Q_actor) /
  (Q_actor − Q_zero), then clamped to ≤ 0 as the reference does (the mean over states is reported), over the states
  where the actor beats the zero action (the others have no scale; their count is reported);
* Adam's time to reach the actor's value: the first iteration whose batch-mean Q is at least the actor's batch-mean Q
  (time from a second, clean run that stops there), and the ratio to the actor's time.

``run(ckpt_path, num_states, quick)`` returns the markdown table (its header :data:`HEADER` and one row), which
``benchmarks/control.py --actor-ckpt`` puts beside the model-based ones; the checkpoint is one of
``lightning-amor fit --config recipes/_base/trainer.yaml --config recipes/control/sac_pendulum.yaml`` or one left by
``benchmarks/rl_sb3.py`` (``runs/control/rl_sb3/ours_seed<k>.ckpt``).

    OMP_NUM_THREADS=1 python -m benchmarks.control_actor --ckpt runs/control/sac_pendulum/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from benchmarks.control import normalised

ADAM_LR = 5e-3
ADAM_ITERATIONS = 500
REPORTED_AT = (50, 100, 200, 500)
HEADER = (
    "| problem | states | policy ms/batch | Adam normalised value at 50 / 100 / 200 / 500 it | Adam it to policy's "
    "value | Adam s to policy's value | ratio |\n|---|---|---|---|---|---|---|"
)


def load_actor_critic(ckpt_path: str) -> Any:
    """The ActorCriticModule of a ``lightning-amor fit`` checkpoint, or of one written by benchmarks/rl_sb3.py."""
    from lightning_amor.loading import load_module
    from lightning_amor.module import BadCheckpointError

    try:
        return load_module(ckpt_path)
    except BadCheckpointError as error:
        if "does not store the recipe" not in str(error):
            raise
    from benchmarks.rl_sb3 import build_module

    module = build_module()
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return module.eval()


@torch.no_grad()
def visited_states(module: Any, num_states: int, seed: int = 20_000) -> Tensor:
    """``num_states x 3`` states of the actor's deterministic Pendulum-v1 episodes (resets seeded seed, seed + 1...)."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    high = float(env.action_space.high[0])
    states: list[Tensor] = []
    episode = 0
    while len(states) < num_states:
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done and len(states) < num_states:
            state = torch.as_tensor(obs, dtype=torch.float32)
            states.append(state)
            action = module.act(state[None]).numpy()[0] * high
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        episode += 1
    return torch.stack(states)


def q_value(module: Any, states: Tensor, actions: Tensor) -> Tensor:
    """min(Q1, Q2)(s, u), ``B``."""
    return -module.objective.max_q(actions, {"obs": states})


def actor_time_ms(module: Any, states: Tensor, repeats: int = 20) -> float:
    """Median wall time (ms) of the actor's deterministic actions for the whole batch."""
    with torch.no_grad():
        for _ in range(3):
            module.act(states)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module.act(states)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def adam(module: Any, states: Tensor, iterations: int, stop_at: float | None = None) -> tuple[list[Tensor], float]:
    """Adam from zero actions on the batch-mean of −Q, iterates clipped to [−1, 1]: the Q of every iterate
    (``B`` each, the first at u = 0) and the wall time; with ``stop_at`` it stops at the first iterate whose mean Q
    is at least that (reading the mean every iteration, a cheap CPU read: that run's time is the one reported)."""
    action = torch.zeros(len(states), module.objective.action_dim, requires_grad=True)
    optimizer = torch.optim.Adam([action], lr=ADAM_LR)
    values: list[Tensor] = []
    start = time.perf_counter()
    for _ in range(iterations + 1):
        q = q_value(module, states, action)
        values.append(q.detach())
        if stop_at is not None and float(q.detach().mean()) >= stop_at:
            break
        optimizer.zero_grad()
        (-q.mean()).backward()
        optimizer.step()
        with torch.no_grad():
            action.clamp_(-1.0, 1.0)
    return values, time.perf_counter() - start


def run(ckpt_path: str, num_states: int = 1000, quick: bool = False) -> str:
    """The protocol on ``num_states`` states of the checkpoint's actor: a markdown table (:data:`HEADER`, one row)."""
    torch.manual_seed(0)
    module = load_actor_critic(ckpt_path)
    for p in module.parameters():
        p.requires_grad_(False)
    states = visited_states(module, num_states)
    iterations = 50 if quick else ADAM_ITERATIONS
    policy_ms = actor_time_ms(module, states, repeats=3 if quick else 20)
    with torch.no_grad():
        q_actor = q_value(module, states, module.act(states))
    values, _ = adam(module, states, iterations)
    # the model-based protocol's normalisation on costs −Q (policy 0, zero action −1), over the states where the
    # actor beats the zero action (a state where it does not has no scale)
    scores, left_out = normalised(-torch.stack(values), -q_actor)
    curve = scores.mean(1)
    at = " / ".join(f"{float(curve[i]):.3f}" if i < len(curve) else "–" for i in REPORTED_AT)
    if left_out:
        at += f" ({left_out} states left out: the actor does not beat u = 0 there)"
    target = float(q_actor.mean())
    reached = next((i for i, v in enumerate(values) if float(v.mean()) >= target), None)
    if reached is None:
        it, seconds, ratio = f"not within {iterations}", "–", "–"
    else:
        _, elapsed = adam(module, states, reached, stop_at=target)
        it, seconds, ratio = str(reached), f"{elapsed:.3f}", f"{1000 * elapsed / policy_ms:.0f}×"
    return (f"{HEADER}\n| model-free max-Q (Pendulum-v1 SAC actor) | {len(states)} | {policy_ms:.3f} | {at} | {it} "
            f"| {seconds} | {ratio} |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint of recipes/control/sac_pendulum.yaml")
    parser.add_argument("--states", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="few states and iterations, to check it runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(run(args.ckpt, 64 if args.quick else args.states, args.quick), end="")


if __name__ == "__main__":
    main()
