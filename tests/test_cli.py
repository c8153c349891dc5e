"""Tests of the ``lightning-amor`` command, run in-process: help, a minimal recipe, and clear errors for bad recipes.

Every file in ``tests/bad_recipes/`` is a small recipe with one defect; its ``# expect:`` comment lines give the
fragments that the error message must contain.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from lightning_amor.cli import main
from lightning_amor.objective import Objective
from tests.test_recipes import recipe_args

REPO = Path(__file__).resolve().parents[1]
SHIPPED_RECIPE = REPO / "recipes" / "sphere" / "full_objective.yaml"
BAD_RECIPES = sorted((Path(__file__).parent / "bad_recipes").glob("*.yaml"))

MINIMAL_RECIPE = """\
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: lightning_amor.AmortizedModule
  init_args:
    objective:
      class_path: lightning_amor.apps.sphere.SphereObjective
      init_args:
        grid_points: 64
        starts: 1
    amortizer:
      class_path: lightning_amor.FullyAmortized
      init_args:
        net:
          class_path: lightning_amor.MLP
          init_args:
            in_features: 16
            out_features: 3
            hidden: [8]
data:
  class_path: datamodules.SphereContexts
  init_args:
    batch_size: 8
    batches_per_epoch: 2
    val_size: 8
    test_size: 8
    cache_dir: none
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run every command inside ``tmp_path`` with a bare ``sys.argv``, as the console script would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])


def run_expecting_failure(args: list[str], capsys) -> str:
    """Run the CLI, which must fail; return the error text (stderr of a parser exit, or the exception)."""
    with pytest.raises((SystemExit, Exception)) as info:
        main(args=args)
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None), "the command exited successfully"
        return capsys.readouterr().err
    return str(info.value)


def expected_fragments(recipe: Path) -> list[str]:
    lines = recipe.read_text().splitlines()
    fragments = [line.split("# expect:", 1)[1].strip() for line in lines if line.startswith("# expect:")]
    assert fragments, f"{recipe.name} has no '# expect:' line"
    return fragments


# --- help ---------------------------------------------------------------------------------------------


def test_entry_point_is_the_cli_main():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "lightning-amor"]
    assert script.value == "lightning_amor.cli:main"
    assert script.load() is main


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--help"], ["usage: lightning-amor", "fit", "validate", "test", "predict"]),
        (["fit", "--help"], ["--trainer.max_steps", "--model", "--data", "--ckpt_path"]),
        (["fit", "--data.help", "SphereContexts"], ["--data.batch_size", "--data.train_size", "--data.cache_dir"]),
        (["fit", "--model.help", "AmortizedModule"], ["--model.objective", "--model.amortizer", "--model.nonfinite"]),
    ],
    ids=["top", "fit", "data", "model"],
)
def test_help(args, fragments, capsys):
    with pytest.raises(SystemExit) as info:
        main(args=args)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for fragment in fragments:
        assert fragment in out


# --- a minimal valid recipe (the control for the bad ones) --------------------------------------------------


def test_a_minimal_recipe_fits_and_prints_the_held_out_metrics(tmp_path, capsys):
    recipe = tmp_path / "minimal.yaml"
    recipe.write_text(MINIMAL_RECIPE)
    main(args=["fit", "--config", str(recipe), "--trainer.val_check_interval", "2"])
    out = capsys.readouterr().out
    assert "held-out validation metrics" in out
    for key in ("val/objective", "val/gap", "val/distance", "val/inference_ms"):
        assert key in out


