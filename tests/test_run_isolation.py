"""Two runs of one recipe never clobber each other.

A run holds its checkpoint folder while it trains (a lock file beside it), so a second live run of the same folder
is refused before anything is built, and a lock left by a killed run is taken over with a note; the preemption
checkpoint keeps the versioned ``last`` name that the ``ModelCheckpoint`` chose; ``--ckpt_path last`` names the
file it resumes from and refuses one written with another configuration unless ``--resume_any_config true``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_amor.cli import main
from lightning_amor.exit_codes import BAD_INPUT, DEBUG_VARIABLE
from tests.test_faults import fit_args, small_data, small_module, small_trainer

LR = "--model.init_args.optimizer.init_args.lr"


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def write_lock(folder: Path, pid: int) -> Path:
    """A lock of the checkpoint folder ``folder`` held by the process ``pid`` of this host."""
    lock = folder.parent / f"{folder.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}))
    return lock


def dead_pid() -> int:
    """The id of a process of this host that has finished."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def exits_with(code: int, args: list[str], capsys) -> str:
    """Run the CLI with ``args``; it must exit with ``code``; return what it wrote to stderr."""
    with pytest.raises(SystemExit) as info:
        main(args=args)
    err = capsys.readouterr().err
    assert info.value.code == code, err
    return err


# --- the lock -------------------------------------------------------------------------------------------------
def test_a_second_live_run_of_the_same_folder_is_refused_before_anything_is_built(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            lock = write_lock(folder, other.pid)
            before = lock.read_text()
            err = exits_with(BAD_INPUT, [*fit_args(tmp_path, tmp_path / "cache", 2)], capsys)
        finally:
            other.kill()
    assert len(err.strip().splitlines()) == 1, err
    assert f"the checkpoint folder {folder} is in use by another run (pid {other.pid} on " in err
    assert "--trainer.default_root_dir runs/" in err, "the message gives the fix"
    assert not folder.exists(), "the refused run built something"
    assert lock.read_text() == before, "the refused run touched the other run's lock"


def test_a_lock_of_this_very_process_counts_as_live(tmp_path, capsys):
    write_lock(tmp_path / "checkpoints", os.getpid())
    err = exits_with(BAD_INPUT, [*fit_args(tmp_path, tmp_path / "cache", 2)], capsys)
    assert f"(pid {os.getpid()} on " in err


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    pid = dead_pid()
    lock = write_lock(folder, pid)
    main(args=fit_args(tmp_path, tmp_path / "cache", 2))
    err = capsys.readouterr().err
    assert f"took over the lock {lock} of pid {pid}, which is no longer running" in err, err
    assert (folder / "last.ckpt").is_file()
    assert not lock.exists(), "the run did not release its lock"


def test_the_lock_holds_the_folder_until_released(tmp_path):
    from lightning_amor.run_lock import RunFolderBusyError, RunLock

    folder = tmp_path / "checkpoints"
    first = RunLock(str(folder))
    first.acquire()
    held = json.loads(Path(first.path).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    with pytest.raises(RunFolderBusyError, match="is in use by another run"):
        RunLock(str(folder)).acquire()
    first.release()
    assert not Path(first.path).exists()
    second = RunLock(str(folder))
    second.acquire()
    second.release()
    second.release()  # releasing twice is harmless


def test_only_the_first_process_of_a_ddp_run_takes_the_lock(tmp_path, monkeypatch):
    from lightning_amor.run_lock import RunLock

    folder = tmp_path / "checkpoints"
    write_lock(folder, os.getpid())  # rank 0 holds it
    monkeypatch.setenv("LOCAL_RANK", "1")
    other_rank = RunLock(str(folder))
    other_rank.acquire()  # the same run: not refused, takes nothing
    other_rank.release()
    assert json.loads((tmp_path / "checkpoints.lock").read_text())["pid"] == os.getpid()


# --- the preemption checkpoint's name ----------------------------------------------------------------------------
def test_the_final_checkpoint_keeps_the_versioned_last_name(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    earlier = folder / "last.ckpt"
    earlier.write_bytes(b"the last checkpoint of an earlier run")
    trainer = small_trainer(tmp_path, 3)
    trainer.fit(small_module(), datamodule=small_data(tmp_path / "cache"))
    assert earlier.read_bytes() == b"the last checkpoint of an earlier run", "another run's last.ckpt was clobbered"
    versioned = folder / "last-v1.ckpt"
    assert versioned.is_file()
    assert torch.load(versioned, weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in folder.iterdir()) == ["last-v1.ckpt", "last.ckpt"]


# --- --ckpt_path last: which file, and of which configuration ---------------------------------------------------
def test_resuming_names_its_checkpoint_and_refuses_another_configuration(tmp_path, capsys):
    cache, last = tmp_path / "cache", tmp_path / "checkpoints" / "last.ckpt"
    main(args=[*fit_args(tmp_path, cache, 2), LR, "0.001"])
    assert torch.load(last, weights_only=False)["global_step"] == 2
    capsys.readouterr()

    err = exits_with(BAD_INPUT, [*fit_args(tmp_path, cache, 4), LR, "0.003", "--ckpt_path", "last"], capsys)
    assert len(err.strip().splitlines()) == 1, err
    assert f"--ckpt_path last: the checkpoint {last} does not fit this run: it was written with another " \
           "configuration (" in err
    assert "model optimizer.init_args.lr: 0.001 in the checkpoint, 0.003 now" in err
    assert "--resume_any_config true" in err
    assert torch.load(last, weights_only=False)["global_step"] == 2, "training started"

    # a longer run (trainer settings) and a safety setting may change on resume
    main(args=[*fit_args(tmp_path, cache, 4), LR, "0.001", "--model.init_args.nonfinite", "skip",
               "--ckpt_path", "last"])
    assert f"resuming from {last} (step 2, written " in capsys.readouterr().err
    assert torch.load(last, weights_only=False)["global_step"] == 4

    main(args=[*fit_args(tmp_path, cache, 6), LR, "0.003", "--ckpt_path", "last", "--resume_any_config", "true"])
    err = capsys.readouterr().err
    assert f"resuming from {last} (step 4, written " in err
    assert "model optimizer.init_args.lr: 0.001 in the checkpoint, 0.003 now" in err, "the override hides nothing"
    assert torch.load(last, weights_only=False)["global_step"] == 6
