"""How much Sinkhorn work does Meta OT's predicted potential save? (Amos et al. 2022, the warm-start protocol)

For each trained checkpoint of ``recipes/meta_ot/*.yaml`` and the first ``--pairs`` held-out test pairs of its data
module, in one process:

* log-domain Sinkhorn (:class:`~lightning_amor.apps.sinkhorn.Sinkhorn`, the model's dtype) from three starts: zero
  (cold), the Gaussian potential (:func:`~lightning_amor.apps.meta_ot.gaussian_potential`, Thornton & Cuturi 2022:
  a training-free baseline) and the model's prediction (warm); the L1 marginal error of every iterate;
* per problem, solved alone: the iterations and seconds to L1 marginal errors of 1e-2 and 1e-3, the start's own
  time included (the prediction of that one pair, or the Gaussian's closed form); median and p90;
* the prediction's own marginal error;
* the transport cost ⟨P, C⟩ of the warm-started Sinkhorn (stopped at 1e-3, and run on to 1e-6 in float64) against
  POT's ``ot.sinkhorn2`` (log domain, stopThr 1e-8) on the first ``--pot-pairs`` problems: the largest relative
  difference;
* POT's own time per problem, plain and log-domain Sinkhorn, with its stopping threshold at 1e-3 (POT checks the
  L2 error of the column marginal every 10 iterations).

Writes the figure ``benchmarks/figures/meta_ot_<name>_marginal_error.png`` (the median L1 marginal error against
the iteration from the three starts), ``--out``/``<name>.json``, and the section ``## Meta OT: <name>`` of
``benchmarks/RESULTS.md``.

    python -m benchmarks.meta_ot --ckpt runs/meta_ot/digits/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_amor.apps.meta_ot import EntropicOT, entropic_objective, gaussian_potential, grid_cost
from lightning_amor.apps.sinkhorn import Sinkhorn
from lightning_amor.figures import curve_figure
from lightning_amor.results import cpu_name, write_atomically, write_section

THRESHOLDS = (1e-2, 1e-3)
STARTS = ("cold", "gaussian", "predicted")
TARGET_RATIO = 3.0
TARGET_COST_RTOL = 1e-4


def _first_below(errors: Tensor, threshold: float) -> Optional[int]:
    """The first iterate whose error (``K + 1`` errors of iterates 0..K) is at most ``threshold`` (``None``: never)."""
    hit = (errors <= threshold).nonzero()
    return int(hit[0]) if hit.numel() else None


def solve_alone(objective: EntropicOT, x: Tensor, start: Optional[Tensor], start_seconds: float, steps: int
                ) -> dict[str, Any]:
    """Sinkhorn on one problem ``1 x 2 x n`` from ``start`` (``1 x n``; ``None``: zero) to the smallest threshold:
    the iterations and seconds (``start_seconds`` included) to each threshold, ``None`` where not reached."""
    solver = Sinkhorn(steps=steps, tol=min(THRESHOLDS))
    stamps: list[float] = []
    begin = time.perf_counter()
    solver.solve(objective, x, start, callback=lambda k, f: stamps.append(time.perf_counter() - begin))
    errors = solver.last_errors[:, 0]
    out: dict[str, Any] = {}
    for threshold in THRESHOLDS:
        k = _first_below(errors, threshold)
        out[f"iterations_{threshold:g}"] = k
        out[f"seconds_{threshold:g}"] = None if k is None else start_seconds + stamps[k]
    return out


def _stats(values: list[Optional[float]]) -> dict[str, Any]:
    reached = [v for v in values if v is not None]
    return {"median": statistics.median(reached) if reached else None,
            "p90": float(np.quantile(reached, 0.9)) if reached else None, "reached": len(reached), "of": len(values)}


def _timed(fn, repeats: int = 3) -> tuple[Any, float]:
    """``fn()`` and the median of ``repeats`` timed calls (after one untimed call)."""
    out = fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - begin)
    return out, statistics.median(times)


def pot_checks(objective: EntropicOT, x: Tensor, warm: Tensor, pot_pairs: int, steps: int) -> dict[str, Any]:
    """POT's cost and time on the first ``pot_pairs`` problems against the warm-started Sinkhorn's cost."""
    import ot

    x64, cost = x[:pot_pairs].double(), grid_cost(objective.side).numpy()
    exact = copy.deepcopy(objective).double()
    stopped = Sinkhorn(steps=steps, tol=min(THRESHOLDS)).solve(exact, x64, warm[:pot_pairs].double())
    tight = Sinkhorn(steps=20 * steps, tol=1e-6).solve(exact, x64, stopped.y)
    ours_stopped = exact.transport_cost(stopped.y, x64).numpy()
    ours_tight = exact.transport_cost(tight.y, x64).numpy()
    eps = objective.epsilon
    reference, plain_seconds, log_seconds, plain_iterations, log_iterations = [], [], [], [], []
    for i in range(pot_pairs):
        a, b = x64[i, 0].numpy(), x64[i, 1].numpy()
        reference.append(float(ot.sinkhorn2(a, b, cost, eps, method="sinkhorn_log", stopThr=1e-8,
                                            numItermax=20000)))
        for method, seconds, iterations in (("sinkhorn", plain_seconds, plain_iterations),
                                            ("sinkhorn_log", log_seconds, log_iterations)):
            begin = time.perf_counter()
            _, log = ot.sinkhorn(a, b, cost, eps, method=method, stopThr=1e-3, numItermax=100000, log=True)
            seconds.append(time.perf_counter() - begin)
            iterations.append(int(log["niter"]))
    reference = np.asarray(reference)
    return {
        "pot_pairs": pot_pairs,
        "cost_rel_diff_stopped_max": float(np.max(np.abs(ours_stopped - reference) / reference)),
        "cost_rel_diff_tight_max": float(np.max(np.abs(ours_tight - reference) / reference)),
        "tight_converged": bool(tight.converged.all()),
        "pot_plain_seconds_median": statistics.median(plain_seconds),
        "pot_log_seconds_median": statistics.median(log_seconds),
        "pot_plain_iterations_median": statistics.median(plain_iterations),
        "pot_log_iterations_median": statistics.median(log_iterations),
    }


def run(module: Any, x: Tensor, name: str, steps: int, pot_pairs: int, figures: Path) -> dict[str, Any]:
    """Every measurement of the module docstring on the problems ``x`` (``B x 2 x n``, the model's dtype)."""
    objective = entropic_objective(module.objective, "benchmarks.meta_ot")
    module.eval()
    batch = x.shape[0]
    with torch.no_grad():
        predicted = module(x).detach()
    starts = {"cold": None, "gaussian": gaussian_potential(x, objective.side), "predicted": predicted}
    traces, solver = {}, Sinkhorn(steps=steps, tol=min(THRESHOLDS))
    for start, init in starts.items():
        solver.solve(objective, x, init)
        traces[start] = solver.last_errors.float()
    per_problem: dict[str, list[dict[str, Any]]] = {start: [] for start in STARTS}
    with torch.no_grad():
        for i in range(batch):
            one = x[i : i + 1]
            gaussian, gaussian_seconds = _timed(lambda one=one: gaussian_potential(one, objective.side))
            prediction, prediction_seconds = _timed(lambda one=one: module(one).detach())
            for start, init, seconds in (("cold", None, 0.0), ("gaussian", gaussian, gaussian_seconds),
                                         ("predicted", prediction, prediction_seconds)):
                per_problem[start].append(solve_alone(objective, one, init, seconds, steps))
    results: dict[str, Any] = {
        "name": name, "pairs": batch, "side": objective.side, "epsilon": objective.epsilon, "dtype": str(x.dtype),
        "sinkhorn_steps": steps,
        "prediction_marginal_error": _stats(traces["predicted"][0].tolist()),
        "gaussian_marginal_error": _stats(traces["gaussian"][0].tolist()),
        "cold_marginal_error": _stats(traces["cold"][0].tolist()),
    }
    for start in STARTS:
        for threshold in THRESHOLDS:
            for what in ("iterations", "seconds"):
                key = f"{what}_{threshold:g}"
                results[f"{start}_{key}"] = _stats([p[key] for p in per_problem[start]])
    for threshold in THRESHOLDS:
        cold = results[f"cold_iterations_{threshold:g}"]["median"]
        warm = results[f"predicted_iterations_{threshold:g}"]["median"]
        results[f"iteration_ratio_{threshold:g}"] = None if not cold or warm is None else cold / max(warm, 1)
    results.update(pot_checks(objective, x, predicted, pot_pairs, steps))
    length = max(t.shape[0] for t in traces.values())
    medians = {start: torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]).median(1).values.clamp_min(1e-12)
               for start, t in traces.items()}
    figure = curve_figure(torch.arange(length), medians, {f"{t:g}": t for t in THRESHOLDS},
                          xlabel="Sinkhorn iteration", ylabel="median L1 marginal error", logy=True,
                          title=f"Meta OT {name}: {batch} held-out pairs")
    figures.mkdir(parents=True, exist_ok=True)
    figure.savefig(figures / f"meta_ot_{name}_marginal_error.png", dpi=120)
    return results


