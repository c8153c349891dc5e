"""Amortized MPC on Pendulum-v1 against gradient shooting and CEM (tutorial §4.3, Fig. 4.3), and in the real loop.

Two measurements, side by side in one process:

1. **The reference's protocol** on 1000 states (the data module's seeded test set: every angle, every speed): the
   policy's time for the batch (``torch.no_grad``, median of repeats, after warm-up) against Adam from zero actions
   at lr 5e-3 on the same H-step objective, through the core's :func:`~lightning_amor.evaluation.evaluate` (its
   curve, its timing and its "first iteration whose batch-mean f reaches the policy's"). Values are normalised per
   state as the reference does, so that the policy is 0 and the zero action −1, ``(f_policy − f) / (f_zero −
   f_policy)``, clamped to ≤ 0 (states where the policy is no better than doing nothing have no such scale and are
   counted, then left out of the normalised curve). The semi-amortized policy is scored against the same Adam curve.
2. **The closed loop**: each controller in the real gymnasium ``Pendulum-v1`` (receding horizon: apply the first
   action, re-plan) for ``--episodes`` episodes of 200 steps (reset seeds 0, 1, ...): the return (mean ± std) and
   the time of a control step (the episodes run in lockstep, so one planning call serves all of them). Controllers:
   the fully amortized and the semi-amortized policies, Adam-shooting MPC and CEM MPC (both warm-started from the
   previous plan shifted by one step). TensorBoard (``OUT/tensorboard/control``): returns, angle and torque against
   time.

With ``--actor-ckpt`` the model-free protocol of ``benchmarks/control_actor.py`` (the actor against Adam on max Q)
is run too and written as its own section.

    OMP_NUM_THREADS=1 python -m benchmarks.control                 # after training both recipes (about 10 minutes)
    OMP_NUM_THREADS=1 python -m benchmarks.control --quick         # a smoke run into a temporary folder
    OMP_NUM_THREADS=1 python -m benchmarks.control --only-semi     # after retraining the semi recipe (about 2 min)

``--only-semi`` runs the closed loop of the semi-amortized policy alone and takes the other controllers' rows from
the previous full run's ``OUT/control_results.json`` (marked "previous run" with its date); the protocol is
measured again (the semi row needs the per-state Adam curve, which the JSON does not keep).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from benchmarks.results import cpu_name, write_atomically, write_section
from lightning_amor.apps.closed_loop import (
    AmortizedController,
    EpisodeResult,
    SolverController,
    log_episodes,
    run_episodes,
    trajectory_figure,
)
from lightning_amor.cem import CEM
from lightning_amor.evaluation import EvaluationReport, evaluate
from lightning_amor.evaluation_figures import save_figures
from lightning_amor.solvers import Adam

SECTION = "## Control: model-based (Pendulum-v1)"
ACTOR_SECTION = "## Control: model-free protocol"
CHECKPOINTS = {"full": "runs/control/mpc_pendulum/checkpoints/last.ckpt",
               "semi": "runs/control/mpc_pendulum_semi/checkpoints/last.ckpt"}
SNAPSHOTS = (0, 50, 100, 250, 500, 1000, 2000)


def load_module(path: str) -> Any:
    """A trained module of a recipe checkpoint (:func:`lightning_amor.loading.load_module`: eval mode, a clear error
    for a missing or damaged file), with frozen weights."""
    from lightning_amor.loading import load_module as load_checkpoint

    return load_checkpoint(path).requires_grad_(False)


def held_out_states(num: int) -> Tensor:
    """The recipes' seeded test observations (``num x 3``), the same in every run."""
    from datamodules.pendulum_states import PendulumStates

    return PendulumStates(test_size=num, seed=0, cache_dir="none").fixed_set("test", num, with_targets=False)["x"]


