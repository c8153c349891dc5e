"""Where the shipped recipes are, and ``--config NAME``: a recipe named by its path below the recipes folder.

The recipes folder is ``$LIGHTNING_AMOR_RECIPES`` when set, else the one installed inside the package
(``lightning_amor/recipes/``: a wheel or sdist install carries every recipe, ``_base/`` and the cluster launchers),
else ``recipes/`` beside the package (a checkout, installed with ``pip install -e .``).

A recipe's *name* is its path below that folder, with or without ``.yaml``: ``sphere/semi_sum_regression``,
``_base/trainer.yaml``. ``lightning-amor fit --config NAME`` (and ``validate``, ``test``, ``predict``, ``evaluate``)
looks a value that is not a file here up as, in order: the file ``NAME.yaml`` here, then the shipped recipe
``NAME`` or ``NAME.yaml`` (a leading ``recipes/`` is dropped, so a checkout's ``--config recipes/...`` works after a
plain ``pip install`` too). A local file of that path always wins over the shipped one. A recipe given by name runs
as ``lightning-amor recipes`` shows it: composed with the shared settings its leading comment names
(``_base/trainer.yaml``) unless they are given before it, and ``lightning-amor`` says so in one line. A recipe given
as an existing file is used as it is.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Optional

from lightning_amor.config_errors import CONFIG_OPTIONS, YAML_SUFFIXES, ConfigError

RECIPES_ENV = "LIGHTNING_AMOR_RECIPES"
"""Environment variable naming the recipes folder (default: :data:`PACKAGED_RECIPES`, else :data:`CHECKOUT_RECIPES`)."""

PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"
"""The recipes installed inside the package (a wheel or sdist install; pyproject.toml maps recipes/ here)."""

CHECKOUT_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
"""The recipes folder of the checkout the package runs from (an editable install)."""

CHECKOUT_PREFIX = "recipes/"
"""How a checkout's commands write a recipe's path (``recipes/sphere/...``); dropped to get its name."""

SHARED_PREFIX = "_"
"""Folders and files under the recipes folder whose names start with it are shared settings, not recipes."""

_NAME = re.compile(r"[\w.\-/\\]+")
"""What a ``--config`` value that names a file looks like (anything else, e.g. ``{trainer: ...}``, is inline YAML)."""


class UnknownRecipeError(ConfigError):
    """A ``--config`` value that is neither a file nor the name of a shipped recipe."""


def recipes_dir() -> Path:
    """The recipes folder: ``$LIGHTNING_AMOR_RECIPES``, else the installed package's, else the checkout's (which
    may not exist: the caller says so)."""
    env = os.environ.get(RECIPES_ENV)
    if env:
        return Path(env)
    return PACKAGED_RECIPES if PACKAGED_RECIPES.is_dir() else CHECKOUT_RECIPES


def is_packaged(folder: Path) -> bool:
    """Whether ``folder`` is the recipes folder installed inside the package (not a checkout's, not the user's)."""
    return folder.resolve() == PACKAGED_RECIPES


def recipe_name(path: Path, root: Path) -> str:
    """The name of the recipe file ``path`` below ``root``: its relative POSIX path, without ``.yaml``
    (``sphere/semi_sum_regression``); other files keep their suffix (``cluster/slurm.sbatch``)."""
    relative = path.resolve().relative_to(root.resolve())
    if relative.suffix in YAML_SUFFIXES:
        relative = relative.with_suffix("")
    return relative.as_posix()


def is_shared(name: str) -> bool:
    """Whether the recipe ``name`` is shared settings (``_base/trainer``) rather than a recipe."""
    return any(part.startswith(SHARED_PREFIX) for part in Path(name).parts)


def recipe_names(root: Optional[Path] = None) -> list[str]:
    """The names of every YAML file below ``root`` (default: :func:`recipes_dir`), shared settings included."""
    root = recipes_dir() if root is None else root
    if not root.is_dir():
        return []
    return sorted(recipe_name(path, root) for suffix in YAML_SUFFIXES for path in root.rglob(f"*{suffix}"))


def _candidates(name: str) -> list[str]:
    """The relative paths that ``name`` may stand for: itself, then with ``.yaml``, each also without a leading
    ``recipes/``."""
    forms = [name] if Path(name).suffix else [name, f"{name}.yaml"]
    shortened = name.replace("\\", "/")
    if shortened.startswith(CHECKOUT_PREFIX):
        shortened = shortened[len(CHECKOUT_PREFIX):]
        forms += [shortened] if Path(shortened).suffix else [shortened, f"{shortened}.yaml"]
    return forms


def find_named(name: str, root: Optional[Path] = None) -> Optional[Path]:
    """The file of the recipes folder ``root`` (default: :func:`recipes_dir`) that ``name`` names (see the module
    docstring), or None. Names never leave the folder (``..`` is refused), and an absolute path is no name."""
    root = recipes_dir() if root is None else root
    if not name or Path(name).is_absolute() or not root.is_dir():
        return None
    top = root.resolve()
    for form in _candidates(name):
        candidate = (top / form).resolve()
        if candidate.is_file() and candidate.is_relative_to(top):
            return candidate
    return None


def resolve_config(value: str) -> Optional[Path]:
    """The file that the ``--config`` value ``value`` stands for when it is a name, or None when it is used as it
    is: an existing file or folder here, or inline YAML (``{trainer: {max_steps: 5}}``).

    Raises:
        UnknownRecipeError: ``value`` looks like a file's name, but no such file exists here and no shipped recipe
            is named so; the message suggests the closest names.
    """
    if Path(value).exists() or not _NAME.fullmatch(value):
        return None
    if not Path(value).suffix and Path(f"{value}.yaml").is_file():
        return Path(f"{value}.yaml")  # a local file of that name wins over a shipped recipe
    found = find_named(value)
    if found is not None:
        return found
    raise unknown_recipe_error(value, recipes_dir())


def unknown_recipe_error(value: str, root: Path, everything: bool = False) -> UnknownRecipeError:
    """The error for ``value``, which names no file here nor in the recipes folder ``root``: it suggests the closest
    recipe names (of every file of ``root`` with ``everything``, e.g. ``cluster/slurm.sbatch``)."""
    if everything and root.is_dir():
        files = (path for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts)
        names = sorted(recipe_name(path, root) for path in files)
    else:
        names = [name for name in recipe_names(root) if not is_shared(name)]
    asked = _candidates(value)[-1].removesuffix(".yaml")
    close = difflib.get_close_matches(asked, names, n=3, cutoff=0.6)
    close += [name for name in names if name not in close and Path(name).name == Path(asked).name][:1]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    where = f"in {root.resolve()}" if root.is_dir() else f"(there is no recipes folder: {root} does not exist)"
    return UnknownRecipeError(
        f"the recipe {value} does not exist: no such file here, and no shipped recipe of that name {where}{hint} "
        "(`lightning-amor recipes` lists the shipped recipes and their names)"
    )


def display_config(path: Path) -> str:
    """How to write the config file ``path`` on a command line: its name when it is a shipped recipe of an
    installed package, else the path itself."""
    if path.resolve().is_relative_to(PACKAGED_RECIPES) and PACKAGED_RECIPES.is_dir():
        return recipe_name(path, PACKAGED_RECIPES)
    return str(path)


def _config_values(argv: list[str]) -> list[tuple[int, bool]]:
    """``(position, inline)`` of every ``--config`` (or ``-c``) value in ``argv``: at ``argv[position]`` itself
    (``--config=VALUE``, inline) or after it."""
    found = []
    for position, word in enumerate(argv):
        if word == "--":
            break
        if word in CONFIG_OPTIONS and position + 1 < len(argv):
            found.append((position + 1, False))
        elif word.split("=", 1)[0] in CONFIG_OPTIONS and "=" in word:
            found.append((position, True))
    return found


def expand_recipe_names(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` with every ``--config NAME`` replaced by the file it names (:func:`resolve_config`), each recipe
    given by name preceded by the shared settings its comment composes it with that are not given before it; and a
    one-line note for each such composition.

    Raises:
        UnknownRecipeError: a ``--config`` value that is neither a file nor a recipe's name.
    """
    from lightning_amor.commands.recipes import recipe_configs  # which imports this module

    out, notes, given = list(argv), [], []
    inserted = 0
    for position, inline in _config_values(argv):
        option, value = argv[position].split("=", 1) if inline else (argv[position - 1], argv[position])
        found = resolve_config(value)
        if found is None:
            if Path(value).is_file():
                given.append(Path(value).resolve())
            continue
        try:
            wanted = [config.resolve() for config in recipe_configs(found)]
        except (OSError, ValueError):
            wanted = [found.resolve()]  # its comment names no usable command: it runs alone
        missing = [] if found.resolve() not in wanted else [
            base for base in wanted[: wanted.index(found.resolve())] if base not in given
        ]
        where = position + inserted
        start = where if inline else where - 1
        words = [*(word for base in missing for word in (option, str(base))), option, str(found.resolve())]
        out[start: where + 1] = words
        inserted += len(words) - (where + 1 - start)
        given += [*missing, found.resolve()]
        if missing:
            bases = " ".join(f"{option} {_shown(base)}" for base in missing)
            notes.append(f"lightning-amor: note: running the recipe {value} ({found.resolve()}) composed with its "
                         f"shared settings, as `lightning-amor recipes` shows: {bases} before it")
    return out, notes


def _shown(path: Path) -> str:
    """``path``'s name when it lies in the recipes folder, else the path."""
    root = recipes_dir()
    return recipe_name(path, root) if path.resolve().is_relative_to(root.resolve()) else str(path)
