"""Sphere benchmark: train every sphere recipe in one process and compare them on one held-out set.

For each recipe in ``recipes/sphere/`` this script builds the model, data module and Trainer from the
YAML (through the ``lightning-amor`` CLI class, without running a subcommand), trains it, and then
evaluates the final weights on the data module's fixed test set (1024 seeded contexts, never used in
training) against the oracle's global minimizers (``SphereObjective.solve``: a dense Fibonacci grid
refined by multi-start L-BFGS). It prints, and writes as markdown into ``benchmarks/RESULTS.md``:

* the median and 90th percentile of the geodesic angle between ŷ and y* (degrees), the share of contexts more
  than 10° away (in another basin: ``SphereObjective.basin_threshold``) and the mean amortization gap f(ŷ) − f(y*),
  all from the library's evaluation (:func:`lightning_amor.evaluation.evaluate`, as ``lightning-amor evaluate``),
* the speed-up at matched quality against the recipe's own solver (L-BFGS) from scratch, from the same evaluation,
* the oracle time spent on the training labels (regression recipes; a pool shared by several recipes
  is solved once and its time is shown on each of them), and the training wall time (``Trainer.fit``,
  labels excluded, periodic validation included),
* the inference time for a batch of 1024 contexts (``torch.no_grad``, after warm-up, median of repeats),
  next to the oracle's time for the same batch (median of repeats, timed in rounds interleaved with the
  amortizers so that the shared machine's load changes affect both alike), and their ratio (speed-up).

The default recipe's whole evaluation (warm-start saving, gap quantiles, ...) follows the table, and its figures go
to ``benchmarks/figures/sphere_<recipe>_*.png``. Reference solutions are cached in a fresh temporary directory by
default, so label times are real.

    OMP_NUM_THREADS=1 python benchmarks/sphere.py            # the full benchmark (about 11 min on a 2-core CPU)
    OMP_NUM_THREADS=1 python benchmarks/sphere.py --quick    # smoke run: few steps, small pool, no RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `datamodules` lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.results import cpu_name, write_section  # noqa: E402
from datamodules.context import ContextDataModule  # noqa: E402
from lightning_amor.apps.sphere import SphereObjective  # noqa: E402
from lightning_amor.cli import AmortCLI  # noqa: E402
from lightning_amor.commands.recipes import recipe_configs  # noqa: E402
from lightning_amor.evaluation import EvaluationReport, evaluate  # noqa: E402
from lightning_amor.evaluation_figures import save_figures  # noqa: E402
from lightning_amor.module import AmortizedModule  # noqa: E402

RECIPE_DIR = ROOT / "recipes" / "sphere"
RECIPES = (
    "full_objective",
    "full_regression",
    "semi_objective",
    "semi_regression",
    "semi_sum_objective",
    "semi_sum_regression",
    "semi_learned",
)
DEFAULT_RECIPE = "semi_sum_regression"
SECTION = "## Sphere"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="NAME",
                        help=f"recipes of {RECIPE_DIR.relative_to(ROOT)} to train (default: {', '.join(RECIPES)})")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every recipe's max_steps (and its cosine schedule's T_max) by this factor")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="override train_size of the regression recipes (default: the recipes' own)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="override val_size and test_size (default: the recipes' own, 1024)")
    parser.add_argument("--repeats", type=int, default=21,
                        help="timed predictions of each amortizer (spread over the --solver-repeats rounds)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up calls before timing inference")
    parser.add_argument("--solver-repeats", type=int, default=3,
                        help="timed oracle solves of the test batch (= timing rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cache-dir", default=None,
                        help="where reference solutions are cached (default: a fresh temporary directory)")
    parser.add_argument("--output", default=None,
                        help="markdown file whose Sphere section is (re)written (default: benchmarks/RESULTS.md; "
                             "none with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --steps-scale 0.02 --pool-size 2048 --eval-size 256, few repeats, "
                             "RESULTS.md untouched unless --output is given")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps_scale = min(args.steps_scale, 0.02)
        args.pool_size = args.pool_size or 2048
        args.eval_size = args.eval_size or 256
        args.repeats = min(args.repeats, 5)
        args.warmup = min(args.warmup, 2)
        args.solver_repeats = 1
    elif args.output is None:
        args.output = str(ROOT / "benchmarks" / "RESULTS.md")
    unknown = [r for r in args.recipes if not (RECIPE_DIR / f"{r}.yaml").is_file()]
    if unknown:
        parser.error(f"no recipe {', '.join(unknown)} in {RECIPE_DIR}")
    if args.steps_scale <= 0:
        parser.error("--steps-scale must be positive")
    if min(args.repeats, args.solver_repeats) < 1 or args.warmup < 0:
        parser.error("--repeats and --solver-repeats must be at least 1, --warmup at least 0")
    return args


def quiet_lightning() -> None:
    """Keep the output to this script's own lines: Lightning's info messages and known warnings off."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def recipe_overrides(path: Path, args: argparse.Namespace, cache_dir: str) -> list[str]:
    """Command-line overrides that apply the benchmark's options to one recipe."""
    config = yaml.safe_load(path.read_text())
    overrides = [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.init_args.cache_dir={cache_dir}",
    ]
    if args.steps_scale != 1.0:
        steps = max(1, round(config["trainer"]["max_steps"] * args.steps_scale))
        overrides.append(f"--trainer.max_steps={steps}")
        interval = min(steps, config["trainer"].get("val_check_interval", steps))
        overrides.append(f"--trainer.val_check_interval={interval}")
        scheduler = config["model"]["init_args"].get("lr_scheduler")
        if scheduler and "T_max" in scheduler.get("init_args", {}):
            overrides.append(f"--model.init_args.lr_scheduler.init_args.T_max={steps}")
    data_args = config["data"].get("init_args", {})
    if args.pool_size is not None and data_args.get("train_size") is not None:
        overrides.append(f"--data.init_args.train_size={args.pool_size}")
    if args.eval_size is not None:
        overrides.append(f"--data.init_args.val_size={args.eval_size}")
        overrides.append(f"--data.init_args.test_size={args.eval_size}")
    return overrides


