"""One live run per checkpoint folder: a lock file that ``lightning-amor fit`` holds while it trains.

Every run of a recipe writes into the same checkpoint folder, ``<run folder>/checkpoints`` (see
:mod:`~lightning_amor.run_folder`), so that ``--ckpt_path last`` finds the checkpoint of an interrupted run. Two
runs of that folder at once would overwrite each other's ``last.ckpt``, and a later resume would continue one run
with the other's weights and optimizer. So a run takes a lock on each of its checkpoint folders before anything is
built, and a second live run of one of them is refused with one line naming the folder, the other run and the fix.

Why a lock and not versioned folders (``version_N`` as TensorBoard's): ``--ckpt_path last`` would then have to
guess which version is the interrupted run, and a cluster job restarted by its scheduler (``last_or_fresh``) must
come back to its own folder. With one folder per recipe and a lock, resuming needs no guessing; runs that should
coexist name their own folders (``--trainer.default_root_dir``).

The lock is the file ``<folder>.lock`` beside the folder (a file inside it would make Lightning's
``ModelCheckpoint`` warn that the folder "exists and is not empty" on every first run). It holds the pid, the host
and the start time of its run, is created atomically (``O_CREAT | O_EXCL``) and removed when the run ends, however
it ends. A run killed by SIGKILL leaves its lock behind: a lock whose pid no longer runs on this host is stale,
and the next run takes it over with a note. A lock of another host cannot be checked from here: it is refused,
and the message says to delete the file if that run is dead. Under DDP only the first process takes the lock: the
other ranks belong to the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from typing import Any, Optional

from lightning_amor.checkpoint_io import CheckpointFolderError, check_checkpoint_folder

LOCK_SUFFIX = ".lock"
"""The lock of the checkpoint folder ``F`` is the file ``F.lock`` beside it."""

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""Environment variables naming a process's rank, in the order Lightning reads them (the first one set counts)."""


class RunFolderBusyError(CheckpointFolderError):
    """A checkpoint folder is held by another live run (exit status 2)."""


def is_first_process() -> bool:
    """Whether this process is rank 0 of its run (or the only process), read from the launcher's environment
    variables: this is known before the trainer is built, when the lock is taken."""
    rank = next((os.environ[name] for name in RANK_VARIABLES if os.environ.get(name) is not None), "0")
    return rank.strip() == "0" and os.environ.get("NODE_RANK", "0").strip() == "0"


def _running_here(pid: int) -> bool:
    """Whether the process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class RunLock:
    """The lock of the checkpoint folder ``folder`` (see the module docstring).

    Args:
        folder: the checkpoint folder (it need not exist yet).
    """

    def __init__(self, folder: str) -> None:
        self.folder = str(folder)
        self.path = self.folder.rstrip(os.sep) + LOCK_SUFFIX
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (with a note on stderr); nothing on a rank other than 0.

        Raises:
            RunFolderBusyError: another live run holds the folder, or the lock file cannot be created.
            CheckpointFolderError: the folder cannot be created or written.
        """
        if not is_first_process():
            return
        check_checkpoint_folder(self.folder)  # a folder that cannot be written is named as such, not as a lock
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": datetime.datetime.now().isoformat(timespec="seconds")})
        for _ in range(3):  # a stale lock is moved away once, then the create is retried
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:
                raise RunFolderBusyError(f"cannot create the lock {self.path} of the checkpoint folder {self.folder} "
                                         f"({err.strerror}); make its parent folder writable") from err
            with os.fdopen(descriptor, "w") as file:
                file.write(content)
            self.held = True
            return
        raise RunFolderBusyError(f"the lock {self.path} of the checkpoint folder {self.folder} keeps coming back; "
                                 "another run is starting there: give this run its own --trainer.default_root_dir")

    def release(self) -> None:
        """Remove the lock if this run holds it (calling it again, or without the lock, does nothing)."""
        if not self.held:
            return
        self.held = False
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def _read(self) -> tuple[Optional[str], dict[str, Any]]:
        """The lock file's text (``None`` when it is gone) and what it says about its run (``{}`` if unreadable)."""
        try:
            with open(self.path) as file:
                text = file.read()
        except FileNotFoundError:
            return None, {}
        try:
            holder = json.loads(text)
        except ValueError:
            return text, {}
        return text, holder if isinstance(holder, dict) else {}

    def _take_over_if_stale(self) -> None:
        """Move away a lock whose run is dead; raise :class:`RunFolderBusyError` for a live (or unknown) one."""
        text, holder = self._read()
        if text is None:
            return  # released meanwhile
        pid, host = holder.get("pid"), holder.get("host")
        here = host == socket.gethostname()
        if not (here and isinstance(pid, int) and pid > 0 and not _running_here(pid)):
            who = f"pid {pid} on {host}, started {holder.get('started')}" if holder else "unreadable lock file"
            unsure = "" if here else f" (a run on another host cannot be checked from here: delete {self.path} if it " \
                                     "is no longer running)"
            raise RunFolderBusyError(
                f"the checkpoint folder {self.folder} is in use by another run ({who}){unsure}; wait for it to end, "
                "or give this run its own folder with --trainer.default_root_dir runs/<application>/<recipe>/<name>"
            )
        # Moved away under a name of our own, then checked: of two runs taking over at once, only one wins.
        moved = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another run took it over first: the create decides
        with open(moved) as file:
            taken = file.read()
        if taken != text:  # a live lock created meanwhile: put it back
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
            os.remove(moved)
            return
        os.remove(moved)
        print(f"lightning-amor: note: took over the lock {self.path} of pid {pid}, which is no longer running "
              "(a run killed before it could release it)", file=sys.stderr, flush=True)
