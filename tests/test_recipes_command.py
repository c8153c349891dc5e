"""``lightning-amor recipes``: every shipped recipe listed under its application, with a description and commands
that run; clear errors for a missing folder or an unknown application."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from lightning_amor.cli import main
from lightning_amor.commands.recipes import (
    NO_DESCRIPTION,
    RECIPES_ENV,
    default_recipes_dir,
    read_recipe,
    recipe_configs,
)

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "recipes" / "_base" / "trainer.yaml"
SHIPPED = sorted(path for path in (REPO / "recipes").rglob("*.yaml") if "_base" not in path.parts)


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    monkeypatch.setattr(sys, "path", list(sys.path))


def listing(args: list[str], capsys) -> str:
    main(["recipes", *args])
    return capsys.readouterr().out


def test_the_default_folder_is_the_checkouts():
    assert default_recipes_dir() == REPO / "recipes"
    assert len(SHIPPED) >= 11


def test_every_shipped_recipe_is_listed_under_its_application_with_a_description(capsys):
    out = listing([], capsys)
    headers = re.findall(r"^(\w+): (.+)$", out, flags=re.M)
    assert [name for name, _ in headers] == sorted({path.parent.name for path in SHIPPED})
    assert all(about.strip() for _, about in headers), headers  # the application module's docstring
    for path in SHIPPED:
        recipe = read_recipe(path)
        assert recipe.summary != NO_DESCRIPTION and 10 < len(recipe.summary) <= 120, (path, recipe.summary)
        section = out.split(f"{path.parent.name}: ", 1)[1].split("\n\n", 1)[0]  # its application's block
        assert re.search(rf"^  {path.stem} +{re.escape(recipe.summary)}$", section, flags=re.M), path
        relative = path.relative_to(REPO).as_posix()
        assert f"$ lightning-amor fit --config recipes/_base/trainer.yaml --config {relative}\n" in out, relative
        assert recipe_configs(path) == [BASE, path]
    assert "(the best sphere recipe; the default)" in out
    assert "_base" not in re.findall(r"^  (\S+)", out, flags=re.M), "the shared settings are listed as a recipe"


def test_the_listed_commands_parse(capsys):
    commands = re.findall(r"\$ (lightning-amor .+)$", listing(["sphere"], capsys), flags=re.M)
    assert len(commands) == len([p for p in SHIPPED if p.parent.name == "sphere"])
    with pytest.raises(SystemExit) as info:
        main(shlex.split(commands[0])[1:] + ["--print_config"])
    assert info.value.code in (0, None)
    assert "class_path: lightning_amor.AmortizedModule" in capsys.readouterr().out


def test_the_recipes_usage_lines_are_listed_with_their_paths(capsys):
    out = listing(["vae"], capsys)
    assert "sphere:" not in out and "vae:" in out
    assert ("$ lightning-amor test --config recipes/_base/trainer.yaml --config recipes/vae/vae_mnist.yaml "
            "--ckpt_path runs/vae/vae_mnist/checkpoints/last.ckpt") in out


def test_paths_are_absolute_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = listing(["sphere"], capsys)
    recipe = REPO / "recipes" / "sphere" / "full_objective.yaml"
    assert f"$ lightning-amor fit --config {BASE} --config {recipe}" in out


def test_another_folder_by_option_or_environment(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.yaml").write_text("# My problem: fully amortized. More text.\n#   lightning-amor fit "
                                             "--config recipes/mine/a.yaml\ntrainer: {}\n")
    (tmp_path / "mine" / "b.yaml").write_text("trainer: {}\n")
    out = listing(["--dir", str(tmp_path)], capsys)
    assert re.search(r"^  a +My problem$", out, flags=re.M), out
    assert f"$ lightning-amor fit --config {tmp_path / 'mine' / 'a.yaml'}" in out
    assert re.search(rf"^  b +{re.escape(NO_DESCRIPTION)}$", out, flags=re.M), out
    monkeypatch.setenv(RECIPES_ENV, str(tmp_path))
    assert listing([], capsys) == out


def test_a_copied_recipes_folder_composes_its_own_base(tmp_path, capsys):
    (tmp_path / "recipes" / "_base").mkdir(parents=True)
    (tmp_path / "recipes" / "mine").mkdir()
    base = tmp_path / "recipes" / "_base" / "trainer.yaml"
    base.write_text("trainer: {max_steps: 5}\n")
    recipe = tmp_path / "recipes" / "mine" / "a.yaml"
    recipe.write_text("# Mine: a test.\n#   lightning-amor fit --config recipes/_base/trainer.yaml --config "
                      "recipes/mine/a.yaml\ntrainer: {}\n")
    assert recipe_configs(recipe) == [base, recipe]
    out = listing(["--dir", str(tmp_path / "recipes")], capsys)
    assert f"$ lightning-amor fit --config {base} --config {recipe}" in out
    assert "_base" not in re.findall(r"^  (\S+)", out, flags=re.M)
    base.unlink()
    with pytest.raises(FileNotFoundError, match=r"--config recipes/_base/trainer.yaml .*found in no folder above"):
        recipe_configs(recipe)
    with pytest.raises(SystemExit) as info:  # the listing names the recipe and the file it misses
        listing(["--dir", str(tmp_path / "recipes")], capsys)
    assert info.value.code == 2 and f"the recipe {recipe} is run with --config" in capsys.readouterr().err


def test_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["recipes", "--dir", str(tmp_path / "nowhere")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"no recipes folder at {tmp_path / 'nowhere'}" in err and "pip install -e ." in err and "--dir" in err


def test_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["recipes", "--dir", str(tmp_path)])
    assert info.value.code == 2
    assert "holds no *.yaml recipe" in capsys.readouterr().err


def test_an_unknown_application_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["recipes", "spheres"])
    assert info.value.code == 2
    assert "unknown application(s) ['spheres']; choose among ['sphere', 'vae']" in capsys.readouterr().err
