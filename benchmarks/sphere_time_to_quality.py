"""Sphere, time to quality: a plain PyTorch loop and the default recipe under the same wall-clock budgets, in one run.

Two ways to train an amortizer of the sphere problem, one after the other in this process, on one thread:

* **plain loop**: the tutorial reference's model (an MLP 16-128-128-3 with ReLU, its output normalised onto S²)
  trained by Adam (lr 5e-4) on the objective f(ŷ(x); x), averaged over batches of 64 fresh contexts from the same
  p(x) as ``datamodules.SphereContexts`` — a dozen lines of PyTorch, what a user would write without the framework;
* **the default recipe** (``recipes/sphere/semi_sum_regression.yaml``), built in-process through the
  ``lightning-amor`` CLI class and run by ``Trainer.fit`` exactly as ``lightning-amor fit`` runs it (periodic
  validation, figures and checkpoints included), with a fresh, empty cache of reference solutions: its clock starts
  before ``fit``, so it pays for solving its training pool (and validation set) with the oracle.

Both clocks stop while this script measures: every ``--eval-every`` seconds of training, and at each budget, the
current model predicts the data module's fixed test set (1024 seeded contexts never used in training; eval mode,
``torch.no_grad``), and the geodesic angle to the oracle's global minimizers of those contexts (solved once, before
either run, and not counted) gives the median and 90th percentile of the error. A run stops at the last budget; a
recipe that finishes its steps earlier keeps its final weights for the remaining budgets.

Target (issue 9): the recipe reaches a median ≤ 5° and a 90th percentile ≤ 15° in less time than the plain loop needs
to reach its own error at 60 s.

    OMP_NUM_THREADS=1 python benchmarks/sphere_time_to_quality.py           # about 5 min; writes RESULTS.md
    OMP_NUM_THREADS=1 python benchmarks/sphere_time_to_quality.py --quick   # smoke run (budgets 1-4 s, no RESULTS.md)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `datamodules` lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.results import cpu_name, write_section  # noqa: E402
from benchmarks.sphere import quiet_lightning  # noqa: E402
from datamodules.context import ContextDataModule  # noqa: E402
from datamodules.sphere import SphereContexts  # noqa: E402
from lightning_amor.apps.sphere import SphereObjective  # noqa: E402
from lightning_amor.cli import AmortCLI  # noqa: E402
from lightning_amor.commands.recipes import recipe_configs  # noqa: E402
from lightning_amor.module import AmortizedModule  # noqa: E402

RECIPE = ROOT / "recipes" / "sphere" / "semi_sum_regression.yaml"
BUDGETS = (5.0, 15.0, 30.0, 60.0, 120.0)
TARGET_MEDIAN, TARGET_P90 = 5.0, 15.0
SECTION = "## Sphere: time to quality"

Predict = Callable[[Tensor], Tensor]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                        help="wall-clock budgets (s) at which both runs are measured; the last one ends the runs")
    parser.add_argument("--eval-every", type=float, default=0.5,
                        help="seconds of training between two measurements (for the time to reach a quality)")
    parser.add_argument("--pool-size", type=int, default=None, help="override the recipe's train_size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plain loop's model and contexts")
    parser.add_argument("--output", default=None,
                        help="markdown file whose section is (re)written (default benchmarks/RESULTS.md; none with "
                             "--quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: budgets 1 2 4 s, pool of 2048, no RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets = [1.0, 2.0, 4.0]
        args.pool_size = args.pool_size or 2048
    elif args.output is None:
        args.output = str(ROOT / "benchmarks" / "RESULTS.md")
    args.budgets = sorted(args.budgets)
    if args.budgets[0] <= 0 or args.eval_every <= 0:
        parser.error("--budgets and --eval-every must be positive")
    return args


def angular_errors(y: Tensor, y_star: Tensor) -> Tensor:
    """Geodesic angles (degrees) between ``B x 3`` predictions and ``B x 3`` references, in float64 (``B``).

    ``atan2(‖a × b‖, a·b)`` stays accurate for tiny angles, where ``arccos`` of a float32 dot product does not.
    """
    a = nn.functional.normalize(y.double(), dim=-1)
    b = nn.functional.normalize(y_star.double(), dim=-1)
    return torch.rad2deg(torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1)))


class Stopwatch:
    """Training time of one run: wall time since :meth:`start`, without the time spent in :meth:`measure`.

    ``measure`` records ``(t, median°, p90°)`` whenever the next measurement time (every ``every`` seconds and at
    each budget) has passed, and says whether the last budget is spent.
    """

    def __init__(self, x: Tensor, y_star: Tensor, budgets: list[float], every: float) -> None:
        self.x, self.y_star, self.budgets, self.every = x, y_star, budgets, every
        self.records: list[tuple[float, float, float]] = []
        self._start = 0.0
        self._paused = 0.0
        self._next = 0.0

    def start(self) -> None:
        """Start the clock at zero."""
        self._start, self._paused = time.perf_counter(), 0.0
        self._next = min(self.every, self.budgets[0])

    def elapsed(self) -> float:
        """Seconds of training so far (measurements excluded)."""
        return time.perf_counter() - self._start - self._paused

    def due(self) -> bool:
        """Whether a measurement is due."""
        return self.elapsed() >= self._next

    def measure(self, predict: Predict, final: bool = False) -> bool:
        """Measure ``predict`` if a measurement is due (or ``final``); returns whether the last budget is spent."""
        now = self.elapsed()
        if now >= self._next or final:
            pause = time.perf_counter()
            with torch.no_grad():
                err = angular_errors(predict(self.x), self.y_star)
            self.records.append((now, float(err.median()), float(torch.quantile(err, 0.9))))
            due = [b for b in self.budgets if b > now]
            self._next = min([now + self.every, *due[:1]])
            self._paused += time.perf_counter() - pause
        return now >= self.budgets[-1]

    def at(self, budget: float) -> tuple[float, float]:
        """Median and p90 (°) of the last measurement within ``budget`` seconds (NaN when there is none)."""
        within = [r for r in self.records if r[0] <= budget + 1e-9]
        return (within[-1][1], within[-1][2]) if within else (math.nan, math.nan)

    def first(self, median: float, p90: float = math.inf) -> Optional[float]:
        """The first time (s) the error was at most ``median`` and ``p90``, or ``None``."""
        return next((t for t, m, p in self.records if m <= median and p <= p90), None)


class ReferenceMLP(nn.Module):
    """The tutorial reference's sphere model: MLP 16-128-128-3 (ReLU), output divided by its norm (``B x 3``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return y / y.norm(dim=-1, keepdim=True)


