"""``lightning-amor evaluate``: the speed-up, warm-start saving, gap distribution and wrong-basin share of a trained
amortizer on its recipe's held-out test set (:mod:`lightning_amor.evaluation`), as a table, figures (PNG and
TensorBoard) and a section of a results file."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

SOLVERS = {"adam": "lightning_amor.solvers.Adam", "gd": "lightning_amor.solvers.GradientDescent",
           "lbfgs": "lightning_amor.solvers.LBFGS"}
"""Short names of ``--solver``; ``recipe`` (the default) is the recipe's ``model.init_args.inference.solver``."""

RECIPE_OPTIONS = ("--trainer", "--model", "--data", "--seed_everything", "--preemption")
"""Prefixes of the options that override the recipe (passed on to the recipe's parser with the ``--config`` files)."""


class EvaluateError(ValueError):
    """Bad arguments of ``lightning-amor evaluate``: a missing recipe, an unknown solver, a bad number."""


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (``lightning-amor evaluate --help`` prints it)."""
    parser = argparse.ArgumentParser(
        prog="lightning-amor evaluate",
        description=(
            "Evaluate a trained amortizer on its recipe's held-out test set against a classical solver: the speed-up "
            "at matched quality (iterations and seconds the solver needs from scratch to first reach the "
            "prediction's mean f, and per context its own f), the warm-start saving (iterations and seconds to a "
            "residual tolerance from scratch vs from the prediction), the amortization gap's distribution and the "
            "wrong-basin share. Prints a table, saves figures (PNG and TensorBoard) and writes a section of a "
            "results file. Options that start with --trainer., --model., --data. override the recipe, as in "
            "`lightning-amor fit`."
        ),
    )
    parser.add_argument("--config", action="append", default=[],
                        help="A recipe (YAML); repeat to compose several, later ones overriding earlier ones. Without "
                        "it, the model and data module are those stored in --ckpt.")
    parser.add_argument("--ckpt", default=None,
                        help="A checkpoint written by `lightning-amor fit`; with --config its weights are loaded into "
                        "the recipe's model. Without it, the recipe's freshly initialised model is evaluated.")
    parser.add_argument("--contexts", type=int, default=None,
                        help="Evaluate the first N contexts of the test set (default: all, data.init_args.test_size).")
    parser.add_argument("--solver", default="recipe",
                        help="The classical solver: `recipe` (default: the recipe's model.init_args.inference.solver, "
                        "the one it refines and falls back with, tuned for the problem), `adam`, `gd`, `lbfgs`, or a "
                        "class path such as lightning_amor.apps.vae.SVI.")
    parser.add_argument("--solver-args", default="{}",
                        help='Constructor arguments of a named --solver as JSON, e.g. \'{"lr": 0.05}\'.')
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="The solver's iteration budget (its `steps`; default: the solver's own).")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="The residual tolerance of the warm-start saving (default: the recipe's "
                        "model.init_args.inference.tolerance).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed runs of the prediction and of each solver run; the median is reported.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed predictions before the timed ones.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the solvers' random numbers.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ..., or auto (cuda when available).")
    parser.add_argument("--name", default=None,
                        help="The name of the figures and the results section (default: the recipe's file name, or "
                        "the checkpoint's run folder).")
    parser.add_argument("--out", default="benchmarks/figures",
                        help="Folder of the PNG figures and the JSON numbers (NAME_gap.png, NAME_speedup.png, "
                        "NAME_warm_start.png, NAME_evaluation.json); TensorBoard events go to OUT/tensorboard/NAME.")
    parser.add_argument("--results", default="benchmarks/RESULTS.md",
                        help="The Markdown file whose `## Evaluation: NAME` section is written (replaced when "
                        "present); `none` writes none.")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Run ``lightning-amor evaluate`` with the arguments ``argv`` (those after ``evaluate``); bad input files and
    arguments end with a one-line error and exit status 2."""
    argv = sys.argv[2:] if argv is None else list(argv)
    from lightning_amor.evaluation import EvaluationError
    from lightning_amor.module import BadCheckpointError

    try:
        run(argv)
    except (EvaluateError, EvaluationError, BadCheckpointError) as err:
        print(f"lightning-amor evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def run(argv: list[str]) -> Any:
    """Parse ``argv``, build and evaluate the model, and write the outputs; returns the
    :class:`~lightning_amor.evaluation.EvaluationReport`."""
    from lightning_amor.evaluation import evaluate
    from lightning_amor.evaluation_figures import log_to_tensorboard, render_figures, save_figures
    from lightning_amor.results import cpu_name, write_atomically, write_section

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") and not a.split("=")[0].startswith(RECIPE_OPTIONS)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest and not args.config:
        raise EvaluateError(f"recipe overrides ({' '.join(rest)}) need a recipe: pass --config RECIPE first")
    if not args.config and args.ckpt is None:
        raise EvaluateError("nothing to evaluate: pass --config RECIPE (and --ckpt CHECKPOINT for trained weights), "
                            "or --ckpt alone")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    solver = _solver(args.solver, args.solver_args)
    module, data = _build(args.config, rest, args.ckpt)
    module = module.to(device)
    name = args.name or _default_name(args.config, args.ckpt)
    report = evaluate(module, data, size=args.contexts, solver=solver, max_iterations=args.max_iterations,
                      tolerance=args.tolerance, repeats=args.repeats, warmup=args.warmup, seed=args.seed, name=name)

    where = f"weights of {args.ckpt}" if args.ckpt else "freshly initialised weights (no --ckpt)"
    print(f"lightning-amor evaluate: {report.model}, {where}; {report.contexts + report.nonfinite} held-out test "
          f"contexts of {type(data).__name__}")
    print(report.table())
    out = Path(args.out)
    rendered = render_figures(report)
    paths = save_figures(report, out, name, rendered)
    summary = report.summary()
    write_atomically(out / f"{name}_evaluation.json", json.dumps(summary, indent=2) + "\n")
    tensorboard = log_to_tensorboard(report, out / "tensorboard" / name, rendered)
    print(f"figures: {', '.join(str(p) for p in paths.values())}; numbers: {out / f'{name}_evaluation.json'}")
    print(f"TensorBoard: tensorboard --logdir {tensorboard}")
    if args.results.lower() != "none":
        command = shlex.join(["lightning-amor", "evaluate", *argv])
        machine = f"{cpu_name()}, {os.cpu_count()} cores, {_device_name(device)}; torch {torch.__version__}, " \
                  f"{torch.get_num_threads()} intra-op thread(s)"
        title = f"## Evaluation: {name}"
        write_section(Path(args.results), title, report.section(title, command=command, machine=machine))
        print(f"results: section `{title}` of {args.results}")
    return report


def _build(configs: list[str], overrides: list[str], ckpt: Optional[str]) -> tuple[Any, Any]:
    """The model (with the checkpoint's weights when given) and its data module, from the recipe or the checkpoint."""
    from lightning_amor.loading import check_checkpoint_file, load_datamodule, load_module
    from lightning_amor.module import BadCheckpointError

    if ckpt is not None:
        check_checkpoint_file(ckpt, option="--ckpt")
    if not configs:
        module, data = load_module(ckpt), load_datamodule(ckpt)
        if data is None:
            raise BadCheckpointError(f"the checkpoint {ckpt} records no data module, so there is no held-out test "
                                     "set; pass its recipe with --config")
        return module, data
    for config in configs:
        if not Path(config).is_file():
            where = "is a directory, not a file" if Path(config).is_dir() else "does not exist"
            raise EvaluateError(f"the recipe {config} {where}; `lightning-amor recipes` lists the shipped ones")
    from datamodules.context import ContextDataModule
    from lightning_amor.cli import AmortCLI
    from lightning_amor.module import AmortizedModule

    recipe = [token for config in configs for token in ("--config", config)] + overrides
    with warnings.catch_warnings():  # `args` is this command's own share of the command line, given on purpose
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       auto_configure_optimizers=False, run=False, args=recipe)
    module = cli.model
    if ckpt is not None:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)  # a checkpoint the user trusts
        module.on_load_checkpoint(checkpoint)  # names every parameter that does not fit this recipe's model
        module.load_state_dict(checkpoint["state_dict"])
    return module, cli.datamodule


def _solver(name: str, arguments: str) -> Any:
    """The solver named by ``--solver`` (``None`` for the recipe's), built with the JSON ``arguments``."""
    try:
        kwargs = json.loads(arguments)
    except json.JSONDecodeError as err:
        raise EvaluateError(f"--solver-args is not JSON ({err}); write e.g. '{{\"lr\": 0.05}}'") from err
    if not isinstance(kwargs, dict):
        raise EvaluateError(f"--solver-args must be a JSON object of constructor arguments, got {arguments}")
    if name == "recipe":
        if kwargs:
            raise EvaluateError("--solver-args needs a named --solver (adam, gd, lbfgs or a class path)")
        return None
    from lightning_amor.solvers import Solver

    path = SOLVERS.get(name, name)
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise EvaluateError(f"--solver {name}: not `recipe`, one of {', '.join(SOLVERS)}, or the class path of a "
                            "lightning_amor.solvers.Solver")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise EvaluateError(f"--solver {name} with --solver-args {arguments}: {err}") from err


def _default_name(configs: list[str], ckpt: Optional[str]) -> str:
    if configs:
        return Path(configs[-1]).stem
    path = Path(ckpt).resolve()
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return folder.name or path.stem


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return "CPU only"
