"""``lightning-amor recipes``: every shipped recipe listed under its application, with a description and commands
that run; clear errors for a missing folder or an unknown application; recipes run by name (``--config
sphere/semi_sum_regression``, composed with their shared base), a local file winning over a shipped one; ``--copy``."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from lightning_amor import recipe_files
from lightning_amor.cli import main
from lightning_amor.commands.recipes import (
    NO_DESCRIPTION,
    RECIPES_ENV,
    default_recipes_dir,
    read_recipe,
    recipe_configs,
)
from lightning_amor.recipe_files import UnknownRecipeError, expand_recipe_names, find_named, resolve_config

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
    unfit = {path.relative_to(REPO).as_posix(): read_recipe(path).summary for path in SHIPPED
             if not 10 < len(read_recipe(path).summary) <= 120 or read_recipe(path).summary == NO_DESCRIPTION}
    assert not unfit, f"a recipe's summary (its comment's first clause) must be 11 to 120 characters long: {unfit}"
    for path in SHIPPED:
        recipe = read_recipe(path)
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
    base.unlink()  # then the shipped base of that name is composed, as for a recipe copied out alone
    assert recipe_configs(recipe) == [BASE, recipe]
    recipe.write_text(recipe.read_text().replace("recipes/_base/", "recipes/_nothing/"))
    with pytest.raises(FileNotFoundError, match=r"--config recipes/_nothing/trainer.yaml .*found in no folder above"):
        recipe_configs(recipe)
    with pytest.raises(SystemExit) as info:  # the listing names the recipe and the file it misses
        listing(["--dir", str(tmp_path / "recipes")], capsys)
    assert info.value.code == 2 and f"the recipe {recipe} is run with --config" in capsys.readouterr().err


def test_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["recipes", "--dir", str(tmp_path / "nowhere")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"no recipes folder at {tmp_path / 'nowhere'}" in err and "--dir" in err and "ship inside the package" in err


def test_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["recipes", "--dir", str(tmp_path)])
    assert info.value.code == 2
    assert "holds no *.yaml recipe" in capsys.readouterr().err


def test_an_unknown_application_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["recipes", "spheres"])
    assert info.value.code == 2
    applications = sorted({path.parent.name for path in SHIPPED})
    assert f"unknown application(s) ['spheres']; choose among {applications}" in capsys.readouterr().err


# --- recipes by name (lightning_amor/recipe_files.py) -------------------------------------------------------------

SEMI_SUM = REPO / "recipes" / "sphere" / "semi_sum_regression.yaml"


@pytest.mark.parametrize("written", [
    "sphere/semi_sum_regression", "sphere/semi_sum_regression.yaml", "recipes/sphere/semi_sum_regression.yaml",
])
def test_a_recipe_by_name_is_composed_with_its_shared_base(written, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: the name is looked up in the recipes folder
    argv, notes = expand_recipe_names(["fit", "--config", written, "--trainer.max_steps", "3"])
    assert argv == ["fit", "--config", str(BASE), "--config", str(SEMI_SUM), "--trainer.max_steps", "3"]
    (note,) = notes
    assert note.startswith(f"lightning-amor: note: running the recipe {written} ({SEMI_SUM}) composed with its "
                           "shared settings") and note.endswith("--config _base/trainer before it")


def test_a_base_given_by_name_before_the_recipe_is_not_composed_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, notes = expand_recipe_names(["test", "--config=_base/trainer", "-c", "sphere/semi_sum_regression.yaml"])
    assert argv == ["test", "--config", str(BASE), "-c", str(SEMI_SUM)] and notes == []
    for base in (str(BASE), "recipes/_base/trainer.yaml"):  # the second as recipes/cluster/slurm.sbatch gives it
        argv, notes = expand_recipe_names(["fit", "--config", base, "--config", "sphere/semi_sum_regression"])
        assert argv == ["fit", "--config", str(BASE), "--config", str(SEMI_SUM)] and notes == []


def test_files_and_inline_yaml_are_used_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sphere").mkdir()
    local = tmp_path / "sphere" / "semi_sum_regression.yaml"
    local.write_text("trainer: {max_steps: 5}\n")
    given = ["fit", "--config", "sphere/semi_sum_regression.yaml", "--config", "{trainer: {max_steps: 3}}",
             "--model", "x.yaml", "--", "--config", "nowhere"]
    assert expand_recipe_names(given) == (given, [])
    # a local file of the same name wins over the shipped recipe, with or without .yaml; it runs alone (no comment)
    assert expand_recipe_names(["fit", "--config", "sphere/semi_sum_regression"]) == (
        ["fit", "--config", str(local)], [])
    assert resolve_config("sphere/semi_sum_regression") == Path("sphere/semi_sum_regression.yaml")


def test_names_stay_inside_the_recipes_folder():
    assert find_named("sphere/full_objective") == REPO / "recipes" / "sphere" / "full_objective.yaml"
    assert find_named("../pyproject.toml") is None and find_named("recipes/../../pyproject.toml") is None
    assert find_named(str(SEMI_SUM)) is None, "an absolute path is no name"
    assert find_named("cluster/slurm.sbatch") == REPO / "recipes" / "cluster" / "slurm.sbatch"


@pytest.mark.parametrize(("written", "suggested"), [
    ("sphere/semi_sum_regresion", "did you mean sphere/semi_sum_regression"),
    ("semi_sum_regression", "did you mean sphere/semi_sum_regression"),
    ("missing.yaml", "(`lightning-amor recipes` lists the shipped recipes and their names)"),
])
def test_an_unknown_name_is_one_line_with_the_closest_names(written, suggested, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownRecipeError, match=re.escape(suggested)):
        resolve_config(written)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", written])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lightning-amor fit: error: the recipe {written} does not exist: no such file here, "
                           f"and no shipped recipe of that name in {REPO / 'recipes'}") and suggested in line, line


def test_fit_by_name_from_another_folder_resolves_the_composed_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "sphere/semi_sum_regression", "--print_config"])
    assert info.value.code in (0, None)
    captured = capsys.readouterr()
    config = yaml.safe_load(captured.out)
    assert config["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger"), "the base was not composed"
    assert config["trainer"]["default_root_dir"] == "runs/sphere/semi_sum_regression"  # relative: the current folder
    assert "note: running the recipe sphere/semi_sum_regression" in captured.err


def test_the_listing_of_an_installed_package_names_the_recipes(monkeypatch, capsys):
    # as in a wheel install, where the recipes folder is lightning_amor/recipes/
    monkeypatch.setattr(recipe_files, "PACKAGED_RECIPES", (REPO / "recipes").resolve())
    out = listing([], capsys)
    assert out.startswith(f"Recipes in {REPO / 'recipes'} (installed with the package)\n")
    for path in SHIPPED:
        assert f"$ lightning-amor fit --config {path.parent.name}/{path.stem}\n" in out, path
    assert "$ lightning-amor test --config vae/vae_mnist --ckpt_path runs/vae/vae_mnist/checkpoints/last.ckpt" in out
    assert "_base" not in out and "recipes/" not in out.split("Cluster launchers")[0]
    assert "run a recipe by name (`--config sphere/semi_sum_regression`" in out
    assert "--config /" not in out


def test_copy_writes_a_recipe_whose_comment_runs_the_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["recipes", "--copy", "sphere/semi_sum_regression", "mine.yaml"])
    out = capsys.readouterr().out
    copy = tmp_path / "mine.yaml"
    assert out == (f"wrote mine.yaml (a copy of sphere/semi_sum_regression from {REPO / 'recipes'}); run it with\n"
                   "  lightning-amor fit --config _base/trainer --config mine.yaml\n")
    shipped = SEMI_SUM.read_text()
    assert copy.read_text() == shipped.replace(
        "--config recipes/_base/trainer.yaml --config recipes/sphere/semi_sum_regression.yaml",
        "--config _base/trainer --config mine.yaml")
    assert recipe_configs(copy) == [BASE, copy]  # the shipped base, found by name

    # the command in the copy's comment runs it (here: parses it)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "_base/trainer", "--config", "mine.yaml", "--print_config"])
    assert info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    # alone, the copy is refused with the command that runs it
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "mine.yaml"])
    assert info.value.code == 2 and f"--config {BASE} --config mine.yaml" in capsys.readouterr().err


def test_copy_refuses_to_overwrite_without_force_and_copies_into_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("mine\n")
    with pytest.raises(SystemExit) as info:
        main(["recipes", "--copy", "sphere/full_objective", "mine.yaml"])
    assert info.value.code == 2 and "mine.yaml exists already; pass --force" in capsys.readouterr().err
    assert (tmp_path / "mine.yaml").read_text() == "mine\n"
    shipped = (REPO / "recipes" / "sphere" / "full_objective.yaml").read_text()
    with pytest.raises(SystemExit) as info:  # never onto the shipped file, even with --force
        main(["recipes", "--copy", "sphere/full_objective", str(REPO / "recipes" / "sphere"), "--force"])
    assert info.value.code == 2 and "(it is the shipped file itself)" in capsys.readouterr().err
    assert (REPO / "recipes" / "sphere" / "full_objective.yaml").read_text() == shipped
    main(["recipes", "--copy", "sphere/full_objective.yaml", "mine.yaml", "--force"])
    assert "--config _base/trainer --config mine.yaml" in (tmp_path / "mine.yaml").read_text()

    (tmp_path / "launchers").mkdir()
    main(["recipes", "--copy", "cluster/slurm.sbatch", "launchers"])
    copied = tmp_path / "launchers" / "slurm.sbatch"
    shipped = REPO / "recipes" / "cluster" / "slurm.sbatch"
    assert copied.read_bytes() == shipped.read_bytes() and copied.stat().st_mode == shipped.stat().st_mode
    main(["recipes", "--copy", "_base/trainer", "my/base.yaml"])  # the shared settings too, into a new folder
    assert (tmp_path / "my" / "base.yaml").read_text() == BASE.read_text()
    capsys.readouterr()

    with pytest.raises(SystemExit) as info:
        main(["recipes", "--copy", "cluster/slurm", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "the recipe cluster/slurm does not exist" in err and "did you mean cluster/slurm.sbatch" in err


def test_evaluate_takes_recipes_by_name_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--config", "sphere/semi_sum_regresion", "--ckpt", "model.ckpt"])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lightning-amor evaluate: error: the recipe sphere/semi_sum_regresion does not exist")
    assert "did you mean sphere/semi_sum_regression" in line
