"""A real install, as a researcher on a cluster makes one: the sdist, and the wheel built from it, hold every recipe;
the wheel, installed (not editable) into a fresh virtual environment with ``constraints.txt``, lists the shipped
recipes, trains one by name from a folder outside the checkout (its run folder there, nothing written into the
installation) and ``solve``s contexts with the checkpoint.

Slow (about 70 s of CPU time, a third of it pip installing torch and the other dependencies from pip's cache or index
into the fresh environment, which is then deleted in the background), so marked ``slow``; plain ``pytest`` runs it,
as CI does, and ``-m "not slow"`` leaves it out.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_amor
from datamodules import SphereContexts

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "lightning_amor", "datamodules", "recipes")
"""What building the package reads from the checkout (the rest of the checkout stays out of the copy built)."""

RECIPE = "sphere/semi_sum_regression"
"""The recipe trained by name: the README's first one."""

TINY = [  # a few CPU steps on tiny data (as tests/test_recipes.py's smoke_overrides, but keeping the run folder)
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null",
    "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "16", "--data.init_args.val_size", "32",
    "--data.init_args.test_size", "32", "--data.init_args.train_size", "64", "--data.init_args.num_workers", "0",
]


def run(command: list, cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` in ``cwd`` (with a time limit); fail the test with its output unless it exits with 0. Prints
    how long it took (shown with ``pytest -s``, or when the test fails)."""
    start = time.perf_counter()
    done = subprocess.run([str(word) for word in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"{time.perf_counter() - start:6.1f} s  {' '.join(str(word) for word in command)[:150]}")
    assert done.returncode == 0, (
        f"{command} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def shipped_files() -> list[str]:
    """Every file of the checkout's recipes folder, relative to it (POSIX)."""
    return sorted(path.relative_to(REPO / "recipes").as_posix() for path in (REPO / "recipes").rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts)


def build(tmp_path: Path) -> tuple[Path, Path]:
    """The sdist (setuptools' own PEP 517 hook, as ``python -m build --sdist`` calls it) of a copy of the checkout's
    sources, and the wheel that pip builds from that sdist (in an isolated build environment, as ``python -m build``
    does): ``(sdist, wheel)``."""
    source, dist = tmp_path / "source", tmp_path / "dist"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    hook = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    made = run([sys.executable, "-c", hook], cwd=source, timeout=120)
    sdist = dist / made.stdout.strip().splitlines()[-1]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist, sdist],
        cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("lightning_amor-*.whl")
    return sdist, wheel


def remove_in_background(folder: Path) -> None:
    """Delete ``folder`` (a whole environment, about 1 GB) without waiting for the disk: moved aside, then removed by
    a detached ``rm -rf`` (with a time limit)."""
    trash = Path(tempfile.mkdtemp(prefix="lightning-amor-test-trash-"))
    try:
        folder.rename(trash / folder.name)
    except OSError:  # another file system: delete it where it is
        trash = folder
    subprocess.Popen(["timeout", "900", "rm", "-rf", str(trash)], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def installed_files(package: Path) -> set[str]:
    """The files of the installed package, less Python's bytecode caches."""
    return {path.relative_to(package).as_posix() for path in package.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_lists_trains_by_name_and_solves(tmp_path):
    sdist, wheel = build(tmp_path)
    version = lightning_amor.__version__
    assert sdist.name == f"lightning_amor-{version}.tar.gz" and wheel.name.startswith(f"lightning_amor-{version}-")

    # both carry every recipe, the shared base and the cluster launchers
    recipes = shipped_files()
    assert {"_base/trainer.yaml", "cluster/slurm.sbatch", "cluster/torchrun.sh", f"{RECIPE}.yaml"} <= set(recipes)
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {f"recipes/{name}" for name in recipes} <= in_sdist, sorted({f"recipes/{n}" for n in recipes} - in_sdist)
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
        metadata = archive.read(f"lightning_amor-{version}.dist-info/METADATA").decode()
    expected = {f"lightning_amor/recipes/{name}" for name in recipes} | {
        path.relative_to(REPO).as_posix() for package in ("lightning_amor", "datamodules")
        for path in (REPO / package).rglob("*.py")}
    assert expected <= in_wheel, sorted(expected - in_wheel)
    assert f"Version: {version}\n" in metadata and "Provides-Extra: apps" in metadata

    # a fresh environment, the wheel installed (not editable) with the tested versions of its dependencies (by this
    # environment's pip: `venv` installing pip into the new one would take another 10 s)
    venv = tmp_path / "venv"
    try:
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, timeout=120)
        python, command = venv / "bin" / "python", venv / "bin" / "lightning-amor"
        run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile",
             "-c", REPO / "constraints.txt", wheel], cwd=tmp_path, timeout=420)
        (package,) = (venv / "lib").glob("python*/site-packages/lightning_amor")
        before = installed_files(package)

        work = tmp_path / "elsewhere"  # outside the checkout: only the installation can provide the recipes
        work.mkdir()
        assert not work.resolve().is_relative_to(REPO)
        env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "LIGHTNING_AMOR_RECIPES", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")}
        env.update(OMP_NUM_THREADS="1", LIGHTNING_AMOR_CACHE=str(tmp_path / "cache"), COLUMNS="200",
                   PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")

        listing = run([command, "recipes"], cwd=work, env=env, timeout=300).stdout
        assert listing.startswith(f"Recipes in {(package / 'recipes').resolve()} (installed with the package)\n")
        for name in recipes:
            if name.endswith(".yaml") and not name.startswith("_"):
                assert f"$ lightning-amor fit --config {name.removesuffix('.yaml')}\n" in listing, name

        fitted = run([command, "fit", "--config", RECIPE, *TINY, "--data.init_args.cache_dir", tmp_path / "cache"],
                     cwd=work, env=env, timeout=300)
        assert "held-out validation metrics" in fitted.stdout and "val/objective" in fitted.stdout, fitted.stdout
        assert f"note: running the recipe {RECIPE} ({package.resolve() / 'recipes' / RECIPE}.yaml) composed" \
            in fitted.stderr, fitted.stderr[-3000:]
        run_folder = work / "runs" / RECIPE  # the recipe's relative default_root_dir, from the current folder
        checkpoint = run_folder / "checkpoints" / "last.ckpt"
        assert checkpoint.is_file() and list((run_folder / "tensorboard").rglob("events.out.tfevents.*"))
        assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 3
        # nothing was written into the installation (Python's bytecode caches aside)
        assert installed_files(package) == before, sorted(installed_files(package) ^ before)
        assert not list(venv.rglob("runs")) and not list(venv.rglob("*.ckpt"))

        contexts = SphereContexts().sample(8, torch.Generator().manual_seed(3))
        np.save(work / "contexts.npy", contexts.numpy())
        solved = run([command, "solve", "--ckpt", checkpoint, "--contexts", "contexts.npy", "--out", "solutions.csv"],
                     cwd=work, env=env, timeout=300)
        with open(work / "solutions.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 8 and all(row["status"] for row in rows), solved.stdout
        assert all(np.isfinite(float(row[f"y_{j}"])) for row in rows for j in range(3)), rows
    finally:
        remove_in_background(venv)
