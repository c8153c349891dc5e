"""What the benchmarks share: the machine's description and their tables in benchmarks/RESULTS.md (a ``## `` section
each). The writer lives in the library (:mod:`lightning_amor.results`), which ``lightning-amor evaluate`` uses too."""

from __future__ import annotations

from lightning_amor.results import cpu_name, write_atomically, write_section

__all__ = ["cpu_name", "write_atomically", "write_section"]
