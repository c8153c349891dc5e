"""MkDocs hook: the site's navigation, an API reference page for every public module, the highlighting stylesheet.

A module is public unless a part of its dotted name starts with ``_``. Each page holds a mkdocstrings
``::: module`` block, so the reference follows the code without a hand-kept list of pages.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from pygments.formatters import HtmlFormatter

PACKAGES = ("lightning_amor", "datamodules")
"""The packages documented in the API reference."""

PAGE_ORDER = {
    "index.md": "Home",
    "new_problem.md": "Tutorial: a new problem",
    "extending.md": "Extension points",
    "applications/sphere.md": "Sphere",
    "applications/vae.md": "VAE and SA-VAE",
    "applications/sparse_coding.md": "Sparse coding (LISTA)",
    "applications/convex_qp.md": "Parametric QP (OSQP warm starts)",
    "applications/meta_ot.md": "Optimal transport (Meta OT)",
    "applications/deq.md": "Deep equilibrium models",
    "applications/maml.md": "Meta-learning (MAML)",
    "applications/mpc.md": "Model-based control (MPC)",
    "applications/sac.md": "Model-free control (SAC)",
    "cli.md": "Command line",
    "inference.md": "Inference",
    "export.md": "Export",
    "evaluate.md": "Evaluation",
    "figures.md": "Figures",
}
"""Pages listed first in the navigation, in this order and with these short titles (when they exist); the others
follow by name, titled by their first heading."""

PYGMENTS_CSS = "css/pygments.css"
"""The stylesheet of the code highlighting, generated from Pygments' default style."""

SECTIONS = {"applications": "Applications"}
"""Titles of the navigation sections for folders of ``docs/``."""


def public_modules(root: Path) -> dict[str, Path]:
    """``{dotted name: source file}`` of every public module and package of :data:`PACKAGES` under ``root``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if any(part.startswith("_") for part in parts):
                continue
            modules[".".join(parts)] = path
    return dict(sorted(modules.items()))


def first_line(path: Path) -> str:
    """The first line of a module's docstring (read without importing it)."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def api_page(name: str, modules: dict[str, Path]) -> str:
    """The Markdown of a module's page: its reference, and for a package the list of its modules."""
    children = [child for child in modules if child.rpartition(".")[0] == name]
    if not children:
        return f"::: {name}\n"
    lines = [f"::: {name}", "    options:", "      members: false", "", "## Modules", ""]
    lines += [f"- [`{child}`]({child}.md): {first_line(modules[child])}" for child in children]
    return "\n".join(lines) + "\n"


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Build the navigation from the pages that exist, then the API reference."""
    docs = Path(config.docs_dir)
    pages = sorted(str(p.relative_to(docs).as_posix()) for p in docs.rglob("*.md") if "hooks" not in p.parts)
    ordered = [p for p in PAGE_ORDER if p in pages] + [p for p in pages if p not in PAGE_ORDER]
    nav: list = []
    sections: dict[str, list] = {}
    for page in ordered:
        entry = {PAGE_ORDER[page]: page} if page in PAGE_ORDER else page
        folder = page.split("/")[0] if "/" in page else None
        if folder is None:
            nav.append(entry)
        elif folder not in sections:
            sections[folder] = [entry]
            nav.append({SECTIONS.get(folder, folder.replace("_", " ").capitalize()): sections[folder]})
        else:
            sections[folder].append(entry)
    nav.append({"API reference": [{name: f"api/{name}.md"} for name in public_modules(_root(config))]})
    config.nav = nav
    config.extra_css.append(PYGMENTS_CSS)
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated API pages and the highlighting stylesheet."""
    files.append(File.generated(config, PYGMENTS_CSS, content=HtmlFormatter().get_style_defs(".highlight")))
    modules = public_modules(_root(config))
    for name in modules:
        files.append(File.generated(config, f"api/{name}.md", content=api_page(name, modules)))
    return files
