"""Packaging: the version bounds cover what is tested, and another project's ``datamodules`` package never silently
replaces lightning-amor's (or is silently replaced by it) in one environment."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import datamodules
from lightning_amor.datamodules_guard import expected_location, other_locations

REPO = Path(__file__).resolve().parents[1]
BOUNDED = ("torch", "pytorch-lightning", "jsonargparse")
"""The libraries whose private symbols lightning-amor uses (tests/test_private_api.py): bounded above."""


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name: Requirement(line) for line in project["dependencies"]}


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
