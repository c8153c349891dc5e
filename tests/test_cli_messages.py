"""One line, not a traceback, for bad configs and bad checkpoint arguments (run in-process).

Each case checks the exit status, that stderr holds exactly one ``lightning-amor SUBCOMMAND: error:`` line naming
the file or option and the fix, and that no traceback or usage dump is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_amor.cli import main
from lightning_amor.exit_codes import BAD_INPUT
from lightning_amor.loading import check_checkpoint_file, load_datamodule, load_module
from lightning_amor.module import BadCheckpointError
from tests.test_cli import MINIMAL_RECIPE


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run every command inside ``tmp_path`` with a bare ``sys.argv``, as the console script would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])


def one_line_error(args: list[str], capsys, subcommand: str) -> str:
    """Run the command, which must exit with status 2; return its single ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        main(args=args)
    err = capsys.readouterr().err
    assert info.value.code == BAD_INPUT, err
    assert "Traceback" not in err and "usage:" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"lightning-amor {subcommand}: error: "), err
    assert not err.rstrip().splitlines()[-1].startswith(" "), err  # nothing follows the line
    return errors[0]


def recipe(tmp_path: Path, text: str = MINIMAL_RECIPE, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- config files ---------------------------------------------------------------------------------------------


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = recipe(tmp_path, "trainer:\n  max_steps: [1\nmodel: x\n", "broken.yaml")
    line = one_line_error(["fit", "--config", str(bad)], capsys, "fit")
    assert f"{bad}, line 3" in line and "expected ',' or ']', but got ':'" in line
    assert "started at line 2" in line and "<unicode string>" not in line


def test_a_yaml_syntax_error_in_a_file_given_for_one_option_is_named(tmp_path, capsys):
    good, bad = recipe(tmp_path), recipe(tmp_path, "class_path: [lightning_amor.MLP\n", "part.yaml")
    line = one_line_error(["fit", "--config", str(good), "--model.init_args.amortizer", str(bad)], capsys, "fit")
    assert f"{bad}, line 2" in line


def test_an_empty_config_file_is_named_as_empty(tmp_path, capsys):
    empty = recipe(tmp_path, "# nothing here yet\n\n", "empty.yaml")
    line = one_line_error(["fit", "--config", str(empty)], capsys, "fit")
    assert f"the config file {empty} is empty" in line and "Unexpected config" not in line


def test_a_config_file_that_is_no_mapping_is_named(tmp_path, capsys):
    listed = recipe(tmp_path, "- trainer\n- model\n", "listed.yaml")
    line = one_line_error(["fit", "--config", str(listed)], capsys, "fit")
    assert f"the config file {listed} holds a list" in line and "trainer:" in line


# --- misspelt class paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong,right", [
    ("lightning_amor.FullyAmortised", "lightning_amor.FullyAmortized"),
    ("torch.optim.Adamm", "torch.optim.Adam"),
    ("lightning_amr.FullyAmortized", "lightning_amor.FullyAmortized"),
    ("lightning_amor.nest.MLP", "lightning_amor.nets.MLP"),
    ("FullyAmortised", "lightning_amor.FullyAmortized"),
])
def test_a_misspelt_class_path_gets_a_suggestion(wrong, right):
    from lightning_amor.config_errors import suggest_class_path

    assert suggest_class_path(wrong) == right


def test_a_class_path_without_a_near_name_gets_no_suggestion():
    from lightning_amor.config_errors import suggest_class_path

    assert suggest_class_path("lightning_amor.Zzzzqqq") is None


def test_a_misspelt_class_path_in_a_recipe_names_the_file_line_and_the_right_name(tmp_path, capsys):
    typo = recipe(tmp_path, MINIMAL_RECIPE.replace("lightning_amor.FullyAmortized", "lightning_amor.FullyAmortised"))
    line = one_line_error(["fit", "--config", str(typo)], capsys, "fit")
    number = MINIMAL_RECIPE.splitlines().index("      class_path: lightning_amor.FullyAmortized") + 1
    assert f"{typo}, line {number}: " in line and "has no attribute 'FullyAmortised'" in line
    assert line.endswith("did you mean lightning_amor.FullyAmortized?")


def test_a_misspelt_class_path_on_the_command_line_names_the_option(tmp_path, capsys):
    args = ["fit", "--config", str(recipe(tmp_path)), "--model.init_args.optimizer", "torch.optim.Adamm"]
    line = one_line_error(args, capsys, "fit")
    assert "--model.init_args.optimizer torch.optim.Adamm: " in line
    assert line.endswith("did you mean torch.optim.Adam?")


