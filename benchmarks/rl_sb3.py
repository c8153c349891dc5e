"""Soft actor–critic on Pendulum-v1: this project's ActorCriticModule side by side with Stable-Baselines3's SAC.

Both run the same algorithm with rl-baselines3-zoo's settings for Pendulum-v1 (SAC, lr 1e-3, everything else SB3's
defaults: batch 256, buffer 10⁶, 100 random steps before learning, one gradient step per environment step,
τ 0.005, γ 0.99, 256×256 networks, learned temperature with target entropy −1) on the same budget: 20 000
environment steps, seeds 0, 1, 2, and 10 deterministic evaluation episodes every 2000 environment steps, on the
same evaluation resets (seeds 10 000 … 10 009) for both. Ours is built as ``recipes/control/sac_pendulum.yaml``
(no logger, no checkpoints, no validation: the timed run is training and the evaluation episodes only). One thread
(``torch.set_num_threads(1)``) per run. With ``--jobs 2`` (the default) ours and SB3's run for the same seed at the
same time, in two processes, so that the shared machine's load hits both alike, and the seeds one after the
other; with ``--jobs 1`` every run goes one after the other, alternating ours and SB3's (ours first for seed 0,
SB3's first for seed 1, ...).

Reported: the mean evaluation return against environment steps (one plot, ``control_rl_returns.png``), the return
at 6k and 20k steps, the wall time of each run, and for ours where the time goes: the environment and acting
(the stream's ``next_batch``), the updates (the training step: both losses and both optimizers), the evaluation
episodes, and the rest (Lightning's loop, hooks and data fetching, and the target critic's Polyak update, which runs
in the module's end-of-batch hook after the callbacks' end hooks that close the updates' timer).

    OMP_NUM_THREADS=1 python -m benchmarks.rl_sb3            # the full run (3 × 2 runs of 5-15 min), RESULTS.md
    OMP_NUM_THREADS=1 python -m benchmarks.rl_sb3 --quick    # 1 seed, 1200 steps, to a temporary folder only
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.results import cpu_name, write_section

SECTION = "## Control: model-free (SAC on Pendulum-v1, side by side with SB3)"
EVAL_SEED = 10_000
CHECKPOINTS = Path("runs/control/rl_sb3")
"""Where each of our runs leaves its final checkpoint (``ours_seed<seed>.ckpt``)."""
TARGET_6K, TARGET_20K, TARGET_WALL_RATIO = -200.0, -170.0, 1.5


@dataclass
class Run:
    """One training run: evaluation returns against environment steps, wall time and its parts (ours)."""

    library: str
    seed: int
    steps: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    parts_s: dict[str, float] = field(default_factory=dict)

    def at(self, step: int) -> float:
        return self.returns[self.steps.index(step)] if step in self.steps else float("nan")


def deterministic_returns(act: Any, episodes: int) -> list[float]:
    """The returns of ``episodes`` deterministic Pendulum-v1 episodes from the resets seeded EVAL_SEED + i;
    ``act(obs) -> env action`` (numpy)."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED + episode)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def build_module() -> Any:
    """The ActorCriticModule of ``recipes/control/sac_pendulum.yaml``, built in Python."""
    from lightning_amor import MLP, FullyAmortized
    from lightning_amor.apps.actor_critic import ActorCriticModule, SoftQObjective

    return ActorCriticModule(
        objective=SoftQObjective(obs_dim=3, action_dim=1, hidden=(256, 256)),
        amortizer=FullyAmortized(MLP(3, 2, hidden=[256, 256], context_key="obs")),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        objective_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        gamma=0.99, tau=0.005,
    )