def _cell(stats: dict[str, Any], scale: float = 1.0, digits: int = 0) -> str:
    if stats["median"] is None:
        return f"not reached ({stats['reached']}/{stats['of']})"
    text = f"{stats['median'] * scale:.{digits}f} / {stats['p90'] * scale:.{digits}f}"
    return text if stats["reached"] == stats["of"] else f"{text} ({stats['reached']}/{stats['of']} reached)"


def table(r: dict[str, Any]) -> str:
    """The results as Markdown."""
    lines = ["| start | iterations to 1e-2 (median / p90) | iterations to 1e-3 | ms to 1e-2 | ms to 1e-3 |",
             "|---|--:|--:|--:|--:|"]
    labels = {"cold": "zero (cold)", "gaussian": "Gaussian potential (baseline)", "predicted": "Meta OT prediction"}
    for start in STARTS:
        cells = [_cell(r[f"{start}_iterations_{t:g}"]) for t in THRESHOLDS]
        cells += [_cell(r[f"{start}_seconds_{t:g}"], 1000.0, 2) for t in THRESHOLDS]
        lines.append(f"| {labels[start]} | " + " | ".join(cells) + " |")
    ratio = r["iteration_ratio_0.001"]
    met = ratio is not None and ratio >= TARGET_RATIO
    cost_met = r["cost_rel_diff_tight_max"] <= TARGET_COST_RTOL
    lines += [
        "",
        f"- L1 marginal error of the start itself (median / p90): prediction "
        f"{_cell(r['prediction_marginal_error'], 1, 4)}, Gaussian {_cell(r['gaussian_marginal_error'], 1, 4)}, "
        f"zero {_cell(r['cold_marginal_error'], 1, 4)}.",
        f"- Median iterations to 1e-3, cold / warm: **{'n/a' if ratio is None else f'{ratio:.2f}'}×** "
        f"(target ≥ {TARGET_RATIO:g}×: **{'met' if met else 'missed'}**); to 1e-2: "
        f"{'n/a' if r['iteration_ratio_0.01'] is None else format(r['iteration_ratio_0.01'], '.2f')}×.",
        f"- Transport cost ⟨P, C⟩ against POT `ot.sinkhorn2` (log domain, stopThr 1e-8) on {r['pot_pairs']} pairs, "
        f"largest relative difference: warm-started Sinkhorn stopped at 1e-3 {r['cost_rel_diff_stopped_max']:.2e}; "
        f"run on to 1e-6 (float64) {r['cost_rel_diff_tight_max']:.2e} (target ≤ {TARGET_COST_RTOL:g}: "
        f"**{'met' if cost_met else 'missed'}**).",
        f"- POT's own Sinkhorn per problem (stopThr 1e-3 on the L2 column error): plain "
        f"{1000 * r['pot_plain_seconds_median']:.2f} ms ({r['pot_plain_iterations_median']:.0f} iterations), log "
        f"domain {1000 * r['pot_log_seconds_median']:.2f} ms ({r['pot_log_iterations_median']:.0f} iterations); "
        f"median over {r['pot_pairs']} pairs.",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, help="a Meta OT checkpoint (repeat for several)")
    parser.add_argument("--pairs", type=int, default=200, help="held-out test pairs (the first of the test split)")
    parser.add_argument("--pot-pairs", type=int, default=20, help="pairs of the POT comparison")
    parser.add_argument("--steps", type=int, default=3000, help="Sinkhorn's iteration budget")
    parser.add_argument("--root", default=None, help="Fashion-MNIST's folder, if not the checkpoint's")
    parser.add_argument("--quick", action="store_true", help="a tiny run for checking (8 pairs, 2 for POT)")
    parser.add_argument("--out", default="runs/meta_ot_benchmark", help="folder of the JSON results")
    parser.add_argument("--figures", default="benchmarks/figures")
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="'' to write no section")
    parser.add_argument("--shared", action="store_true", help="say in RESULTS that the machine was shared")
    args = parser.parse_args(argv)
    if args.quick:  # a check, not a measurement: its figures and JSON go to a temporary folder, RESULTS.md untouched
        args.pairs, args.pot_pairs, args.steps = 8, 2, min(args.steps, 1500)
        args.figures = args.out = tempfile.mkdtemp(prefix="meta_ot_quick_")
        args.results = ""
    from lightning_amor.loading import load_datamodule, load_module

    all_results = []
    for ckpt in args.ckpt:
        module = load_module(ckpt)
        data = load_datamodule(ckpt)
        if args.root is not None:
            data.root = args.root
        name = Path(ckpt).parent.parent.name
        x = data.sample_split("test", args.pairs, torch.Generator()).to(module.dtype)
        results = run(module, x, name, args.steps, min(args.pot_pairs, args.pairs), Path(args.figures))
        results["checkpoint"] = ckpt
        all_results.append(results)
        text = table(results)
        print(f"## Meta OT: {name}\n\n{text}\n")
        write_atomically(Path(args.out) / f"{name}.json", json.dumps(results, indent=2) + "\n")
        if args.results:
            command = "python -m benchmarks.meta_ot " + " ".join(sys.argv[1:] if argv is None else argv)
            machine = (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                       f"Python {platform.python_version()}" + (
                           "; the 2-core machine was shared with other jobs" if args.shared else ""))
            section = (f"## Meta OT: {name}\n\nCommand: `{command}`  \nMachine: {machine}  \n"
                       f"Date: {datetime.date.today()}; {results['pairs']} held-out pairs, {x.shape[-1]} pixels, "
                       f"ε = {results['epsilon']:g}, {results['dtype']}; times per problem solved alone.\n\n{text}\n\n"
                       f"Figure: `benchmarks/figures/meta_ot_{name}_marginal_error.png`.\n")
            write_section(args.results, f"## Meta OT: {name}", section)
    return all_results


if __name__ == "__main__":
    main()
