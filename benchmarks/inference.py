"""Inference benchmark: eager PyTorch vs TorchScript vs ONNX Runtime vs the classical solver, in one process.

For each checkpoint, the model is exported with :mod:`lightning_amor.export` (a dynamic batch; a fixed batch per
batch size where the prediction draws seeded noise whose shape depends on it), every exported file is checked
against the eager model on the checkpoint's held-out test contexts (max |exported − eager| ≤ 1e-5), and the median
wall time of one prediction per batch (batch 1 and 1024 by default) is measured for

* eager: ``module(x)`` in eval mode under ``torch.no_grad`` (inner gradient steps included),
* TorchScript: the exported ``.pt`` (``torch.jit.load``) under ``torch.no_grad``,
* ONNX Runtime: the exported ``.onnx`` (``onnxruntime.InferenceSession``, CPU, as many intra-op threads as torch),
* the classical solver from scratch: the objective's oracle (``objective.solve``) or, without one, the model's
  ``refine`` solver from the objective's default initial point (SVI for the VAEs),

timed in interleaved rounds (so that the shared machine's load affects all alike). Ratios are time / eager time
(below 1: faster than eager). The table is printed and written as a section of ``benchmarks/RESULTS.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference.py                    # the recipes' checkpoints in runs/
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference.py --ckpt runs/sphere/full_objective/checkpoints/last.ckpt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference.py --quick             # smoke run, RESULTS.md untouched

Without ``--ckpt`` and without any recipe checkpoint under ``runs/``, a short run of the default sphere recipe is
trained first (a few hundred steps; its quality is not the point, its inference time is).
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
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `datamodules` lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.results import cpu_name, write_section  # noqa: E402
from lightning_amor.commands.recipes import recipe_configs  # noqa: E402
from lightning_amor.export import (  # noqa: E402
    SUFFIXES,
    ExportedAmortizer,
    ExportError,
    check_export,
    export,
)
from lightning_amor.loading import load_datamodule, load_module  # noqa: E402
from lightning_amor.module import AmortizedModule  # noqa: E402

SECTION = "## Inference: eager vs TorchScript vs ONNX Runtime"
RECIPES = (
    "sphere/full_objective",
    "sphere/semi_sum_regression",
    "sphere/semi_learned",
    "vae/vae_digits",
    "vae/savae_digits",
)
"""Recipes (under runs/) whose checkpoints are benchmarked by default, where present."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="+", default=None, metavar="PATH",
                        help="checkpoints of `lightning-amor fit` (default: the recipes' last.ckpt found under runs/, "
                             "or a short training run of the default sphere recipe when there is none)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 1024], help="batch sizes timed")
    parser.add_argument("--repeats", type=int, default=60, help="timed calls of each exported or eager model")
    parser.add_argument("--solver-repeats", type=int, default=3, help="timed solver runs (= interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--atol", type=float, default=1e-5, help="tolerance of the export check")
    parser.add_argument("--output", default=None,
                        help="markdown file whose section is (re)written (default: benchmarks/RESULTS.md; none "
                             "with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats, RESULTS.md untouched")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.solver_repeats, args.warmup = min(args.repeats, 5), 1, min(args.warmup, 2)
    elif args.output is None:
        args.output = str(ROOT / "benchmarks" / "RESULTS.md")
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.solver_repeats < 1 or args.warmup < 0:
        parser.error("--batch-sizes, --repeats and --solver-repeats must be at least 1, --warmup at least 0")
    return args


