"""Recipes and command-line settings that cannot be used, answered in one line that names the file or option.

jsonargparse reports a YAML syntax error "in <unicode string>", an empty config file as "Unexpected config:", a
misspelt class path without a suggestion, and a value refused by a constructor as two chained tracebacks. The
functions here turn each into a :class:`ConfigError` whose message names the file (and line) or the option, says
what is wrong and how to fix it; ``lightning-amor`` prints it as one line with exit status 2.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import yaml

CONFIG_OPTIONS = ("--config", "-c")
"""The options whose value is a whole config file (a recipe)."""

YAML_SUFFIXES = (".yaml", ".yml")
"""Option values that are files with these suffixes are read by jsonargparse as YAML, so they are checked too."""

SHORT_NAME_PACKAGES = ("lightning_amor", "datamodules")
"""Where a class given by its bare name (``FullyAmortized``) is looked for when suggesting the right name."""


class ConfigError(ValueError):
    """A recipe file or a setting that cannot be used; the message names the file or option and the fix."""


# --- config files -------------------------------------------------------------------------------------------------


def config_files(argv: list[str]) -> list[tuple[str, Path]]:
    """``(option, file)`` for every existing file in ``argv`` that jsonargparse will read as YAML: the values of
    ``--config`` (or ``-c``), and values of other options that are ``.yaml`` / ``.yml`` files."""
    found = []
    for position, word in enumerate(argv):
        option, value = word, None
        if word.startswith("-") and "=" in word:
            option, value = word.split("=", 1)
        elif word.startswith("-") and position + 1 < len(argv):
            value = argv[position + 1]
        if value is None or not option.startswith("-") or not Path(value).is_file():
            continue
        if option in CONFIG_OPTIONS or Path(value).suffix.lower() in YAML_SUFFIXES:
            found.append((option, Path(value)))
    return found


def check_config_files(argv: list[str]) -> None:
    """Raise :class:`ConfigError` for the first config file of ``argv`` (see :func:`config_files`) that is not
    valid YAML (naming its line and column), is empty, or (for ``--config``) holds no mapping of settings."""
    for option, file in config_files(argv):
        try:
            content = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(_yaml_problem(file, err)) from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"the config file {file} cannot be read ({err}); pass a readable YAML file") from err
        if content is None:
            raise ConfigError(f"the config file {file} is empty (nothing but blank lines or comments); write its "
                              "settings (such as `trainer:`, `model:`, `data:`) or leave the file out")
        if option in CONFIG_OPTIONS and not isinstance(content, dict):
            raise ConfigError(f"the config file {file} holds a {type(content).__name__}, not settings by name; write "
                              "a mapping such as `trainer:`, `model:`, `data:` at the top level")


def _yaml_problem(file: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or mark is None:
        return f"the config file {file} is not valid YAML ({err}); fix its syntax"
    where = f"{file}, line {mark.line + 1}, column {mark.column + 1}"
    context, start = err.context, err.context_mark
    since = f" ({context} started at line {start.line + 1}, column {start.column + 1})" if context and start else ""
    return f"{where}: invalid YAML: {err.problem}{since}; fix the syntax there"


# --- misspelt class paths -----------------------------------------------------------------------------------------


def suggest_class_path(class_path: str) -> Optional[str]:
    """The importable dotted path closest to ``class_path``, part by part (modules, then the class), or ``None``
    when some part has no near name or nothing differs. A bare name is looked for in
    :data:`SHORT_NAME_PACKAGES`."""
    parts = class_path.split(".")
    if len(parts) == 1:
        for package in SHORT_NAME_PACKAGES:
            match = _closest(parts[0], _children(importlib.import_module(package), package))
            if match is not None:
                return f"{package}.{match}"
        return None
    chosen: list[str] = []
    current: Any = None
    for part in parts:
        match = _closest(part, _children(current, ".".join(chosen)))
        if match is None:
            return None
        chosen.append(match)
        current = _child(current, ".".join(chosen), match)
        if current is None:
            return None
    return ".".join(chosen) if chosen != parts else None


def _closest(name: str, names: set[str]) -> Optional[str]:
    if name in names:
        return name
    matches = difflib.get_close_matches(name, sorted(names), n=1)
    return matches[0] if matches else None


def _children(parent: Any, dotted: str) -> set[str]:
    """The public names of ``parent`` (a module's attributes and submodules), or the top-level modules."""
    if parent is None:
        return {module.name for module in pkgutil.iter_modules()} | {name.split(".")[0] for name in sys.modules}
    names = {name for name in dir(parent) if not name.startswith("_")}
    if isinstance(parent, ModuleType) and hasattr(parent, "__path__"):
        names |= {module.name for module in pkgutil.iter_modules(parent.__path__)}
    return names


def _child(parent: Any, dotted: str, name: str) -> Any:
    found = getattr(parent, name, None) if parent is not None else None
    if found is not None:
        return found
    if parent is None or isinstance(parent, ModuleType):
        try:
            return importlib.import_module(dotted)
        except Exception:  # noqa: BLE001 - a module that fails to import is no suggestion
            return None
    return None


EXTRA_OF_MODULE = {"gymnasium": "apps", "ot": "apps", "cvxpy": "apps", "osqp": "apps", "scipy": "apps",
                   "onnx": "export", "onnxscript": "export", "onnxruntime": "export"}
"""The optional dependencies an application or feature imports, by top-level module, and the extra that installs
them (pyproject.toml's ``[project.optional-dependencies]``)."""

_CLASS_PATH_PROBLEMS = (
    re.compile(r"Problem with given class_path '(?P<path>[^']+)':\s*\n\s*(?P<reason>[^\n]+)"),
    re.compile(r"expects a function or a callable class: (?P<reason>.+?)\. Got value: (?P<path>\S+)"),
    re.compile(r"Expected a dot import path string: (?P<path>\S+)()"),
)


def explain_parse_error(message: str, argv: list[str], program: str) -> ConfigError:
    """The :class:`ConfigError` for jsonargparse's parse error ``message``: one line naming the file and line (or
    the option) of a class path that cannot be imported, with a "did you mean" when a near name exists; any other
    message as it is, with a pointer to ``program --help`` (without jsonargparse's usage dump)."""
    problems = (found for pattern in _CLASS_PATH_PROBLEMS for found in pattern.finditer(message))
    for found in problems:
        path, reason = found.group("path"), found.groupdict().get("reason") or "no class of that name is known"
        if _imports(path):
            continue  # the class exists: the problem is in its arguments, which jsonargparse words well
        suggestion = suggest_class_path(path)
        missing = re.search(r"No module named '(?P<module>[\w.]+)'", reason)
        extra = EXTRA_OF_MODULE.get(missing.group("module").split(".")[0]) if missing else None
        if extra is not None:
            fix = f'install the `{extra}` extra: pip install "lightning-amor[{extra}]"'
        elif suggestion:
            fix = f"did you mean {suggestion}?"
        else:
            fix = "check the spelling, or install the package defining it"
        return ConfigError(f"{_where(path, argv)}{path} cannot be imported ({reason.strip()}); {fix}")
    return ConfigError(f"{message}\n(`{program} --help` lists the accepted options)")


def _imports(path: str) -> bool:
    """Whether the dotted ``path`` names an importable object (a bare name never does)."""
    module, _, name = path.rpartition(".")
    try:
        return bool(module) and hasattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - whatever fails to import is not importable
        return False


def _where(value: str, argv: list[str]) -> str:
    """``FILE, line N: `` or ``--OPTION VALUE: `` for where ``value`` was given, or nothing when not found."""
    token = re.compile(rf"(?<![\w.]){re.escape(value)}(?![\w.])")
    for position, word in enumerate(argv):
        if word == value and position > 0 and argv[position - 1].startswith("-"):
            return f"{argv[position - 1]} {value}: "
        if word.startswith("-") and word.endswith(f"={value}"):
            return f"{word.split('=', 1)[0]} {value}: "
    for _, file in config_files(argv):
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if token.search(line.split("#", 1)[0]):
                return f"{file}, line {number}: "
    return ""


# --- values refused by a constructor ------------------------------------------------------------------------------


def explain_instantiation_error(err: ValueError, sections: dict[str, Any]) -> Optional[ConfigError]:
    """The :class:`ConfigError` for a ``ValueError`` a constructor raised while jsonargparse built a section of the
    config (``err`` is jsonargparse's wrapping of it), keeping the constructor's message and naming the section and
    its class; ``None`` when ``err`` wraps no such error. ``sections`` maps the config's section names (``model``,
    ``data``) to their ``class_path``."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__  # type: ignore[assignment]
    if cause is err or not isinstance(cause, ValueError):
        return None
    found = re.search(r"class_path='([^']+)'", str(err))
    class_path = found.group(1) if found else None
    section = next((name for name, path in sections.items() if class_path and path == class_path), None)
    built = f" (in {section}: {class_path})" if section else f" (in {class_path})" if class_path else ""
    return ConfigError(f"{cause}{built}; change that value in the recipe or on the command line")
