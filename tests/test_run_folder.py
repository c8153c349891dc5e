"""The run folder: a logger's ``save_dir`` and a ModelCheckpoint's ``dirpath`` left unset follow
``trainer.default_root_dir``; values that are given are kept."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from datamodules.context import ContextDataModule
from lightning_amor import AmortizedModule
from lightning_amor.cli import AmortCLI
from lightning_amor.run_folder import fill_checkpoint_dirs, logger_save_dir
from tests.test_recipes import recipe_args

REPO = Path(__file__).resolve().parents[1]
TENSORBOARD = "pytorch_lightning.loggers.TensorBoardLogger"
CHECKPOINT = "pytorch_lightning.callbacks.ModelCheckpoint"


def item(class_path: str, **init_args) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def test_a_logger_without_save_dir_logs_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert logger_save_dir("runs/a", item(TENSORBOARD, save_dir=None)) == "runs/a"
    assert logger_save_dir(None, item(TENSORBOARD, save_dir=None)) == os.getcwd()  # Lightning's default root
    assert logger_save_dir("runs/a", item(TENSORBOARD, save_dir="elsewhere")) == "elsewhere"
    assert logger_save_dir("runs/a", False) == "runs/a"  # no logger: nothing to set


def test_several_loggers_share_one_save_dir_or_fail_clearly():
    same = [item(TENSORBOARD, save_dir=None), item("pytorch_lightning.loggers.CSVLogger", save_dir="runs/a")]
    assert logger_save_dir("runs/a", same) == "runs/a"
    with pytest.raises(ValueError, match=r"the loggers' save_dir differ \(\['logs', 'runs/a'\]\).*leave them unset"):
        logger_save_dir("runs/a", [item(TENSORBOARD, save_dir="logs"), item(TENSORBOARD, save_dir=None)])


def test_only_checkpoints_without_dirpath_go_to_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Namespace(default_root_dir="runs/a", callbacks=[
        item(CHECKPOINT, dirpath=None, save_last=True),
        item(CHECKPOINT, dirpath="mine"),
        Namespace(class_path=CHECKPOINT),  # no init_args at all
        item("pytorch_lightning.callbacks.LearningRateMonitor"),
    ])
    fill_checkpoint_dirs(trainer)
    dirpaths = [callback.get("init_args", Namespace()).get("dirpath") for callback in trainer.callbacks]
    assert dirpaths == [os.path.join("runs/a", "checkpoints"), "mine", os.path.join("runs/a", "checkpoints"), None]
    single = Namespace(default_root_dir=None, callbacks=item(CHECKPOINT, dirpath=None))
    fill_checkpoint_dirs(single)
    assert single.callbacks.init_args.dirpath == os.path.join(os.getcwd(), "checkpoints")


def test_a_recipe_keeps_the_paths_given_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    recipe = REPO / "recipes" / "sphere" / "full_objective.yaml"
    cli = AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   run=False, args=[*recipe_args(recipe), "--trainer.accelerator", "cpu",
                                    "--trainer.default_root_dir", "moved", "--trainer.logger.init_args.save_dir", "tb"])
    assert Path(cli.trainer.logger.log_dir) == Path("tb") / "tensorboard" / "version_0"
    checkpoints = {Path(c.dirpath) for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"}
    assert checkpoints == {tmp_path.resolve() / "moved" / "checkpoints"}