def run_plain_loop(watch: Stopwatch, seed: int) -> int:
    """Train :class:`ReferenceMLP` on fresh batches of 64 with Adam 5e-4 until the last budget; returns its steps."""
    torch.manual_seed(seed)
    model, objective, contexts = ReferenceMLP(), SphereObjective(), SphereContexts()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    watch.start()
    while True:
        x = contexts.sample(64, generator)
        loss = objective(model(x), x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if watch.measure(model):  # (no dropout or normalisation layers: eval mode would change nothing)
            return steps


class MeasureDuringFit(Callback):
    """Measures the module after every training step that is due, and stops ``fit`` at the last budget."""

    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if self.watch.due():
            pl_module.eval()
            if self.watch.measure(pl_module):
                trainer.should_stop = True
            pl_module.train()


def run_recipe(watch: Stopwatch, pool_size: Optional[int], workdir: str) -> dict:
    """Run the default recipe's ``fit`` with an empty cache; returns its ``steps``, its ``total`` time, the time
    before its first step (``references``: the oracle solving the pool and validation set) and its ``pool`` size."""
    overrides = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 f"--data.init_args.cache_dir={Path(workdir) / 'cache'}"]
    if pool_size is not None:
        overrides.append(f"--data.init_args.train_size={pool_size}")
    cli = AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   auto_configure_optimizers=False, run=False,
                   args=[*(arg for config in recipe_configs(RECIPE) for arg in ("--config", str(config))), *overrides])
    cli.trainer.callbacks.append(MeasureDuringFit(watch))
    first_step: list[float] = []

    class MarkFirstStep(Callback):
        def on_train_batch_start(self, *args: object) -> None:
            """Note the clock at the first training step (the references are solved by then)."""
            if not first_step:
                first_step.append(watch.elapsed())

    cli.trainer.callbacks.append(MarkFirstStep())
    watch.start()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    total = watch.elapsed()
    cli.model.eval()
    watch.measure(cli.model, final=True)
    return {"steps": cli.trainer.global_step, "total": total, "pool": cli.datamodule.train_size,
            "references": first_step[0] if first_step else math.nan}


def fmt(value: Optional[float], unit: str = "", digits: int = 1) -> str:
    """A number with its unit, or "not reached" for ``None``/NaN."""
    return "not reached" if value is None or math.isnan(value) else f"{value:.{digits}f}{unit}"


