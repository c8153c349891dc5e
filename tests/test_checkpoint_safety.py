"""Checkpoints that are never lost or silently wrong, and bad ones answered with one line.

A checkpoint folder that cannot be written stops ``fit`` before training; every save is verified (on disk, complete,
its checksums intact); ``--ckpt_path last`` with nothing to resume stops unless ``last_or_fresh`` asks to start
fresh; a checkpoint with a flipped byte is refused by ``fit``, ``solve`` and ``export``; a bad checkpoint is one
line with exit status 2, and ``LIGHTNING_AMOR_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, Trainer

from lightning_amor.checkpoint_io import (
    CheckpointFolderError,
    CheckpointSaveError,
    DamagedCheckpointError,
    VerifiedCheckpointIO,
    check_checkpoint_folder,
    verify_checkpoint_archive,
)
from lightning_amor.cli import main
from lightning_amor.exit_codes import BAD_INPUT, DEBUG_VARIABLE, SAVE_FAILED
from lightning_amor.module import BadCheckpointError
from tests.test_faults import EVERY, SignalSelf, fit_args, small_data, small_module, small_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The reference-solution cache and a finished run, shared by the tests of this file."""
    return tmp_path_factory.mktemp("checkpoint_safety")


@pytest.fixture(scope="module")
def trained(shared) -> Path:
    """The ``last.ckpt`` of a tiny ``fit``, started with ``--ckpt_path last_or_fresh`` in an empty folder."""
    work = shared / "trained"
    main(args=[*fit_args(work, shared / "cache", EVERY), "--ckpt_path", "last_or_fresh"])
    return work / "checkpoints" / "last.ckpt"


def flipped_copy(checkpoint: Path, folder: Path) -> Path:
    """A copy of ``checkpoint`` with one bit flipped in the middle of the file."""
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged = folder / "flipped.ckpt"
    damaged.write_bytes(bytes(data))
    return damaged


def exits_with(code: int, args: list[str], capsys) -> str:
    """Run the CLI with ``args``; it must exit with ``code``; return what it wrote to stderr."""
    with pytest.raises(SystemExit) as info:
        main(args=args)
    assert info.value.code == code, capsys.readouterr().err
    return capsys.readouterr().err


class BlockFolderAtStep(Callback):
    """At training step ``step``, put a regular file where the checkpoint folder ``folder`` is."""

    def __init__(self, folder: str, step: int) -> None:
        self.folder, self.step = Path(folder), step

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.write_text("in the way\n")


# --- integrity: the archive's checksums -------------------------------------------------------------------


def test_a_flipped_byte_is_found_by_the_archive_checksums(tmp_path, trained):
    assert verify_checkpoint_archive(trained)
    damaged = flipped_copy(trained, tmp_path)
    torch.load(damaged, map_location="cpu", weights_only=False)  # torch itself does not notice
    with pytest.raises(DamagedCheckpointError, match=f"the checkpoint {damaged} is damaged: its record .* does not"):
        verify_checkpoint_archive(damaged)


def test_an_archive_without_checksums_loads_with_a_warning(tmp_path):
    path = tmp_path / "unchecked.ckpt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    with pytest.warns(UserWarning, match="stores no checksums"):
        assert not verify_checkpoint_archive(path)


def test_fit_solve_and_export_refuse_a_flipped_checkpoint_naming_it(tmp_path, shared, trained, capsys):
    damaged = flipped_copy(trained, tmp_path)
    contexts = tmp_path / "contexts.csv"
    contexts.write_text(",".join(["0.1"] * 16) + "\n")
    commands = {
        "fit": [*fit_args(tmp_path / "run", shared / "cache", 2 * EVERY), "--ckpt_path", str(damaged)],
        "solve": ["solve", "--ckpt", str(damaged), "--contexts", str(contexts), "--out", str(tmp_path / "out.csv")],
        "export": ["export", "--ckpt", str(damaged), "--out", str(tmp_path / "exported")],
    }
    for name, args in commands.items():
        message = exits_with(BAD_INPUT, args, capsys)
        assert f"lightning-amor {name}: error: the checkpoint {damaged} is damaged" in message, (name, message)
        assert "Traceback" not in message
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "out.csv").exists()


