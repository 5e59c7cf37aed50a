"""Helpers the tests share: the leak check every bus-making test runs, and small utilities.

Child processes (``childproc.py``) and a standalone broker in its own process (``brokerproc.py``)
live beside this module.
"""

from __future__ import annotations

import os
import threading
import time


def fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class LeakCheck:
    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.fds = fds()

    def assert_clean(self, grace: float = 2.0) -> None:
        # Threads that a close() from inside a callback let finish on their own get a grace
        # period to end; joining them is what a second close() would do.
        deadline = time.monotonic() + grace
        for thread in self._new_threads():
            thread.join(max(deadline - time.monotonic(), 0.0))
        left = [t.name for t in self._new_threads()]
        assert not left, f"threads left behind: {left}"
        leaked = fds() - self.fds
        described = {fd: _describe(fd) for fd in leaked}
        assert not leaked, f"file descriptors left behind: {described}"

    def _new_threads(self) -> list[threading.Thread]:
        # Threads Python did not start (Qt's own, say) show up as dummies: not ours to join.
        return [t for t in set(threading.enumerate()) - self.threads
                if not isinstance(t, threading._DummyThread)]


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
