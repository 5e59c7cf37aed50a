"""A file descriptor one thread can wake another with: the waiter polls it beside its socket
(a ZeroMQ poller, a ``select``, a Qt ``QSocketNotifier``). The only one in vbus."""

from __future__ import annotations

import itertools
import os
import socket


class Waker:
    """Level-triggered: once woken it stays readable until cleared or closed. Safe to wake
    from any thread.

    An eventfd on Linux (one descriptor). ``for_signals=True``, and on systems without
    eventfd, a non-blocking socket pair instead: ``signal.set_wakeup_fd`` writes single
    bytes, which an eventfd refuses, and Windows' ``select`` and ``QSocketNotifier`` take
    only sockets. ``wakeup_fd()`` is the end to hand to ``signal.set_wakeup_fd``."""

    def __init__(self, *, for_signals: bool = False) -> None:
        # Made and stored in one C call (list.extend drains the iterator in C, running no
        # bytecode between the fd's birth and its storage), so Ctrl-C cannot land in between
        # and leave an fd nobody can close. Masking signals cannot promise that: a signal
        # taken by another thread still runs its Python handler in the main thread, at once.
        # (A socket pair closes itself when collected: only the eventfd needs this.)
        self._fds: list[int] = []
        self._pair: list[socket.socket] = []
        if hasattr(os, "eventfd") and not for_signals:
            self._fds.extend(
                itertools.starmap(os.eventfd, [(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]))
        else:
            self._pair.extend(socket.socketpair())
            for end in self._pair:
                end.setblocking(False)

    def fileno(self) -> int:
        """The descriptor to wait on (-1 once closed)."""
        if self._pair:
            return self._pair[0].fileno()
        return self._fds[0] if self._fds else -1

    def wakeup_fd(self) -> int:
        """The descriptor that wakes it when written (for ``signal.set_wakeup_fd``)."""
        if self._pair:
            return self._pair[-1].fileno()
        return self._fds[-1] if self._fds else -1

    def wake(self) -> None:
        try:
            if self._pair:
                self._pair[-1].send(b"\1")
            else:
                os.write(self.wakeup_fd(), (1).to_bytes(8, "little"))
        except (BlockingIOError, OSError, IndexError):
            pass  # already woken (counter full) or closed: either way nobody sleeps on it

    def clear(self) -> None:
        """Not readable any more (until the next wake). Only the waiting thread calls it."""
        try:
            if self._pair:
                while self._pair[0].recv(4096):
                    pass
            else:
                os.read(self.fileno(), 8)
        except (BlockingIOError, OSError, IndexError):
            pass  # not woken, or closed

    def __del__(self) -> None:
        # A waker whose owner was never finished (Ctrl-C inside a constructor) still frees its
        # fds; nobody can be polling it once it is unreachable.
        self.close()

    def close(self) -> None:
        """Idempotent; safe from several threads."""
        pair = getattr(self, "_pair", None)  # None: Ctrl-C came before __init__ made it
        while pair:
            try:
                pair.pop().close()
            except IndexError:  # another thread took the last
                break
        fds = getattr(self, "_fds", None)
        while fds:
            try:
                fd = fds.pop()
            except IndexError:  # another thread took the last
                return
            os.close(fd)
