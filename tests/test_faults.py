"""Faults during training, with real processes, signals and checkpoints.

Preemption: ``lightning-amor fit`` runs as a subprocess and gets SIGTERM or SIGUSR1 mid-training; it must save a
checkpoint at the next batch boundary and exit with status 75. SIGKILL: the run dies at once; rerun with
``--ckpt_path last`` it resumes from the last periodic checkpoint and ends with the weights of a run that was never
interrupted. Bad checkpoints (truncated, not a checkpoint, another model) fail before training with errors that
name the file and what does not match. Runs are found mid-way by polling for their periodic checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import SphereContexts
from lightning_amor import MLP, AmortizedModule, FullyAmortized
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.cli import main
from lightning_amor.module import BadCheckpointError
from lightning_amor.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from tests.test_recipes import recipe_args, smoke_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "sphere" / "full_objective.yaml"
EVERY = 5  # steps between periodic checkpoints
FOREVER = 10**6  # max_steps of a run that only a signal ends
HIDDEN = "--model.init_args.amortizer.init_args.net.init_args.hidden"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A folder shared by the tests of this file (the reference-solution cache, a finished run's checkpoint)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    monkeypatch.setenv("LIGHTNING_AMOR_DEBUG", "1")  # the CLI's errors as exceptions, to inspect them


def fit_args(work: Path, cache: Path, max_steps: int, hidden: str = "[32]") -> list[str]:
    """``fit`` of the shipped sphere recipe, shrunk to CPU and tiny sizes, with a stable checkpoint folder
    ``work/checkpoints`` holding a periodic ``last.ckpt`` (what the recipes need for ``--ckpt_path last``)."""
    periodic = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(work / "checkpoints"), "every_n_train_steps": EVERY, "save_top_k": 0, "save_last": True,
        "monitor": None}}  # a list item of the same class keeps the recipe's other arguments unless given
    return [
        "fit", *recipe_args(RECIPE), *smoke_overrides(RECIPE, work),
        "--data.init_args.cache_dir", str(cache), "--trainer.limit_val_batches", "0",
        "--trainer.enable_model_summary", "false", "--trainer.max_steps", str(max_steps),
        "--trainer.callbacks", json.dumps([periodic]), HIDDEN, hidden,
    ]


def start(args: list[str], work: Path, command: Optional[list[str]] = None,
          cluster: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """``python -m lightning_amor.cli ARGS`` (or ``command ARGS``) in ``work``, outside any cluster environment
    (or in the one that the variables ``cluster`` describe), writing its output to files there."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(cluster or {}, OMP_NUM_THREADS="1")
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:
        command = command or [sys.executable, "-m", "lightning_amor.cli"]
        return subprocess.Popen([*command, *args], cwd=work, env=env, stdout=out, stderr=err)