def quiet() -> None:
    """Keep the output to this script's lines: Lightning's info messages and known warnings off."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def recipe_checkpoint(run: Path) -> Optional[Path]:
    """A recipe run's ``checkpoints/last.ckpt``, else the newest ``last.ckpt`` under it (logger-versioned folders)."""
    if (run / "checkpoints" / "last.ckpt").is_file():
        return run / "checkpoints" / "last.ckpt"
    found = sorted(run.glob("**/last.ckpt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def default_checkpoints(work: Path) -> list[Path]:
    """The recipes' checkpoints under runs/, or a freshly trained short run of the default sphere recipe."""
    found = [ckpt for recipe in RECIPES if (ckpt := recipe_checkpoint(ROOT / "runs" / recipe)) is not None]
    if found:
        return found
    from lightning_amor.cli import main as cli_main

    print("no recipe checkpoint under runs/: training a short run of recipes/sphere/semi_sum_regression.yaml")
    here = Path.cwd()
    os.chdir(work)  # the recipe writes runs/sphere/semi_sum_regression/... relative to the working directory
    try:
        cli_main([
            "fit", *(arg for config in recipe_configs(ROOT / "recipes" / "sphere" / "semi_sum_regression.yaml")
                     for arg in ("--config", str(config))),
            "--trainer.max_steps=300", "--trainer.val_check_interval=300", "--trainer.logger=false",
            "--model.init_args.lr_scheduler.init_args.T_max=300", "--data.init_args.train_size=2048",
            "--data.init_args.batch_size=256", "--data.init_args.val_size=256",
            f"--data.init_args.cache_dir={work / 'cache'}",
        ])
    finally:
        os.chdir(here)
    return [work / "runs" / "sphere" / "semi_sum_regression" / "checkpoints" / "last.ckpt"]


def export_all(module: AmortizedModule, x: torch.Tensor, folder: Path, batch_sizes: list[int]
               ) -> tuple[dict[int, dict[str, ExportedAmortizer]], dict[int, dict[str, float]], str]:
    """Exported models and their max errors against eager on ``x[:B]``, per batch size B and format, and the kind of
    batch axis. Errors are compared with ``--atol`` in the table, not raised, so that a failing check is reported
    (and its file timed) too."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded: dict[int, dict[str, ExportedAmortizer]] = {b: {} for b in batch_sizes}
    errors: dict[int, dict[str, float]] = {b: {} for b in batch_sizes}
    try:
        for fmt in ("torchscript", "onnx"):
            path = export(module, folder / f"dynamic{SUFFIXES[fmt]}", x[:8], fmt)
            for b in batch_sizes:
                errors[b][fmt] = check_export(path, module, x, math.inf, batch_sizes=[b])
                loaded[b][fmt] = ExportedAmortizer(path)
        return loaded, errors, "dynamic"
    except ExportError as err:
        if "fixed batch size" not in str(err):
            raise
    for b in batch_sizes:  # seeded noise that depends on the batch size: one fixed-batch export per batch size
        for fmt in ("torchscript", "onnx"):
            path = export(module, folder / f"batch{b}{SUFFIXES[fmt]}", x[:b], fmt, dynamic_batch=False)
            errors[b][fmt] = check_export(path, module, x[:b], math.inf)
            loaded[b][fmt] = ExportedAmortizer(path)
    return loaded, errors, "fixed"


def solver_call(module: AmortizedModule) -> tuple[Optional[Callable[[torch.Tensor], object]], str]:
    """The classical solver from scratch for a batch, and its description."""
    objective = module.objective
    if objective.has_oracle:
        return objective.solve, f"{type(objective).__name__}.solve (oracle)"
    if module.refine is not None:
        refine = module.refine
        steps = getattr(getattr(refine, "adam", refine), "steps", None)
        name = f"{type(refine).__name__}{f' {steps} steps' if steps else ''} from the default initial point"
        return (lambda x: refine.solve(objective, x)), name
    return None, "none"


def time_batch(calls: dict[str, Callable[[], object]], repeats: int, solver_repeats: int, warmup: int,
               progress: tqdm) -> dict[str, float]:
    """Median wall time (ms) of each call, in ``solver_repeats`` interleaved rounds (the solver once per round)."""
    for key, fn in calls.items():
        for _ in range(warmup if key != "solver" else 1):
            fn()
    samples: dict[str, list[float]] = {key: [] for key in calls}
    per_round = max(1, repeats // solver_repeats)
    for _ in range(solver_repeats):
        for key, fn in calls.items():
            for _ in range(1 if key == "solver" else per_round):
                start = time.perf_counter()
                fn()
                samples[key].append(1000.0 * (time.perf_counter() - start))
        progress.update(1)
    return {key: statistics.median(values) for key, values in samples.items()}


def describe(module: AmortizedModule) -> str:
    amortizer = module.amortizer
    name = type(amortizer).__name__
    steps = getattr(amortizer, "steps", None)
    if steps is not None:
        name += f" ({steps} × {type(amortizer.update).__name__})"
    return f"{name} on {type(module.objective).__name__}"


def benchmark(ckpt: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    """Export, check and time one checkpoint: one row per batch size."""
    module = load_module(ckpt)
    data = load_datamodule(ckpt)
    if data is None:
        raise SystemExit(f"{ckpt} records no data module: no held-out contexts to benchmark on")
    x = data.fixed_set("test", max(data.test_size, *args.batch_sizes), with_targets=False)["x"]
    x = x[: max(args.batch_sizes)]
    loaded, errors, axis = export_all(module, x, work / f"export{len(list(work.glob('export*')))}", args.batch_sizes)
    solve, solver_name = solver_call(module)
    rows = []
    progress = tqdm(total=args.solver_repeats * len(args.batch_sizes), desc=f"timing {describe(module)}",
                    leave=False)
    for b in args.batch_sizes:
        xb = x[:b].contiguous()
        files = loaded[b]

        def eager(xb: torch.Tensor = xb) -> object:
            with torch.no_grad():
                return module(xb)

        calls = {
            "eager": eager,
            "torchscript": lambda f=files["torchscript"], xb=xb: f.predict(xb),
            "onnx": lambda f=files["onnx"], xb=xb: f.predict(xb),
        }
        if solve is not None:
            calls["solver"] = lambda xb=xb: solve(xb)
        times = time_batch(calls, args.repeats, args.solver_repeats, args.warmup, progress)
        rows.append({"ckpt": ckpt, "model": describe(module), "batch": b, "times": times, "errors": errors[b],
                     "axis": axis, "solver": solver_name})
    progress.close()
    return rows


def render(rows: list[dict], meta: dict) -> str:
    def flag(error: float) -> str:
        return f"{error:.1g}" if error <= meta["atol"] else f"**{error:.2g} > {meta['atol']:g}**"

    def ms(value: float) -> str:
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"

    def cell(times: dict[str, float], key: str) -> str:
        if key not in times:
            return "—"
        ratio = times[key] / times["eager"]
        return f"{ms(times[key])} ({ratio:,.0f}×)" if ratio >= 10 else f"{ms(times[key])} ({ratio:.2g}×)"

    lines = [
        SECTION,
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {torch.__version__}, onnxruntime {meta['ort']}, {meta['threads']} "
        "intra-op thread(s) for torch and ONNX Runtime  ",
        f"Date: {meta['date']}; total run time {meta['total_s'] / 60:.1f} min; 1-min load average "
        f"{meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} at the end (other jobs share the machine)",
        "",
        "Median wall time of one prediction (ms per batch) for the first B of the checkpoint's held-out test contexts, "
        f"{meta['warmup']} warm-up calls, median of {meta['repeats']} (the solver: of {meta['solver_repeats']}), timed "
        "in interleaved rounds; in parentheses time / eager time (below 1×: faster than eager). Eager = "
        "`module(x)` in eval mode under `torch.no_grad`; TorchScript and ONNX = the files `lightning-amor export` "
        "writes (`lightning_amor.export`), each run against eager on the same B held-out contexts (the max "
        f"abs difference shown, in bold where above the check's tolerance {meta['atol']:g}); solver = the classical "
        "solver from scratch (the sphere's oracle: Fibonacci grid + multi-start "
        "L-BFGS; the VAEs: SVI from λ = 0). Batch axis: dynamic (one file for every B) or fixed (one file per B, "
        "for a prediction whose seeded noise depends on B).",
        "",
        "| checkpoint | model | batch axis | B | eager | TorchScript | ONNX Runtime | solver | max err TS / ONNX |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        t, e = r["times"], r["errors"]
        name = r["ckpt"].relative_to(ROOT) if r["ckpt"].is_relative_to(ROOT) else r["ckpt"]
        lines.append(
            f"| `{name}` | {r['model']} | {r['axis']} | {r['batch']} | {ms(t['eager'])} | {cell(t, 'torchscript')} | "
            f"{cell(t, 'onnx')} | {cell(t, 'solver')} | {flag(e['torchscript'])} / {flag(e['onnx'])} |"
        )
    solvers = sorted({f"{r['model'].split(' on ')[-1]}: {r['solver']}" for r in rows})
    lines += ["", "Solvers: " + "; ".join(solvers) + "."]
    return "\n".join(lines) + "\n"


def shown_arguments(argv: Optional[list[str]]) -> list[str]:
    """The command-line arguments that shape the measurements (``--output``, which only says where to write, left
    out)."""
    given = list(sys.argv[1:] if argv is None else argv)
    if "--output" in given:
        index = given.index("--output")
        del given[index : index + 2]
    return [arg for arg in given if not arg.startswith("--output=")]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="amor-inference-bench-") as tmp:
        work = Path(tmp)
        checkpoints = [Path(p).resolve() for p in args.ckpt] if args.ckpt else default_checkpoints(work)
        rows = []
        for ckpt in tqdm(checkpoints, desc="checkpoints"):
            rows += benchmark(ckpt, args, work)
    import onnxruntime

    meta = {
        "command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/inference.py", *shown_arguments(argv)]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, CPU only",
        "ort": onnxruntime.__version__,
        "threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "total_s": time.perf_counter() - start,
        "load": (load_start, os.getloadavg()[0]),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "solver_repeats": args.solver_repeats,
        "atol": args.atol,
    }
    section = render(rows, meta)
    print(section)
    if args.output:
        write_section(Path(args.output), SECTION, section)
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
