"""Stopping a run between optimiser steps, never inside one: Ctrl-C (SIGINT) and SIGTERM (what Slurm, Kubernetes
and `docker stop` send) both finish the current step, write its checkpoint and exit (status 130 and 143)."""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after writing a checkpoint (none under --save-steps -1); `exit_code` is the shell's
    128 + signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    @property
    def reason(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else f"terminated ({SIGNAL_NAMES.get(self.signum)})"


def _defaults() -> dict:
    return {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextlib.contextmanager
def deferred_interrupt():
    """SIGINT and SIGTERM only set a flag, read by the loop after each step, so that the checkpoint it then writes
    holds whole steps (never half an optimiser update). A second signal of either kind stops at once.

    Yields a function returning the pending signal's number (0 when none). Only the main thread can own the
    handlers, and a signal the parent ignores (SIGINT of a background job) or handles itself stays as it was.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    owned = {s: default for s, default in _defaults().items() if signal.getsignal(s) is default}
    pending: list[int] = []

    def on_signal(signum, frame):
        pending.append(signum)
        for s, default in owned.items():  # a second signal acts at once
            signal.signal(s, default)

    for s in owned:
        signal.signal(s, on_signal)
    try:
        yield lambda: pending[0] if pending else 0
    finally:
        for s, default in owned.items():
            signal.signal(s, default)


def stop_signal(processes, local: int) -> int:
    """The signal that stops every process at this step (0: none): the first process's that got one, so that all
    of them stop together even when the signal reached only some (every process must call this at each step)."""
    if not processes.distributed:
        return local
    if not processes.any(bool(local)):  # a sum of one number per step; the gather only when stopping
        return 0
    return next(s for s in processes.gather(local) if s)
