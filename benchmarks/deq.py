"""How much solver work does a DEQ's learned initializer save? (issue 13, HyperDEQ-style warm starts)

For a trained checkpoint of ``recipes/deq/deq_digits.yaml`` (or ``--recipe recipes/deq/deq_fashion.yaml``,
Fashion-MNIST) and its held-out test inputs, every solver runs to the same absolute residual tolerance
‖g(z) − z‖ ≤ tol (per input) on the same trained DEQ, from three starts:

* **zero**: z⁰ = 0, the usual cold start;
* **previous**: the fixed point of the previous held-out input (inputs taken in the test set's order, as a stream
  would bring them; the first input starts from zero);
* **learned**: the initializer's prediction ẑ_θ(x) (its time is added to the solver's). An ``InjectionInitializer``
  reads the DEQ's injection U x + b, computed inside the prediction and so timed with it; it applies no W, so it
  counts no evaluation of g.

Solvers: this project's :class:`~lightning_amor.fixed_point.Anderson` and
:class:`~lightning_amor.fixed_point.FixedPointIteration`, and torchdeq's ``anderson`` and ``fixed_point_iter``
through ``torchdeq.get_deq`` (side by side, same map g, same tolerance, ``f_stop_mode='abs'``). The common unit of
work is the number of evaluations of g per input until its residual first meets the tolerance (ours: updates + 1;
torchdeq's from its per-input ``abs_trace``, which starts with a placeholder and, for Anderson, after two unrecorded
evaluations). Reported per (solver, start): median and p90 evaluations, the seconds of one batched solve of the whole
set (median of repeats; torchdeq stops a batch when its worst input converges, ours freezes each input when it
does), the share certified, and the task accuracy of head(z) at the returned points.

Target (issue 13): the learned start at least halves the median iterations at equal tolerance, with the same accuracy.

    python -m benchmarks.deq --ckpt runs/deq/deq_digits/checkpoints/last.ckpt
    python -m benchmarks.deq --recipe recipes/deq/deq_fashion.yaml --ckpt runs/deq/deq_fashion/checkpoints/last.ckpt
    python -m benchmarks.deq --quick          # trains the recipe for 20 steps in a temporary folder, then measures
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lightning_amor.apps.deq import DEQClassifier
from lightning_amor.fixed_point import Anderson, FixedPointIteration, FixedPointSolver
from lightning_amor.loading import load_datamodule, load_module
from lightning_amor.residual_figures import residual_curves_figure
from lightning_amor.results import cpu_name, write_section

RECIPE = Path("recipes/deq/deq_digits.yaml")
STARTS = ("zero", "previous", "learned")
TITLE = "## DEQ: solver work from a learned start (benchmarks/deq.py)"


def title_of(recipe: Path) -> str:
    """The RESULTS.md section of ``recipe`` (the digits recipe keeps its original title)."""
    if recipe.stem == RECIPE.stem:
        return TITLE
    return f"## DEQ ({recipe.stem}): solver work from a learned start (benchmarks/deq.py)"


def figure_name(recipe: Path) -> str:
    """The residual figure's file name for ``recipe`` (the digits recipe keeps its original name)."""
    return "deq_residuals.png" if recipe.stem == RECIPE.stem else f"{recipe.stem}_residuals.png"


