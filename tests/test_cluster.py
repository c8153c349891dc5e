"""The cluster launch files in ``recipes/cluster/``: syntax, the SLURM directives, and a real torchrun run on CPU.

The torchrun test launches ``torchrun.sh`` itself with 2 CPU processes (gloo), preempts one rank with SIGUSR1 (both
ranks save and stop together), then launches it again: it resumes from ``last.ckpt`` and finishes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_faults import EVERY, FOREVER, RECIPE, finish, fit_args, output, start, wait_until
from tests.test_recipes import recipe_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "recipes" / "cluster"
SBATCH, TORCHRUN = CLUSTER / "slurm.sbatch", CLUSTER / "torchrun.sh"


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_scripts_without_a_recipe_print_their_usage(script):
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage:" in run.stderr and "RECIPE" in run.stderr


def test_the_sbatch_file_asks_for_a_warning_signal_and_requeue_and_runs_ddp():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.MULTILINE)
    assert "--signal=SIGUSR1@90" in directives and "--requeue" in directives
    assert "--open-mode=append" in directives, "a requeued job should append to its log, not overwrite it"
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert last_directive < first_command, "sbatch ignores #SBATCH lines after the first command"
    launch = " ".join(text.split("srun", 1)[1].replace("\\\n", " ").split())
    for part in ("lightning-amor fit \"${configs[@]}\"", "--trainer.num_nodes \"$nodes\"",
                 "--trainer.devices \"$tasks_per_node\"", "--trainer.strategy ddp", "--ckpt_path last_or_fresh \"$@\""):
        assert part in launch, f"{part!r} is not in the srun line: {launch}"


def test_the_torchrun_script_uses_a_rendezvous_and_resumes():
    launch = " ".join(TORCHRUN.read_text().split("exec torchrun", 1)[1].replace("\\\n", " ").split())
    for part in ("--rdzv_backend c10d", "--rdzv_endpoint", "--rdzv_id", "--nnodes \"$nnodes\"",
                 "-m lightning_amor.cli fit \"${configs[@]}\"", "--trainer.strategy ddp",
                 "--ckpt_path last_or_fresh \"$@\""):
        assert part in launch, f"{part!r} is not in the torchrun line: {launch}"


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_the_scripts_compose_the_shared_settings_before_the_recipe(script, tmp_path, monkeypatch):
    """srun and torchrun replaced by stand-ins that print their arguments: the recipe runs as its listing shows it."""
    for tool in ("srun", "torchrun"):
        (tmp_path / tool).write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "1", "NPROC_PER_NODE": "1"}
    recipe = "recipes/sphere/full_objective.yaml"

    def launched(**env: str) -> list[str]:
        run = subprocess.run(["bash", str(script), recipe, "--trainer.max_steps", "9"], capture_output=True,
                             text=True, cwd=REPO, env={**os.environ, **cluster, **env}, timeout=30)
        assert run.returncode == 0, run.stderr
        args = run.stdout.splitlines()
        return args[args.index("fit") + 1:]

    args = launched()
    assert [Path(a).resolve() for a in args[1:4:2]] == [REPO / "recipes" / "_base" / "trainer.yaml", REPO / recipe]
    assert args[0] == args[2] == "--config" and args[-2:] == ["--trainer.max_steps", "9"]
    assert launched(BASE_CONFIG="")[:2] == ["--config", recipe]  # a recipe of one's own, alone


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def worker_ranks(parent: int) -> dict[int, int]:
    """``rank -> pid`` of the processes started by ``parent`` (torchrun's workers, with RANK in their environment)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [item.split(b"=", 1)[1] for item in environ if item.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = int(entry.name)
    return ranks


def test_torchrun_on_two_cpu_processes_preempts_both_ranks_and_resumes(tmp_path, monkeypatch):
    # torchrun is installed next to this interpreter (an unactivated venv's bin/ is not on PATH)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("torchrun"), "torch's torchrun launcher must be installed beside the interpreter"
    monkeypatch.setenv("NNODES", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("RDZV_ENDPOINT", f"localhost:{free_port()}")
    last = tmp_path / "checkpoints" / "last.ckpt"

    def launch(max_steps: int) -> subprocess.Popen:
        args = fit_args(tmp_path, tmp_path / "cache", max_steps)
        assert args[:5] == ["fit", *recipe_args(RECIPE)]  # the script composes the same two configs
        # keep the script's own process layout (the shared overrides would set one device and no strategy)
        layout = {"--trainer.devices", "--trainer.num_nodes", "--trainer.strategy"}
        args = [a for i, a in enumerate(args) if a not in layout and (i == 0 or args[i - 1] not in layout)]
        return start(["--trainer.accelerator", "cpu", *args[5:]], tmp_path,
                     command=["bash", str(TORCHRUN), str(RECIPE)])

    # 1. a signal to rank 1 only stops both ranks at the same step, after one checkpoint
    proc = launch(FOREVER)
    wait_until(last.exists, proc, tmp_path, timeout=90)
    ranks = worker_ranks(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGUSR1)
    assert finish(proc, tmp_path) != 0, "torchrun reports the preempted workers as failed (so it may restart them)"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < FOREVER
    log = output(tmp_path)
    assert f"preempted by a signal to another rank: saved a checkpoint at global step {step}" in log
    # torchrun's failure report: the first rank to finish exits with 75, and torchrun may stop the other one with
    # SIGTERM before it exits by itself (after the checkpoint: both ranks took part in saving it)
    worker_codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", log))
    assert "75" in worker_codes and worker_codes <= {"75", str(-signal.SIGTERM)}, worker_codes

    # 2. the same launch line resumes from last.ckpt and finishes (at a step with a periodic checkpoint)
    target = (step // EVERY + 1) * EVERY
    proc = launch(target)
    assert finish(proc, tmp_path, timeout=120) == 0, output(tmp_path)[-4000:]
    assert f"Restored all states from the checkpoint at {last}" in output(tmp_path)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == target
