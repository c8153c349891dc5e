"""StopOnSigterm: a long piece of work outside training (an oracle solving a fixed set) that SIGTERM preempts.

Lightning catches SIGTERM only while it trains; before that (``prepare_data``, ``setup``) the signal would kill
the process with status 143 and no word. Inside :class:`StopOnSigterm` it raises
:class:`~lightning_amor.preemption.Preempted` instead, so the process exits with
:data:`~lightning_amor.preemption.PREEMPTED_EXIT_CODE` (75: try again) after saying what was kept.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, Callable, Optional

from lightning_amor.preemption import PREEMPTED_EXIT_CODE, Preempted


class StopOnSigterm:
    """Within ``with``, a SIGTERM stops the work at once with :class:`~lightning_amor.preemption.Preempted`.

    Inside :meth:`critical` (writing a file, say) the signal waits for the block to end. The handler that was
    there before comes back on leaving; a SIGTERM that is ignored (``SIG_IGN``) stays ignored, and off the main
    thread (where Python installs no handlers) nothing changes.

    Args:
        kept: says what the work has kept so far, for the message printed when it stops.
    """

    def __init__(self, kept: Callable[[], str]) -> None:
        self.kept = kept
        self.received = False
        self._critical = 0
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous != signal.SIG_IGN:
                self._previous, self._installed = previous, True
                signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = True
        if self._critical == 0:
            self._stop()

    def _stop(self) -> None:
        print(f"\npreempted by SIGTERM: {self.kept()} (exit status {PREEMPTED_EXIT_CODE})", file=sys.stderr,
              flush=True)
        raise Preempted(PREEMPTED_EXIT_CODE)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A block that a SIGTERM does not interrupt: the stop comes when it ends."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self.received and self._critical == 0:
            self._stop()
