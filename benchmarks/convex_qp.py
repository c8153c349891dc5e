"""Amortize, then solve: does a learned primal–dual prediction save OSQP iterations on a parametric QP?

Two portfolio families of :class:`~lightning_amor.apps.convex_qp.PortfolioQP` (factor covariance, the expected
returns as the parameter, budget 1ᵀw = 1, 0 ≤ w ≤ 0.2; contexts from ``datamodules.convex_qp.PortfolioReturns``):
50 assets with 5 factors, where every OSQP solve takes well under a millisecond, and 300 assets with 20 factors,
where OSQP needs hundreds of iterations. For each family, in one process:

1. reference solutions of a training pool and a held-out test set by OSQP (eps 1e-7, polished);
2. a fully amortized MLP, its output centred and scaled by the mean and spread of the training references,
   trained by regression onto the primal–dual references (the model and loss of
   ``recipes/convex_qp/portfolio_regression.yaml``, trained here in a plain loop);
3. the raw prediction's optimality gap and largest constraint violation, before and after the projection (capped
   simplex for the weights, then t = Fᵀw);
4. OSQP (osqp's own API, ``check_termination=1`` so counts are exact) at eps 1e-4 and 1e-5 on the test set, in
   order, started from: a fresh solver per instance (cold); one reused solver (cold start x = 0, y = 0, the ρ it
   adapted on the previous instance carried over: the strongest cold baseline); the previous test instance's
   solution (the naive warm start); the learned prediction, primal and dual; the learned primal with zero duals;
   and an ideal predictor (the reference primal and dual times 1 + 1% Gaussian noise). Every warm start uses the
   reused solver. Wall time per instance counts OSQP's ``solve()`` and, for the learned warm starts, the
   prediction of that one instance (batch of 1, median of repeats).

The share of the ideal saving recovered is (cold − learned) / (cold − ideal) in median iterations, against the
reused cold solver. Target: at least 70 % on both families, and fewer iterations than the previous-instance warm
start.

    python -m benchmarks.convex_qp            # about 5 minutes on 2 CPU cores
    python -m benchmarks.convex_qp --quick    # a tiny run, for checking
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import osqp  # noqa: E402
import torch  # noqa: E402

from benchmarks.results import cpu_name, write_section  # noqa: E402
from datamodules.context import seeded_generator  # noqa: E402
from datamodules.convex_qp import PortfolioReturns  # noqa: E402
from lightning_amor import FullyAmortized, RegressionLoss  # noqa: E402
from lightning_amor.apps.convex_qp import PortfolioMLP, PortfolioQP  # noqa: E402
from lightning_amor.apps.osqp_solver import OSQPSession  # noqa: E402

FAMILIES = {
    "portfolio-50": dict(assets=50, factors=5, train=8192, test=256, steps=4000, hidden=[256, 256]),
    "portfolio-300": dict(assets=300, factors=20, train=4096, test=128, steps=5000, hidden=[256, 256]),
}
QUICK = {
    "portfolio-50": dict(assets=50, factors=5, train=256, test=16, steps=50, hidden=[64]),
    "portfolio-300": dict(assets=300, factors=20, train=64, test=8, steps=20, hidden=[64]),
}
EPS = (1e-4, 1e-5)
TITLE = "## Parametric QP: OSQP warm-started by an amortized primal–dual prediction"
NEUROMANCER = "### NeuroMANCER side by side"  # the part benchmarks/convex_qp_neuromancer.py writes; kept on rewrites
METHODS = ("fresh cold", "reused cold", "previous instance", "learned primal only", "learned primal-dual",
           "ideal (exact + 1% noise)")


def references(objective: PortfolioQP, x: torch.Tensor, cache: Path) -> torch.Tensor:
    """The oracle's float64 primal–dual solutions of ``x``, cached in ``cache`` for reruns."""
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if torch.equal(saved["x"], x):
            return saved["y"]
    y = objective.solve(x)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, cache)
    return y