def run_ours(seed: int, total_steps: int, every: int, episodes: int) -> Run:
    """Train ActorCriticModule as ``recipes/control/sac_pendulum.yaml`` for ``total_steps`` environment steps."""
    from pytorch_lightning import Callback, Trainer, seed_everything

    from datamodules.gym_replay import GymReplayData
    from lightning_amor.apps.actor_critic import EvaluationEpisodes

    class Progress(Callback):
        def __init__(self) -> None:
            self.printed = 0

        def on_train_batch_end(self, *args: Any) -> None:
            if len(evaluation.history) > self.printed:
                self.printed = len(evaluation.history)
                steps, mean = evaluation.history[-1][:2]
                print(f"ours seed {seed}: {steps} steps, return {mean:.1f}", flush=True)

    class UpdateTimer(Callback):
        """Time from the batch's start hooks (the evaluation ran before) to its end hooks: the training step."""

        def __init__(self) -> None:
            self.seconds, self._start = 0.0, 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.seconds += time.perf_counter() - self._start

    seed_everything(seed, verbose=False)
    learning_starts = 100
    module = build_module()
    data = GymReplayData("Pendulum-v1", capacity=100_000, learning_starts=learning_starts, batch_size=256,
                         batches_per_epoch=1000, seed=seed)
    evaluation = EvaluationEpisodes("Pendulum-v1", every_n_env_steps=every, episodes=episodes, seed=EVAL_SEED,
                                    figure=False)
    timer = UpdateTimer()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=total_steps - learning_starts, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[evaluation, timer, Progress()],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)  # the trained actor and critic, for benchmarks/control_actor.py
    trainer.save_checkpoint(CHECKPOINTS / f"ours_seed{seed}.ckpt")
    stream = data.stream
    update = timer.seconds
    parts = {"environment and acting": stream.seconds, "updates": update, "evaluation": evaluation.seconds}
    parts["Lightning loop (the rest)"] = wall - sum(parts.values())
    return Run("ours", seed, [h[0] for h in evaluation.history], [h[1] for h in evaluation.history], wall, parts)