# --- saves that did not happen ----------------------------------------------------------------------------


def test_a_checkpoint_folder_below_a_file_stops_fit_before_training(tmp_path, shared, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is wanted\n")
    message = exits_with(BAD_INPUT, fit_args(blocker / "run", shared / "cache", EVERY), capsys)
    assert f"lightning-amor fit: error: cannot write checkpoints to {blocker / 'run' / 'checkpoints'}: " \
           f"{blocker} is a file, not a folder" in message
    assert message.count("\n") == 1, message


def test_the_folder_check_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "a" / "b" / "checkpoints"
    check_checkpoint_folder(folder)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointFolderError, match="is a file, not a folder"):
        (tmp_path / "file").touch()
        check_checkpoint_folder(tmp_path / "file" / "checkpoints")


def test_a_verified_save_is_on_disk_intact_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "last.ckpt"
    VerifiedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5.0)}, "step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    with pytest.raises(CheckpointSaveError, match=f"could not save the checkpoint {tmp_path / 'deep'}"):
        VerifiedCheckpointIO().save_checkpoint({"step": 4}, path / "below_a_file.ckpt")


def test_a_file_that_does_not_read_back_as_written_is_a_failed_save(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.arange(100.0)}, path)
    with pytest.raises(CheckpointSaveError, match="holds .* bytes instead of 1"):
        VerifiedCheckpointIO.verify_saved(path, 1)
    with pytest.raises(CheckpointSaveError, match="is missing after saving it"):
        VerifiedCheckpointIO.verify_saved(tmp_path / "never.ckpt", 1)
    damaged = flipped_copy(path, tmp_path)
    with pytest.raises(CheckpointSaveError, match="did not read back as written"):
        VerifiedCheckpointIO.verify_saved(damaged, damaged.stat().st_size)


UNPRIVILEGED = textwrap.dedent("""
    import signal, sys, torch
    from pathlib import Path
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning_amor.checkpoint_io import CheckpointSaveError, VerifiedCheckpointIO
    from tests.test_faults import SignalSelf, small_data, small_module, small_trainer
    run, work = Path(sys.argv[1]), Path(sys.argv[2])
    folder = str(run / "checkpoints")
    TorchCheckpointIO().save_checkpoint({"w": torch.ones(2)}, folder + "/lightning.ckpt")
    print("lightning's save returned")
    try:
        VerifiedCheckpointIO().save_checkpoint({"w": torch.ones(2)}, folder + "/ours.ckpt")
    except CheckpointSaveError as err:
        print("ours:", err)
    # a preemption whose save Lightning's own plugin swallowed
    trainer = small_trainer(run, 50, SignalSelf(signal.SIGUSR1, 2), limit_val_batches=0)
    try:
        trainer.fit(small_module(), small_data(work / "cache"))
    except CheckpointSaveError as err:
        print("preemption:", err)
""")


