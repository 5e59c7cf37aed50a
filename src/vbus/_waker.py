"""A file descriptor one thread can wake another with: the waiter polls it beside its socket."""

from __future__ import annotations

import os

from ._threads import signals_deferred


class Waker:
    """Level-triggered: once woken it stays readable until closed. Safe to wake from any thread."""

    _read = _write = -1

    def __init__(self) -> None:
        with signals_deferred():  # the fds are stored before Ctrl-C can land
            if hasattr(os, "eventfd"):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._read, self._write = fd, fd
            else:  # pragma: no cover - non-Linux
                self._read, self._write = os.pipe()
                os.set_blocking(self._write, False)

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
        fds = {self._read, self._write}
        self._read = self._write = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
