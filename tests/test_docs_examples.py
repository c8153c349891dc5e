"""The extension-point pages run as written: every ```python block of a page, in order, in one namespace per page
(in a fresh temporary folder). A page that is listed but missing fails, so the list stays true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLE_PAGES = ["extending.md", "composite.md", "components.md", "streams.md", "evaluate.md", "applications/maml.md",
                 "applications/deq.md", "applications/meta_ot.md", "applications/mpc.md"]
"""Pages whose Python examples the tests run."""

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", flags=re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    """The code of every ```python block of ``page``, in order."""
    return FENCE.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", EXAMPLE_PAGES)
def test_page_examples_run(name, tmp_path, monkeypatch):
    page = DOCS / name
    assert page.is_file(), f"docs/{name} is listed in EXAMPLE_PAGES but does not exist"
    blocks = python_blocks(page)
    assert blocks, f"docs/{name} has no ```python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_AMOR_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": f"docs_{name.removesuffix('.md')}"}
    for number, code in enumerate(blocks, start=1):
        exec(compile(code, f"docs/{name} (python block {number})", "exec"), namespace)  # noqa: S102
