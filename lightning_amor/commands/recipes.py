"""``lightning-amor recipes``: list the shipped recipes by application, with what each does and how to run it."""

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


@dataclass
class Recipe:
    """One recipe file and what its leading comment block says.

    Attributes:
        path: the YAML file.
        summary: one line: the comment's first clause (up to its first ``: `` or ``. ``).
        commands: the ``lightning-amor ...`` lines of the comment (``fit --config <path>`` when there are none).
    """

    path: Path
    summary: str
    commands: list[str] = field(default_factory=list)


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


def read_recipe(path: Path, shown_as: Optional[str] = None) -> Recipe:
    """Parse ``path``'s leading comment block; ``shown_as`` (default: ``path``) is the ``--config`` of its commands.

    A recipe without a leading comment is still listed, with :data:`NO_DESCRIPTION` as its summary.
    """
    comment = _leading_comment(path.read_text(encoding="utf-8"))
    prose = " ".join(line for line in comment if line and not line.startswith("lightning-amor "))
    commands = [line for line in comment if line.startswith("lightning-amor ")]
    shown = shown_as or str(path)
    if not commands:
        commands = [f"lightning-amor fit --config {shown}"]
    else:
        # the recipes name themselves relative to the repository root: point the commands at the shown path
        commands = [re.sub(r"(--config\s+)\S+", lambda match: match.group(1) + shown, command) for command in commands]
    return Recipe(path=path, summary=_summary(prose) if prose else NO_DESCRIPTION, commands=commands)


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
    print(format_listing(groups))
