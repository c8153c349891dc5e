"""NeuroMANCER side by side with lightning-amor on the 50-asset portfolio QP of ``benchmarks/convex_qp.py``.

NeuroMANCER (1.5.6) learns parametric programs by its own route: a ``Problem`` of ``Node`` s (here a feature map of
μ and an MLP policy μ -> w) and a ``PenaltyLoss`` of the objective and of the constraints written with its
``variable`` algebra (budget 1ᵀw = 1, 0 ≤ w ≤ 0.2, each a penalty), trained by its ``Trainer`` without reference
solutions (self-supervised). lightning-amor's model is the benchmark's: a fully amortized primal–dual MLP trained by
regression onto OSQP's references. Both see the same family (the same P, A, l, u: built by
:class:`~lightning_amor.apps.convex_qp.PortfolioQP`, imported), the same 8192 training forecasts, the same held-out
256 forecasts, the same MLP widths (256, 256), Adam at 1e-3 and the same number of gradient steps (batches of 256).

Reported for both: training time (and, for lightning-amor, the time to solve the training references), the
optimality gap f(ŷ) − f* relative to |f*|, the largest constraint violation of the raw prediction and after the
capped-simplex projection, and OSQP's iterations from each prediction as a warm start. NeuroMANCER's policy
predicts no duals, so its warm start is primal-only (zero duals).

NeuroMANCER is not a dependency of the project: run this in its own virtual environment,

    python3 -m venv /work/venvs/neuromancer
    /work/venvs/neuromancer/bin/pip install -c constraints.txt torch==2.13.0
    /work/venvs/neuromancer/bin/pip install -c constraints.txt neuromancer==1.5.6 wandb   # wandb: undeclared
    PYTHONPATH=. /work/venvs/neuromancer/bin/python -m benchmarks.convex_qp_neuromancer --shared
    PYTHONPATH=. /work/venvs/neuromancer/bin/python -m benchmarks.convex_qp_neuromancer --quick   # for checking

It writes a ``### NeuroMANCER side by side`` part into the parametric-QP section of ``benchmarks/RESULTS.md``
(which ``benchmarks/convex_qp.py`` keeps when it rewrites the section).
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from benchmarks.convex_qp import FAMILIES, NEUROMANCER, QUICK, TITLE, quality, train
from benchmarks.results import cpu_name, write_section
from datamodules.context import seeded_generator
from datamodules.convex_qp import PortfolioReturns
from lightning_amor.apps.convex_qp import PortfolioQP, portfolio_family
from lightning_amor.apps.osqp_solver import OSQPSession

EPS = (1e-4, 1e-5)


def neuromancer_problem(objective: PortfolioQP, hidden: list[int], penalty: float):
    """NeuroMANCER's parametric program for ``objective``: returns the ``Problem`` (nodes: ``mu`` -> ``features`` ->
    ``w``) and its policy node. The penalty weight multiplies each constraint's mean violation."""
    from neuromancer.constraint import Objective, variable
    from neuromancer.loss import PenaltyLoss
    from neuromancer.modules import blocks
    from neuromancer.problem import Problem
    from neuromancer.system import Node

    family = portfolio_family(objective.assets, objective.factors, objective.seed)
    mean = family["mean"].float()
    loadings = objective.loadings.float()
    idiosyncratic = torch.diagonal(objective.P)[: objective.assets].float()  # γ d
    gamma = float(objective.risk_aversion)

    features = Node(lambda mu: (mu - mean) / 0.05, ["mu"], ["features"], name="features")
    policy = Node(blocks.MLP(objective.assets, objective.assets, nonlin=nn.ReLU, hsizes=list(hidden)),
                  ["features"], ["w"], name="policy")
    w, mu = variable("w"), variable("mu")

    def cost(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        exposure = w @ loadings
        return 0.5 * ((idiosyncratic * w * w).sum(-1) + gamma * (exposure * exposure).sum(-1)) - (mu * w).sum(-1)

    value = variable([w, mu], cost, display_name="f")
    budget = variable([w], lambda w: w.sum(-1, keepdim=True), display_name="sum_w")
    # the budget as two inequalities (the same |1ᵀw − 1| penalty as an equality; NeuroMANCER's equality compares a
    # B x 1 tensor with a scalar through F.l1_loss, which warns about broadcasting)
    constraints = [penalty * (budget <= 1.0), penalty * (budget >= 1.0), penalty * (w >= 0.0),
                   penalty * (w <= objective.max_weight)]
    for constraint, name in zip(constraints, ("budget_upper", "budget_lower", "long_only", "position_limit"),
                                strict=True):
        constraint.update_name(name)
    loss = PenaltyLoss([Objective(value, metric=torch.mean, name="risk_adjusted_return")], constraints)
    return Problem([features, policy], loss), policy


def train_neuromancer(objective: PortfolioQP, x_train: torch.Tensor, x_dev: torch.Tensor, steps: int,
                      hidden: list[int], penalty: float, seed: int = 0):
    """NeuroMANCER's ``Trainer`` for ``steps`` gradient steps (whole epochs of batches of 256); returns the problem,
    its policy node and the seconds spent in ``Trainer.train``."""
    from neuromancer.dataset import DictDataset
    from neuromancer.trainer import Trainer

    torch.manual_seed(seed)
    problem, policy = neuromancer_problem(objective, hidden, penalty)
    batch = min(256, x_train.shape[0])
    train_data = DictDataset({"mu": x_train.float()}, name="train")
    dev_data = DictDataset({"mu": x_dev.float()}, name="dev")
    train_loader = torch.utils.data.DataLoader(train_data, batch_size=batch, shuffle=True,
                                               collate_fn=train_data.collate_fn,
                                               generator=torch.Generator().manual_seed(seed))
    dev_loader = torch.utils.data.DataLoader(dev_data, batch_size=x_dev.shape[0], collate_fn=dev_data.collate_fn)
    epochs = max(1, round(steps / len(train_loader)))
    optimizer = torch.optim.Adam(problem.parameters(), lr=1e-3)
    trainer = Trainer(problem, train_loader, dev_loader, optimizer=optimizer, epochs=epochs, patience=epochs,
                      epoch_verbose=max(1, epochs // 5), train_metric="train_loss", dev_metric="dev_loss",
                      eval_metric="dev_loss")
    begin = time.perf_counter()
    trainer.train()  # keeps the weights of the best dev loss
    return problem, policy, time.perf_counter() - begin, epochs * len(train_loader)


def neuromancer_quality(objective: PortfolioQP, problem, x: torch.Tensor, y_star: torch.Tensor) -> tuple[dict, dict]:
    """Gap and violation of NeuroMANCER's raw and projected weights (exposures t = Fᵀw, zero duals)."""
    with torch.no_grad():
        w = problem.step({"mu": x.float()})["w"].double()
    raw = torch.cat([w, w @ objective.loadings, torch.zeros(w.shape[0], objective.m, dtype=w.dtype)], dim=-1)
    projected = objective.project_flat(raw)
    f_star = objective(y_star, x)
    out = {}
    for name, y in (("raw", raw), ("projected", projected)):
        gap = objective(y, x) - f_star
        out[name] = {"gap_mean": float(gap.mean()),
                     "gap_relative_median": float((gap.abs() / f_star.abs().clamp_min(1e-12)).median()),
                     "violation_max": float(objective.violation_flat(y, x).max()),
                     "violation_median": float(objective.violation_flat(y, x).median()),
                     "weights_error_median": float((objective.weights(y) - objective.weights(y_star)).abs()
                                                   .amax(-1).median())}
    return out, {"raw": raw, "projected": projected}


def osqp_iterations(objective: PortfolioQP, x: torch.Tensor, starts: dict[str, Optional[torch.Tensor]],
                    eps: float) -> dict[str, dict]:
    """Median and p90 of OSQP's iterations (one reused solver, ``check_termination=1``) from each start."""
    q, lower, upper = objective.qp_data(x)
    P, A, n = objective.P.numpy(), objective.A.numpy(), objective.n
    out = {}
    for name, start in starts.items():
        session = OSQPSession(P, A, eps=eps, fresh=False, who="PortfolioQP")
        s = None if start is None else start.double().numpy()
        batch = session.solve(q, lower, upper, None if s is None else s[:, :n], None if s is None else s[:, n:])
        its = batch.iterations
        out[name] = {"median": float(np.median(its)), "p90": float(np.percentile(its, 90)),
                     "solved": int(batch.solved.sum()), "of": len(its)}
    return out


def subsection(spec: dict, ours: dict, theirs: dict[float, dict], runs: dict[str, dict]) -> str:
    """The Markdown of the side-by-side comparison (``theirs``: NeuroMANCER's results by penalty weight)."""
    first = next(iter(theirs.values()))
    lines = [
        f"{NEUROMANCER} (`benchmarks/convex_qp_neuromancer.py`)",
        "",
        f"NeuroMANCER {first['version']} in its own venv (`PYTHONPATH=. /work/venvs/neuromancer/bin/python -m "
        f"benchmarks.convex_qp_neuromancer`; import {first['import_s']:.0f} s), on the portfolio-{spec['assets']} "
        f"family (same P, A, l, u, the same {spec['train']} training and {spec['test']} held-out forecasts). Its "
        f"route: `Problem` of `Node`s (μ -> MLP {spec['hidden']} -> w), `PenaltyLoss` of the objective and the "
        f"three constraints (budget, w ≥ 0, w ≤ 0.2; one weight for all, on the mean violation), "
        f"self-supervised by its `Trainer` (no reference solutions). lightning-amor: the primal–dual MLP of "
        f"`benchmarks/convex_qp.py`, regression onto OSQP references. Both: Adam 1e-3, batches of 256, "
        f"{spec['steps']} steps ({first['steps']} for NeuroMANCER: whole epochs).",
        "",
        "| method | training s | references s | gap / abs. f* (median), raw | max violation, raw | "
        "gap / abs. f* (median), projected | max violation, projected | weights error ∞ (median), projected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("lightning-amor (regression, primal–dual)", ours)]
    rows += [(f"NeuroMANCER (penalty weight {penalty:g}, primal)", r) for penalty, r in theirs.items()]
    for name, r in rows:
        raw, proj = r["quality"]["raw"], r["quality"]["projected"]
        ref = f"{r['references_s']:.1f}" if r["references_s"] else "none"
        lines.append(f"| {name} | {r['train_s']:.1f} | {ref} | {raw['gap_relative_median']:.2e} | "
                     f"{raw['violation_max']:.2e} | {proj['gap_relative_median']:.2e} | {proj['violation_max']:.2e} "
                     f"| {proj['weights_error_median']:.2e} |")
    for eps, rows in runs.items():
        lines += ["", f"OSQP warm start at eps {eps} (one reused solver, check_termination=1; NeuroMANCER predicts no "
                      "duals, so its start has zero duals):", "",
                  "| start | iterations median | p90 | solved |", "|---|---|---|---|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {row['median']:.0f} | {row['p90']:.0f} | {row['solved']}/{row['of']} |")
    best = min(theirs, key=lambda p: theirs[p]["quality"]["projected"]["gap_relative_median"])
    ratio = theirs[best]["train_s"] / ours["train_s"]
    gap_ratio = (theirs[best]["quality"]["projected"]["gap_relative_median"]
                 / max(ours["quality"]["projected"]["gap_relative_median"], 1e-300))
    lines += ["", f"NeuroMANCER at its best penalty weight here ({best:g}): training time / lightning-amor's "
                  f"{ratio:.2f}× (lightning-amor's references add {ours['references_s']:.1f} s); projected median "
                  f"relative gap / lightning-amor's {gap_ratio:.1f}×."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    """Train both models, compare them, print the table and write it into ``--results``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run, for checking (numbers not meaningful)")
    parser.add_argument("--penalty", type=float, nargs="+", default=[100.0, 10.0, 1.0],
                        help="NeuroMANCER's constraint penalty weights (one model each)")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--shared", action="store_true", help="say in RESULTS.md that the machine was shared")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = (QUICK if args.quick else FAMILIES)["portfolio-50"]

    begin = time.perf_counter()
    import neuromancer  # noqa: F401  (its import is slow: measured)
    import_s = time.perf_counter() - begin
    from importlib.metadata import version

    objective = PortfolioQP(assets=spec["assets"], factors=spec["factors"])
    # the family as benchmarks/convex_qp.py builds it; P, A, l, u are PortfolioQP's own
    data = PortfolioReturns(assets=spec["assets"], factors=spec["factors"])
    x_train = data.sample(spec["train"], seeded_generator(0, 3)).double()
    x_test = data.sample(spec["test"], seeded_generator(0, 2)).double()
    x_dev = data.sample(512 if not args.quick else 32, seeded_generator(0, 1)).double()
    lower, upper = objective.bounds(x_test[:1])
    assert torch.equal(lower[0, :1], torch.ones(1, dtype=torch.float64)) and float(upper[0, 1]) == 0.2

    begin = time.perf_counter()
    y_train = objective.solve(x_train)  # solved here (not from a cache), so that its time is measured
    references_s = time.perf_counter() - begin
    y_test = objective.solve(x_test)

    model, ours_s = train(objective, x_train, y_train, spec["steps"], spec["hidden"])
    ours_quality, ours_projected = quality(objective, model, x_test, y_test)
    theirs, starts = {}, {"reused cold": None, "lightning-amor primal–dual": ours_projected}
    for penalty in args.penalty:
        problem, _, theirs_s, theirs_steps = train_neuromancer(objective, x_train, x_dev, spec["steps"],
                                                               spec["hidden"], penalty)
        theirs_quality, theirs_y = neuromancer_quality(objective, problem, x_test, y_test)
        theirs[penalty] = {"train_s": theirs_s, "references_s": 0.0, "quality": theirs_quality,
                           "steps": theirs_steps, "import_s": import_s, "version": version("neuromancer")}
        starts[f"NeuroMANCER {penalty:g} primal (zero duals)"] = theirs_y["projected"]
    runs = {f"{eps:g}": osqp_iterations(objective, x_test, starts, eps) for eps in EPS}
    ours = {"train_s": ours_s, "references_s": references_s, "quality": ours_quality}
    text = subsection(spec, ours, theirs, runs)
    command = "PYTHONPATH=. /work/venvs/neuromancer/bin/python -m benchmarks.convex_qp_neuromancer"
    command += (" --quick" if args.quick else "") + (" --shared" if args.shared else "")
    shared = "; the 2-core machine was shared with other jobs" if args.shared else ""
    text += (f"\n\n`{command}` ({datetime.date.today().isoformat()}, {cpu_name()}, torch {torch.__version__}, "
             f"1 torch thread{shared}).")
    print(text)

    path = Path(args.results)
    current = path.read_text() if path.exists() else ""
    match = re.search(rf"^{re.escape(TITLE)}\n.*?(?=^## |\Z)", current, re.S | re.M)
    section = match.group(0) if match else f"{TITLE}\n\n"
    section = section.split(NEUROMANCER, 1)[0].rstrip("\n")  # drop an older side-by-side part
    write_section(path, TITLE, f"{section}\n\n{text}\n")
    return {"ours": ours, "theirs": theirs, "runs": runs}


if __name__ == "__main__":
    main()