def test_a_permission_error_is_a_failed_save_not_a_silent_one(tmp_path):
    run_folder = tmp_path / "read-only"
    folder = run_folder / "checkpoints"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    run_folder.chmod(0o555)
    # root writes anywhere: without the capability that lets it (util-linux's setpriv), as for any other user
    drop = "-dac_override,-dac_read_search"
    unprivileged = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"] if os.geteuid() == 0 else []
    run = subprocess.run(
        [*unprivileged, sys.executable, "-c", UNPRIVILEGED, str(run_folder), str(tmp_path / "work")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    run_folder.chmod(0o755)
    folder.chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert "lightning's save returned" in run.stdout  # the pinned Lightning swallows the PermissionError
    assert f"ours: could not save the checkpoint {folder}/ours.ckpt: Permission denied" in run.stdout
    assert f"preemption: preempted by SIGUSR1, but could not save the checkpoint {folder}/last.ckpt: it is not on " \
           "disk after saving" in run.stdout, run.stdout + run.stderr
    assert "saved a checkpoint" not in run.stderr
    assert list(folder.iterdir()) == []


def test_a_preemption_whose_save_fails_never_reports_it_saved(tmp_path, shared, capsys):
    # the folder is blocked at step 2, the signal arrives at step 3: the preemption's save fails
    trainer = small_trainer(tmp_path, 50, BlockFolderAtStep(str(tmp_path / "checkpoints"), 2),
                            SignalSelf(signal.SIGUSR1, 3), limit_val_batches=0, plugins=[VerifiedCheckpointIO()])
    with pytest.raises(CheckpointSaveError, match="preempted by SIGUSR1, but could not save the checkpoint"):
        trainer.fit(small_module(), small_data(shared / "cache"))
    assert "saved a checkpoint" not in capsys.readouterr().err


# --- --ckpt_path last with nothing to resume --------------------------------------------------------------


def test_ckpt_path_last_with_nothing_to_resume_stops_naming_the_folder(tmp_path, shared, capsys):
    message = exits_with(BAD_INPUT, [*fit_args(tmp_path, shared / "cache", EVERY), "--ckpt_path", "last"], capsys)
    assert f"lightning-amor fit: error: --ckpt_path last: there is no last checkpoint in " \
           f"{tmp_path / 'checkpoints'} to resume from" in message and "last_or_fresh" in message
    assert not (tmp_path / "checkpoints").exists()


def test_last_or_fresh_resumes_when_there_is_a_checkpoint(tmp_path, shared, trained, caplog):
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    shutil.copy(trained, last)
    main(args=[*fit_args(tmp_path, shared / "cache", 2 * EVERY), "--ckpt_path", "last_or_fresh"])
    assert f"Restored all states from the checkpoint at {last}" in caplog.text
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2 * EVERY


def test_the_run_that_started_fresh_with_last_or_fresh_trained(trained):
    assert torch.load(trained, map_location="cpu", weights_only=True)["global_step"] == EVERY


# --- bad checkpoints in fit: one line, exit status 2 ------------------------------------------------------


def test_each_bad_checkpoint_is_one_line_with_exit_status_2(tmp_path, shared, trained, capsys):
    data = trained.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "folder.ckpt").mkdir()
    cases = {"truncated.ckpt": "is truncated", "empty.ckpt": "is empty (0 bytes)",
             "folder.ckpt": "is a directory, not a file", "missing.ckpt": "does not exist"}
    for name, reason in cases.items():
        args = [*fit_args(tmp_path / "run", shared / "cache", 2 * EVERY), "--ckpt_path", str(tmp_path / name)]
        message = exits_with(BAD_INPUT, args, capsys)
        assert message.startswith("lightning-amor fit: error: ") and message.count("\n") == 1, message
        assert str(tmp_path / name) in message and reason in message, message


def test_another_models_checkpoint_is_an_error_message_not_a_traceback(tmp_path, shared, trained, capsys):
    args = [*fit_args(tmp_path, shared / "cache", 2 * EVERY, hidden="[16]"), "--ckpt_path", str(trained)]
    message = exits_with(BAD_INPUT, args, capsys)
    assert message.startswith(f"lightning-amor fit: error: the checkpoint {trained} does not fit this Amortized")
    assert "Traceback" not in message


def test_the_debug_variable_shows_the_exception_instead(tmp_path, shared, monkeypatch):
    monkeypatch.setenv(DEBUG_VARIABLE, "1")
    with pytest.raises(BadCheckpointError, match="does not exist"):
        main(args=[*fit_args(tmp_path, shared / "cache", EVERY), "--ckpt_path", str(tmp_path / "missing.ckpt")])


def test_a_failed_save_during_fit_exits_with_its_own_status(tmp_path, shared, capsys):
    # the folder is writable when fit starts; a file takes its place before the first save
    class_path = "tests.test_checkpoint_safety.BlockFolderAtStep"
    blocker = {"class_path": class_path, "init_args": {"folder": str(tmp_path / "checkpoints"), "step": 2}}
    args = fit_args(tmp_path, shared / "cache", EVERY)
    at = args.index("--trainer.callbacks")
    callbacks = json.loads(args[at + 1])
    args[at + 1] = json.dumps([*callbacks, blocker])
    message = exits_with(SAVE_FAILED, args, capsys)
    assert f"lightning-amor fit: error: could not save the checkpoint {tmp_path / 'checkpoints'}" in message
