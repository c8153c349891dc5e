"""Sparse coding: LISTA with K = 4, 8 and 16 layers against ISTA and FISTA on held-out signals (issue 12).

The lasso ½‖x − Dy‖² + α‖y‖₁ with the 250 × 500 Gaussian unit-norm dictionary and noiseless signals of
Bernoulli(0.1)–Gaussian codes, in two settings (``--settings``), each in the same process as its baselines:

* ``true_codes`` — α = 0.1, LISTA-K (``--layers``, default 4, 8, 16) = ``recipes/sparse_coding/lista_true_codes.yaml``:
  trained by regression to the TRUE codes of its pool, as the LISTA literature trains and measures it (Gregor & LeCun
  2010; Chen et al. 2018; Liu et al. 2019). The metric that matters is the NMSE to the true code, where ISTA and FISTA
  stop at the lasso solution's own NMSE. ``--support-step 0.012`` turns on LISTA's support selection (Chen et al.
  2018: at layer k the largest min(1.2 k, 13) % of the entries skip the soft-threshold).
* ``small_alpha`` — α = ``--small-alpha`` (0.01), LISTA-K (``--small-alpha-layers``, default 16) =
  ``recipes/sparse_coding/lista_regression.yaml`` with that α: trained by regression to FISTA's solutions of its pool
  (the issue's own training target), where the lasso is closer to the true code and FISTA needs many more iterations.

Each LISTA is built through the ``lightning-amor`` CLI class and trained by ``Trainer.fit`` as ``lightning-amor fit``
would, ``--steps`` steps. ISTA and FISTA are the core's batched solvers (:mod:`lightning_amor.proximal_solvers`) from
0 with the fixed step 1/L, L = ‖D‖₂² (FISTA with its default gradient restart), ``--iterations`` iterations, every
iterate recorded.

On ``--batch`` held-out signals (drawn from their own seed, never in a training pool) and their true codes, with the
FISTA oracle's float64 solutions (residual ≤ 1e-6) as the lasso solutions and their values as f*: the NMSE in dB, the
mean over signals of ``10 log10(‖ŷ − y‖² / ‖y‖²)`` (a mean of per-signal ratios in dB), to the true code and to the
lasso solution, and the mean of f − f* (per signal, in float64), for every ISTA/FISTA iteration and every LISTA-K.
Matched iterations = the first iteration at which ISTA's or FISTA's mean NMSE is at most LISTA-K's (the target:
FISTA needs at least 10 × 16 = 160 iterations to reach LISTA-16's NMSE; "> budget" when it never does). Time per
batch: LISTA-K's prediction of the whole batch under ``torch.no_grad`` (median of ``--repeats`` after warm-up), and
ISTA's and FISTA's time to their matched iteration (median of clean timed runs whose callback only reads the clock).

Outputs: a section of ``benchmarks/RESULTS.md`` and, per setting S, ``benchmarks/figures/sparse_coding_S_nmse.png``
(NMSE to the true code and to the lasso solution against iterations/layers) and ``sparse_coding_S_objective.png``
(f − f* against iterations, log scale).

    OMP_NUM_THREADS=1 python benchmarks/sparse_coding.py            # about 25 min on a shared 2-core CPU
    # LISTA-16 with support selection, trained longer (about 25 min): the true_codes subsection only, the
    # small_alpha subsection already in RESULTS.md is kept (marked with its own command and date)
    OMP_NUM_THREADS=1 python benchmarks/sparse_coding.py --settings true_codes --layers 16 --steps 3500 \
        --support-step 0.012 --solver-repeats 1
    OMP_NUM_THREADS=1 python benchmarks/sparse_coding.py --quick    # smoke run: tiny sizes, no RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `datamodules` lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.results import cpu_name, write_section  # noqa: E402
from benchmarks.sphere import quiet_lightning  # noqa: E402
from datamodules.context import ContextDataModule, seeded_generator  # noqa: E402
from lightning_amor.apps.sparse_coding import SparseCoding, nmse_db  # noqa: E402
from lightning_amor.cli import AmortCLI  # noqa: E402
from lightning_amor.commands.recipes import recipe_configs  # noqa: E402
from lightning_amor.module import AmortizedModule  # noqa: E402
from lightning_amor.proximal_solvers import FISTA, ISTA  # noqa: E402
from lightning_amor.solvers import Solver  # noqa: E402

RECIPES = ROOT / "recipes" / "sparse_coding"
SECTION = "## Sparse coding: LISTA against ISTA and FISTA"
HELD_OUT_SEED = 12_345
TARGET_FACTOR = 10


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark setting: the recipe its LISTAs are trained by, α, the layer counts and the NMSE the target uses."""

    name: str
    recipe: Path
    alpha: float
    layers: tuple[int, ...]
    primary: str  # "true" or "lasso": the NMSE that the setting's target is about
    title: str
    overrides: tuple[str, ...] = ()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=["true_codes", "small_alpha"],
                        default=["true_codes", "small_alpha"], help="which settings to run (module docstring)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16], help="the K of each LISTA (true_codes)")
    parser.add_argument("--small-alpha", type=float, default=0.01, help="α of the small_alpha setting")
    parser.add_argument("--small-alpha-layers", type=int, nargs="+", default=[16],
                        help="the K of each LISTA (small_alpha)")
    parser.add_argument("--small-alpha-pool", type=int, default=4096,
                        help="the training pool of small_alpha (its FISTA solutions are slow at a small α)")
    parser.add_argument("--small-alpha-oracle-steps", type=int, default=20_000,
                        help="the oracle's FISTA budget at the small α")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each LISTA")
    parser.add_argument("--lr", type=float, default=None, help="override the recipes' Adam learning rate")
    parser.add_argument("--support-step", type=float, default=0.0,
                        help="LISTA's support selection in the true_codes setting: the fraction of entries that skip "
                             "the prox grows by this per layer (0: off, the recipe as is; the literature: 0.012)")
    parser.add_argument("--support-max", type=float, default=0.13, help="the cap on that fraction")
    parser.add_argument("--pool-size", type=int, default=None, help="override the recipe's train_size (true_codes)")
    parser.add_argument("--batch", type=int, default=1024, help="held-out signals")
    parser.add_argument("--iterations", type=int, default=1000, help="ISTA's and FISTA's iterations")
    parser.add_argument("--repeats", type=int, default=20, help="timed LISTA predictions")
    parser.add_argument("--solver-repeats", type=int, default=2, help="clean timed ISTA/FISTA runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cache-dir", default=None,
                        help="where reference solutions are cached (default: the library's cache directory)")
    parser.add_argument("--figures", default=None,
                        help="folder of the figures (default benchmarks/figures; a temporary one with --quick)")
    parser.add_argument("--output", default=None,
                        help="markdown file whose section is (re)written (default benchmarks/RESULTS.md; none with "
                             "--quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 steps of 32 signals, pools of 64, 64 held-out signals, 50 iterations, no "
                             "RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.pool_size = min(args.steps, 5), args.pool_size or 64
        args.small_alpha_pool = min(args.small_alpha_pool, 64)
        args.batch, args.iterations = min(args.batch, 64), min(args.iterations, 50)
        args.repeats, args.solver_repeats = min(args.repeats, 2), 1
    elif args.output is None:
        args.output = str(ROOT / "benchmarks" / "RESULTS.md")
    if (min(args.layers + args.small_alpha_layers) < 1 or args.steps < 1 or args.batch < 1 or args.iterations < 1
            or args.repeats < 1):
        parser.error("--layers, --small-alpha-layers, --steps, --batch, --iterations and --repeats must be positive")
    if not (math.isfinite(args.small_alpha) and args.small_alpha > 0):
        parser.error(f"--small-alpha must be a positive number, got {args.small_alpha}")
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    """The settings ``args`` asks for, in the order given."""
    known = {
        "true_codes": Setting(
            "true_codes", RECIPES / "lista_true_codes.yaml", 0.1, tuple(args.layers), "true",
            "α = 0.1, LISTA trained to the true codes",
            (() if args.pool_size is None else (f"--data.init_args.train_size={args.pool_size}",))
            + (() if not args.support_step else (
                f"--model.init_args.amortizer.init_args.support_step={args.support_step}",
                f"--model.init_args.amortizer.init_args.support_max={args.support_max}"))),
        "small_alpha": Setting(
            "small_alpha", RECIPES / "lista_regression.yaml", args.small_alpha, tuple(args.small_alpha_layers),
            "lasso", f"α = {args.small_alpha:g}, LISTA trained to FISTA's solutions",
            (f"--model.init_args.objective.init_args.alpha={args.small_alpha}",
             f"--model.init_args.objective.init_args.oracle_steps={args.small_alpha_oracle_steps}",
             f"--data.init_args.train_size={args.small_alpha_pool}")),
    }
    return [known[name] for name in args.settings]


def build(setting: Setting, layers: int, args: argparse.Namespace, cache_dir: Optional[str]) -> AmortCLI:
    """Model, data module and Trainer of the setting's recipe with K = ``layers``, as ``lightning-amor fit`` builds
    them."""
    overrides = [
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.steps}", f"--model.init_args.lr_scheduler.init_args.T_max={args.steps}",
        f"--model.init_args.amortizer.init_args.steps={layers}",
        f"--trainer.default_root_dir=runs/{setting.name}_lista_{layers}", *setting.overrides,
    ]
    # the validation set only calibrates the recipe's fallback here: keep its oracle solves small
    overrides += ["--data.init_args.batch_size=32", "--data.init_args.val_size=32"] if args.quick else [
        "--data.init_args.val_size=256"]
    if args.lr is not None:
        overrides.append(f"--model.init_args.optimizer.init_args.lr={args.lr}")
    if cache_dir is not None:
        overrides.append(f"--data.init_args.cache_dir={cache_dir}")
    configs = [arg for path in recipe_configs(setting.recipe) for arg in ("--config", str(path))]
    return AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    auto_configure_optimizers=False, run=False, args=[*configs, *overrides])


