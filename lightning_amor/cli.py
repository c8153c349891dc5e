"""The ``lightning-amor`` command: LightningCLI over AmortizedModule and ContextDataModule."""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from datamodules.context import ContextDataModule, NonFiniteDataError
from lightning_amor import __version__
from lightning_amor.checkpoint_io import (
    CheckpointFolderError,
    CheckpointSaveError,
    check_checkpoint_folders,
    use_verified_checkpoint_io,
)
from lightning_amor.config_errors import (
    CONFIG_OPTIONS,
    ConfigError,
    check_config_files,
    config_files,
    explain_instantiation_error,
    explain_parse_error,
)
from lightning_amor.exit_codes import BAD_INPUT, NONFINITE, SAVE_FAILED, one_line_errors
from lightning_amor.loading import LAST_OR_FRESH, check_checkpoint_file
from lightning_amor.module import AmortizedModule, BadCheckpointError, NonFiniteLossError
from lightning_amor.preemption import Preempted, PreemptionCheckpoint
from lightning_amor.recipe_files import display_config, expand_recipe_names
from lightning_amor.resume import RESUME_ANY_CONFIG, check_resume_config, read_checkpoint, resume_note
from lightning_amor.run_folder import checkpoint_dirs, fill_checkpoint_dirs, link_run_folder
from lightning_amor.run_lock import RunLock, is_first_process

PROGRESS_REFRESH = 20
"""Steps between two redraws of the default progress bar."""

EXIT_NONFINITE_METRICS = NONFINITE
"""The exit status of a ``fit`` whose held-out objective (``val/objective``) is NaN or infinite."""

NOTHING_TO_TRAIN = {"max_steps": 0, "max_epochs": 0, "limit_train_batches": 0}
"""Trainer settings with which ``fit`` would train nothing (refused before anything is built)."""

