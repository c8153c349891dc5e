"""``lightning-amor recipes``: list the shipped recipes by application, with what each does and how to run it.

A recipe composes with the shared trainer settings of ``recipes/_base/`` (the logger and the checkpoints): its
leading comment names the command that runs it, ``lightning-amor fit --config recipes/_base/trainer.yaml --config
recipes/<application>/<recipe>.yaml``, and :func:`recipe_configs` returns those ``--config`` files. Folders and files
whose names start with ``_`` hold such shared settings and are not recipes.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import lightning_amor

RECIPES_ENV = "LIGHTNING_AMOR_RECIPES"
"""Environment variable naming the recipes folder (default: ``recipes/`` beside the package, in a checkout)."""


NO_DESCRIPTION = "(no description: start the recipe with `# <what it trains>` comment lines)"
"""The summary of a recipe without a leading comment block."""


class RecipesNotFoundError(FileNotFoundError):
    """The recipes folder does not exist (an install without a repository checkout, or a wrong ``--dir``)."""


SHARED_PREFIX = "_"
"""Folders and files under the recipes folder whose names start with it are shared settings, not recipes."""


@dataclass
class Recipe:
    """One recipe file and what its leading comment block says.

    Attributes:
        path: the YAML file.
        summary: one line: the comment's first clause (up to its first ``: `` or ``. ``).
        commands: the ``lightning-amor ...`` lines of the comment (``fit --config <path>`` when there are none).
        configs: the ``--config`` files of its first command, in order (the shared bases, then the recipe).
    """

    path: Path
    summary: str
    commands: list[str] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)


def default_recipes_dir() -> Path:
    """``$LIGHTNING_AMOR_RECIPES``, or the ``recipes/`` folder of the checkout the package was imported from."""
    env = os.environ.get(RECIPES_ENV)
    if env:
        return Path(env)
    return Path(lightning_amor.__file__).resolve().parents[1] / "recipes"


def _leading_comment(text: str) -> list[str]:
    """The lines of the comment block at the top of a YAML file, without their ``#``."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _summary(prose: str) -> str:
    """The first clause of ``prose``: up to its first ``: `` or sentence end, whichever comes first."""
    match = re.search(r":\s|\.\s+(?=[A-Z])|\.$", prose)
    return (prose[: match.start()] if match else prose).strip()


def _resolve_config(written: str, recipe: Path) -> Optional[Path]:
    """The file that a ``--config`` of ``recipe``'s comment names: the recipe itself, or ``written`` (a path relative
    to the repository root, e.g. ``recipes/_base/trainer.yaml``) below the nearest folder above ``recipe`` that holds
    it; None when no such file exists."""
    for folder in recipe.resolve().parents:
        candidate = folder / written
        if candidate.is_file():
            return candidate
    return recipe if Path(written).name == recipe.name else None


def read_recipe(path: Path, shown_as: Optional[str] = None) -> Recipe:
    """Parse ``path``'s leading comment block; its commands show ``path`` as ``shown_as`` (default: ``path``) and the
    other ``--config`` files they name (the shared bases) the same way (relative to the current folder when below it).

    A recipe without a leading comment is still listed, with :data:`NO_DESCRIPTION` as its summary, and runs alone.

    Raises:
        FileNotFoundError: the first command names a ``--config`` file that is found in no folder above the recipe.
    """
    comment = _leading_comment(path.read_text(encoding="utf-8"))
    prose = " ".join(line for line in comment if line and not line.startswith("lightning-amor "))
    commands = [line for line in comment if line.startswith("lightning-amor ")]
    shown = shown_as or str(path)
    if not commands:
        return Recipe(path=path, summary=_summary(prose) if prose else NO_DESCRIPTION,
                      commands=[f"lightning-amor fit --config {shown}"], configs=[path])

    def show(match: re.Match) -> str:
        found = _resolve_config(match.group(2), path)
        if found is None:
            return match.group(0)
        return match.group(1) + (shown if found.resolve() == path.resolve() else _display_path(found))

    # the recipes name their files relative to the repository root: point the commands at the shown paths
    shown_commands = [re.sub(r"(--config\s+)(\S+)", show, command) for command in commands]
    written = re.findall(r"--config\s+(\S+)", commands[0])
    missing = [name for name in written if _resolve_config(name, path) is None]
    if missing:
        raise FileNotFoundError(
            f"the recipe {path} is run with --config {' --config '.join(missing)} (the command in its comment), "
            "which is found in no folder above the recipe; keep the recipes folder's layout (recipes/_base/ beside "
            "the applications' folders) or fix the command line in the recipe's comment"
        )
    return Recipe(path=path, summary=_summary(prose) if prose else NO_DESCRIPTION, commands=shown_commands,
                  configs=[_resolve_config(name, path) for name in written])