def run_sb3(seed: int, total_steps: int, every: int, episodes: int) -> Run:
    """Train Stable-Baselines3's SAC with rl-baselines3-zoo's Pendulum-v1 settings for ``total_steps`` steps."""
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    run = Run("SB3", seed)

    class Evaluate(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds = 0.0

        def _on_step(self) -> bool:
            if self.num_timesteps % every == 0:
                start = time.perf_counter()
                returns = deterministic_returns(lambda obs: self.model.predict(obs, deterministic=True)[0], episodes)
                run.steps.append(self.num_timesteps)
                run.returns.append(float(np.mean(returns)))
                self.seconds += time.perf_counter() - start
                print(f"SB3 seed {seed}: {self.num_timesteps} steps, return {run.returns[-1]:.1f}", flush=True)
            return True

    callback = Evaluate()
    start = time.perf_counter()
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), learning_rate=1e-3, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=total_steps, callback=callback)
    run.wall_s = time.perf_counter() - start
    run.parts_s = {"evaluation": callback.seconds}
    return run


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for library, colour in (("ours", "C0"), ("SB3", "C1")):
        mine = [r for r in runs if r.library == library]
        if not mine:
            continue
        steps = mine[0].steps
        values = np.array([r.returns for r in mine if r.steps == steps])
        mean = values.mean(0)
        ax.plot(steps, mean, color=colour, marker="o",
                label=f"{'lightning-amor ActorCriticModule' if library == 'ours' else 'Stable-Baselines3 SAC'} "
                      f"(mean of {len(values)} seeds)")
        ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2)
    ax.axhline(TARGET_20K, color="grey", linestyle=":", label=f"target {TARGET_20K:.0f}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean return of 10 deterministic episodes")
    ax.set_title("SAC on Pendulum-v1 (band: min–max over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_at(runs: list[Run], library: str, step: int) -> float:
    return statistics.fmean(r.at(step) for r in runs if r.library == library)


def report(runs: list[Run], args: argparse.Namespace, figure: Path) -> str:
    """The markdown section: per-run rows, means, targets and the time breakdown of ours."""
    mid = min(6000, args.steps)
    how = ("ours and SB3 side by side in two processes for each seed, the seeds in turn" if args.jobs == 2
           else "runs one after the other, ours and SB3 alternating")
    lines = [
        SECTION, "",
        f"Command: `OMP_NUM_THREADS=1 nice -n 5 python -m benchmarks.rl_sb3{' --quick' if args.quick else ''}`  ",
        f"Date: {datetime.date.today().isoformat()}; {cpu_name()}, one thread (`torch.set_num_threads(1)`) per run, "
        f"{how}; the 2-core machine was shared with other "
        f"jobs.  ",
        f"Both: SAC with rl-baselines3-zoo's Pendulum-v1 settings, {args.steps} environment steps, seeds "
        f"{args.seeds}, {args.episodes} deterministic evaluation episodes every {args.every} steps (the same "
        f"resets for both). Figure: `{figure}`.",
        *([f"Only seeds {args.seeds} finished: the run was stopped for lack of time (the shared machine ran it at "
           f"about a quarter of its idle speed), and the section was written from the finished runs with "
           f"`--report-from`."] if args.report_from and args.seeds != [0, 1, 2] else []), "",
        f"| run | seed | return at {mid // 1000}k | return at {args.steps // 1000}k | wall s | env steps/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r.library} | {r.seed} | {r.at(mid):.1f} | {r.at(args.steps):.1f} | {r.wall_s:.1f} | "
                     f"{args.steps / r.wall_s:.1f} |")
    ours_wall = statistics.fmean(r.wall_s for r in runs if r.library == "ours")
    sb3_wall = statistics.fmean(r.wall_s for r in runs if r.library == "SB3")
    ratio = ours_wall / sb3_wall
    lines += ["", "| | ours | SB3 | target |", "|---|---|---|---|"]
    for step, target in ((mid, TARGET_6K), (args.steps, TARGET_20K)):
        o, s = mean_at(runs, "ours", step), mean_at(runs, "SB3", step)
        lines.append(f"| mean return at {step // 1000}k | {o:.1f} ({'met' if o >= target else 'missed'}) | {s:.1f} | "
                     f"≥ {target:.0f} |")
    lines.append(f"| wall time per run (s) | {ours_wall:.1f} | {sb3_wall:.1f} | ours ≤ {TARGET_WALL_RATIO}× SB3's |")
    lines.append(f"| ratio ours / SB3 | {ratio:.2f}× ({'met' if ratio <= TARGET_WALL_RATIO else 'missed'}) | | |")
    parts = [r.parts_s for r in runs if r.library == "ours"]
    lines += ["", "Where our time goes (mean per run, s; per environment step in ms):", "",
              "| part | s | ms/step |", "|---|---|---|"]
    for name in parts[0]:
        value = statistics.fmean(p[name] for p in parts)
        lines.append(f"| {name} | {value:.1f} | {1000 * value / args.steps:.2f} |")
    sb3_eval = statistics.fmean(r.parts_s["evaluation"] for r in runs if r.library == "SB3")
    lines += ["", f"SB3's evaluation episodes took {sb3_eval:.1f} s per run of its {sb3_wall:.1f} s."]
    return "\n".join(lines) + "\n"


def _one_run(job: tuple) -> Run:
    """One run in this process (or a pool's), on one thread."""
    runner, *rest = job
    torch.set_num_threads(1)
    return runner(*rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1200 steps, to a temporary folder only")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: ours and SB3's run at the same time for each seed; 1: every run in turn")
    parser.add_argument("--report-from", default=None, metavar="JSON",
                        help="write the plot and the section from the runs saved in JSON (control_rl_runs.json) of an "
                             "interrupted full run, without running anything")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--figures", default="benchmarks/figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.steps, args.every, args.episodes, args.seeds = (1200, 600, 2, [0]) if args.quick else (20_000, 2000, 10,
                                                                                                [0, 1, 2])
    out = Path(tempfile.mkdtemp(prefix="rl_sb3_quick_")) if args.quick else Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "control_rl_returns.png"
    if args.report_from:
        runs = [Run(**r) for r in json.loads(Path(args.report_from).read_text())]
        args.seeds = sorted({r.seed for r in runs})
        plot(runs, figure)
        section = report(runs, args, figure)
        print(section)
        write_section(args.results, SECTION, section)
        return
    runs: list[Run] = []
    for index, seed in enumerate(args.seeds):
        order = (run_ours, run_sb3) if index % 2 == 0 else (run_sb3, run_ours)
        jobs = [(runner, seed, args.steps, args.every, args.episodes) for runner in order]
        if args.jobs == 2:
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                done = pool.map(_one_run, jobs)
        else:
            done = [_one_run(job) for job in jobs]
        for run in done:
            runs.append(run)
            print(f"{run.library} seed {seed}: {run.wall_s:.1f} s, returns {[round(v) for v in run.returns]}",
                  flush=True)
        (out / "control_rl_runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    plot(runs, figure)
    section = report(runs, args, figure)
    print(section)
    if args.quick:
        print(f"(quick: nothing written to {args.results}; figure in {figure})")
    else:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
