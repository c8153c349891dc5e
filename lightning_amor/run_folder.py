"""The run folder: ``trainer.default_root_dir`` decides where a run's logs and checkpoints go.

A recipe names its folder once, ``trainer.default_root_dir: runs/<application>/<recipe>``, and what it leaves unset
follows from it (values that a recipe or the command line gives are kept):

- a logger's ``save_dir`` (TensorBoard's, CSV's, ...) is the run folder, so the logs land in
  ``<root>/<logger name>/version_N/`` (Lightning itself requires ``save_dir``);
- a ``ModelCheckpoint``'s ``dirpath`` is ``<root>/checkpoints``: one fixed folder for every run of the recipe, so that
  ``--ckpt_path last`` finds the ``last.ckpt`` of an earlier, interrupted run. Lightning's own default, the logger's
  ``version_N/checkpoints``, is a new folder for every run. One live run at a time holds that folder
  (:mod:`~lightning_amor.run_lock`): runs that should coexist need their own ``default_root_dir``.

Without ``default_root_dir`` the run folder is the current directory, as in Lightning. This is what lets the shared
trainer settings (``recipes/_base/trainer.yaml``: the logger and the checkpoints) serve every recipe.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser

CHECKPOINTS = "checkpoints"
"""The folder of the run folder that holds the checkpoints of a ``ModelCheckpoint`` without ``dirpath``."""


def run_root(default_root_dir: Optional[str]) -> str:
    """The run folder: ``trainer.default_root_dir``, or the current directory (Lightning's default) when unset."""
    return str(default_root_dir) if default_root_dir else os.getcwd()


def logger_save_dir(default_root_dir: Optional[str], logger: Any) -> str:
    """The ``save_dir`` of the logger(s) ``logger`` (the parsed ``trainer.logger``): the one given, else the run folder.

    Raises:
        ValueError: a list of loggers whose ``save_dir`` differ (one value serves them all; set the same on each,
            or leave them unset).
    """
    root = run_root(default_root_dir)
    loggers = logger if isinstance(logger, list) else [logger]
    given = {
        _init_args(item).get("save_dir") or root
        for item in loggers
        if isinstance(item, (Namespace, dict)) and "save_dir" in _init_args(item)
    }
    if len(given) > 1:
        raise ValueError(
            f"the loggers' save_dir differ ({sorted(given)}): lightning-amor gives every logger the same folder; "
            "set the same save_dir on each, or leave them unset so that they log under trainer.default_root_dir"
        )
    return given.pop() if given else root


def link_run_folder(parser: LightningArgumentParser) -> None:
    """Make ``trainer.logger``'s ``save_dir`` default to the run folder, in ``parser`` (a subcommand's parser)."""
    parser.link_arguments(
        ("trainer.default_root_dir", "trainer.logger"), "trainer.logger.init_args.save_dir", compute_fn=logger_save_dir
    )


def fill_checkpoint_dirs(trainer_config: Namespace) -> None:
    """Set ``dirpath`` to ``<run folder>/checkpoints`` on every ``ModelCheckpoint`` of the parsed ``trainer`` config
    ``trainer_config`` (its ``callbacks``) that leaves it unset; in place. Call it before the classes are built."""
    callbacks = trainer_config.get("callbacks")
    if callbacks is None:
        return
    folder = os.path.join(run_root(trainer_config.get("default_root_dir")), CHECKPOINTS)
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(callback, Namespace) or "class_path" not in callback:
            continue
        init_args = callback.get("init_args")
        if init_args is None:
            init_args = callback["init_args"] = Namespace()
        if init_args.get("dirpath") is None and _is_model_checkpoint(callback.class_path):
            init_args["dirpath"] = folder


def checkpoint_dirs(trainer_config: Namespace) -> list[str]:
    """The local folders (``dirpath``) of the ``ModelCheckpoint`` callbacks of the parsed ``trainer`` config
    ``trainer_config``, each once, in order (remote ones, ``s3://...``, are left out). Call it after
    :func:`fill_checkpoint_dirs`."""
    callbacks = trainer_config.get("callbacks") or []
    folders: list[str] = []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(callback, Namespace) or "class_path" not in callback:
            continue
        dirpath = _init_args(callback).get("dirpath")
        if dirpath is None or "://" in str(dirpath) or not _is_model_checkpoint(callback.class_path):
            continue
        folder = os.path.abspath(str(dirpath))
        if folder not in folders:
            folders.append(folder)
    return folders


def _init_args(item: Any) -> Any:
    """The ``init_args`` of a parsed ``class_path``/``init_args`` item (a Namespace or a dict)."""
    args = item.get("init_args")
    return args if args is not None else {}


def _is_model_checkpoint(class_path: str) -> bool:
    """Whether ``class_path`` (already checked by the parser, so importable) names a ``ModelCheckpoint`` (subclass)."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)
