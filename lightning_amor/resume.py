"""Resuming with ``--ckpt_path last``: which file, and whether it was written by this configuration.

``lightning-amor fit --ckpt_path last`` continues from the newest ``last*.ckpt`` of the checkpoint folders. Before
training it prints which file that is, with its step and the time it was written, and it compares the recipe stored
in the checkpoint (the model's and the data module's settings, which LightningCLI saves as
``hyper_parameters`` and ``datamodule_hyper_parameters``) with the current one. A checkpoint written with other
settings (another learning rate, another network) is refused, listing every setting that differs: resuming it
would continue another run. ``--resume_any_config true`` resumes anyway (the differences are still listed).

The trainer's settings (``max_steps``, devices, logging) are not compared: a longer run, or one on other hardware,
is a normal resume. Nor are the settings in :data:`MAY_CHANGE_ON_RESUME`, which change no training step.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any, Union

import torch

from lightning_amor.module import BadCheckpointError

RESUME_ANY_CONFIG = "--resume_any_config"
"""The option of ``lightning-amor fit`` that resumes from a checkpoint written with another configuration."""

MAY_CHANGE_ON_RESUME = {
    "model": ("nonfinite", "max_skipped_share", "skip_window", "inference"),
    "data": ("cache_dir", "num_workers", "progress_bar", "eval_batch_size", "root", "download"),
}
"""Settings (by their first key under ``init_args``) that a resume may change: what to do about non-finite steps,
how ``solve`` answers, and where and how fast the data is read. Every other model and data setting must match."""

_PARTS = {"model": "hyper_parameters", "data": "datamodule_hyper_parameters"}


class ResumeConfigError(BadCheckpointError):
    """``--ckpt_path last`` found a checkpoint written with another configuration (exit status 2)."""


def flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of the nested mapping ``settings`` by dotted key (``optimizer.init_args.lr``); keys starting with
    ``_`` other than ``_class_path`` (LightningCLI's bookkeeping) are left out, and lists are leaves."""
    if not isinstance(settings, Mapping):
        return {prefix: settings} if prefix else {}
    leaves: dict[str, Any] = {}
    for key, value in settings.items():
        if str(key).startswith("_") and key != "_class_path":
            continue
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            leaves.update(flatten(value, name))
        else:
            leaves[name] = list(value) if isinstance(value, tuple) else value
    return leaves


def config_differences(checkpoint: Mapping[str, Any], model_settings: Any, data_settings: Any) -> list[str]:
    """Every model or data setting whose value in ``checkpoint`` (a loaded Lightning checkpoint) differs from the
    current run's (``model_settings``, ``data_settings``: the modules' ``hparams``), as
    ``"model optimizer.init_args.lr: 0.001 in the checkpoint, 0.003 now"``; empty when they match or when the
    checkpoint stores no settings."""
    differences = []
    for part, current in (("model", model_settings), ("data", data_settings)):
        stored = checkpoint.get(_PARTS[part])
        if not stored or current is None:
            continue
        before, now = flatten(stored), flatten(current)
        for key in sorted(set(before) | set(now)):
            if key.split(".")[0] in MAY_CHANGE_ON_RESUME[part] or before.get(key) == now.get(key):
                continue
            was = repr(before[key]) if key in before else "unset"
            is_ = repr(now[key]) if key in now else "unset"
            differences.append(f"{part} {key}: {was} in the checkpoint, {is_} now")
    return differences


def read_checkpoint(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The checkpoint ``path`` (already checked by :func:`~lightning_amor.loading.check_checkpoint_file`), with its
    tensors memory-mapped, not read."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def resume_note(path: Union[str, os.PathLike], checkpoint: Mapping[str, Any]) -> str:
    """``resuming from PATH (step N, written TIME)``: what ``fit --ckpt_path last`` continues."""
    written = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(sep=" ", timespec="seconds")
    return f"resuming from {path} (step {checkpoint.get('global_step', '?')}, written {written})"


def check_resume_config(path: Union[str, os.PathLike], checkpoint: Mapping[str, Any], model_settings: Any,
                        data_settings: Any, any_config: bool) -> list[str]:
    """The differences (:func:`config_differences`) between the checkpoint ``path`` and the current run, which
    ``any_config`` accepts.

    Raises:
        ResumeConfigError: there are differences and not ``any_config``; one line naming the file, every
            difference and the two ways out.
    """
    differences = config_differences(checkpoint, model_settings, data_settings)
    if differences and not any_config:
        raise ResumeConfigError(
            f"--ckpt_path last: the checkpoint {path} does not fit this run: it was written with another "
            "configuration ("
            + "; ".join(differences)
            + f"), so resuming would continue another run; run with the settings it was written with, give this run "
            f"its own --trainer.default_root_dir, or pass {RESUME_ANY_CONFIG} true to resume it anyway"
        )
    return differences