def train(objective: PortfolioQP, x: torch.Tensor, y: torch.Tensor, steps: int, hidden: list[int],
          seed: int = 0, min_scale: float = 1e-2) -> tuple[FullyAmortized, float]:
    """A fully amortized MLP trained by regression onto ``y`` (Adam, cosine schedule), its output centred and
    scaled by the mean and spread (at least ``min_scale``) of ``y``; returns it and seconds."""
    torch.manual_seed(seed)
    net = PortfolioMLP(objective.assets, objective.factors, objective.seed, objective.risk_aversion,
                       objective.max_weight, hidden=hidden)
    # the output's per-coordinate centre and scale from the whole training pool (its references are solved
    # anyway), not only from the network's own calibration forecasts: an asset held in a few per cent of the
    # contexts gets its true spread
    net.centre.copy_(y.mean(0).float())
    net.scale.copy_(y.std(0).clamp_min(min_scale).float())
    model = FullyAmortized(net)
    loss_fn = RegressionLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    xf, yf = x.float(), y.float()
    generator = torch.Generator().manual_seed(seed)
    begin = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (min(256, x.shape[0]),), generator=generator)
        output = model(xf[index], objective)
        loss = loss_fn(output, xf[index], objective, yf[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), time.perf_counter() - begin


def prediction_seconds(model: FullyAmortized, objective: PortfolioQP, x: torch.Tensor, repeats: int = 50) -> float:
    """Median seconds of one prediction for a single context (batch of 1)."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 5):
            row = x[i % x.shape[0]].unsqueeze(0)
            begin = time.perf_counter()
            model(row, objective)
            if i >= 5:
                times.append(time.perf_counter() - begin)
    return statistics.median(times)


def osqp_runs(objective: PortfolioQP, x: torch.Tensor, y_star: torch.Tensor, y_pred: torch.Tensor, eps: float,
              seed: int = 0) -> dict[str, dict]:
    """OSQP's iterations and solve seconds per instance for every start of :data:`METHODS`."""
    q, lower, upper = objective.qp_data(x)
    P, A = objective.P.numpy(), objective.A.numpy()
    n = objective.n
    ref = y_star.double().numpy()
    pred = y_pred.double().numpy()
    rng = np.random.default_rng(seed)
    ideal = ref * (1 + 0.01 * rng.standard_normal(ref.shape))
    previous = np.concatenate([np.zeros_like(ref[:1]), ref[:-1]])
    primal_only = pred.copy()
    primal_only[:, n:] = 0.0
    starts = {
        "fresh cold": (True, None),
        "reused cold": (False, None),
        "previous instance": (False, previous),
        "learned primal only": (False, primal_only),
        "learned primal-dual": (False, pred),
        "ideal (exact + 1% noise)": (False, ideal),
    }
    out = {}
    for method, (fresh, start) in starts.items():
        session = OSQPSession(P, A, eps=eps, fresh=fresh, who="PortfolioQP")
        x0 = None if start is None else start[:, :n]
        y0 = None if start is None else start[:, n:]
        batch = session.solve(q, lower, upper, x0, y0)
        iterations, seconds = batch.iterations, batch.seconds
        if method == "previous instance":  # the first instance has no predecessor
            iterations, seconds = iterations[1:], seconds[1:]
        out[method] = {"iterations": iterations.tolist(), "seconds": seconds.tolist(),
                       "solved": int(batch.solved.sum()), "of": len(batch.solved),
                       "max_violation": float(objective.violation_flat(
                           torch.from_numpy(np.concatenate([batch.x, batch.y], 1)), x).max())}
    return out


def quality(objective: PortfolioQP, model: FullyAmortized, x: torch.Tensor, y_star: torch.Tensor) -> dict:
    """The raw and projected predictions' optimality gap (relative to |f*|) and largest violation."""
    with torch.no_grad():
        raw = objective.flatten(model.net(x.float())).double()
        projected = objective.project_flat(raw)
        # "raw": the network's weights before the capped-simplex projection, with the exposures t = Fᵀw they imply
        n = objective.assets
        raw[:, n : objective.n] = raw[:, :n] @ objective.loadings
        f_star = objective(y_star, x)
        result = {}
        for name, y in (("raw", raw), ("projected", projected)):
            gap = objective(y, x) - f_star
            result[name] = {
                "gap_mean": float(gap.mean()), "gap_abs_median": float(gap.abs().median()),
                "gap_relative_median": float((gap.abs() / f_star.abs().clamp_min(1e-12)).median()),
                "violation_max": float(objective.violation_flat(y, x).max()),
                "violation_median": float(objective.violation_flat(y, x).median()),
                "kkt_median": float(objective.residual_flat(y, x).median()),
                "weights_error_median": float((objective.weights(y) - objective.weights(y_star)).abs().amax(-1)
                                              .median()),
            }
    return result, projected


def run_family(name: str, spec: dict, out: Path, quick: bool) -> dict:
    objective = PortfolioQP(assets=spec["assets"], factors=spec["factors"])
    data = PortfolioReturns(assets=spec["assets"], factors=spec["factors"])
    x_train = data.sample(spec["train"], seeded_generator(0, 3)).double()
    x_test = data.sample(spec["test"], seeded_generator(0, 2)).double()
    begin = time.perf_counter()
    y_train = references(objective, x_train, out / "cache" / f"{name}-train-{spec['train']}.pt")
    y_test = references(objective, x_test, out / "cache" / f"{name}-test-{spec['test']}.pt")
    reference_seconds = time.perf_counter() - begin
    model, train_seconds = train(objective, x_train, y_train, spec["steps"], spec["hidden"])
    scores, projected = quality(objective, model, x_test, y_test)
    predict_s = prediction_seconds(model, objective, x_test.float())
    runs = {f"{eps:g}": osqp_runs(objective, x_test, y_test, projected, eps) for eps in EPS}
    summary = {}
    for eps, methods in runs.items():
        rows = {}
        for method, r in methods.items():
            its = np.asarray(r["iterations"])
            extra = predict_s if method.startswith("learned") else 0.0
            rows[method] = {"median": float(np.median(its)), "p90": float(np.percentile(its, 90)),
                            "ms": 1e3 * (float(np.mean(r["seconds"])) + extra), "solved": r["solved"], "of": r["of"],
                            "max_violation": r["max_violation"]}
        cold, ideal = rows["reused cold"]["median"], rows["ideal (exact + 1% noise)"]["median"]
        learned = rows["learned primal-dual"]["median"]
        share = (cold - learned) / (cold - ideal) if cold > ideal else float("nan")
        summary[eps] = {"rows": rows, "recovered": share,
                        "beats_previous": learned < rows["previous instance"]["median"]}
    return {"family": name, **{k: v for k, v in spec.items()}, "n_variables": objective.n, "m_constraints": objective.m,
            "reference_seconds": reference_seconds, "train_seconds": train_seconds,
            "prediction_ms": 1e3 * predict_s, "quality": scores, "runs": runs, "summary": summary}


def table(result: dict) -> str:
    q = result["quality"]
    lines = [
        f"### {result['family']}: {result['assets']} assets, {result['factors']} factors ({result['n_variables']} "
        f"variables, {result['m_constraints']} constraints); {result['train']} training and {result['test']} "
        f"held-out contexts; MLP {result['hidden']} trained {result['steps']} steps in "
        f"{result['train_seconds']:.0f} s; "
        f"prediction {result['prediction_ms']:.3f} ms per instance",
        "",
        "| prediction | gap f(ŷ) − f* (mean) | abs. gap / abs. f* (median) | max violation | KKT residual (median) "
        "| weights error ∞ (median) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("raw", "projected"):
        s = q[kind]
        lines.append(f"| {kind} | {s['gap_mean']:.2e} | {s['gap_relative_median']:.2e} | {s['violation_max']:.2e} | "
                     f"{s['kkt_median']:.2e} | {s['weights_error_median']:.2e} |")
    for eps, summary in result["summary"].items():
        lines += ["", f"OSQP at eps {eps} (check_termination=1):", "",
                  "| start | iterations median | p90 | ms per instance (prediction included) | solved |",
                  "|---|---|---|---|---|"]
        for method, row in summary["rows"].items():
            lines.append(f"| {method} | {row['median']:.0f} | {row['p90']:.0f} | {row['ms']:.3f} | "
                         f"{row['solved']}/{row['of']} |")
        verdict = "met" if summary["recovered"] >= 0.7 and summary["beats_previous"] else "missed"
        lines += ["", f"share of the ideal saving recovered over the reused cold solver: "
                      f"{100 * summary['recovered']:.1f}%; beats the previous-instance warm start: "
                      f"{'yes' if summary['beats_previous'] else 'no'} (target ≥ 70% and yes: {verdict})"]
    return "\n".join(lines)


def kept_neuromancer(path: Path) -> str:
    """The side-by-side part that ``benchmarks/convex_qp_neuromancer.py`` wrote into the section (run in its own
    venv, so not rerun here), or ``""``."""
    text = path.read_text() if path.exists() else ""
    match = re.search(rf"^{re.escape(TITLE)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    if match is None or NEUROMANCER not in match.group(0):
        return ""
    return "\n" + NEUROMANCER + match.group(0).split(NEUROMANCER, 1)[1].rstrip("\n") + "\n"


def figure(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        runs = result["runs"][f"{EPS[0]:g}"]
        for method in METHODS:
            its = np.sort(np.asarray(runs[method]["iterations"]))
            ax.step(its, np.arange(1, len(its) + 1) / len(its), where="post", label=method)
        ax.set_xscale("log")
        ax.set_xlabel(f"OSQP iterations to eps {EPS[0]:g}")
        ax.set_ylabel("share of held-out instances solved")
        ax.set_title(result["family"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run, for checking (numbers not meaningful)")
    parser.add_argument("--out", default="runs/convex_qp_benchmark", help="folder of results.json and the caches")
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="the RESULTS.md to write the section to")
    parser.add_argument("--figure", default="benchmarks/figures/convex_qp_iterations.png")
    parser.add_argument("--shared", action="store_true", help="say in RESULTS.md that the machine was shared")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:  # a check, not a measurement: its JSON and figure go to a temporary folder, RESULTS.md untouched
        args.out = tempfile.mkdtemp(prefix="convex_qp_quick_")
        args.figure = str(Path(args.out) / "convex_qp_iterations.png")
    out = Path(args.out)
    results = [run_family(name, spec, out, args.quick) for name, spec in (QUICK if args.quick else FAMILIES).items()]
    text = "\n\n".join(table(r) for r in results)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    figure(results, Path(args.figure))
    command = "python -m benchmarks.convex_qp" + (" --quick" if args.quick else "")
    command += " --shared" if args.shared else ""
    machine = f"{cpu_name()}, torch {torch.__version__}, osqp {osqp.__version__}, 1 torch thread"
    shared = "; the 2-core machine was shared with other jobs" if args.shared else ""
    section = (f"{TITLE}\n\n"
               f"`{command}` ({datetime.date.today().isoformat()}, {machine}{shared}). Figure: "
               f"`{args.figure}`.\n\n{text}\n")
    if not args.quick:
        write_section(Path(args.results), TITLE, section + kept_neuromancer(Path(args.results)))
    return results


if __name__ == "__main__":
    main()