def prediction_ms(module: Any, x: Tensor, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one prediction of the batch under ``torch.no_grad``."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            module(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def normalised(curve: Tensor, f_policy: Tensor) -> tuple[Tensor, int]:
    """Adam's values ``K x B`` normalised per state (policy 0, zero action −1, clamped to ≤ 0) over the states where
    the policy beats the zero action: ``K x B'``, and the number of states left out."""
    f_zero = curve[0]
    scale = f_zero - f_policy
    keep = scale > 1e-6 * f_zero.abs().clamp(min=1.0)
    values = ((f_policy[keep] - curve[:, keep]) / scale[keep]).clamp(max=0.0)
    return values, int((~keep).sum())


def protocol(report: EvaluationReport, semi: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The protocol's numbers from the evaluation of the fully amortized policy (and the semi-amortized one scored
    against the same Adam curve)."""
    curve, seconds = report.scratch.objective, report.scratch.seconds
    rows = {}
    policies = {"full": (report.f_pred, 1000.0 * report.prediction_seconds)}
    if semi is not None:
        policies["semi"] = (semi["f"], semi["ms"])
    for name, (f_policy, ms) in policies.items():
        values, left_out = normalised(curve, f_policy)
        mean_curve = curve.mean(1)
        hit = (mean_curve <= f_policy.mean()).nonzero()
        matched = int(hit[0]) if len(hit) else None
        adam_s = float(seconds[matched]) if matched is not None else float(seconds[-1])
        rows[name] = {
            "policy_ms": ms, "mean_f_policy": float(f_policy.mean()), "mean_f_zero": float(curve[0].mean()),
            "adam_mean_f_end": float(mean_curve[-1]), "left_out": left_out,
            "normalised": {k: float(values[k].mean()) for k in SNAPSHOTS if k < len(values)},
            "normalised_end": float(values[-1].mean()),
            "matched_iteration": matched, "adam_seconds_to_match": adam_s,
            "ratio": adam_s / (ms / 1000.0), "ratio_is_lower_bound": matched is None,
            "curve_mean": values.mean(1).tolist(), "curve_std": values.std(1).tolist(),
        }
    return {"rows": rows, "iterations": int(report.scratch.iterations_run), "seconds": seconds.tolist(),
            "states": report.contexts}


def protocol_figure(results: dict[str, Any], path: Path) -> None:
    """Normalised value against Adam iterations and seconds, the policies at 0 (Fig. 4.3's layout)."""
    from lightning_amor.figures import new_figure

    figure = new_figure(9.0, 3.5)
    left, right = figure.subplots(1, 2, sharey=True)
    seconds = np.asarray(results["seconds"])
    row = results["rows"]["full"]
    mean, std = np.asarray(row["curve_mean"]), np.asarray(row["curve_std"])
    iterations = np.arange(len(mean))
    timed = seconds > 0  # a log axis of seconds: the iterates after the first clock reading
    for ax, xs, rows in ((left, iterations, slice(None)), (right, seconds, timed)):
        ax.plot(xs[rows], mean[rows], label="Adam from zero actions (lr 5e-3)")
        ax.fill_between(xs[rows], (mean - std)[rows], np.minimum(mean + std, 0.0)[rows], alpha=0.3)
        ax.axhline(0.0, color="k", ls="--", label=f"fully amortized policy ({row['policy_ms']:.2f} ms)")
        ax.set_ylim(-1.05, 0.05)
        ax.grid(alpha=0.3)
    left.set_xlabel("Adam iterations")
    right.set_xlabel("seconds")
    right.set_xscale("log")
    left.set_ylabel("normalised value (policy 0, zero action −1)")
    left.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=110)


def controllers(modules: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The four closed-loop controllers (only the semi-amortized one with ``--only-semi``)."""
    if args.only_semi:
        return {"semi-amortized": AmortizedController(modules["semi"], "semi-amortized")}
    objective = modules["full"].objective
    out: dict[str, Any] = {"amortized": AmortizedController(modules["full"], "amortized")}
    if "semi" in modules:
        out["semi-amortized"] = AmortizedController(modules["semi"], "semi-amortized")
    out["Adam-shooting MPC"] = SolverController(objective, Adam(steps=args.mpc_adam_steps, lr=args.mpc_adam_lr),
                                                name="adam_mpc")
    out["CEM MPC"] = SolverController(
        objective, CEM(iterations=args.cem_iterations, population=args.cem_population, elites=args.cem_elites,
                       init_std=1.0, lower=-3.0, upper=3.0), name="cem_mpc")
    return out


def merge_closed_loop(previous: dict[str, Any], fresh: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The closed-loop rows of this run (``fresh``) in the order of a previous run's JSON (``previous``, ``{}`` for
    none), its rows kept where this run has none, marked ``previous_run`` with that run's date."""
    rows: dict[str, dict[str, Any]] = {}
    for label, row in previous.get("closed_loop", {}).items():
        rows[label] = fresh[label] if label in fresh else \
            {**row, "previous_run": row.get("previous_run", previous["meta"]["date"])}
    rows.update(fresh)
    return rows


def closed_loop(modules: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, EpisodeResult]:
    """Every controller's episodes, logged to ``out/tensorboard/control``."""
    from torch.utils.tensorboard import SummaryWriter

    results = {}
    writer = SummaryWriter(str(out / "tensorboard" / "control"))
    try:
        for label, controller in controllers(modules, args).items():
            print(f"closed loop: {label}", flush=True)
            results[label] = run_episodes(controller, list(range(args.episodes)), args.episode_steps)
            log_episodes(writer, label.replace(" ", "_"), results[label])
        from lightning_amor.figures import log_figure

        log_figure(writer, "closed_loop/all_controllers", trajectory_figure(results), 0)
    finally:
        writer.close()
    return results


def report_text(results: dict[str, Any], args: argparse.Namespace) -> str:
    meta, prot = results["meta"], results["protocol"]
    command = ("OMP_NUM_THREADS=1 python -m benchmarks.control" + (" --quick" if args.quick else "")
               + (" --only-semi" if args.only_semi else ""))
    lines = [
        SECTION, "",
        f"Command: `{command}` (checkpoints of `recipes/control/mpc_pendulum.yaml` and "
        f"`recipes/control/mpc_pendulum_semi.yaml`, trained with `lightning-amor fit`)  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {torch.__version__}; {meta['threads']} thread(s); "
        f"load average {meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} at the end: the 2-core machine was "
        f"shared with other jobs, so times are noisy.", "",
        f"### The reference's protocol: {prot['states']} states, H = {meta['horizon']}", "",
        f"Adam from zero actions at lr {args.lr} for {prot['iterations']} iterations on the batch (the reference "
        "runs 500), timed by `lightning_amor.evaluation.evaluate`; values normalised per state so that the policy is "
        "0 and the zero action −1 (clamped to ≤ 0). \"Adam reaches the policy\" is the first iteration whose "
        "batch-mean cost is at most the policy's; where it never does, the ratio is a lower bound (Adam's whole "
        "run over the policy's time).", "",
        "| policy | time per batch | mean cost (zero actions → policy) | Adam's normalised value at "
        + " / ".join(str(k) for k in SNAPSHOTS) + " it | Adam reaches the policy | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in prot["rows"].items():
        snaps = " / ".join(f"{row['normalised'][k]:.3f}" for k in SNAPSHOTS if k in row["normalised"])
        reached = (f"iteration {row['matched_iteration']}, {row['adam_seconds_to_match']:.2f} s"
                   if row["matched_iteration"] is not None else
                   f"not within {prot['iterations']} it ({row['adam_seconds_to_match']:.2f} s; Adam's mean cost "
                   f"{row['adam_mean_f_end']:.2f})")
        ratio = f"{'≥ ' if row['ratio_is_lower_bound'] else ''}{row['ratio']:.0f}×"
        label = {"full": "fully amortized (MLP)", "semi": "semi-amortized (MLP + 5 Adam steps)"}[name]
        left = (f" ({row['left_out']} states where it is no better than zero actions left out)"
                if row["left_out"] else "")
        lines.append(f"| {label} | {row['policy_ms']:.2f} ms | {row['mean_f_zero']:.2f} → {row['mean_f_policy']:.2f}"
                     f"{left} | {snaps} | {reached} | {ratio} |")
    lines += [
        "", "Reference (humanoid, H = 3, learned model, GPU): policy 5.8 ms, \"≈ 700×\"; Adam at −0.008 after 500 "
        "iterations (7.1 s).", "",
        f"### Closed loop in gymnasium's Pendulum-v1: {args.episodes} episodes of {args.episode_steps} steps", "",
        "Receding horizon: each control step plans from the observation and applies the first torque. The episodes "
        "run in lockstep, so one planning call serves all of them; the time is that call's median. "
        f"Adam-shooting MPC: {args.mpc_adam_steps} Adam steps at lr {args.mpc_adam_lr}; CEM MPC: {args.cem_iterations} "
        f"iterations of {args.cem_population} samples, {args.cem_elites} elites; both warm-started from the previous "
        "plan shifted by one step.", "",
        "| controller | return (mean ± std) | per episode | time per control step (median) |",
        "|---|---|---|---|",
    ]
    for label, row in results["closed_loop"].items():
        if "previous_run" in row:
            label = f"{label} (previous run, {row['previous_run']})"
        lines.append(f"| {label} | {row['mean']:.1f} ± {row['std']:.1f} | "
                     f"{', '.join(f'{r:.0f}' for r in row['returns'])} | {row['ms_per_step']:.2f} ms |")
    loop_figure = ("`benchmarks/figures/control_closed_loop_semi.png` (this run's semi-amortized episodes: angle and "
                   "torque against time; `control_closed_loop.png` has the previous full run's four controllers)"
                   if args.only_semi else
                   "`benchmarks/figures/control_closed_loop.png` (angle and torque against time)")
    lines += ["", "Figures: `benchmarks/figures/control_protocol.png` (normalised value against Adam iterations and "
              f"seconds), {loop_figure}, and the core evaluation's `control_full_{{speedup,gap,warm_start}}.png`.", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=CHECKPOINTS["full"], help="checkpoint of recipes/control/mpc_pendulum.yaml")
    parser.add_argument("--semi-ckpt", default=CHECKPOINTS["semi"],
                        help="checkpoint of recipes/control/mpc_pendulum_semi.yaml ('none' to leave it out)")
    parser.add_argument("--states", type=int, default=1000, help="states of the protocol (the reference's 1000)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam's step size in the protocol (the reference's)")
    parser.add_argument("--iterations", type=int, default=2000, help="Adam's iterations in the protocol")
    parser.add_argument("--repeats", type=int, default=1, help="timed Adam runs (the median is reported)")
    parser.add_argument("--episodes", type=int, default=5, help="closed-loop episodes (reset seeds 0, 1, ...)")
    parser.add_argument("--episode-steps", type=int, default=200)
    parser.add_argument("--mpc-adam-steps", type=int, default=30)
    parser.add_argument("--mpc-adam-lr", type=float, default=0.1)
    parser.add_argument("--cem-iterations", type=int, default=5)
    parser.add_argument("--cem-population", type=int, default=64)
    parser.add_argument("--cem-elites", type=int, default=8)
    parser.add_argument("--actor-ckpt", default=None,
                        help="checkpoint of the model-free actor-critic: also run benchmarks.control_actor's protocol")
    parser.add_argument("--quick", action="store_true", help="a smoke run into a temporary folder, no RESULTS.md")
    parser.add_argument("--only-semi", action="store_true",
                        help="closed loop of the semi-amortized policy only; the other controllers' rows come from "
                             "the previous run's OUT/control_results.json")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--out", default=None, help="figures, JSON and TensorBoard (default benchmarks/figures; a "
                                                    "temporary folder with --quick)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="control_quick_") if args.quick else "benchmarks/figures"
    if args.quick:
        args.states, args.iterations, args.episodes, args.episode_steps = 64, 60, 2, 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous: dict[str, Any] = {}
    if args.only_semi:
        if args.semi_ckpt == "none":
            raise SystemExit("--only-semi needs the semi-amortized checkpoint (--semi-ckpt)")
        try:
            previous = json.loads((out / "control_results.json").read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--only-semi reuses the other controllers' rows of a previous full run, but "
                             f"{out / 'control_results.json'} could not be read ({error}); run the benchmark "
                             f"without --only-semi first") from error
    torch.manual_seed(0)
    load = [os.getloadavg()[0]]
    modules = {"full": load_module(args.ckpt)}
    if args.semi_ckpt != "none":
        modules["semi"] = load_module(args.semi_ckpt)
    x = held_out_states(args.states)

    print("protocol: Adam from zero actions against the fully amortized policy", flush=True)
    report = evaluate(modules["full"], x, solver=Adam(steps=args.iterations, lr=args.lr), repeats=args.repeats,
                      warmup=3, prediction_repeats=20, name="control_full")
    save_figures(report, out, "control_full")
    semi = None
    if "semi" in modules:
        with torch.no_grad():
            f_semi = modules["semi"].objective(modules["semi"](x), x)
        semi = {"f": f_semi, "ms": prediction_ms(modules["semi"], x, repeats=5)}
    results: dict[str, Any] = {"protocol": protocol(report, semi)}
    protocol_figure(results["protocol"], out / "control_protocol.png")

    episodes = closed_loop(modules, args, out)
    figure = trajectory_figure(episodes)
    figure.savefig(out / ("control_closed_loop_semi.png" if args.only_semi else "control_closed_loop.png"), dpi=100)
    fresh = {label: {"returns": r.returns.tolist(), "mean": float(r.returns.mean()), "std": float(r.returns.std()),
                     "ms_per_step": 1000.0 * float(np.median(r.step_seconds))} for label, r in episodes.items()}
    results["closed_loop"] = merge_closed_loop(previous, fresh)
    load.append(os.getloadavg()[0])
    results["meta"] = {"date": str(date.today()), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                       "threads": torch.get_num_threads(), "load": load, "horizon": modules["full"].objective.horizon}
    text = report_text(results, args)
    print(text)
    write_atomically(out / "control_results.json", json.dumps(results))  # the curves too: the figure redraws
    if not args.quick:
        write_section(Path(args.results), SECTION, text)

    if args.actor_ckpt:
        try:
            import benchmarks.control_actor as control_actor
        except ImportError as error:
            raise SystemExit(f"--actor-ckpt needs benchmarks/control_actor.py (the model-free benchmark): {error}") \
                from error
        rows = control_actor.run(args.actor_ckpt, num_states=args.states, quick=args.quick)
        actor_text = f"{ACTOR_SECTION}\n\nCommand: `OMP_NUM_THREADS=1 python -m benchmarks.control --actor-ckpt " \
                     f"{args.actor_ckpt}{' --quick' if args.quick else ''}`\n\n{rows}\n"
        print(actor_text)
        if not args.quick:
            write_section(Path(args.results), ACTOR_SECTION, actor_text)
    return results


if __name__ == "__main__":
    main()
