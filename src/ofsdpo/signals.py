"""Stopping a run between optimiser steps, never inside one."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) only sets a flag, read by the loop after each step, so that the checkpoint it then writes
    holds whole steps (never half an optimiser update). A second Ctrl-C interrupts at once.

    Yields a function telling whether an interrupt is pending. Only the main thread can own the handler, and a
    SIGINT that the shell ignores (a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    pending = []

    def on_sigint(signum, frame):
        pending.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(pending)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