def recipe_configs(path: Path) -> list[Path]:
    """The ``--config`` files that run the recipe ``path``, in order: the shared settings its comment's first command
    composes (``recipes/_base/trainer.yaml``), then the recipe; ``[path]`` for a recipe without a command line.

    Raises:
        FileNotFoundError: the command names a file that is found in no folder above the recipe.
    """
    return read_recipe(path).configs


def application_summary(name: str) -> str:
    """The first line of the docstring of ``lightning_amor/apps/<name>.py`` (read without importing it), or ``""``."""
    source = Path(lightning_amor.__file__).resolve().parent / "apps" / f"{name}.py"
    if not source.is_file():
        return ""
    docstring = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def find_recipes(root: Path) -> dict[str, list[Path]]:
    """The YAML recipes under ``root``, grouped by their folder (the application): ``{name: [paths]}``, sorted.

    Raises:
        RecipesNotFoundError: ``root`` is not a folder, or holds no ``*.yaml`` recipe.
    """
    if not root.is_dir():
        raise RecipesNotFoundError(
            f"no recipes folder at {root}: the recipes ship with the repository (recipes/ beside the package), so "
            f"use a checkout installed with `pip install -e .`, or pass --dir DIR (or set ${RECIPES_ENV})"
        )
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.yaml")):
        relative = path.relative_to(root)
        if any(part.startswith(SHARED_PREFIX) for part in relative.parts):
            continue  # shared settings (recipes/_base/), not a recipe
        group = relative.parts[0] if len(relative.parts) > 1 else "other"
        groups.setdefault(group, []).append(path)
    if not groups:
        raise RecipesNotFoundError(f"the folder {root} holds no *.yaml recipe; pass --dir DIR with the recipes folder")
    return groups


def _display_path(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it, absolute otherwise."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def format_listing(groups: dict[str, list[Path]]) -> str:
    """The text that ``lightning-amor recipes`` prints for ``groups`` (from :func:`find_recipes`)."""
    out = []
    for group, paths in groups.items():
        about = application_summary(group)
        out.append(f"{group}" + (f": {about}" if about else ""))
        for path in paths:
            recipe = read_recipe(path, shown_as=_display_path(path))
            out.append(f"  {path.stem:<22} {recipe.summary}")
            out.extend(f"  {'':<22}   $ {command}" for command in recipe.commands)
        out.append("")
    out.append("Override any value on the command line (e.g. --trainer.max_steps 500); "
               "`lightning-amor fit --help` lists them all.")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-amor recipes``."""
    parser = argparse.ArgumentParser(
        prog="lightning-amor recipes",
        description="List the shipped recipes grouped by application: a one-line description of each (from its "
        "leading comment) and the commands that run it.",
    )
    parser.add_argument(
        "applications", nargs="*", metavar="APPLICATION",
        help="only list these applications (recipe folders, e.g. sphere vae); default: all",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, metavar="DIR",
        help=f"the recipes folder (default: ${RECIPES_ENV}, else recipes/ of the checkout the package runs from)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``lightning-amor recipes``: print the listing, or exit with status 2 and a clear error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        groups = find_recipes(args.dir if args.dir is not None else default_recipes_dir())
    except RecipesNotFoundError as err:
        parser.error(str(err))
    unknown = [name for name in args.applications if name not in groups]
    if unknown:
        parser.error(f"unknown application(s) {unknown}; choose among {sorted(groups)}")
    if args.applications:
        groups = {name: groups[name] for name in args.applications}
    try:
        print(format_listing(groups))
    except FileNotFoundError as err:
        parser.error(str(err))
