"""Packaging: the version bounds cover what is tested, the version lives in one place, every package and the
recipes are built, every third-party import is a declared dependency, and another project's ``datamodules`` package
never silently replaces lightning-amor's (or is silently replaced by it) in one environment. (The wheel itself is
built, installed and run in tests/test_wheel_install.py.)"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import datamodules
import lightning_amor
from lightning_amor.cli import main
from lightning_amor.datamodules_guard import expected_location, other_locations

REPO = Path(__file__).resolve().parents[1]
BOUNDED = ("torch", "pytorch-lightning", "jsonargparse")
"""The libraries whose private symbols lightning-amor uses (tests/test_private_api.py): bounded above."""


PACKAGES = ("lightning_amor", "datamodules")
"""The top-level packages of the distribution."""

IMPORT_EXTRAS = ("apps", "export")
"""The extras whose libraries the package imports (where a recipe or a subcommand needs them)."""


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = pyproject()["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_the_version_lives_in_one_place(capsys):
    config = pyproject()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_amor.__version__"}
    assert version("lightning-amor") == lightning_amor.__version__, "reinstall: pip install -c constraints.txt -e ."
    main(["--version"])
    assert capsys.readouterr().out == f"lightning-amor {lightning_amor.__version__}\n"


def test_every_package_is_built_and_the_recipes_ship_inside_the_package():
    setuptools = pyproject()["tool"]["setuptools"]
    found = {".".join(init.parent.relative_to(REPO).parts) for package in PACKAGES
             for init in (REPO / package).rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"lightning_amor.recipes"}, (
        "list every package (a folder with an __init__.py) in pyproject.toml's [tool.setuptools] packages")
    assert setuptools["package-dir"] == {"lightning_amor.recipes": "recipes"}
    assert setuptools["package-data"]["lightning_amor.recipes"] == ["**/*"]


def test_every_imported_library_is_a_declared_dependency():
    imported: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    imported.setdefault(name.split(".")[0], set()).add(path.relative_to(REPO).as_posix())
    third_party = {name: files for name, files in imported.items()
                   if name not in sys.stdlib_module_names and name not in PACKAGES}
    distributions = packages_distributions()
    declared = {canonicalize_name(name) for extra in (None, *IMPORT_EXTRAS) for name in requirements(extra)}
    undeclared = {name: sorted(files) for name, files in third_party.items()
                  if not {canonicalize_name(dist) for dist in distributions.get(name, [name])} & declared}
    assert not undeclared, (f"imported but not declared in pyproject.toml (dependencies, or the extras "
                            f"{IMPORT_EXTRAS}): {undeclared}")


@pytest.mark.parametrize("name", BOUNDED)
def test_the_libraries_with_private_symbols_are_bounded_to_the_tested_versions(name):
    requirement = requirements()[name]
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier), (
        f"pyproject.toml must bound {name} above (lightning-amor uses its private symbols): {requirement}")
    pinned = next(line.split("==")[1] for line in (REPO / "constraints.txt").read_text().splitlines()
                  if line.split("==")[0].strip().lower() == name)
    for tested in (pinned, version(name)):
        assert requirement.specifier.contains(tested.split("+")[0]), (
            f"{name} {tested} is tested (constraints.txt, this environment) but pyproject.toml allows {requirement}")


def other_datamodules(folder: Path, names: str = "OTHER = 'another project'\n") -> Path:
    """A folder holding another project's package named ``datamodules``; returns the folder."""
    (folder / "datamodules").mkdir(parents=True)
    (folder / "datamodules" / "__init__.py").write_text(names)
    return folder


def test_another_datamodules_first_on_the_path_stops_the_import_with_a_clear_error(tmp_path):
    other = other_datamodules(tmp_path / "other")
    env = {**os.environ, "PYTHONPATH": str(other), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", "import lightning_amor"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "DatamodulesShadowedError: another package named `datamodules`" in run.stderr, run.stderr[-3000:]
    assert str(other / "datamodules") in run.stderr and str(expected_location()) in run.stderr


def test_ours_first_resolves_the_recipes_classes_and_names_the_hidden_package(tmp_path, monkeypatch):
    assert Path(datamodules.__file__).resolve().parent == expected_location()
    other = other_datamodules(tmp_path / "other")
    monkeypatch.setattr(sys, "path", [*sys.path, str(other)])
    assert other_locations() == [other / "datamodules"]
    assert datamodules.SphereContexts.__module__ == "datamodules.sphere"  # what the recipes name
    with pytest.raises(AttributeError, match=r"has no attribute 'OTHER'; another package named `datamodules` on "
                                             rf"sys.path is hidden by it: {other / 'datamodules'}"):
        datamodules.OTHER  # noqa: B018  (what the other project's code would ask for)


def test_a_missing_name_without_another_package_is_a_plain_attribute_error(monkeypatch):
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".")])
    with pytest.raises(AttributeError, match=r"has no attribute 'Nothing'$"):
        datamodules.Nothing  # noqa: B018
