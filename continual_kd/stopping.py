"""Stopping on SIGINT / SIGTERM: a stop request a signal handler can set safely, and the handlers that set it.

A ``threading.Event`` is the wrong thing for a handler to set: Python runs handlers on the main thread between
two bytecodes, so a second Ctrl-C arriving while the first handler is inside ``Event.set`` (or while the main
thread is inside ``Event.wait``) re-enters the event's non-reentrant lock and the process hangs for good
(``ckd serve`` did on a double Ctrl-C). ``StopFlag`` has no lock; whoever waits for it naps and looks
(``nap_until``). Threads other than the main one may still hand in a ``threading.Event``: both have ``set`` and
``is_set``.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Protocol

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(Protocol):
    """What a loop that can be stopped reads (and a handler or another thread sets): ``StopFlag`` or ``threading.Event``."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


class StopFlag:
    """``set`` / ``is_set`` like ``threading.Event``, without its lock (safe to set from a signal handler)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


def nap_until(stop, seconds: float, nap: float = 0.05) -> bool:
    """Sleep up to ``seconds`` in naps of at most ``nap`` until ``stop`` is set; → whether it is."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(nap, left))
    return stop.is_set()


def catch_stop_signals(stop, interrupt_on_second: bool = False) -> dict:
    """SIGINT / SIGTERM → ``stop.set()``; with ``interrupt_on_second`` a signal after the stop was asked for stops
    now: the handler it replaced runs (the CLI's Ctrl-C line for SIGINT, Ray's exit for SIGTERM), else
    KeyboardInterrupt. → the handlers replaced, for ``restore_signals`` ({} off the main thread, where Python cannot
    install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced: dict = {}

    def handler(signum, frame) -> None:
        if interrupt_on_second and stop.is_set():
            previous = replaced.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        stop.set()

    replaced.update({sig: signal.signal(sig, handler) for sig in STOP_SIGNALS})
    return dict(replaced)


def restore_signals(handlers: dict) -> None:
    """Put back what ``catch_stop_signals`` replaced."""
    for sig, previous in handlers.items():
        signal.signal(sig, previous)
