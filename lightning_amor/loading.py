"""Loading a trained model (and the data module it was trained with) from a Lightning checkpoint."""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lightning_amor.checkpoint_io import verify_checkpoint_archive
from lightning_amor.module import AmortizedModule, BadCheckpointError

LAST_OR_FRESH = "last_or_fresh"
"""The ``--ckpt_path`` of ``lightning-amor fit`` that resumes from ``last`` when there is one, and starts fresh
otherwise (plain ``last`` with nothing to resume is an error)."""

FIT_OPTION = "--ckpt_path"
"""The checkpoint option of ``fit``, ``validate``, ``test`` and ``predict``: the only one that also takes the names
Lightning resolves itself (``last``, ``best``, ``hpc``, ``registry``) and ``last_or_fresh``."""

# ckpt_path values that Lightning resolves itself ("last" looks in the ModelCheckpoint directories), and ours
_RESOLVED_BY_LIGHTNING = ("last", "best", "hpc", "registry", LAST_OR_FRESH)

EXAMPLE_CHECKPOINT = "runs/<app>/<recipe>/checkpoints/last.ckpt"
"""Where ``lightning-amor fit`` with a shipped recipe writes its last checkpoint (the example in messages)."""


def check_checkpoint_file(path: Any, option: Optional[str] = None) -> None:
    """Raise :class:`BadCheckpointError` naming ``path`` unless it is a readable Lightning checkpoint.

    The file is read once to check every record against the checksum stored with it (a flipped bit is refused,
    as :class:`~lightning_amor.checkpoint_io.DamagedCheckpointError`); tensors are then memory-mapped, not read.
    ``None`` and remote URLs pass unchecked, and so, for :data:`FIT_OPTION`, do the values Lightning resolves
    itself (``last``, ``best``, ``hpc``).

    Args:
        path: the checkpoint file.
        option: the command-line option that gave ``path`` (:data:`FIT_OPTION`, or ``--ckpt`` of ``solve`` and
            ``export``), named by the messages; ``None`` (a Python caller) words them for the ``path`` argument.
    """
    if path is None or "://" in str(path):
        return
    if option == FIT_OPTION and str(path).split(":")[0] in _RESOLVED_BY_LIGHTNING:
        return
    file = Path(path)
    if not file.is_file() and option is not None and option != FIT_OPTION and str(path) in _RESOLVED_BY_LIGHTNING:
        example = newest_last_checkpoint() or EXAMPLE_CHECKPOINT
        raise BadCheckpointError(
            f"{option} {path}: this command takes a checkpoint file, not `{path}` (which only {FIT_OPTION} of fit, "
            f"validate, test and predict resolves); pass a file such as {example}"
        )
    if not file.is_file():
        where = "is a directory, not a file" if file.is_dir() else "does not exist"
        if option == FIT_OPTION:
            raise BadCheckpointError(f"{option} {path} {where}; pass a .ckpt file, or `last` to resume a run")
        if option is not None:
            raise BadCheckpointError(f"{option} {path} {where}; pass a checkpoint file such as {EXAMPLE_CHECKPOINT}")
        raise BadCheckpointError(f"the checkpoint {path} {where}; pass the path of a .ckpt file, such as "
                                 f"{EXAMPLE_CHECKPOINT}")
    if file.stat().st_size == 0:
        raise BadCheckpointError(f"the checkpoint {path} is empty (0 bytes), as after an interrupted write; use "
                                 "another checkpoint, or start without it")
    if not zipfile.is_zipfile(file):
        with open(file, "rb") as handle:
            starts_like_torch = handle.read(4) == b"PK\x03\x04"
        reason = (
            f"is truncated: it begins like a PyTorch checkpoint but its end is missing ({file.stat().st_size} bytes; "
            "an interrupted copy or write?)" if starts_like_torch
            else "is not a PyTorch checkpoint (torch.save writes a zip archive; this file is none)"
        )
        raise BadCheckpointError(f"the checkpoint {path} {reason}; use another checkpoint, or start without it")
    verify_checkpoint_archive(file)  # torch.load does not check the archive's checksums
    try:
        content = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch cannot read is reported the same way
        raise BadCheckpointError(f"the checkpoint {path} cannot be read: {type(err).__name__}: {err}") from err
    missing = [key for key in ("state_dict", "pytorch-lightning_version") if key not in content] if isinstance(
        content, dict) else ["state_dict"]
    if missing:
        found = sorted(map(str, content))[:8] if isinstance(content, dict) else type(content).__name__
        raise BadCheckpointError(
            f"the checkpoint {path} is a PyTorch file but not a Lightning checkpoint: it lacks {missing} (it holds "
            f"{found}); pass a file written by ModelCheckpoint or Trainer.save_checkpoint"
        )


def newest_last_checkpoint(root: Union[str, Path] = "runs") -> Optional[str]:
    """The newest ``last*.ckpt`` in a ``checkpoints`` folder below ``root`` (relative to the current folder as given),
    or ``None``: the file a user most likely means by ``last``."""
    found = [path for path in Path(root).glob("**/checkpoints/last*.ckpt") if path.is_file()]
    return str(max(found, key=lambda path: path.stat().st_mtime)) if found else None


def _resolve(class_path: str, base: type, what: str, path: Any) -> type:
    """Import ``package.module.Class`` and check that it is a subclass of ``base``."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise BadCheckpointError(
            f"the checkpoint {path} names the {what} class {class_path!r}, which cannot be imported ({err}); "
            "install the package that defines it, or run from the folder that holds it"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise BadCheckpointError(f"the checkpoint {path} names {class_path!r} as its {what}, not a {base.__name__}")
    return cls


def _read(path: Union[str, Path], option: Optional[str]) -> dict[str, Any]:
    check_checkpoint_file(path, option)
    # Lightning's own checkpoints hold plain config (class paths and numbers) next to the tensors.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def load_module(path: Union[str, Path], map_location: Any = "cpu", option: Optional[str] = None) -> AmortizedModule:
    """The trained model stored in the checkpoint ``path``, in eval mode.

    The checkpoint must come from ``lightning-amor fit`` (the recipe is stored in it) or from a model whose
    hyperparameters are all plain values. The classes the recipe names are imported: load only checkpoints you
    trust, as with any pickle. ``option`` names the command-line option that gave ``path``, for the messages of a
    command (see :func:`check_checkpoint_file`).

    Raises:
        BadCheckpointError: the file is missing, truncated or not a Lightning checkpoint, or its model class
            cannot be imported.
    """
    checkpoint = _read(path, option)
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    cls = _resolve(class_path, AmortizedModule, "model", path) if class_path else AmortizedModule
    if "objective" not in hparams or "amortizer" not in hparams:
        raise BadCheckpointError(
            f"the checkpoint {path} does not store the recipe of its model (it was not written by "
            "`lightning-amor fit`); rebuild the model in Python and load it with "
            f"{cls.__name__}.load_from_checkpoint(path, objective=..., amortizer=...)"
        )
    module = cls.load_from_checkpoint(path, map_location=map_location)
    return module.eval()


def load_datamodule(path: Union[str, Path], option: Optional[str] = None) -> Optional[Any]:
    """The data module the checkpoint ``path`` was trained with (built from its stored settings), or ``None``
    when the checkpoint does not record one; ``option`` as for :func:`load_module`."""
    checkpoint = _read(path, option)
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not hparams or "_class_path" not in hparams:
        return None
    from datamodules.context import ContextDataModule

    cls = _resolve(hparams["_class_path"], ContextDataModule, "data module", path)
    settings = {key: value for key, value in hparams.items() if not key.startswith("_")}
    return cls(**settings)