def test_print_config_resolves_the_defaults(tmp_path, capsys):
    recipe = tmp_path / "minimal.yaml"
    recipe.write_text(MINIMAL_RECIPE)
    with pytest.raises(SystemExit) as info:
        main(args=["fit", "--config", str(recipe), "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["nonfinite"] == "raise"
    assert config["data"]["init_args"]["seed"] == 0
    assert config["trainer"]["max_steps"] == 2


# --- bad recipes --------------------------------------------------------------------------------------


def test_the_bad_recipe_corpus_is_found():
    assert len(BAD_RECIPES) >= 10


@pytest.mark.parametrize("recipe", BAD_RECIPES, ids=[p.stem for p in BAD_RECIPES])
def test_a_bad_recipe_fails_with_a_clear_message(recipe, capsys):
    message = run_expecting_failure(["fit", "--config", str(recipe)], capsys)
    for fragment in expected_fragments(recipe):
        assert fragment in message, f"{recipe.name}: {fragment!r} is not in the error:\n{message}"


def test_an_unknown_key_in_a_shipped_recipe_is_named(tmp_path, capsys):
    config = yaml.safe_load(SHIPPED_RECIPE.read_text())
    config["data"]["init_args"]["batch_sizee"] = 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    message = run_expecting_failure(["fit", "--config", str(bad)], capsys)
    assert "'batch_sizee' is not accepted" in message


def test_a_wrong_type_on_the_command_line_is_named(capsys):
    message = run_expecting_failure(["fit", *recipe_args(SHIPPED_RECIPE), "--trainer.max_steps", "many"], capsys)
    assert 'Parser key "trainer.max_steps"' in message and "many" in message


def test_a_missing_recipe_file_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_recipe.yaml"
    message = run_expecting_failure(["fit", "--config", str(missing)], capsys)
    assert "no_such_recipe.yaml" in message


def test_last_checkpoint_holds_the_final_weights_between_periodic_saves(tmp_path):
    """A shipped recipe saves last.ckpt every 100 steps; a run of 7 steps still ends with its final weights there."""
    import torch

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sphere" / "full_objective.yaml"
    main(args=[
        "fit", *recipe_args(recipe), "--trainer.max_steps", "7", "--trainer.val_check_interval", "7",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--data.init_args.val_size", "16", "--data.init_args.test_size", "16",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ])
    last = tmp_path / "runs" / "sphere" / "full_objective" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 7


def test_the_default_progress_bar_redraws_every_few_steps():
    from datamodules import ContextDataModule
    from lightning_amor import AmortizedModule
    from lightning_amor.cli import PROGRESS_REFRESH, AmortCLI

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sphere" / "full_objective.yaml"
    cli = AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   run=False, args=recipe_args(recipe))
    assert cli.trainer.progress_bar_callback.refresh_rate == PROGRESS_REFRESH > 1


def test_a_single_callback_on_the_command_line_keeps_the_default_progress_bar():
    from datamodules import ContextDataModule
    from lightning_amor import AmortizedModule
    from lightning_amor.cli import AmortCLI

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sphere" / "full_objective.yaml"
    cli = AmortCLI(AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   run=False, args=[*recipe_args(recipe), "--trainer.callbacks",
                                    "pytorch_lightning.callbacks.LearningRateMonitor"])
    names = {type(callback).__name__ for callback in cli.trainer.callbacks}
    assert {"LearningRateMonitor", "TQDMProgressBar"} <= names


def test_a_recipe_run_without_its_shared_base_is_refused(capsys):
    recipe = REPO / "recipes" / "sphere" / "full_objective.yaml"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe), "--trainer.max_steps", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "recipes/_base/trainer.yaml" in err and "full_objective.yaml" in err and "not given before it" in err


NAN_RECIPE = """
trainer:
  max_steps: 4
  enable_progress_bar: false
  enable_checkpointing: false
  logger: false
model:
  class_path: lightning_amor.AmortizedModule
  init_args:
    objective: {class_path: tests.test_cache_safety.Shifted, init_args: {shift: SHIFT}}
    amortizer:
      class_path: lightning_amor.FullyAmortized
      init_args: {net: {class_path: lightning_amor.MLP, init_args: {in_features: 2, out_features: 2, hidden: [4]}}}
data:
  class_path: tests.test_cache_safety.Gaussian
  init_args: {nan_rows: NAN_ROWS, batch_size: 4, batches_per_epoch: 2, val_size: 8, test_size: 8, cache_dir: none}
"""


@pytest.mark.parametrize(("shift", "nan_rows", "status", "words"), [
    ("0.0", "[1]", 2, "NaN or infinite"),  # the data is at fault: bad input, named at the source
    ("0.0", "[]", 0, None),
], ids=["nan-data", "clean"])
def test_nonfinite_numbers_end_fit_with_one_line_and_a_status(tmp_path, monkeypatch, capsys, shift, nan_rows, status,
                                                                words):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(NAN_RECIPE.replace("SHIFT", shift).replace("NAN_ROWS", nan_rows))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_AMOR_DEBUG", raising=False)
    if status == 0:
        main(["fit", "--config", str(recipe)])
        return
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe)])
    assert info.value.code == status
    err = capsys.readouterr().err
    assert "lightning-amor fit: error:" in err and words in err and "Traceback" not in err


def test_a_nonfinite_loss_ends_fit_with_status_3(tmp_path, monkeypatch, capsys):
    from lightning_amor.exit_codes import NONFINITE

    recipe = tmp_path / "recipe.yaml"
    # inf in the objective's buffer: every loss is infinite, and the data itself is fine
    recipe.write_text(NAN_RECIPE.replace("SHIFT", "0.0").replace("NAN_ROWS", "[]").replace(
        "tests.test_cache_safety.Shifted", "tests.test_cli.InfiniteObjective").replace(", init_args: {shift: 0.0}", ""))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_AMOR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe)])
    assert info.value.code == NONFINITE == 3
    err = capsys.readouterr().err
    assert "non-finite loss at global step 0" in err and "Traceback" not in err


class InfiniteObjective(Objective):
    """f = +inf everywhere (a broken objective)."""

    dim = 2

    def value(self, y, x):
        return (y * 0.0).sum(-1) + float("inf")