def quick_checkpoint(folder: Path, steps: int, recipe: Path = RECIPE) -> Path:
    """Train the recipe for ``steps`` steps with ``lightning-amor fit`` into ``folder``; its newest checkpoint."""
    command = [sys.executable, "-m", "lightning_amor.cli", "fit", "--config", "recipes/_base/trainer.yaml",
               "--config", str(recipe), "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.default_root_dir", str(folder), "--trainer.enable_progress_bar", "false"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return max((folder / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def evaluations_to(trace: Tensor, tol: float, offset: int) -> Tensor:
    """Per input (columns of the ``K x B`` residual ``trace``), g's evaluations until its residual is ≤ ``tol``:
    the first such row + ``offset``; −1 where never."""
    hit = trace <= tol
    first = hit.to(torch.int64).argmax(0) + offset
    return torch.where(hit.any(0), first, torch.full_like(first, -1))


def timed(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(solver: FixedPointSolver, g: Callable[[Tensor], Tensor], z0: Tensor, tol: float):
    with torch.no_grad():
        result = solver.iterate(g, z0)
    evals = evaluations_to(result.residuals, tol, 1)
    return result.y, evals, result.converged, result.residuals


def torchdeq_solve(name: str, g: Callable[[Tensor], Tensor], z0: Tensor, tol: float, budget: int):
    from torchdeq import get_deq

    deq = get_deq(core="indexing", f_solver=name, f_max_iter=budget, f_tol=tol, f_stop_mode="abs")
    deq.eval()
    with torch.no_grad():
        z, info = deq(g, z0)
    trace = info["abs_trace"].T  # K x B; row 0 is a placeholder (1e8)
    offset = 2 if name == "anderson" else 0
    evals = evaluations_to(trace[1:], tol, offset + 1)
    return z[-1], evals, evals >= 0, trace[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe of the checkpoint (digits or fashion)")
    parser.add_argument("--ckpt", default=None, help="default: runs/deq/<recipe>/checkpoints/last.ckpt")
    parser.add_argument("--quick", action="store_true",
                        help="train 20 steps in a temporary folder, 64 inputs; writes no results and no figures")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-4], help="absolute residual tolerances")
    parser.add_argument("--contexts", type=int, default=None, help="held-out inputs (default: the whole test set)")
    parser.add_argument("--budget", type=int, default=500, help="the most evaluations of g per solve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="'none' to write no section")
    parser.add_argument("--figures", default="benchmarks/figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    temporary = None
    recipe = Path(args.recipe)
    if not recipe.is_file():
        raise SystemExit(f"--recipe {recipe} does not exist (e.g. {RECIPE} or recipes/deq/deq_fashion.yaml)")
    ckpt = Path(args.ckpt or f"runs/deq/{recipe.stem}/checkpoints/last.ckpt")
    if args.quick:
        temporary = tempfile.TemporaryDirectory()
        ckpt = quick_checkpoint(Path(temporary.name), 20, recipe)
        args.contexts, args.repeats = args.contexts or 64, 1
    elif not ckpt.exists():
        raise SystemExit(f"{ckpt} does not exist: train it first with\n  lightning-amor fit --config "
                         f"recipes/_base/trainer.yaml --config {recipe}\nor run `python -m benchmarks.deq --quick`")
    module = load_module(ckpt)
    objective: DEQClassifier = module.objective
    data = load_datamodule(ckpt)
    size = args.contexts or data.test_size
    x = data.fixed_set("test", data.test_size, with_targets=False)["x"]
    x = {k: v[:size] for k, v in x.items()}
    labels = objective.labels(x)
    with torch.no_grad():
        g = objective.fixed_point_map(x)
        z_exact = Anderson(steps=1000, atol=1e-6).iterate(g, torch.zeros(size, objective.dim)).y
        prediction = module(x)
        predict_seconds = timed(lambda: module(x), args.repeats)
    previous = torch.cat([torch.zeros(1, objective.dim), z_exact[:-1]])
    starts = {"zero": torch.zeros(size, objective.dim), "previous": previous, "learned": prediction}
    distance = {k: float((v - z_exact).norm(dim=-1).median()) for k, v in starts.items()}

    rows, traces, verdicts = [], {}, []
    for tol in args.tol:
        solvers = {
            "ours: Anderson (m=5)": lambda z0, t=tol: ours(Anderson(steps=args.budget, atol=t, memory=5), g, z0, t),
            "ours: fixed-point iteration": lambda z0, t=tol: ours(FixedPointIteration(steps=args.budget, atol=t),
                                                                  g, z0, t),
            "torchdeq: anderson (m=6)": lambda z0, t=tol: torchdeq_solve("anderson", g, z0, t, args.budget),
            "torchdeq: fixed_point_iter": lambda z0, t=tol: torchdeq_solve("fixed_point_iter", g, z0, t, args.budget),
        }
        medians = {}
        for solver_name, solve in solvers.items():
            for start in STARTS:
                z0 = starts[start]
                z, evals, certified, trace = solve(z0)
                seconds = timed(lambda s=solve, z0=z0: s(z0), args.repeats)
                if start == "learned":
                    seconds += predict_seconds
                reached = evals[evals >= 0].double()
                median = float(reached.median()) if reached.numel() else float("nan")
                p90 = float(torch.quantile(reached, 0.9)) if reached.numel() else float("nan")
                accuracy = float((objective.logits(z).argmax(-1) == labels).double().mean())
                medians[(solver_name, start)] = median
                rows.append((tol, solver_name, start, median, p90, 1000 * seconds, float(certified.double().mean()),
                             accuracy))
                if solver_name.startswith("ours: Anderson") and tol == min(args.tol):
                    traces[f"from {start}"] = trace.float()
        for solver_name in solvers:
            ratio = medians[(solver_name, "zero")] / medians[(solver_name, "learned")]
            verdicts.append((tol, solver_name, ratio))

    accuracies = {(r[0], r[1], r[2]): r[7] for r in rows}
    same_accuracy = len({round(a, 6) for a in accuracies.values()}) == 1
    lines = ["| tol | solver | start | median g-evals | p90 | ms per batch | certified | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t:g} | {s} | {st} | {m:.0f} | {p:.0f} | {ms:.1f} | {100 * c:.1f}% | {100 * a:.2f}% |"
              for t, s, st, m, p, ms, c, a in rows]
    summary = [f"| {t:g} | {s} | {r:.2f}× | {'met' if r >= 2 else 'MISSED'} |" for t, s, r in verdicts]
    table = "\n".join(lines)
    verdict = "\n".join(["| tol | solver | median evals zero / learned | target ≥ 2× |", "|---|---|---|---|", *summary])
    print(table)
    print()
    print(verdict)
    print("\nmedian ‖z⁰ − z*‖ by start: " + ", ".join(f"{k} {v:.3g}" for k, v in distance.items()))
    print(f"prediction time: {1000 * predict_seconds:.2f} ms for {size} inputs; same accuracy from every start and "
          f"solver: {same_accuracy}")

    # a quick check draws its figure in its temporary folder, leaving the full run's figure alone
    figures = Path(temporary.name) if temporary is not None else Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    figure = residual_curves_figure(traces, tolerance=min(args.tol),
                                    title=f"Anderson (ours) on {size} held-out inputs ({recipe.stem}): residual "
                                          f"from each start")
    figure.savefig(figures / figure_name(recipe), dpi=120)
    if args.results != "none" and not args.quick:
        command = "python -m benchmarks.deq " + " ".join(a for a in sys.argv[1:])
        section = "\n".join([
            title_of(recipe), "",
            f"`{command.strip()}` on {datetime.date.today()}, {cpu_name()}, 1 thread; the 2-core machine was shared "
            f"with other jobs, so the milliseconds are noisy (the evaluation counts are not). Model: {ckpt} "
            f"({type(module.amortizer).__name__} initializer, DEQ hidden size {objective.dim}, ‖W‖₂ ≤ "
            f"{objective.contraction}); {size} held-out test inputs; torchdeq {_torchdeq_version()}.", "",
            "Median distance of each start to z* (solved to 1e-6): "
            + ", ".join(f"{k} {v:.3g}" for k, v in distance.items())
            + f". Prediction time {1000 * predict_seconds:.2f} ms per batch (included in the learned rows' ms).", "",
            table, "", verdict, "",
            f"Same task accuracy from every start and solver: {same_accuracy}. Residual against iteration: "
            f"`benchmarks/figures/{figure_name(recipe)}`.",
        ])
        write_section(args.results, title_of(recipe), section + "\n")
    if temporary is not None:
        temporary.cleanup()


def _torchdeq_version() -> str:
    from importlib.metadata import version

    return version("torchdeq")


if __name__ == "__main__":
    main()
