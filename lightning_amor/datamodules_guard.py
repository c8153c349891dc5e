"""The top-level ``datamodules`` package: lightning-amor's, and no other project's of the same name.

lightning-amor installs two top-level packages side by side: ``lightning_amor`` and ``datamodules`` (the recipes
name data classes as ``datamodules.SphereContexts``). ``datamodules`` is a common name, so another project may
install one too. Python imports the first one on ``sys.path``, so one of the two is hidden:

- another ``datamodules`` first: importing ``lightning_amor`` fails at once with :class:`DatamodulesShadowedError`,
  naming both folders and the fixes (instead of an obscure ``No module named 'datamodules.context'`` later);
- lightning-amor's first: the other project's ``import datamodules`` gets lightning-amor's, and a name it asks for
  that lightning-amor's lacks raises an ``AttributeError`` that names the hidden package
  (:func:`missing_name_error`, from ``datamodules.__getattr__``).

Installing both with pip into one environment writes both into the same ``site-packages/datamodules/`` folder (pip
does not refuse): use separate environments, or rename the other project's package.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path
from typing import Optional

PACKAGE = "datamodules"
"""The top-level name shared with other projects."""


class DatamodulesShadowedError(ImportError):
    """Another project's ``datamodules`` package comes before lightning-amor's on ``sys.path``."""


def expected_location() -> Path:
    """The folder of lightning-amor's ``datamodules``: beside the ``lightning_amor`` package (installed or checkout)."""
    return Path(__file__).resolve().parents[1] / PACKAGE


def _folder(origin: Optional[str]) -> Optional[Path]:
    return Path(origin).resolve().parent if origin else None


def imported_location() -> Optional[Path]:
    """The folder that ``import datamodules`` gives (or gave) in this process; None when there is none."""
    module = sys.modules.get(PACKAGE)
    if module is not None:
        return _folder(getattr(module, "__file__", None))
    spec = importlib.machinery.PathFinder.find_spec(PACKAGE)
    if spec is None:
        for finder in sys.meta_path:  # an editable install's finder
            find = getattr(finder, "find_spec", None)
            spec = find(PACKAGE, None) if find is not None else None
            if spec is not None:
                break
    return _folder(spec.origin) if spec is not None else None


def other_locations() -> list[Path]:
    """The folders of every ``datamodules`` package on ``sys.path`` that is not lightning-amor's."""
    ours, found = expected_location(), []
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec(PACKAGE, [entry or "."])
        folder = _folder(spec.origin) if spec is not None else None
        if folder is not None and folder != ours and folder not in found:
            found.append(folder)
    return found


def check_datamodules() -> None:
    """Raise :class:`DatamodulesShadowedError` when ``import datamodules`` does not give lightning-amor's package."""
    found, ours = imported_location(), expected_location()
    if found is None or found == ours:
        return  # none at all: the import that needs it names what is missing
    raise DatamodulesShadowedError(
        f"another package named `{PACKAGE}` ({found}) comes before lightning-amor's ({ours}) on sys.path, so "
        f"lightning-amor and its recipes (`{PACKAGE}.SphereContexts`, ...) would import the wrong one. Fix: uninstall "
        f"or rename the other project's `{PACKAGE}`, or put {ours.parent} before {found.parent} on sys.path "
        "(PYTHONPATH), or install lightning-amor in an environment of its own."
    )


def missing_name_error(name: str) -> AttributeError:
    """The error for ``datamodules.<name>`` that lightning-amor's package lacks, naming a hidden ``datamodules``."""
    message = f"module '{PACKAGE}' (lightning-amor's, at {expected_location()}) has no attribute '{name}'"
    others = other_locations()
    if others:
        message += (
            f"; another package named `{PACKAGE}` on sys.path is hidden by it: {', '.join(map(str, others))}. Put "
            "that project's folder before lightning-amor's on sys.path, or install the two in separate environments"
        )
    return AttributeError(message)


check_datamodules()