def render(plain: Stopwatch, recipe: Stopwatch, info: dict) -> str:
    """The section of RESULTS.md (markdown)."""
    budgets = info["budgets"]
    head = " | ".join(f"{b:g} s" for b in budgets)
    lines = [
        SECTION,
        "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread  ",
        f"Date: {info['date']}; 1-min load average {info['load'][0]:.1f} at the start, {info['load'][1]:.1f} at the "
        "end. Timings come from a shared 2-core machine (other jobs were running) and are noisy.",
        "",
        "Plain loop: the reference's MLP 16-128-128-3 (ReLU, output normalised onto S²), Adam 5e-4, objective loss "
        "on batches of 64 fresh contexts from `SphereContexts`' p(x). Recipe: `recipes/sphere/semi_sum_regression"
        ".yaml` run by `Trainer.fit` as `lightning-amor fit` runs it, with an empty cache, so its clock includes "
        f"solving its pool of {info['pool']} contexts and its validation set with the oracle "
        f"({info['references_s']:.1f} s before its first step) and its periodic validation and figures. "
        "Error = geodesic angle to the oracle's global minimizers on the data module's fixed test set (1024 "
        "contexts), measured with the clock stopped every "
        f"{info['every']:g} s of training and at each budget; median / 90th percentile in degrees (—: no model yet, "
        "the references are being solved).",
        "",
        f"| run | {head} | time to ≤ {TARGET_MEDIAN:g}° median | steps |",
        "|---|" + "--:|" * len(budgets) + "--:|--:|",
    ]
    for name, watch, steps in (("plain loop", plain, info["plain_steps"]),
                               ("default recipe", recipe, info["recipe_steps"])):
        errors = [watch.at(b) for b in budgets]
        cells = " | ".join("—" if math.isnan(m) else f"{fmt(m, '°', 2)} / {fmt(p, '°', 2)}" for m, p in errors)
        lines.append(f"| {name} | {cells} | {fmt(watch.first(TARGET_MEDIAN), ' s')} | {steps} |")
    lines += ["", info["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(plain: Stopwatch, recipe: Stopwatch, reference_budget: float) -> str:
    """Whether the target is met, in a sentence with the numbers."""
    plain_median, _ = plain.at(reference_budget)
    plain_time = plain.first(plain_median)
    recipe_time = recipe.first(TARGET_MEDIAN, TARGET_P90)
    met = recipe_time is not None and plain_time is not None and recipe_time < plain_time
    return (
        f"Target {'met' if met else 'NOT met'}: the recipe first reaches ≤ {TARGET_MEDIAN:g}° median and ≤ "
        f"{TARGET_P90:g}° p90 after {fmt(recipe_time, ' s')}; the plain loop first reaches its own "
        f"{reference_budget:g}-s median error ({fmt(plain_median, '°', 2)}) after {fmt(plain_time, ' s')}."
    )


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    load_start = os.getloadavg()[0]
    data = SphereContexts()
    x = data.fixed_set("test", data.test_size, with_targets=False)["x"]
    print(f"solving the held-out references ({x.shape[0]} contexts) ...", flush=True)
    y_star = SphereObjective().solve(x)

    plain = Stopwatch(x, y_star, args.budgets, args.eval_every)
    print(f"plain loop: training for {args.budgets[-1]:g} s ...", flush=True)
    plain_steps = run_plain_loop(plain, args.seed)

    recipe = Stopwatch(x, y_star, args.budgets, args.eval_every)
    print("default recipe: fit with an empty cache ...", flush=True)
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="amor-sphere-ttq-") as workdir:
        os.chdir(workdir)  # the recipe's run folder (logs, checkpoints) goes to the temporary directory
        try:
            run = run_recipe(recipe, args.pool_size, workdir)
        finally:
            os.chdir(here)
    print(f"recipe: {run['steps']} steps in {run['total']:.1f} s ({run['references']:.1f} s before its first step)")

    reference_budget = 60.0 if 60.0 in args.budgets else args.budgets[-1]
    threads = os.environ.get("OMP_NUM_THREADS")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(([f"OMP_NUM_THREADS={threads}"] if threads else [])
                       + ["python", "benchmarks/sphere_time_to_quality.py", *given])
    info = {
        "budgets": args.budgets, "every": args.eval_every, "command": command, "pool": run["pool"],
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, CPU only", "references_s": run["references"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": (load_start, os.getloadavg()[0]), "plain_steps": plain_steps, "recipe_steps": run["steps"],
        "verdict": verdict(plain, recipe, reference_budget),
    }
    section = render(plain, recipe, info)
    print()
    print(section)
    if args.output:
        write_section(Path(args.output), SECTION, section)
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