def suboptimality(objective: SparseCoding, y: Tensor, x: Tensor, f_star: Tensor) -> float:
    """The mean over signals of f(y; x) − f*(x), in float64."""
    return float((objective(y.double(), x.double()) - f_star).mean())


def solver_curves(solver: Solver, objective: SparseCoding, x: Tensor, codes: Tensor, lasso: Tensor,
                  f_star: Tensor) -> dict:
    """The solver from 0 on ``x``: mean NMSE (dB) to the true codes and to the lasso solutions, and mean f − f*, at
    every iteration 0..K (lists of K + 1 numbers)."""
    curves: dict[str, list[float]] = {"true": [], "lasso": [], "subopt": []}

    def record(k: int, y: Tensor) -> None:
        curves["true"].append(float(nmse_db(y, codes).mean()))
        curves["lasso"].append(float(nmse_db(y, lasso).mean()))
        curves["subopt"].append(suboptimality(objective, y, x, f_star))

    solver.solve(objective, x, callback=record)
    return curves


def solver_seconds(solver: Solver, objective: SparseCoding, x: Tensor, repeats: int) -> list[float]:
    """Seconds to reach every iteration 0..K: the median of ``repeats`` runs whose callback only reads the clock."""
    runs = []
    for _ in range(repeats):
        stamps: list[float] = []

        def stamp(k: int, y: Tensor, stamps: list[float] = stamps, start: float = time.perf_counter()) -> None:
            stamps.append(time.perf_counter() - start)

        solver.solve(objective, x, callback=stamp)
        runs.append(stamps)
    return [statistics.median(run[k] for run in runs) for k in range(len(runs[0]))]


