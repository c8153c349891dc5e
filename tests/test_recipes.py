"""Every recipe under ``recipes/`` runs as a CPU smoke test: ``fit`` for a few steps, then ``test`` from its checkpoint.

Recipes are found by globbing, so a new recipe is covered as soon as it is added. The overrides below shrink
any recipe to a few CPU steps on tiny data and keep every file it writes inside the test's temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.images import MNIST_FILES, write_idx
from lightning_amor import AmortizedModule
from lightning_amor.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))

# float16 needs a GPU; on CPU the smoke test runs such recipes in bfloat16
CPU_PRECISION = {"16": "bf16-mixed", "16-mixed": "bf16-mixed", "16-true": "bf16-true"}


def smoke_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    """Command-line overrides that shrink ``recipe`` to a CPU smoke test writing only under ``tmp_path``."""
    config = yaml.safe_load(recipe.read_text())
    trainer, data = config.get("trainer") or {}, (config.get("data") or {}).get("init_args") or {}
    model = (config.get("model") or {}).get("init_args") or {}
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
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "class_path" in logger:
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    if str(trainer.get("precision")) in CPU_PRECISION:
        args += ["--trainer.precision", CPU_PRECISION[str(trainer["precision"])]]
    return args


def tiny_mnist(folder: Path) -> Path:
    """MNIST-shaped IDX files (80 training and 40 test images of random pixels) in ``folder``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 80), ("test", 40)):
        write_idx(folder / f"{MNIST_FILES[split]}.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    return folder


def test_recipes_are_found():
    assert REPO / "recipes" / "sphere" / "full_objective.yaml" in RECIPES, "the glob misses the shipped recipes"


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_recipe_fits_and_tests_on_cpu(recipe, tmp_path, monkeypatch, capsys):
    # relative paths in a recipe (runs/...) land in tmp_path too
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    overrides = smoke_overrides(recipe, tmp_path)

    main(args=[
        "fit", "--config", str(recipe), *overrides, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
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

    main(args=["test", "--config", str(recipe), *overrides, "--ckpt_path", str(checkpoint)])
    out = capsys.readouterr().out
    for key in ("test/objective", "test/gap", "test/distance"):
        assert key in out, out