def output(work: Path) -> str:
    return (work / "stdout.txt").read_text() + (work / "stderr.txt").read_text()


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, work: Path, timeout: float = 30) -> None:
    """Poll ``condition`` every 20 ms while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before the condition held:\n{output(work)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the condition did not hold within {timeout} s:\n{output(work)[-3000:]}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, work: Path, timeout: float = 60) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not exit within {timeout} s:\n{output(work)[-3000:]}")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise the same weights, optimizer state and scheduler state."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][name], rtol=0, atol=0, msg=f"weights differ in {name}")
    for (state_a, state_b) in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for index, slots in state_a["state"].items():
            for slot, value in slots.items():
                torch.testing.assert_close(value, state_b["state"][index][slot], rtol=0, atol=0)
    assert a["lr_schedulers"] == b["lr_schedulers"]


# --- preemption: SIGTERM and SIGUSR1 --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preemption_signal_saves_a_checkpoint_and_exits(tmp_path, shared, signum):
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = start(fit_args(tmp_path, shared / "cache", FOREVER), tmp_path)
    wait_until(last.exists, proc, tmp_path)
    periodic_step = load(last)["global_step"]
    proc.send_signal(signum)
    assert finish(proc, tmp_path) == PREEMPTED_EXIT_CODE, output(tmp_path)[-3000:]

    step = load(last)["global_step"]
    assert periodic_step <= step < FOREVER
    assert step > 0
    log = output(tmp_path)
    assert (f"preempted by {signum.name}: saved a checkpoint at global step {step} to {last}; resume with "
            f"--ckpt_path last (exit status {PREEMPTED_EXIT_CODE})") in log
    assert "Traceback" not in log


def test_under_slurm_sigusr1_still_gets_lightnings_requeue_and_saves_last(tmp_path, shared):
    # the variables srun sets for a one-task job step: Lightning then runs its SLURM requeue handler on SIGUSR1
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "amor",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = start(fit_args(tmp_path, shared / "cache", FOREVER), tmp_path, cluster=slurm)
    wait_until(last.exists, proc, tmp_path)
    proc.send_signal(signal.SIGUSR1)
    assert finish(proc, tmp_path) == PREEMPTED_EXIT_CODE, output(tmp_path)[-3000:]

    log = output(tmp_path)
    assert "Handling auto-requeue signal" in log, "Lightning's SLURM handler did not run"
    assert re.search(r"[Rr]eque\w* (SLURM )?job 4242", log), "Lightning did not try to requeue"  # (no scontrol here)
    (hpc,) = (tmp_path / "root").glob("hpc_ckpt_*.ckpt")
    step = load(last)["global_step"]
    assert 0 < load(hpc)["global_step"] <= step < FOREVER
    assert f"preempted by SIGUSR1: saved a checkpoint at global step {step} to {last}" in log


# --- SIGKILL, then resume with --ckpt_path last ---------------------------------------------------------------


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint_exactly(tmp_path, shared, monkeypatch):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    last = killed / "checkpoints" / "last.ckpt"
    proc = start(fit_args(killed, shared / "cache", FOREVER), killed)
    wait_until(last.exists, proc, killed)
    proc.kill()
    assert finish(proc, killed) == -signal.SIGKILL
    saved = load(last)["global_step"]
    assert saved > 0 and saved % EVERY == 0, "the surviving checkpoint is a periodic one"

    # rerun the same command with --ckpt_path last, to a few periodic checkpoints later
    target = saved + 2 * EVERY
    proc = start([*fit_args(killed, shared / "cache", target), "--ckpt_path", "last"], killed)
    assert finish(proc, killed) == 0, output(killed)[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in output(killed)
    resumed = load(last)
    assert resumed["global_step"] == target

    # the same command never interrupted (in this process, on one thread like the subprocesses)
    reference.mkdir()
    monkeypatch.chdir(reference)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(args=fit_args(reference, shared / "cache", target))
    finally:
        torch.set_num_threads(threads)
    assert_same_training_state(resumed, load(reference / "checkpoints" / "last.ckpt"))


# --- the callback in-process: validation, chaining, restoring -----------------------------------------------


def small_module(hidden: int = 16) -> AmortizedModule:
    torch.manual_seed(0)
    return AmortizedModule(SphereObjective(grid_points=256, starts=2), FullyAmortized(MLP(16, 3, hidden=[hidden])))


def small_data(cache: Path) -> SphereContexts:
    return SphereContexts(batch_size=8, batches_per_epoch=20, val_size=32, test_size=8, eval_batch_size=8,
                          cache_dir=str(cache))


def small_trainer(work: Path, max_steps: int, *callbacks: Callback, **kwargs) -> Trainer:
    periodic = ModelCheckpoint(dirpath=work / "checkpoints", every_n_train_steps=100, save_top_k=0, save_last=True)
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=work,
                   callbacks=[*callbacks, PreemptionCheckpoint(), periodic], **kwargs)


class SignalSelf(Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (or of the first validation batch
    after it, with ``in_validation``)."""

    def __init__(self, signum: int, step: int, in_validation: bool = False) -> None:
        self.signum, self.step, self.in_validation, self.sent = signum, step, in_validation, False

    def _send(self, trainer: Trainer) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.in_validation:
            self._send(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.in_validation and not trainer.sanity_checking:
            self._send(trainer)


def test_sigusr1_calls_the_handler_installed_before_it_and_restores_it(tmp_path):
    calls = []

    def previous(signum, frame):  # e.g. Lightning's SLURM requeue handler
        calls.append(signum)

    before = signal.signal(signal.SIGUSR1, previous)
    try:
        trainer = small_trainer(tmp_path, 50, SignalSelf(signal.SIGUSR1, step=3))
        with pytest.raises(SystemExit) as info:
            trainer.fit(small_module(), small_data(tmp_path / "cache"))
        assert info.value.code == PREEMPTED_EXIT_CODE
        assert calls == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is previous, "the handler in place before fit was not restored"
    finally:
        signal.signal(signal.SIGUSR1, before)
    saved = load(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3
    # the ModelCheckpoint keeps writing to this file after a resume (not to a last-v1.ckpt)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["last_model_path"] == str(tmp_path / "checkpoints" / "last.ckpt")


def test_sigterm_during_validation_saves_there_and_the_run_resumes(tmp_path):
    data = small_data(tmp_path / "cache")
    trainer = small_trainer(tmp_path, 12, SignalSelf(signal.SIGTERM, step=4, in_validation=True),
                            val_check_interval=4)
    with pytest.raises(SystemExit) as info:
        trainer.fit(small_module(), data)
    assert info.value.code == PREEMPTED_EXIT_CODE
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "Lightning's SIGTERM handler was left installed"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 4

    resumed = small_trainer(tmp_path, 12, val_check_interval=4)
    resumed.fit(small_module(), data, ckpt_path=last)
    assert resumed.global_step == 12
    assert "val/objective" in resumed.callback_metrics


def test_uncatchable_or_unknown_signals_are_rejected():
    with pytest.raises(ValueError, match=r"cannot catch \['SIGKILL'\]"):
        PreemptionCheckpoint(signals=["SIGTERM", "SIGKILL"])
    with pytest.raises(ValueError, match=r"cannot catch \['SIGNOPE'\]"):
        PreemptionCheckpoint(signals=["SIGNOPE"])


# --- bad checkpoints --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(shared) -> Path:
    """A checkpoint written by ``lightning-amor fit`` (MLP widths [32])."""
    work = shared / "good"
    work.mkdir()
    main(args=fit_args(work, shared / "cache", EVERY))
    return work / "checkpoints" / "last.ckpt"


def fails_before_training(args: list[str], work: Path) -> str:
    """Run the CLI, which must raise BadCheckpointError before any training step; return its message."""
    with pytest.raises(BadCheckpointError) as info:
        main(args=args)
    assert not (work / "checkpoints").exists(), "training started"
    return str(info.value)


def test_a_truncated_checkpoint_is_named(tmp_path, shared, good_checkpoint):
    truncated = tmp_path / "truncated.ckpt"
    data = good_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    message = fails_before_training([*fit_args(tmp_path, shared / "cache", 10), "--ckpt_path", str(truncated)],
                                    tmp_path)
    assert f"the checkpoint {truncated} is truncated" in message


def test_a_truncated_last_checkpoint_is_named_when_resuming_with_last(tmp_path, shared, good_checkpoint):
    # e.g. killed while Lightning moved it in from a temporary folder on another filesystem
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    data = good_checkpoint.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    with pytest.raises(BadCheckpointError, match=f"the checkpoint {last} is truncated"):
        main(args=[*fit_args(tmp_path, shared / "cache", 10), "--ckpt_path", "last"])
    assert last.stat().st_size == len(data) - 100, "training started"


def test_a_file_that_is_no_checkpoint_is_named(tmp_path, shared):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint\n")
    weights = tmp_path / "weights.pt"
    torch.save(small_module().state_dict(), weights)
    missing = tmp_path / "missing.ckpt"
    cases = [(notes, "is not a PyTorch checkpoint"), (weights, "is a PyTorch file but not a Lightning checkpoint"),
             (missing, "does not exist")]
    for path, reason in cases:
        message = fails_before_training(
            ["validate", *fit_args(tmp_path, shared / "cache", 10)[1:], "--ckpt_path", str(path)], tmp_path
        )
        assert str(path) in message and reason in message, message


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_checkpoint_of_another_model_lists_the_mismatched_parameters(tmp_path, shared, good_checkpoint, subcommand):
    args = fit_args(tmp_path, shared / "cache", 10, hidden="[24, 8]")
    message = fails_before_training([subcommand, *args[1:], "--ckpt_path", str(good_checkpoint)], tmp_path)
    assert f"the checkpoint {good_checkpoint} does not fit this AmortizedModule" in message
    assert "amortizer.net.layers.0.weight: (32, 16) in the checkpoint, (24, 16) in the model" in message
    assert "amortizer.net.layers.2.weight: (3, 32) in the checkpoint, (8, 24) in the model" in message
    assert "amortizer.net.layers.4.weight: (3, 8) in the model, missing from the checkpoint" in message


def test_resuming_with_last_from_a_folder_of_another_model_names_the_resolved_file(tmp_path, shared,
                                                                                   good_checkpoint):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(good_checkpoint.read_bytes())
    with pytest.raises(BadCheckpointError, match=f"the checkpoint {folder / 'last.ckpt'} does not fit"):
        main(args=[*fit_args(tmp_path, shared / "cache", 10, hidden="[16]"), "--ckpt_path", "last"])