def build(name: str, args: argparse.Namespace, cache_dir: str) -> AmortCLI:
    """Model, data module and Trainer of one recipe, as ``lightning-amor fit --config`` would build them."""
    path = RECIPE_DIR / f"{name}.yaml"
    return AmortCLI(
        AmortizedModule,
        ContextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=[*(arg for config in recipe_configs(path) for arg in ("--config", str(config))),
              *recipe_overrides(path, args, cache_dir)],
    )


def describe(cli: AmortCLI) -> str:
    """A short description of a recipe: model, inner steps and update rule, loss, label pool."""
    module, data = cli.model, cli.datamodule
    amortizer = module.amortizer
    init = getattr(amortizer, "net", None) or getattr(amortizer, "init", None)
    widths = [m.out_features for m in init.modules() if isinstance(m, torch.nn.Linear)][:-1]
    net = f"MLP {'-'.join(str(w) for w in widths)}"
    if type(amortizer).__name__ == "SemiAmortized":
        update = type(amortizer.update).__name__
        if update == "LearnedUpdate":
            update = f"LearnedUpdate({amortizer.update.kind})"
        model = f"semi: {net} + {amortizer.steps}×{update}"
    else:
        model = f"full: {net}"
    loss = module.loss
    loss_name = type(loss).__name__.replace("Loss", "").lower()
    if type(loss).__name__ == "IterateSumLoss":
        loss_name = f"Σ_t {type(loss.base).__name__.replace('Loss', '').lower()} over iterates"
    pool = f", {data.train_size} labels" if module.needs_target else ", fresh x"
    return f"{model}; {loss_name}{pool}"


def prepare_references(cli: AmortCLI, label_times: dict[str, Optional[float]]) -> Optional[float]:
    """Solve (or load) the fixed sets' references before training; returns the training labels' oracle time.

    The label pool is timed the first time it is solved; a pool that was already in the cache directory
    before this run reports ``None`` (unknown cost).
    """
    data, module = cli.datamodule, cli.model
    data.attach(module.objective, module.needs_target)
    labels = None
    if module.needs_target and data.train_size is not None:
        cache_file = data.cache_file("pool")
        key = None if cache_file is None else cache_file.name
        if key not in label_times:
            cached = cache_file is not None and cache_file.exists()
            start = time.perf_counter()
            data.fixed_set("pool", data.train_size)
            label_times[key] = None if cached else time.perf_counter() - start
        labels = label_times[key]
    data.fixed_set("val", data.val_size)  # validation references: cached now, not counted as training time
    return labels


