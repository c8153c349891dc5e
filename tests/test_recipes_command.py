"""``lightning-amor recipes``: every shipped recipe listed under its application, with a description and commands
that run; clear errors for a missing folder or an unknown application."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from lightning_amor.cli import main
from lightning_amor.commands.recipes import NO_DESCRIPTION, RECIPES_ENV, default_recipes_dir, read_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


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
        assert f"$ lightning-amor fit --config {relative}" in out, relative
    assert "(the best sphere recipe; the default)" in out


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
    assert ("$ lightning-amor test --config recipes/vae/vae_mnist.yaml --ckpt_path "
            "runs/vae/vae_mnist/checkpoints/last.ckpt") in out


def test_paths_are_absolute_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = listing(["sphere"], capsys)
    assert f"$ lightning-amor fit --config {REPO / 'recipes' / 'sphere' / 'full_objective.yaml'}" in out


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
