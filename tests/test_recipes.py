"""Every recipe under ``recipes/`` runs as a CPU smoke test: ``fit`` for a few steps, then ``test`` from its checkpoint.

Recipes are found by globbing, so a new recipe is covered as soon as it is added. Each runs as its comment says,
composed with the shared trainer settings (``--config recipes/_base/trainer.yaml --config RECIPE``: use
:func:`recipe_args`), and the composition keeps the base's checkpoints and logger next to the recipe's own figure
callbacks, in the run folder layout ``runs/<application>/<recipe>/{tensorboard,checkpoints}``. The overrides below
shrink any recipe to a few CPU steps on tiny data and keep every file it writes inside the test's temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.context import ContextDataModule
from datamodules.images import MNIST_FILES, write_idx
from lightning_amor import AmortizedModule
from lightning_amor.cli import AmortCLI, main
from lightning_amor.commands.recipes import find_recipes, recipe_configs

REPO = Path(__file__).resolve().parents[1]
RECIPES = [path for paths in find_recipes(REPO / "recipes").values() for path in paths]
BASE = REPO / "recipes" / "_base" / "trainer.yaml"

# float16 needs a GPU; on CPU the smoke test runs such recipes in bfloat16
CPU_PRECISION = {"16": "bf16-mixed", "16-mixed": "bf16-mixed", "16-true": "bf16-true"}

SMOKE_EPSILON = 0.1
"""The smallest ``epsilon`` (smoothing of the objective, e.g. entropic OT) a smoke test runs at."""


def recipe_args(recipe: Path) -> list[str]:
    """The ``--config`` arguments that run ``recipe``, as its comment's command gives them: the shared trainer
    settings first (``--config recipes/_base/trainer.yaml``), then ``--config recipe``; absolute paths."""
    return [arg for config in recipe_configs(recipe) for arg in ("--config", str(config.resolve()))]


def smoke_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    """Command-line overrides that shrink ``recipe`` to a CPU smoke test writing only under ``tmp_path`` (its run
    folder, ``trainer.default_root_dir``, is ``tmp_path/root``: the logs and the checkpoints follow it).

    An objective with a smoothing parameter ``epsilon`` (entropic OT) below :data:`SMOKE_EPSILON` runs at
    :data:`SMOKE_EPSILON`: the iterations of its solvers (oracle, figures, evaluation) grow like 1/ε, and the smoke
    test checks that the recipe runs, not how hard its problem is."""
    config = yaml.safe_load(recipe.read_text())
    trainer, data = config.get("trainer") or {}, (config.get("data") or {}).get("init_args") or {}
    model = (config.get("model") or {}).get("init_args") or {}
    objective = (model.get("objective") or {}).get("init_args") or {}
    args = [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.strategy", "auto", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.default_root_dir", str(tmp_path / "root"),
        "--data.init_args.batch_size", "16", "--data.init_args.val_size", "32", "--data.init_args.test_size", "32",
        "--data.init_args.num_workers", "0", "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ]
    if data.get("train_size") is not None:
        args += ["--data.init_args.train_size", "64"]
    if "root" in data:  # a data set read from a folder (MNIST): point it at tiny generated IDX files
        args += ["--data.init_args.root", str(tiny_mnist(tmp_path / "mnist")), "--data.init_args.download", "false"]
    if "steps" in ((model.get("refine") or {}).get("init_args") or {}):  # the solver that measures the gap
        args += ["--model.init_args.refine.init_args.steps", "5"]
    if str(trainer.get("precision")) in CPU_PRECISION:
        args += ["--trainer.precision", CPU_PRECISION[str(trainer["precision"])]]
    epsilon = objective.get("epsilon")
    if isinstance(epsilon, (int, float)) and epsilon < SMOKE_EPSILON:  # a coarser problem: fewer solver iterations
        args += ["--model.init_args.objective.init_args.epsilon", str(SMOKE_EPSILON)]
    return args


def tiny_mnist(folder: Path) -> Path:
    """MNIST-shaped IDX files (80 training and 40 test images of random pixels, and random labels 0–9 for the
    classifiers) in ``folder``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 80), ("test", 40)):
        write_idx(folder / f"{MNIST_FILES[split]}.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    labels = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
    for split, count in (("train", 80), ("test", 40)):
        write_idx(folder / f"{labels[split]}.gz", rng.integers(0, 10, count, dtype=np.uint8))
    return folder


def test_recipes_are_found():
    assert REPO / "recipes" / "sphere" / "full_objective.yaml" in RECIPES, "the glob misses the shipped recipes"
    assert BASE not in RECIPES, "the shared settings are not a recipe"


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_a_recipe_runs_composed_with_the_shared_trainer_settings(recipe):
    assert recipe_args(recipe) == ["--config", str(BASE), "--config", str(recipe)]
    trainer = yaml.safe_load(recipe.read_text())["trainer"]
    # the shared settings are not repeated: the recipe appends its callbacks and names its run folder once
    assert not {"logger", "callbacks", "accelerator", "devices"} & set(trainer), sorted(trainer)
    assert trainer["default_root_dir"] == f"runs/{recipe.parent.name}/{recipe.stem}"
    assert "ModelCheckpoint" not in recipe.read_text() and "save_dir" not in recipe.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_the_composed_recipe_keeps_the_base_checkpoints_and_its_figures_in_its_run_folder(
    recipe, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    cli = AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   run=False, args=[*recipe_args(recipe), "--trainer.accelerator", "cpu"])
    run = tmp_path.resolve() / "runs" / recipe.parent.name / recipe.stem
    checkpoints = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert [(c.monitor, c.save_last) for c in checkpoints] == [("val/objective", None), (None, True)]
    assert {Path(c.dirpath) for c in checkpoints} == {run / "checkpoints"}
    given = [item["class_path"] for item in yaml.safe_load(recipe.read_text())["trainer"]["callbacks+"]]
    built = [f"{type(c).__module__}.{type(c).__name__}" for c in cli.trainer.callbacks]
    assert given and all(path in built for path in given), (given, built)
    assert Path(cli.trainer.logger.log_dir).resolve() == run / "tensorboard" / "version_0"


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_recipe_fits_and_tests_on_cpu(recipe, tmp_path, monkeypatch, capsys):
    # relative paths in a recipe (runs/...) land in tmp_path too
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    overrides = smoke_overrides(recipe, tmp_path)

    main(args=[
        "fit", *recipe_args(recipe), *overrides, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_checkpointing", "true",
    ])
    out = capsys.readouterr().out
    assert "held-out validation metrics" in out and "val/objective" in out, out

    checkpoints = sorted(tmp_path.rglob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
    assert checkpoints, "fit wrote no checkpoint"
    checkpoint = checkpoints[-1]
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3

    if (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("logger", True) is not False:
        event_files = list(tmp_path.rglob("events.out.tfevents.*"))
        assert event_files, "fit wrote no TensorBoard events"
        events = EventAccumulator(str(event_files[0].parent))
        events.Reload()
        assert "val/objective" in events.Tags()["scalars"]

    # a checkpoint written by the CLI loads without unpickling arbitrary objects and holds the trained weights
    loaded = AmortizedModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert loaded.state_dict().keys() == saved["state_dict"].keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, saved["state_dict"][name], rtol=0, atol=0)

    main(args=["test", *recipe_args(recipe), *overrides, "--ckpt_path", str(checkpoint)])
    out = capsys.readouterr().out
    for key in ("test/objective", "test/gap", "test/distance"):
        assert key in out, out