def interleaved_times_ms(fns: dict[str, Callable[[], object]], rounds: int, per_round: dict[str, int],
                         warmup: dict[str, int]) -> dict[str, float]:
    """Median wall time (ms) of each ``fns[k]()``, measured in interleaved rounds.

    Every function first gets ``warmup[k]`` untimed calls; then each of ``rounds`` rounds times every
    function ``per_round[k]`` times, one function after the other, so that a change in the machine's load
    (it is shared) affects all of them alike instead of whichever was measured at that moment.
    """
    for key, fn in fns.items():
        for _ in range(warmup[key]):
            fn()
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in tqdm(range(rounds), desc="timing rounds", unit="round"):
        for key, fn in fns.items():
            for _ in range(per_round[key]):
                start = time.perf_counter()
                fn()
                samples[key].append(1000.0 * (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in samples.items()}


def quality(report: EvaluationReport) -> dict:
    """Angular errors to the global minimizers (degrees), the wrong-basin share, the mean gap and the speed-up at
    matched quality of a trained module, from its evaluation on the test batch."""
    angle = report.distance.double() * (180.0 / math.pi)
    return {"median": float(angle.median()), "p90": float(torch.quantile(angle, 0.9)), "gap": report.gap_quantiles()[
        "mean"], "wrong_basin": report.wrong_basin_share, "nonfinite": report.nonfinite, "report": report}


def matched(report: EvaluationReport) -> str:
    """The speed-up at matched quality as a table cell: ``k it, N×``, or a lower bound when never reached."""
    k = report.matched_iteration
    if k is None:
        return f"not reached in {report.scratch.iterations_run} it (> {report.speedup:,.0f}×)"
    return f"{k} it, {report.speedup:,.0f}×"


def inference(module: AmortizedModule, x: torch.Tensor) -> Callable[[], object]:
    """One prediction for the batch, as deployed: eval mode, ``torch.no_grad``."""
    module.eval()

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return predict


def fmt_seconds(value: Optional[float]) -> str:
    return "cached" if value is None else f"{value:.0f}"


def render(rows: list[dict], solver_ms: float, batch: int, meta: dict) -> str:
    """The Sphere section of RESULTS.md (markdown)."""
    lines = [
        SECTION,
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)  ",
        f"Date: {meta['date']}; total run time {meta['total_s'] / 60:.1f} min; 1-min load average "
        f"{meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} at the end (other jobs share the machine)",
        "",
        f"Held-out set: the data modules' fixed test set ({batch} seeded contexts, seed 0, never used in training), "
        "evaluated with the final weights of each run against the oracle's global minimizers "
        f"(`SphereObjective.solve`: a {meta['grid']}-point Fibonacci grid, then float64 L-BFGS from its "
        f"{meta['starts']} lowest points at least {meta['separation']:g}° apart). Angular error = geodesic angle "
        "between ŷ and y*; gap = mean f(ŷ) − f(y*). "
        "Labels = oracle time to solve a regression recipe's training pool (one shared pool, solved once, shown on "
        "each recipe that uses it). Train = `Trainer.fit` wall time without the labels (periodic validation "
        f"included, process start-up excluded). Inference = one batch of {batch}, `torch.no_grad`, "
        f"{meta['warmup']} warm-up calls, median of {meta['repeats']}; the oracle row is the median of "
        f"{meta['solver_repeats']} solves of the same batch after one untimed solve, timed in rounds interleaved "
        "with the amortizers' predictions. Speed-up = oracle time / inference time. "
        f"Default recipe: `{DEFAULT_RECIPE}`. Timings come from a shared 2-core machine and are noisy.",
        "",
        f"| recipe | model; loss | median err (°) | p90 err (°) | > 10° (wrong basin) | mean gap | labels (s) "
        f"| train (s) | inference (ms / {batch}) | speed-up vs oracle | L-BFGS from scratch to mean f(ŷ) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        labels = fmt_seconds(r["labels_s"]) if r["labels"] else "—"
        wrong = f"{100 * r['wrong_basin']:.1f}%" + (f" (+{r['nonfinite']} NaN ŷ left out)" if r["nonfinite"] else "")
        lines.append(
            f"| `{r['name']}` | {r['description']} | {r['median']:.2f} | {r['p90']:.2f} | {wrong} | {r['gap']:.4f} "
            f"| {labels} | {r['train_s']:.0f} | {r['infer_ms']:.2f} | {solver_ms / r['infer_ms']:.0f}× "
            f"| {matched(r['report'])} |"
        )
    lines.append(
        f"| oracle | {meta['grid']}-point grid + {meta['starts']}-start L-BFGS (the reference) | 0 | 0 | 0% | 0 | — "
        f"| — | {solver_ms:.0f} | 1× | — |"
    )
    default = next((r for r in rows if r["name"] == DEFAULT_RECIPE), rows[0])
    lines += [
        "",
        "L-BFGS from scratch = the recipes' own solver (`model.init_args.inference.solver`) from "
        "`objective.initial_point`: the iterations and the speed-up (its time / the inference time) at which its "
        "batch-mean f first reaches the model's mean f(ŷ) (`lightning_amor.evaluation`; a lower bound when it never "
        "does: a single start ends in whichever basin it descends into).",
        "",
        f"### `{default['name']}`: the whole evaluation (as `lightning-amor evaluate` reports it)",
        "",
        default["report"].table(),
        "",
        f"Figures: `benchmarks/figures/sphere_{default['name']}_{{gap,speedup,warm_start}}.png`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    start_all = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    temp = None
    if args.cache_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="amor-sphere-bench-")
        cache_dir = temp.name
    else:
        cache_dir = args.cache_dir

    label_times: dict[str, Optional[float]] = {}
    test_x: Optional[torch.Tensor] = None
    rows = []
    trained = []
    for name in tqdm(args.recipes, desc="recipes", unit="recipe"):
        cli = build(name, args, cache_dir)
        labels_s = prepare_references(cli, label_times)
        x = cli.datamodule.fixed_set("test", cli.datamodule.test_size, with_targets=False)["x"]
        if test_x is None:
            test_x = x
        elif not torch.equal(test_x, x):
            raise RuntimeError(f"recipe {name} has another test set (test_size or seed differ): rows would not compare")
        print(f"[{name}] training ({describe(cli)}) ...", flush=True)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        train_s = time.perf_counter() - start
        print(f"[{name}] trained in {train_s:.0f} s ({cli.trainer.global_step} steps)", flush=True)
        trained.append((name, cli, labels_s, train_s))

    # Quality, wrong basins and the speed-up at matched quality: the library's evaluation on the same test batch,
    # against the oracle's global minimizers (solved once and cached by the data module).
    for name, cli, labels_s, train_s in tqdm(trained, desc="evaluating", unit="recipe"):
        report = evaluate(cli.model, cli.datamodule, repeats=args.solver_repeats, warmup=args.warmup, name=name)
        rows.append({"name": name, "description": describe(cli), "labels": cli.model.needs_target,
                     "labels_s": labels_s, "train_s": train_s, **quality(report)})
        if args.output:
            save_figures(report, ROOT / "benchmarks" / "figures", f"sphere_{name}")
    oracle = SphereObjective()
    oracle.solve(test_x)  # the oracle's warm-up call for the timing below

    # Timing: the oracle once per round, each amortizer repeats/rounds times per round, interleaved.
    rounds = args.solver_repeats
    fns: dict[str, Callable[[], object]] = {"oracle": lambda: oracle.solve(test_x)}
    fns.update({name: inference(cli.model, test_x) for name, cli, _, _ in trained})
    per_amortizer = -(-args.repeats // rounds)
    per_round = {key: 1 if key == "oracle" else per_amortizer for key in fns}
    warmup = {key: 0 if key == "oracle" else args.warmup for key in fns}
    print(f"timing: {rounds} rounds of 1 oracle solve and {per_amortizer} predictions per amortizer ...", flush=True)
    times = interleaved_times_ms(fns, rounds, per_round, warmup)
    solver_ms = times.pop("oracle")
    for row in rows:
        row["infer_ms"] = times[row["name"]]
    print(f"[oracle] {solver_ms:.0f} ms per batch of {test_x.shape[0]}", flush=True)

    total_s = time.perf_counter() - start_all
    given = sys.argv[1:] if argv is None else argv
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join(([f"OMP_NUM_THREADS={threads}"] if threads else []) + ["python", "benchmarks/sphere.py", *given])
    meta = {
        "command": command,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, CPU only",
        "load": (load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "total_s": total_s,
        "grid": oracle.grid_points,
        "starts": oracle.starts,
        "separation": oracle.separation,
        "warmup": args.warmup,
        "repeats": rounds * per_amortizer,
        "solver_repeats": args.solver_repeats,
    }
    section = render(rows, solver_ms, test_x.shape[0], meta)
    print()
    print(section)
    if args.output:
        write_section(Path(args.output), SECTION, section)
        print(f"written to {args.output}")
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