class AmortCLI(LightningCLI):
    """LightningCLI with subclass mode for models and data; prints the held-out metrics after ``fit``.

    Every run gets a :class:`~lightning_amor.preemption.PreemptionCheckpoint` (configured under ``preemption:``),
    and a ``--ckpt_path`` file is checked before anything is built. The recipe is the source of truth for the
    model: unlike plain LightningCLI, which rebuilds the model from the hyperparameters stored in a ``--ckpt_path``
    file, a checkpoint of another model is an error listing the parameters that differ, and resuming with changed
    settings (``--model.init_args.nonfinite skip``, say) keeps them.

    ``fit`` holds its checkpoint folders while it runs (:mod:`~lightning_amor.run_lock`), and ``--ckpt_path last``
    names the file it resumes and refuses one written with another configuration (:mod:`~lightning_amor.resume`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_locks: list[RunLock] = []
        try:
            super().__init__(*args, **kwargs)
        finally:
            for lock in self.run_locks:  # however the run ended: done, an error, preempted
                lock.release()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with a progress bar that redraws every ``PROGRESS_REFRESH`` steps unless the recipe brings
        its own (Lightning's default redraws every step, about 5% of a small model's step on a CPU)."""
        config = self._get(self.config_init, "trainer", default={})
        given = config.get("callbacks") or []
        callbacks = [given] if isinstance(given, Callback) else list(given)
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            kwargs.setdefault("callbacks", [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_REFRESH)])
        trainer = super().instantiate_trainer(**kwargs)
        use_verified_checkpoint_io(trainer)  # a save that does not reach the disk is an error, not silence
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_argument(RESUME_ANY_CONFIG, type=bool, default=False,
                            help="With --ckpt_path last: resume also from a checkpoint written with other model or "
                            "data settings (they are listed); without it, such a checkpoint is refused.")
        link_run_folder(parser)

    def before_instantiate_classes(self) -> None:
        """A ModelCheckpoint without ``dirpath`` saves to ``<default_root_dir>/checkpoints`` (see
        :mod:`~lightning_amor.run_folder`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            _refuse_training_nothing(config.trainer)
        fill_checkpoint_dirs(config.trainer)
        if self.subcommand == "fit":
            for folder in checkpoint_dirs(config.trainer):  # before anything is built: a busy folder is refused
                self.run_locks.append(RunLock(folder))
                self.run_locks[-1].acquire()

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """LightningCLI's parser, with the :data:`EXTRA_SUBCOMMANDS` listed in the top-level ``--help`` and usage
        (:func:`main` runs them before this parser is built, so they only appear here)."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        subcommands = getattr(self.parser, "_subcommands_action", None)
        if not add_subcommands or subcommands is None:
            return
        # Lightning's one-liners for its subcommands stop mid-sentence; say what each does here.
        for listed in getattr(subcommands, "_choices_actions", []):
            listed.help = TRAINER_SUBCOMMANDS.get(listed.dest, listed.help)
        for name, (_, summary) in EXTRA_SUBCOMMANDS.items():
            subcommands.add_subcommand(
                name, self.parser_class(prog=f"lightning-amor {name}", description=summary), help=summary
            )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """A parser that raises its errors (:meth:`parse_arguments` words them) instead of printing its usage."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, after checking the config files; every parse error is a
        :class:`~lightning_amor.config_errors.ConfigError` (one line for files and class paths)."""
        argv = [str(word) for word in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        check_config_files(argv)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            known = argv and argv[0] in TRAINER_SUBCOMMANDS
            raise explain_parse_error(str(err), argv, f"lightning-amor {argv[0]}" if known else "lightning-amor") \
                from err
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"), option="--ckpt_path")

    def instantiate_classes(self) -> None:
        """Build the classes; a value a constructor refuses (its ``ValueError``) is one line keeping its message."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            config = self.config[self.subcommand] if self.subcommand else self.config
            sections = {name: (config.get(name) or {}).get("class_path") for name in ("model", "data")}
            explained = explain_instantiation_error(err, sections)
            if explained is None:
                raise
            raise explained from err

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe's model (LightningCLI would rebuild it from the checkpoint's hyperparameters)."""

    def _check_last_checkpoint(self) -> None:
        """With ``--ckpt_path last``, check the file it stands for: the newest ``last*.ckpt`` in the folders of
        the trainer's ModelCheckpoints (as Lightning resolves it; folders that depend on the logger are skipped).
        Without one, ``last`` is an error naming the folders, and ``last_or_fresh`` starts from scratch."""
        asked = self.config[self.subcommand].get("ckpt_path")
        if asked not in ("last", LAST_OR_FRESH):
            return
        found = [
            path
            for callback in self.trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir()
            for path in Path(callback.dirpath).iterdir()
            if path.suffix == callback.FILE_EXTENSION and path.stem.startswith(callback.CHECKPOINT_NAME_LAST)
        ]
        if found:
            newest = max(found, key=lambda path: path.stat().st_mtime)
            check_checkpoint_file(newest)
            if self.subcommand == "fit":
                self._check_resume(newest)
        elif asked == "last":
            folders = [str(cb.dirpath) for cb in self.trainer.checkpoint_callbacks
                       if isinstance(cb, ModelCheckpoint) and cb.dirpath]
            where = " or ".join(folders) if folders else "any folder (the trainer has no ModelCheckpoint)"
            raise BadCheckpointError(
                f"--ckpt_path last: there is no last checkpoint in {where} to resume from; start without --ckpt_path, "
                f"or with --ckpt_path {LAST_OR_FRESH} to resume when there is one and start fresh otherwise"
            )
        if asked == LAST_OR_FRESH:
            self.config_init[self.subcommand]["ckpt_path"] = "last" if found else None

    def _check_resume(self, path: Path) -> None:
        """Say which checkpoint ``fit --ckpt_path last`` resumes; refuse one written with another configuration
        unless ``--resume_any_config true`` (:mod:`~lightning_amor.resume`)."""
        checkpoint = read_checkpoint(path)
        any_config = bool(self.config[self.subcommand].get("resume_any_config"))
        differences = check_resume_config(path, checkpoint, self.model.hparams,
                                          getattr(self.datamodule, "hparams", None), any_config)
        if is_first_process():
            if differences:
                print(f"lightning-amor: note: resuming with another configuration ({RESUME_ANY_CONFIG} true): "
                      + "; ".join(differences), file=sys.stderr)
            print(resume_note(path, checkpoint), file=sys.stderr, flush=True)

    def before_fit(self) -> None:
        self._check_last_checkpoint()
        check_checkpoint_folders(self.trainer)  # before training, not at the first save

    def before_validate(self) -> None:
        self._check_last_checkpoint()

    def before_test(self) -> None:
        self._check_last_checkpoint()

    def before_predict(self) -> None:
        self._check_last_checkpoint()

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print("\nheld-out validation metrics (fixed, seeded contexts never used in training):")
        if not metrics:
            print("  none: no validation ran in this fit (see trainer.val_check_interval)")
        for name, value in sorted(metrics.items()):
            # A NaN is no result: mark it so that it cannot be read as one.
            flag = "" if math.isfinite(value) else "   <- NOT FINITE: the model or the data went wrong"
            print(f"  {name:<20} {value:.6g}{flag}")
        if trainer.logger is not None and trainer.logger.log_dir is not None:
            log_dir, root = trainer.logger.log_dir, trainer.logger.save_dir
            print(f"TensorBoard logs: {log_dir}  (watch with: tensorboard --logdir {root})")
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) if trainer.checkpoint_callback else None
        if dirpath and Path(dirpath).is_dir():
            print(f"checkpoints: {dirpath}")
        elif dirpath:
            print(f"checkpoints: none written (no save was due; {dirpath} does not exist)")
        objective = metrics.get("val/objective")
        if objective is not None and not math.isfinite(objective):
            shown = "NaN" if math.isnan(objective) else f"{objective:+}"
            print(f"lightning-amor: error: the held-out objective is {shown} after training, so this run learned "
                  f"nothing usable; look for NaN or inf in the objective and the data, or lower the learning rate "
                  f"(exit status {EXIT_NONFINITE_METRICS})", file=sys.stderr)
            raise SystemExit(EXIT_NONFINITE_METRICS)


