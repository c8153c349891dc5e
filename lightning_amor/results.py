"""Results files: a Markdown file of ``## `` sections, each rewritten in place by the benchmark or evaluation that
owns it, and written atomically; and the machine line the sections quote."""

from __future__ import annotations

import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Union


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for a results section's machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_atomically(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a reader (or a crash)
    never sees a half-written file; the folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        # mkstemp creates the file readable by its owner only; give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_section(path: Union[str, Path], title: str, section: str) -> None:
    """Replace the section headed ``title`` (a ``## ...`` line) of the Markdown file ``path`` with ``section``, or
    append it; every other section is kept as it is. A missing file is created with a ``# Benchmark results``
    title. The file is replaced atomically (:func:`write_atomically`)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_atomically(path, text.rstrip("\n") + "\n")