def first_at_most(curve: list[float], level: float) -> Optional[int]:
    """The first iteration whose value is at most ``level`` (``None``: never)."""
    return next((k for k, value in enumerate(curve) if value <= level), None)


def lista_numbers(module: AmortizedModule, x: Tensor, codes: Tensor, lasso: Tensor, f_star: Tensor,
                  repeats: int) -> dict:
    """LISTA-K's NMSE (to the true codes, to the lasso solutions: final and per layer), mean f − f*, prediction
    time."""
    module.eval()
    with torch.no_grad():
        out = module.amortizer(x, module.objective)
        for _ in range(2):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return {
        "true": float(nmse_db(out.y, codes).mean()), "lasso": float(nmse_db(out.y, lasso).mean()),
        "subopt": suboptimality(module.objective, out.y, x, f_star),
        "nonzeros": float((out.y != 0).float().mean()),
        "true_layers": [float(nmse_db(y, codes).mean()) for y in out.iterates],
        "lasso_layers": [float(nmse_db(y, lasso).mean()) for y in out.iterates],
        "ms": 1000.0 * statistics.median(times),
    }


def plot(path_nmse: Path, path_objective: Path, title: str, curves: dict, listas: dict) -> None:
    """The NMSE figure (to the true code, to the lasso solution) and the f − f* figure (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, what in ((axes[0], "true", "to the true code"), (axes[1], "lasso", "to the lasso solution (FISTA)")):
        for name, style in (("ISTA", "C0-"), ("FISTA", "C1-")):
            values = curves[name][key]
            ax.plot(range(1, len(values)), values[1:], style, label=name)
        for i, (layers, r) in enumerate(sorted(listas.items())):
            ax.plot(range(1, layers + 1), r[f"{key}_layers"][1:], f"C{i + 2}.-", label=f"LISTA-{layers} (its layers)")
        ax.set_xscale("log")
        ax.set_xlabel("iteration / layer")
        ax.set_ylabel("NMSE (dB)")
        ax.set_title(f"NMSE {what}\n{title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_nmse, dpi=120)
    plt.close(fig)

    floor = 1e-12  # float32 iterates stop at about 1e-7 relative; a mean at or below 0 is drawn here
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("ISTA", "C0-"), ("FISTA", "C1-")):
        values = [max(v, floor) for v in curves[name]["subopt"]]
        ax.plot(range(1, len(values)), values[1:], style, label=name)
    for i, (layers, r) in enumerate(sorted(listas.items())):
        ax.plot([layers], [max(r["subopt"], floor)], f"C{i + 2}o", label=f"LISTA-{layers}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration / layers")
    ax.set_ylabel("mean f − f*  (f* = FISTA to convergence, float64)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_objective, dpi=120)
    plt.close(fig)


def _iters(value: Optional[int], budget: int) -> str:
    return f"not in {budget}" if value is None else str(value)


def _ms(seconds: list[float], iteration: Optional[int]) -> str:
    return "—" if iteration is None else f"{1000.0 * seconds[iteration]:.1f}"


def render_setting(setting: Setting, result: dict, info: dict) -> list[str]:
    """The lines of one setting's subsection of RESULTS.md."""
    budget, curves, seconds, listas = info["iterations"], result["curves"], result["seconds"], result["listas"]
    trained_to = "the true codes" if setting.primary == "true" else "FISTA's solutions"
    lines = [
        f"### {setting.title}", "",
        f"Lasso ½‖x − Dy‖² + {setting.alpha:g}‖y‖₁. LISTA-K = `{setting.recipe.relative_to(ROOT)}`"
        f"{'' if setting.alpha == 0.1 else f' with alpha {setting.alpha:g}'}, K tied layers"
        f"{result.get('variant', '')}, trained {info['steps']} "
        f"steps of 256 signals by regression to {trained_to} of a pool of {result['pool']} (train = its `Trainer.fit` "
        f"wall time, the pool's references excluded). The lasso solutions' own NMSE to the true code: "
        f"{result['lasso_true']:.2f} dB (no ISTA/FISTA iterate goes much below it); mean f* = "
        f"{result['lasso_value']:.4f}.", "",
        "| model | NMSE to true (dB) | NMSE to lasso (dB) | mean f − f* | nonzeros | time / batch (ms) | ISTA iters to "
        "match (true / lasso) | FISTA iters to match (true / lasso) | FISTA ms to match (true / lasso) | FISTA iters "
        f"/ K ({setting.primary}) | train (s) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for layers, r in sorted(listas.items()):
        m = r["matched"]
        needed = m["FISTA"][setting.primary]
        ratio = f"not reached in {budget} iterations" if needed is None else f"{needed / layers:.1f}×"
        lines.append(
            f"| LISTA-{layers} | {r['true']:.2f} | {r['lasso']:.2f} | {r['subopt']:.3g} | {r['nonzeros']:.3f} "
            f"| {r['ms']:.1f} | {_iters(m['ISTA']['true'], budget)} / {_iters(m['ISTA']['lasso'], budget)} "
            f"| {_iters(m['FISTA']['true'], budget)} / {_iters(m['FISTA']['lasso'], budget)} "
            f"| {_ms(seconds['FISTA'], m['FISTA']['true'])} / {_ms(seconds['FISTA'], m['FISTA']['lasso'])} "
            f"| {ratio} | {r['train_s']:.0f} |"
        )
    for name in ("ISTA", "FISTA"):
        c = curves[name]
        for k in (4, 8, 16, 160, budget):
            if k < len(c["true"]):
                lines.append(
                    f"| {name}, {k} iterations | {c['true'][k]:.2f} | {c['lasso'][k]:.2f} | {c['subopt'][k]:.3g} | "
                    f"| {1000.0 * seconds[name][k]:.1f} | | | | | |"
                )
    lines += ["", result["verdict"], "",
              f"Figures: `benchmarks/figures/sparse_coding_{setting.name}_nmse.png`, "
              f"`benchmarks/figures/sparse_coding_{setting.name}_objective.png`.", ""]
    return lines


def render(info: dict, results: dict[str, tuple[Setting, dict]], kept: Optional[list[str]] = None) -> str:
    """The section of RESULTS.md (``kept``: the lines of earlier subsections to keep after the new ones)."""
    lines = [
        SECTION, "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread  ",
        f"Date: {info['date']}; 1-min load average {info['load'][0]:.1f} at the start, {info['load'][1]:.1f} at the "
        "end: the 2-core machine was shared with about 5 other jobs, so the times are noisy.", "",
        f"D 250 × 500 Gaussian with unit-norm columns (L = ‖D‖₂² = {info['lipschitz']:.3f}), noiseless signals of "
        f"Bernoulli(0.1)–Gaussian codes; {info['batch']} held-out signals. NMSE = mean over signals of "
        "10 log10(‖ŷ − y‖² / ‖y‖²) in dB, to the true code and to the lasso solution (the oracle's, float64, residual "
        "≤ 1e-6); f − f* per signal in float64, f* the oracle's value. ISTA/FISTA: the core's solvers from 0, step "
        f"1/L (FISTA restarted), {info['iterations']} iterations; matched = the first iteration whose mean NMSE is at "
        "most LISTA-K's, and its time for the batch; LISTA's time = one prediction of the batch under "
        f"`torch.no_grad`, median of {info['repeats']}. Target (issue 12): LISTA-16 reaches an NMSE that FISTA "
        f"needs ≥ {TARGET_FACTOR}× more iterations (≥ 160) to reach.", "",
    ]
    for setting, result in results.values():
        lines += render_setting(setting, result, info)
    lines += kept or []
    return "\n".join(lines).rstrip("\n") + "\n"


KEPT_NOTE = "*Kept from an earlier run, not rerun by the command above:"


def kept_subsections(path: Path, rerun: list[str]) -> list[str]:
    """The ``### `` subsections of the section already in ``path`` whose titles are not in ``rerun``, each marked with
    the command and date of the run that measured it (a subsection kept before keeps its own mark)."""
    if not path.exists():
        return []
    match = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", path.read_text(), re.S | re.M)
    if match is None:
        return []
    old = match.group(1)
    command = re.search(r"^Command: (`.*`)", old, re.M)
    date = re.search(r"^Date: ([^;]*);", old, re.M)
    origin = f"{KEPT_NOTE} {command.group(1) if command else 'command unknown'}, {date.group(1) if date else ''}.*"
    kept = []
    for block in re.split(r"^(?=### )", old, flags=re.M)[1:]:
        title = block.split("\n", 1)[0][4:].strip()
        if title in rerun:
            continue
        head, _, body = block.partition("\n")
        if KEPT_NOTE not in body:
            body = "\n" + origin + "\n" + body
        kept += [head, *body.rstrip("\n").split("\n"), ""]
    return kept


def verdict(listas: dict, layers: int, budget: int) -> str:
    """Whether LISTA-``layers`` meets the target (FISTA needs ≥ 10 K iterations to reach its NMSE), per NMSE."""
    if layers not in listas:
        return f"Target not evaluated: no LISTA-{layers} in this run."
    m = listas[layers]["matched"]["FISTA"]
    parts = []
    for key, what in (("true", "to the true code"), ("lasso", "to the lasso solution")):
        needed = m[key]
        met = needed is None or needed >= TARGET_FACTOR * layers
        reach = (f"does not reach LISTA-{layers}'s {listas[layers][key]:.2f} dB in {budget} iterations"
                 if needed is None else f"needs {needed} iterations to reach LISTA-{layers}'s "
                 f"{listas[layers][key]:.2f} dB")
        parts.append(f"NMSE {what}: FISTA {reach}, target (≥ {TARGET_FACTOR * layers}) {'MET' if met else 'MISSED'}")
    return f"Target with LISTA-{layers}: " + "; ".join(parts) + "."


def run_setting(setting: Setting, args: argparse.Namespace, figures: Path) -> dict:
    """Train the setting's LISTAs, run ISTA and FISTA on the held-out signals, measure, plot."""
    here = os.getcwd()
    trained = {}
    with tempfile.TemporaryDirectory(prefix="amor-sparse-coding-") as workdir:
        cache_dir = args.cache_dir or (str(Path(workdir) / "cache") if args.quick else None)
        os.chdir(workdir)  # the recipe's run folder goes to the temporary directory
        try:
            for layers in setting.layers:
                cli = build(setting, layers, args, cache_dir)
                cli.datamodule.attach(cli.model.objective, cli.model.needs_target)
                start = time.perf_counter()
                cli.datamodule.prepare_data()  # the pool's references first (solved once), outside the train time
                cli.datamodule.setup("fit")
                print(f"[{setting.name} LISTA-{layers}] data ready in {time.perf_counter() - start:.0f} s; training "
                      f"{args.steps} steps ...", flush=True)
                start = time.perf_counter()
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                trained[layers] = (cli, time.perf_counter() - start)
                print(f"[{setting.name} LISTA-{layers}] trained in {trained[layers][1]:.0f} s", flush=True)
        finally:
            os.chdir(here)

    data = next(iter(trained.values()))[0].datamodule
    objective = next(iter(trained.values()))[0].model.objective
    x, codes = data.sample_with_codes(args.batch, seeded_generator(data.seed, HELD_OUT_SEED))
    print(f"[{setting.name}] solving the {args.batch} held-out lassos (FISTA, float64) ...", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lasso64 = objective.solve(x.double())
    for warning in caught:
        print(f"[{setting.name}] warning: {warning.message}", flush=True)
    lasso, f_star = lasso64.float(), objective(lasso64, x.double())

    solvers = {
        "ISTA": ISTA(steps=args.iterations, tol=None, lipschitz=objective.lipschitz, backtracking=False),
        "FISTA": FISTA(steps=args.iterations, tol=None, lipschitz=objective.lipschitz, backtracking=False),
    }
    curves, seconds = {}, {}
    for name, solver in solvers.items():
        print(f"[{setting.name} {name}] {args.iterations} iterations ...", flush=True)
        curves[name] = solver_curves(solver, objective, x, codes, lasso, f_star)
        seconds[name] = solver_seconds(solver, objective, x, args.solver_repeats)

    listas = {}
    for layers, (cli, train_s) in trained.items():
        r = lista_numbers(cli.model, x, codes, lasso, f_star, args.repeats)
        r["train_s"] = train_s
        r["matched"] = {name: {key: first_at_most(curves[name][key], r[key]) for key in ("true", "lasso")}
                        for name in solvers}
        listas[layers] = r

    plot(figures / f"sparse_coding_{setting.name}_nmse.png", figures / f"sparse_coding_{setting.name}_objective.png",
         setting.title, curves, listas)
    target_layers = 16 if 16 in listas else max(listas)
    variant = ""
    if any("support_step" in override for override in setting.overrides):
        variant += (f" with support selection (at layer k the round(min(k · {args.support_step:g}, "
                    f"{args.support_max:g}) · n) largest entries skip the soft-threshold)")
    if args.lr is not None:
        variant += f", Adam lr {args.lr:g} (cosine to 0)"
    return {
        "variant": variant,
        "curves": curves, "seconds": seconds, "listas": listas, "pool": data.train_size,
        "lasso_true": float(nmse_db(lasso, codes).mean()), "lasso_value": float(f_star.mean()),
        "lipschitz": objective.lipschitz, "verdict": verdict(listas, target_layers, args.iterations),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    load_start = os.getloadavg()[0]
    if args.figures is not None:
        figures = Path(args.figures)
    elif args.quick:  # a smoke run leaves the committed figures alone
        figures = Path(tempfile.mkdtemp(prefix="amor-sparse-coding-figures-"))
    else:
        figures = ROOT / "benchmarks" / "figures"
    figures.mkdir(parents=True, exist_ok=True)

    results = {}
    for setting in settings(args):
        results[setting.name] = (setting, run_setting(setting, args, figures))

    threads = os.environ.get("OMP_NUM_THREADS")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(([f"OMP_NUM_THREADS={threads}"] if threads else [])
                       + ["python", "benchmarks/sparse_coding.py", *given])
    info = {
        "command": command, "machine": f"{cpu_name()}, {os.cpu_count()} cores, CPU only",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": (load_start, os.getloadavg()[0]), "batch": args.batch, "iterations": args.iterations,
        "steps": args.steps, "repeats": args.repeats,
        "lipschitz": next(iter(results.values()))[1]["lipschitz"],
    }
    kept = [] if not args.output else kept_subsections(Path(args.output), [s.title for s, _ in results.values()])
    section = render(info, results, kept)
    print()
    print(section)
    print(f"figures in {figures}")
    if args.output:
        write_section(Path(args.output), SECTION, section)
        print(f"written to {args.output}")
    return {"info": info, "results": {name: result for name, (_, result) in results.items()}}


if __name__ == "__main__":
    main()