def _refuse_training_nothing(trainer: Any) -> None:
    """Stop with one line (exit status 2) when the trainer settings train nothing (:data:`NOTHING_TO_TRAIN`)."""
    for name, nothing in NOTHING_TO_TRAIN.items():
        value = trainer.get(name)
        if value is not None and not isinstance(value, bool) and value == nothing:
            print(f"lightning-amor: error: trainer.{name}={value} trains nothing (no step, no checkpoint); give it a "
                  f"positive value, or leave it unset", file=sys.stderr)
            raise SystemExit(2)


def _close_process_group() -> None:
    """Destroy the default process group (DDP) before the interpreter exits: Lightning leaves it open, and gloo's
    worker threads can then abort the process at exit (SIGABRT after a finished run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


DESCRIPTION = (
    "lightning-amor: train amortized optimization models (y*(x) = argmin_y f(y; x)) with PyTorch Lightning. "
    "Train with `lightning-amor fit --config RECIPE` (a file, or a shipped recipe by name, e.g. "
    "sphere/semi_sum_regression); `lightning-amor recipes` lists the shipped recipes; `lightning-amor --version` "
    "prints the version."
)
"""The top-level ``--help`` text."""

TRAINER_SUBCOMMANDS = {
    "fit": "Train a model from a recipe: checkpoints, TensorBoard logs, held-out metrics at the end.",
    "validate": "Evaluate a model (e.g. --ckpt_path FILE) on the fixed, seeded validation set.",
    "test": "Evaluate a model (e.g. --ckpt_path FILE) on the fixed, seeded test set.",
    "predict": "Predict solutions for the test set's contexts.",
}
"""One-line summaries of LightningCLI's subcommands for the top-level ``--help``."""

# Subcommands that are not Trainer methods: name -> (module with ``main(argv)``, one-line summary).
EXTRA_SUBCOMMANDS = {
    "recipes": ("lightning_amor.commands.recipes", "List the shipped recipes and applications."),
    "solve": ("lightning_amor.commands.solve", "Amortize-then-refine contexts from a file, with certificates."),
    "export": ("lightning_amor.commands.export", "Export a trained amortizer to TorchScript and ONNX."),
    "evaluate": ("lightning_amor.commands.evaluate", "Speed-up, warm-start saving and gap of a model vs a solver."),
}


RECIPE_SUBCOMMANDS = (*TRAINER_SUBCOMMANDS, "evaluate")
"""The subcommands whose ``--config`` may name a shipped recipe (:mod:`~lightning_amor.recipe_files`)."""


