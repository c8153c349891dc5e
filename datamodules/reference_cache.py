"""ReferenceCache: one fixed set's reference solutions on disk, kept in chunks while the oracle solves them.

A complete set is one file ``<name>-<key>.pt``; while it is being solved, each solved chunk of rows is a file
``<name>-<key>.partial/rows-<start>-<stop>.pt``, written atomically, so an interrupted solve (a preemption, a
crash) loses at most the chunk in progress and a rerun continues from the chunks on disk. Every file records a
digest of the set's contexts, so references are never paired with contexts other than their own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder, so ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ReferenceCache:
    """The cached reference solutions ``N x n`` of one fixed set of ``size`` contexts with digest ``contexts``.

    Args:
        path: the file of the complete set.
        size: N, the number of contexts in the set.
        contexts: a digest of the set's contexts (see :func:`~lightning_amor.fingerprint.tensor_digest`).
    """

    def __init__(self, path: Path, size: int, contexts: str) -> None:
        self.path, self.size, self.contexts = path, size, contexts
        self.partial = path.with_suffix(".partial")

    def load(self) -> Optional[Tensor]:
        """The complete set's references ``N x n``, or ``None`` when the file does not exist.

        Raises:
            RuntimeError: the file cannot be read, holds the wrong number of rows or belongs to other contexts.
        """
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            y_star = saved["y_star"]
            if not isinstance(y_star, Tensor) or y_star.shape[0] != self.size:
                found = tuple(y_star.shape) if isinstance(y_star, Tensor) else type(y_star).__name__
                raise ValueError(f"expected {self.size} solutions, found {found}")
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise RuntimeError(
                f"the cached reference solutions {self.path} cannot be read ({err!r}); delete the file to solve again"
            ) from err
        if saved.get("contexts") != self.contexts:
            raise RuntimeError(
                f"the cached reference solutions {self.path} were solved for other contexts than the ones drawn now "
                f"(the data module's data or sampling changed without changing its settings); delete the file to "
                f"solve again"
            )
        return y_star

    def chunks(self) -> dict[int, Tensor]:
        """The chunks saved by an earlier, interrupted solve of these contexts: ``{first row: references}``.

        Chunks of other contexts and unreadable chunks (a crash while writing one) are left out: they are solved
        again.
        """
        found: dict[int, Tensor] = {}
        for file in sorted(self.partial.glob("rows-*.pt")) if self.partial.is_dir() else []:
            try:
                saved = torch.load(file, map_location="cpu", weights_only=True)
                start, y = int(saved["start"]), saved["y_star"]
            except Exception:  # noqa: BLE001 - a damaged chunk is simply solved again
                continue
            if saved.get("contexts") == self.contexts and isinstance(y, Tensor) and 0 <= start < start + len(y) <= \
                    self.size:
                found[start] = y
        return found

    def save_chunk(self, start: int, y_star: Tensor) -> None:
        """Save the references ``k x n`` of rows ``start`` to ``start + k``."""
        stop = start + y_star.shape[0]
        atomic_save({"contexts": self.contexts, "start": start, "y_star": y_star},
                    self.partial / f"rows-{start}-{stop}.pt")

    def save(self, y_star: Tensor) -> None:
        """Save the complete set's references ``N x n`` and remove its chunks."""
        atomic_save({"contexts": self.contexts, "y_star": y_star}, self.path)
        shutil.rmtree(self.partial, ignore_errors=True)
