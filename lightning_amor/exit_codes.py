"""Exit statuses of ``lightning-amor``, and errors answered with one line instead of a traceback.

| status | meaning |
|---|---|
| 0 | done |
| 1 | an unexpected error (a traceback: please report it) |
| 2 | bad input: a bad option or recipe, an unusable checkpoint or checkpoint folder, a run folder held by
  another live run, a checkpoint written with other settings, non-finite data, a bad input file |
| 3 | non-finite numbers: a NaN or infinite loss or gradient stopped training (``nonfinite: raise``, or too many
  skipped steps), or ``fit`` ended with a held-out objective that is NaN or infinite |
| 74 | a checkpoint could not be saved, or did not read back as written (``EX_IOERR``) |
| 75 | preempted by a signal after saving a checkpoint: run again with ``--ckpt_path last`` (``EX_TEMPFAIL``) |

Set ``LIGHTNING_AMOR_DEBUG=1`` to see the exception and its traceback instead of the one-line message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

BAD_INPUT = 2
"""Exit status for bad input: options, recipes, checkpoints, checkpoint folders, input files."""

NONFINITE = 3
"""Exit status of a run stopped by NaN or infinite numbers in training, or ending with a non-finite held-out
objective."""

SAVE_FAILED = 74
"""Exit status of a run whose checkpoint could not be saved (``EX_IOERR``)."""

DEBUG_VARIABLE = "LIGHTNING_AMOR_DEBUG"
"""The environment variable that, set to ``1``, shows tracebacks instead of one-line messages."""


def debugging() -> bool:
    """Whether :data:`DEBUG_VARIABLE` asks for tracebacks (any value but empty, ``0``, ``false`` or ``no``)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def one_line_errors(program: str, statuses: Mapping[type[BaseException], int]) -> Iterator[None]:
    """Turn the exceptions of the types in ``statuses`` into ``program: error: MESSAGE`` on stderr and an exit with
    the status given for their type (the first type that matches, in order), unless :func:`debugging`."""
    try:
        yield
    except tuple(statuses) as err:
        if debugging():
            raise
        status = next(code for kind, code in statuses.items() if isinstance(err, kind))
        print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(status) from err