ONE_LINE_ERRORS: dict[type[BaseException], int] = {
    ConfigError: BAD_INPUT,
    BadCheckpointError: BAD_INPUT,
    CheckpointFolderError: BAD_INPUT,
    CheckpointSaveError: SAVE_FAILED,
    NonFiniteDataError: BAD_INPUT,
    NonFiniteLossError: NONFINITE,
}
"""Errors answered with ``lightning-amor SUBCOMMAND: error: MESSAGE`` and an exit status, not a traceback (unless
``LIGHTNING_AMOR_DEBUG=1``; see :mod:`~lightning_amor.exit_codes`)."""


def missing_bases(argv: list[str]) -> list[tuple[Path, Path]]:
    """``(recipe, base)`` for every ``--config`` recipe of ``argv`` whose comment composes it with a shared base
    (``recipes/_base/trainer.yaml``) that ``argv`` does not give before it: run alone, such a recipe would silently
    lose the base's logger and checkpoints."""
    from lightning_amor.commands.recipes import recipe_configs

    configs = [path for option, path in config_files(argv) if option in CONFIG_OPTIONS]
    missing = []
    for position, config in enumerate(configs):
        if not config.is_file():
            continue  # jsonargparse reports it
        try:
            wanted = recipe_configs(config)
        except (OSError, ValueError):
            continue  # its comment names no usable command: nothing to check
        order = [c.resolve() for c in wanted]
        if config.resolve() not in order:
            continue  # a shared base: its comment shows a command for some recipe
        given = {c.resolve() for c in configs[:position]}
        missing += [(config, base) for base in wanted[: order.index(config.resolve())] if base.resolve() not in given]
    return missing


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-amor`` console script: LightningCLI's fit / validate / test / predict, and
    the subcommands in :data:`EXTRA_SUBCOMMANDS`."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["--version"]:
        print(f"lightning-amor {__version__}")
        return
    if argv and argv[0] in RECIPE_SUBCOMMANDS:
        with one_line_errors(f"lightning-amor {argv[0]}", {ConfigError: BAD_INPUT}):
            expanded, notes = expand_recipe_names(argv)
        if is_first_process():
            for note in notes:
                print(note, file=sys.stderr)
        if expanded != argv:
            argv = expanded
            if args is None:
                sys.argv[1:] = argv  # what LightningCLI parses, and what DDP reruns in the other processes
            else:
                args = argv
    if os.getcwd() not in sys.path and "" not in sys.path:
        # As `python -m` does: recipes may name classes of the user's own modules in the current folder. Appended,
        # so that a local file never shadows an installed package.
        sys.path.append(os.getcwd())
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        importlib.import_module(EXTRA_SUBCOMMANDS[argv[0]][0]).main(argv[1:])
        return
    # Lightning's pytree helper uses torch's deprecated LeafSpec; a warning no user of lightning-amor can act on.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    known = [*TRAINER_SUBCOMMANDS, *EXTRA_SUBCOMMANDS]
    if not argv or (not argv[0].startswith("-") and argv[0] not in known):
        what = "no subcommand was given" if not argv else f"unknown subcommand {argv[0]!r}"
        print(f"lightning-amor: error: {what}; choose one of {{{','.join(known)}}} "
              "(`lightning-amor --help` says what each does)", file=sys.stderr)
        raise SystemExit(2)
    missing = missing_bases(argv)
    if missing:
        recipe, base = missing[0]
        subcommand = argv[0] if argv and not argv[0].startswith("-") else "fit"
        print(f"lightning-amor: error: the recipe {recipe} is composed with the shared settings {base} (the logger "
              f"and the checkpoints), which were not given before it; run\n  lightning-amor {subcommand} "
              f"--config {display_config(base)} --config {recipe} ...", file=sys.stderr)
        raise SystemExit(2)
    program = f"lightning-amor {argv[0]}" if argv and not argv[0].startswith("-") else "lightning-amor"
    try:
        with one_line_errors(program, ONE_LINE_ERRORS):
            AmortCLI(
                AmortizedModule,
                ContextDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                auto_configure_optimizers=False,
                parser_kwargs={"description": DESCRIPTION},
                # A rerun into the same folder (e.g. without a versioned logger) must not abort: the recipe is also
                # stored in every checkpoint.
                save_config_kwargs={"overwrite": True},
            )
    except Preempted:
        _close_process_group()  # the ranks stopped together, after saving one checkpoint
        raise
    _close_process_group()  # not after other errors: ranks may still be waiting in a collective


if __name__ == "__main__":
    main()
