"""Preemption signals (SIGTERM, SIGUSR1) as a flag, for exactly as long as the work that polls it runs.

A handler that only sets a flag swallows the signal: left installed after the loop that polls the flag
has returned, it makes the process immune to SIGTERM (``timeout``, ``kill``, a scheduler's grace signal)
for the rest of its life. :class:`PreemptionFlag` therefore restores the previous handlers when closed;
use it as a context manager, or call :meth:`PreemptionFlag.restore` in a ``finally``. The one exception is a
process's entry point (``mcd_scale/train.py``, the precompute tool, the distill driver; :func:`run_entry`): its
flag is installed before any work and stays until the process exits, so a signal that arrives after the work is
done cannot kill the process with the default action (exit 138, which no batch script accepts as done).
"""
from __future__ import annotations

import signal
from typing import Callable, Optional, Sequence

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """``requested`` turns true on the first preemption signal; the handlers before it are put back by
    :meth:`restore` (idempotent). Off the main thread (in-process tests) nothing is installed."""

    def __init__(self, signals: Sequence[int] = PREEMPTION_SIGNALS):
        self.requested = False
        self.signum = None
        self._previous: dict[int, object] = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def run_entry(work: Callable[[PreemptionFlag], int], process_entry: bool,
              flag: Optional[PreemptionFlag] = None) -> int:
    """``work(flag)`` with the preemption handlers installed before any of it (``flag``, or a new
    :class:`PreemptionFlag`). As the process's entry point (``process_entry``) the handlers stay installed until
    the process exits; an in-process caller (the tests) gets its previous handlers back."""
    flag = flag if flag is not None else PreemptionFlag()
    try:
        return work(flag)
    finally:
        if not process_entry:
            flag.restore()
