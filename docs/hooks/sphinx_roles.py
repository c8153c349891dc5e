"""Griffe extension: Sphinx roles in docstrings (:class:`~pkg.mod.Name`) become mkdocstrings cross-references.

A target in the documented packages (``lightning_amor.…``, ``datamodules.…``) becomes a link, checked when the site
is built; any other target (a bare or relative name, another library's object) becomes inline code.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

LINKED = ("lightning_amor.", "datamodules.")
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")


def _replace(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    if not target.startswith(LINKED):
        return f"`{target.rsplit('.', 1)[-1] if short else target}`"
    shown = target.rsplit(".", 1)[-1] if short else target
    return f"[`{shown}`][{target}]"


class SphinxRoles(Extension):
    """Rewrite the Sphinx roles of every docstring as it is loaded."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_replace, obj.docstring.value)
