"""A file descriptor one thread can wake another with: the waiter polls it beside its socket."""

from __future__ import annotations

import itertools
import os


class Waker:
    """Level-triggered: once woken it stays readable until closed. Safe to wake from any thread."""

    def __init__(self) -> None:
        # Made and stored in one C call (list.extend drains the iterator in C, running no
        # bytecode between the fd's birth and its storage), so Ctrl-C cannot land in between
        # and leave an fd nobody can close. Masking signals cannot promise that: a signal
        # taken by another thread still runs its Python handler in the main thread, at once.
        self._fds: list[int] = []
        if hasattr(os, "eventfd"):
            self._fds.extend(
                itertools.starmap(os.eventfd, [(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]))
        else:  # pragma: no cover - non-Linux
            self._fds.extend(itertools.chain.from_iterable(itertools.starmap(os.pipe, [()])))
            os.set_blocking(self._fds[-1], False)

    @property
    def _read(self) -> int:
        return self._fds[0] if self._fds else -1

    @property
    def _write(self) -> int:
        return self._fds[-1] if self._fds else -1

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        try:
            os.write(self._write, (1).to_bytes(8, "little"))
        except (BlockingIOError, OSError):
            pass  # already woken (counter full) or closed: either way nobody sleeps on it

    def __del__(self) -> None:
        # A waker whose owner was never finished (Ctrl-C inside a constructor) still frees its
        # fds; nobody can be polling it once it is unreachable.
        self.close()

    def close(self) -> None:
        fds = getattr(self, "_fds", None)  # None: Ctrl-C came before __init__ made the list
        while fds:
            try:
                fd = fds.pop()
            except IndexError:  # another thread took the last
                return
            os.close(fd)