def test_other_parse_errors_keep_their_message_without_the_usage_dump(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(args=["fit", "--config", str(recipe(tmp_path)), "--trainer.max_steps", "many"])
    err = capsys.readouterr().err
    assert info.value.code == BAD_INPUT and "usage:" not in err
    assert err.startswith('lightning-amor fit: error: Parser key "trainer.max_steps"') and "many" in err
    assert "lightning-amor fit --help" in err


# --- range errors raised by the constructors ------------------------------------------------------------------


def test_a_value_a_constructor_refuses_is_one_line_keeping_its_message(tmp_path, capsys):
    args = ["fit", "--config", str(recipe(tmp_path)), "--seed_everything", "0", "--data.init_args.batch_size", "0"]
    line = one_line_error(args, capsys, "fit")
    assert "SphereContexts: batch_size must be at least 1, got 0" in line
    assert "(in data: datamodules.SphereContexts)" in line and "Does not validate" not in line


# --- --ckpt of solve and export -------------------------------------------------------------------------------


@pytest.mark.parametrize("subcommand", ["solve", "export"])
def test_ckpt_last_in_solve_and_export_is_refused_with_the_file_to_pass(subcommand, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 16), dtype=np.float32))
    extra = ["--contexts", "x.npy"] if subcommand == "solve" else ["--out", "exported"]
    line = one_line_error([subcommand, "--ckpt", "last", *extra], capsys, subcommand)
    assert f"lightning-amor {subcommand}: error: --ckpt last: " in line and "--ckpt_path" in line
    assert "runs/<app>/<recipe>/checkpoints/last.ckpt" in line and "FileNotFoundError" not in line


def test_ckpt_last_suggests_the_newest_last_checkpoint_under_runs(tmp_path, capsys):
    older = tmp_path / "runs" / "sphere" / "a" / "checkpoints" / "last.ckpt"
    newer = tmp_path / "runs" / "vae" / "b" / "checkpoints" / "last-v1.ckpt"
    for path, when in ((older, 1_000_000), (newer, 2_000_000)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        __import__("os").utime(path, (when, when))
    line = one_line_error(["export", "--ckpt", "last", "--out", "exported"], capsys, "export")
    assert "pass a file such as runs/vae/b/checkpoints/last-v1.ckpt" in line


def test_a_missing_ckpt_in_solve_names_its_own_option(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 16), dtype=np.float32))
    line = one_line_error(["solve", "--ckpt", "missing.ckpt", "--contexts", "x.npy"], capsys, "solve")
    assert "--ckpt missing.ckpt does not exist" in line and "--ckpt_path" not in line


def test_a_missing_ckpt_path_in_fit_still_names_its_option(tmp_path, capsys):
    line = one_line_error(["fit", "--config", str(recipe(tmp_path)), "--ckpt_path", "gone.ckpt"], capsys, "fit")
    assert "--ckpt_path gone.ckpt does not exist" in line and "`last`" in line


# --- Python callers get Python terms --------------------------------------------------------------------------


@pytest.mark.parametrize("load", [load_module, load_datamodule, check_checkpoint_file])
def test_python_callers_are_answered_in_python_terms(load, tmp_path):
    for path in ("last", tmp_path / "missing.ckpt"):
        with pytest.raises(BadCheckpointError) as info:
            load(path)
        message = str(info.value)
        assert f"the checkpoint {path} does not exist; pass the path of a .ckpt file" in message, message
        assert "--ckpt" not in message and "`last`" not in message, message


@pytest.mark.parametrize(("module", "extra"), [("osqp", "apps"), ("ot", "apps"), ("gymnasium", "apps"),
                                               ("onnxruntime", "export")])
def test_a_class_whose_optional_dependency_is_missing_names_the_extra_to_install(module, extra):
    from lightning_amor.config_errors import explain_parse_error

    message = (f"Problem with given class_path 'lightning_amor.apps.not_installed_here.Thing':\n"
               f"    No module named '{module}'\n")
    error = str(explain_parse_error(message, [], "lightning-amor fit"))
    assert f'pip install "lightning-amor[{extra}]"' in error, error
    assert "\n" not in error
    other = str(explain_parse_error(message.replace(f"'{module}'", "'unheard_of'"), [], "lightning-amor fit"))
    assert "lightning-amor[" not in other, other
