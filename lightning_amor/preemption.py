"""Preemption: on SIGTERM or SIGUSR1, save ``last.ckpt`` at the next batch boundary and exit with status 75."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_amor.checkpoint_io import CheckpointSaveError

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by a preemption signal after saving its checkpoint (``EX_TEMPFAIL``: try again).

Not 0, so that schedulers and launchers that restart failed work (torchrun ``--max-restarts``, Kubernetes
``OnFailure``, ``fit && test`` chains) do not mistake an interrupted run for a finished one."""

_Handler = Union[Callable[[int, Any], Any], int, None]


class Preempted(SIGTERMException):
    """Training stopped on a preemption signal after saving a checkpoint.

    A ``SystemExit`` (as Lightning's own ``SIGTERMException``, which it subclasses): uncaught, the process exits
    with :data:`PREEMPTED_EXIT_CODE` and no traceback.
    """


def _on_any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank: one all-reduce of a single number (and a host sync) per call."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return flag
    count = torch.tensor([int(flag)], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(count)
    return bool(count.item())


class PreemptionCheckpoint(Callback):
    """On a preemption signal, save ``last.ckpt`` at the next training-batch boundary and stop with exit status 75.

    It also writes the final weights to that ``last.ckpt`` when training ends, so a run whose length is not a
    multiple of the periodic checkpoint interval never loses its last steps.

    ``lightning-amor`` adds this callback to every run (configure it under ``preemption:`` in a recipe, or with
    ``--preemption.signals``). Resume with ``--ckpt_path last``: the checkpoint goes to the directory of the
    trainer's ``ModelCheckpoint`` (the one with ``save_last`` if several), under the file name that callback uses
    for its last checkpoint (``last-v1.ckpt`` when the ``last.ckpt`` of another run is there), so Lightning finds it
    and no other run's file is overwritten; without a ``ModelCheckpoint`` it goes to ``default_root_dir/last.ckpt``.

    How it shares the signals with Lightning (nothing of Lightning's is replaced):

    - ``SIGTERM`` is caught by Lightning's own signal connector during every fit, which sets
      ``trainer.received_sigterm`` and raises ``SIGTERMException`` at the end of the batch; this callback reads the
      flag and saves just before. Under DDP, Lightning forwards the signal to the ranks it launched.
    - Other signals (``SIGUSR1`` by default) get a handler from the start of training to its end, which records
      the signal and then calls the handler that was there before: under SLURM with ``auto_requeue`` that is
      Lightning's requeue handler, which still saves its ``hpc_ckpt_<n>.ckpt`` and requeues the job. A signal set to
      ``SIG_IGN`` stays ignored.
    - Under DDP the ranks decide together (any rank signalled: all save and stop), so one rank's signal is enough.
    - A ``SIGTERM`` that Lightning acts on outside a batch boundary (during validation, say) is handled when its
      exception passes: one process saves then; several processes exit without saving (their collectives may be
      out of step), and the last periodic checkpoint is the one to resume from. The exit status is 75 here too.

    A signal that arrives after the last training step lets the run finish normally. A save that fails is never
    reported as done: it raises :class:`~lightning_amor.checkpoint_io.CheckpointSaveError` (exit status 74).

    Args:
        signals: names of the signals that preempt (``SIGKILL`` and ``SIGSTOP`` cannot be caught).
        exit_code: the exit status of a preempted run (0 makes it look finished to schedulers).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"), exit_code: int = PREEMPTED_EXIT_CODE) -> None:
        names = [str(name).upper() for name in signals]
        catchable = sorted(s.name for s in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
                           if isinstance(s, signal.Signals))
        unknown = [name for name in names if name not in catchable]
        if unknown:
            raise ValueError(f"PreemptionCheckpoint: cannot catch {unknown}; choose among {catchable}")
        self.signals = names
        self.exit_code = exit_code
        self.received: list[str] = []
        self.saved_path: Optional[str] = None
        self._previous: dict[signal.Signals, _Handler] = {}
        self._training = False

    # --- signal handlers ---------------------------------------------------------------------------------
    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread install handlers; SIGTERM still works through Lightning
        for name in self.signals:
            signum = signal.Signals[name]
            if signum == signal.SIGTERM:
                continue  # Lightning's connector owns SIGTERM during fit
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.append(signal.Signals(signum).name)
        previous = self._previous.get(signal.Signals(signum))
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # --- what was asked ----------------------------------------------------------------------------------
    def _requested(self, trainer: pl.Trainer) -> list[str]:
        names = list(dict.fromkeys(self.received))
        if "SIGTERM" in self.signals and trainer.received_sigterm and "SIGTERM" not in names:
            names.append("SIGTERM")
        return names

    @staticmethod
    def _keeper(trainer: pl.Trainer) -> Optional[ModelCheckpoint]:
        """The trainer's ``ModelCheckpoint`` that ``--ckpt_path last`` reads: the one with ``save_last`` if any."""
        candidates = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        return next((cb for cb in candidates if cb.save_last), candidates[0] if candidates else None)

    def _checkpoint_target(self, trainer: pl.Trainer) -> tuple[str, Optional[ModelCheckpoint]]:
        """Where ``--ckpt_path last`` will look: the file the keeper's next ``last`` save writes.

        That is the keeper's name for it, with the version suffix the keeper adds (as its ``_save_last_checkpoint``
        does) when another run's ``last.ckpt`` is in the folder: ``last-v1.ckpt``, never the other run's file.
        Once the keeper has saved (or was restored by a resume), its ``last_model_path`` is that file."""
        keeper = self._keeper(trainer)
        if keeper is None:
            return os.path.join(str(trainer.default_root_dir), "last.ckpt"), None
        metrics = dict(trainer.callback_metrics, epoch=trainer.current_epoch, step=trainer.global_step)
        path = keeper.format_checkpoint_name(metrics, keeper.CHECKPOINT_NAME_LAST)
        if keeper._enable_version_counter:  # private, pinned in tests/test_private_api.py
            version = keeper.STARTING_VERSION
            while keeper.file_exists(path, trainer) and path != keeper.last_model_path:
                path = keeper.format_checkpoint_name(metrics, keeper.CHECKPOINT_NAME_LAST, ver=version)
                version += 1
        return path, keeper

    def checkpoint_folder(self, trainer: pl.Trainer) -> str:
        """The folder this callback saves to (``lightning-amor fit`` checks that it can write there before
        training)."""
        keeper = self._keeper(trainer)
        return str(keeper.dirpath) if keeper is not None else str(trainer.default_root_dir)

    def _save(self, trainer: pl.Trainer) -> str:
        """Save the checkpoint; return how to resume from it."""
        path, keeper = self._checkpoint_target(trainer)
        if keeper is not None and keeper.save_last:
            keeper.last_model_path = path  # its next periodic save then overwrites this file, not a last-v1.ckpt
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero and not os.path.isfile(path):
            # a CheckpointIO plugin may fail in silence (Lightning's own swallows a PermissionError)
            raise CheckpointSaveError(f"could not save the checkpoint {path}: it is not on disk after saving; check "
                                      "that its folder is writable")
        self.saved_path = path
        resume = "--ckpt_path last" if keeper is not None else f"--ckpt_path {path}"
        return f"saved a checkpoint at global step {trainer.global_step} to {path}; resume with {resume}"

    def _save_preempted(self, trainer: pl.Trainer, names: list[str]) -> str:
        """:meth:`_save` for a preemption: a failed save says that the run was preempted (and exits with 74)."""
        try:
            return self._save(trainer)
        except CheckpointSaveError as err:
            raise CheckpointSaveError(f"preempted by {', '.join(names)}, but {err}") from err

    def _announce(self, trainer: pl.Trainer, names: list[str], outcome: str) -> None:
        if trainer.is_global_zero:
            print(f"\npreempted by {', '.join(names)}: {outcome} (exit status {self.exit_code})",
                  file=sys.stderr, flush=True)

    def _training_done(self, trainer: pl.Trainer) -> bool:
        return 0 <= trainer.max_steps <= trainer.global_step

    # --- hooks --------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.saved_path, self._training = [], None, True
        self._continue_resumed_file(trainer)
        self._install()

    def _continue_resumed_file(self, trainer: pl.Trainer) -> None:
        """A run resumed from a ``last`` file of the keeper's folder keeps writing that file. The keeper restores
        its ``last_model_path`` only from a checkpoint it wrote in that same folder; for a checkpoint copied there
        from another folder it would start a ``last-v1.ckpt`` beside the file the run continues."""
        keeper, resumed = self._keeper(trainer), trainer.ckpt_path
        if keeper is None or not keeper.save_last or keeper.last_model_path or not resumed:
            return
        folder, name = os.path.split(os.path.abspath(str(resumed)))
        if folder == os.path.abspath(str(keeper.dirpath)) and name.startswith(keeper.CHECKPOINT_NAME_LAST):
            keeper.last_model_path = str(resumed)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        names = self._requested(trainer)
        if not _on_any_rank(trainer, bool(names)) or self._training_done(trainer):
            return
        names = names or ["a signal to another rank"]
        self._announce(trainer, names, self._save_preempted(trainer, names))
        raise Preempted(self.exit_code)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False
        self._restore()
        keeper = self._keeper(trainer)
        if keeper is not None and keeper.save_last and trainer.global_step > 0:
            # The final weights, also when the run ends between two periodic saves (max_steps overridden).
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        training, self._training = self._training, False
        if isinstance(exception, Preempted) or not isinstance(exception, SIGTERMException):
            return
        if "SIGTERM" not in self.signals:
            return
        # Lightning stopped on SIGTERM away from a training-batch boundary: in validation, or before training
        if not training:
            outcome = "stopped before training started; nothing new to save"
        elif trainer.world_size > 1:
            outcome = "stopped outside a batch boundary, where several processes cannot save together; resume " \
                      "from the last periodic checkpoint with --ckpt_path last"
        else:
            outcome = self._save_preempted(trainer, ["SIGTERM"])
        self._announce(trainer, ["SIGTERM"], outcome)
        exception.code = self.exit_code
