"""``lightning-amor recipes``: list the shipped recipes by application, with what each does and how to run it; copy
one out for editing (``--copy NAME DEST``).

A recipe composes with the shared trainer settings of ``recipes/_base/`` (the logger and the checkpoints): its
leading comment names the command that runs it, ``lightning-amor fit --config recipes/_base/trainer.yaml --config
recipes/<application>/<recipe>.yaml``, and :func:`recipe_configs` returns those ``--config`` files. Folders and files
whose names start with ``_`` hold such shared settings and are not recipes. Where the recipes folder is, and how a
recipe is run by name, is :mod:`lightning_amor.recipe_files`'s.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import lightning_amor
from lightning_amor.config_errors import YAML_SUFFIXES
from lightning_amor.recipe_files import (
    RECIPES_ENV,
    SHARED_PREFIX,
    UnknownRecipeError,
    find_named,
    is_packaged,
    is_shared,
    recipe_name,
    recipes_dir,
    unknown_recipe_error,
)

DEFAULT_RECIPE = "sphere/semi_sum_regression"
"""The recipe that the README trains first, used as the example of a name."""

NO_DESCRIPTION = "(no description: start the recipe with `# <what it trains>` comment lines)"
"""The summary of a recipe without a leading comment block."""


class RecipesNotFoundError(FileNotFoundError):
    """The recipes folder does not exist (a wrong ``--dir`` or ``$LIGHTNING_AMOR_RECIPES``), or holds no recipe."""


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
    """``$LIGHTNING_AMOR_RECIPES``, else the recipes installed inside the package, else the ``recipes/`` folder of
    the checkout the package was imported from (:func:`lightning_amor.recipe_files.recipes_dir`)."""
    return recipes_dir()


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
    """The file that a ``--config`` of ``recipe``'s comment names: ``written`` (a path relative to the repository
    root, e.g. ``recipes/_base/trainer.yaml``, or a name such as ``_base/trainer``) below the nearest folder above
    ``recipe`` that holds it, else the recipe itself, else the shipped recipe of that name
    (:func:`~lightning_amor.recipe_files.find_named`: a copied recipe composes the shipped base); None when no such
    file exists."""
    forms = [written] if Path(written).suffix else [written, f"{written}.yaml"]
    for folder in recipe.resolve().parents:
        for form in forms:
            candidate = folder / form
            if candidate.is_file():
                return candidate
    if Path(written).name == recipe.name:
        return recipe
    return find_named(written)


def read_recipe(path: Path, shown_as: Optional[str] = None, names_below: Optional[Path] = None) -> Recipe:
    """Parse ``path``'s leading comment block; its commands show ``path`` as ``shown_as`` (default: ``path``) and the
    other ``--config`` files they name (the shared bases) the same way (relative to the current folder when below it).
    With ``names_below`` (a recipes folder), the files below it are shown by name instead (``sphere/full_objective``),
    and the shared settings before the recipe are left out: a recipe run by name is composed with them
    (:mod:`lightning_amor.recipe_files`).

    A recipe without a leading comment is still listed, with :data:`NO_DESCRIPTION` as its summary, and runs alone.

    Raises:
        FileNotFoundError: the first command names a ``--config`` file that is found in no folder above the recipe.
    """
    comment = _leading_comment(path.read_text(encoding="utf-8"))
    prose = " ".join(line for line in comment if line and not line.startswith("lightning-amor "))
    commands = [line for line in comment if line.startswith("lightning-amor ")]
    shown = shown_as or str(path)
    if names_below is not None:
        shown = recipe_name(path, names_below)
    if not commands:
        return Recipe(path=path, summary=_summary(prose) if prose else NO_DESCRIPTION,
                      commands=[f"lightning-amor fit --config {shown}"], configs=[path])

    def show_command(command: str) -> str:
        recipe_seen = False

        def show(match: re.Match) -> str:
            nonlocal recipe_seen
            found = _resolve_config(match.group(2), path)
            if found is None:
                return match.group(0)
            is_recipe = found.resolve() == path.resolve()
            by_name = names_below is not None and found.resolve().is_relative_to(names_below.resolve())
            if by_name and not is_recipe and not recipe_seen and is_shared(recipe_name(found, names_below)):
                return ""  # composed with the recipe when it runs by name
            recipe_seen = recipe_seen or is_recipe
            if by_name:
                return match.group(1) + (shown if is_recipe else recipe_name(found, names_below))
            return match.group(1) + (shown if is_recipe else _display_path(found))

        return re.sub(r"(\s+--config\s+)(\S+)", show, command)

    # the recipes name their files relative to the repository root: point the commands at the shown paths
    shown_commands = [show_command(command) for command in commands]
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


def application_summary(name: str, folder: Optional[Path] = None) -> str:
    """The first line of the docstring of ``lightning_amor/apps/<name>.py`` (read without importing it); for an
    application folder whose recipes span several modules (``control``: MPC and SAC), the first line of the
    ``README.md`` in ``folder`` (the recipes' folder), without its ``#``; ``""`` when neither exists."""
    source = Path(lightning_amor.__file__).resolve().parent / "apps" / f"{name}.py"
    if source.is_file():
        docstring = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or ""
        return docstring.strip().splitlines()[0] if docstring.strip() else ""
    readme = folder / "README.md" if folder is not None else None
    if readme is not None and readme.is_file():
        lines = readme.read_text(encoding="utf-8").strip().splitlines()
        return lines[0].lstrip("#").strip() if lines else ""
    return ""


def find_recipes(root: Path) -> dict[str, list[Path]]:
    """The YAML recipes under ``root``, grouped by their folder (the application): ``{name: [paths]}``, sorted.

    Raises:
        RecipesNotFoundError: ``root`` is not a folder, or holds no ``*.yaml`` recipe.
    """
    if not root.is_dir():
        raise RecipesNotFoundError(
            f"no recipes folder at {root}: the recipes ship inside the package (lightning_amor/recipes/ of a `pip "
            f"install lightning-amor`) and in a checkout (recipes/, with `pip install -e .`); pass --dir DIR with a "
            f"recipes folder (or set ${RECIPES_ENV}), or unset ${RECIPES_ENV} to use the shipped ones"
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


def format_listing(groups: dict[str, list[Path]], root: Optional[Path] = None) -> str:
    """The text that ``lightning-amor recipes`` prints for ``groups`` (from :func:`find_recipes`) of the recipes
    folder ``root``: where it is, then the recipes; their commands name them by name when ``root`` is the folder
    installed inside the package, by path otherwise (a checkout, ``--dir``)."""
    by_name = root if root is not None and is_packaged(root) else None
    out = [f"Recipes in {root.resolve()}" + (" (installed with the package)" if by_name else ""), ""] if root else []
    for group, paths in groups.items():
        about = application_summary(group, paths[0].parent)
        out.append(f"{group}" + (f": {about}" if about else ""))
        for path in paths:
            recipe = read_recipe(path, shown_as=_display_path(path), names_below=by_name)
            out.append(f"  {path.stem:<22} {recipe.summary}")
            out.extend(f"  {'':<22}   $ {command}" for command in recipe.commands)
        out.append("")
    if root is not None and (root / "cluster").is_dir():
        out.append(f"Cluster launchers (SLURM, torchrun) and their guide: {_display_path(root / 'cluster')}/")
    out.append("Override any value on the command line (e.g. --trainer.max_steps 500); "
               "`lightning-amor fit --help` lists them all.")
    if root is not None:
        listed = [path for paths in groups.values() for path in paths]
        example = next((path for path in listed if recipe_name(path, root) == DEFAULT_RECIPE), listed[0])
        out.append(f"From any folder, run a recipe by name (`--config {recipe_name(example, root)}`: a local file of "
                   "that path wins; the run folder is made in the current folder) and copy one out to edit it with "
                   "`lightning-amor recipes --copy NAME DEST`.")
    return "\n".join(out)


def copy_recipe(name: str, dest: Path, root: Path, force: bool = False) -> tuple[Path, Optional[str]]:
    """Write the file ``name`` of the recipes folder ``root`` (a recipe, ``_base/trainer`` or a cluster launcher) to
    ``dest``, or into ``dest`` when it is a folder, for editing. In a copied recipe's leading comment, the commands
    name the copy and the shipped shared settings by name (``--config _base/trainer --config DEST``), so that they
    run it composed as shipped. Returns the file written and the first such command (None for other files).

    Raises:
        UnknownRecipeError: ``root`` holds no file of that name (the message suggests close names).
        FileExistsError: the destination exists and ``force`` is false, or is the shipped file itself.
    """
    source = find_named(name, root)
    if source is None:
        raise unknown_recipe_error(name, root, everything=True)
    target = dest / source.name if dest.is_dir() or str(dest).endswith(("/", "\\")) else dest
    if target.exists() and (not force or target.resolve() == source.resolve()):
        itself = " (it is the shipped file itself)" if target.resolve() == source.resolve() else "; pass --force to " \
            "overwrite it"
        raise FileExistsError(f"{target} exists already{itself}; choose another DEST")
    text = source.read_text(encoding="utf-8")
    command = None
    if source.suffix in YAML_SUFFIXES and not is_shared(recipe_name(source, root)):
        text, command = _point_commands_at(text, source, target, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    shutil.copymode(source, target)  # the launchers stay executable
    return target, command


def _point_commands_at(text: str, source: Path, target: Path, root: Path) -> tuple[str, Optional[str]]:
    """``text`` (the recipe ``source``) with the ``--config`` files of its leading comment's commands rewritten for
    its copy ``target``: the recipe becomes the copy, the other files of ``root`` their names; and the first
    command."""
    shown = _display_path(target)

    def rewrite(match: re.Match) -> str:
        found = _resolve_config(match.group(2), source)
        if found is None:
            return match.group(0)
        if found.resolve() == source.resolve():
            return match.group(1) + shown
        inside = found.resolve().is_relative_to(root.resolve())
        return match.group(1) + (recipe_name(found, root) if inside else str(found))

    lines, first = text.splitlines(keepends=True), None
    for number, line in enumerate(lines):
        if not line.startswith("#"):
            break
        if line[1:].strip().startswith("lightning-amor "):
            lines[number] = re.sub(r"(--config\s+)(\S+)", rewrite, line)
            first = first or lines[number][1:].strip()
    return "".join(lines), first


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
        help=f"the recipes folder (default: ${RECIPES_ENV}, else the one installed with the package, else recipes/ "
        "of the checkout the package runs from)",
    )
    parser.add_argument(
        "--copy", nargs=2, default=None, metavar=("NAME", "DEST"),
        help="write the recipe NAME (e.g. sphere/semi_sum_regression; also _base/trainer or cluster/slurm.sbatch) "
        "to the file DEST, or into the folder DEST, for editing; its comment then shows the command that runs the "
        "copy",
    )
    parser.add_argument("--force", action="store_true", help="with --copy: overwrite DEST when it exists")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``lightning-amor recipes``: print the listing, or exit with status 2 and a clear error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root = args.dir if args.dir is not None else default_recipes_dir()
    if args.copy is not None:
        if args.applications:
            parser.error(f"--copy NAME DEST takes no APPLICATION (got {args.applications})")
        try:
            target, command = copy_recipe(args.copy[0], Path(args.copy[1]), root, force=args.force)
        except (OSError, UnknownRecipeError) as err:
            parser.error(str(err))
        print(f"wrote {_display_path(target)} (a copy of {args.copy[0]} from {root.resolve()})"
              + (f"; run it with\n  {command}" if command else ""))
        return
    try:
        groups = find_recipes(root)
    except RecipesNotFoundError as err:
        parser.error(str(err))
    unknown = [name for name in args.applications if name not in groups]
    if unknown:
        parser.error(f"unknown application(s) {unknown}; choose among {sorted(groups)}")
    if args.applications:
        groups = {name: groups[name] for name in args.applications}
    try:
        print(format_listing(groups, root))
    except FileNotFoundError as err:
        parser.error(str(err))
