"""Small thread helpers: a started() handshake and deadline arithmetic."""

from __future__ import annotations

import signal
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Deadline:
    """A point in monotonic time; ``remaining()`` never goes below zero."""

    __slots__ = ("at",)

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + max(timeout, 0.0)

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        return max(self.at - time.monotonic(), 0.0)

    def share(self, fraction: float) -> Deadline:
        """A deadline at ``fraction`` of the time remaining to this one."""
        remaining = self.remaining()
        return Deadline(None if remaining is None else remaining * fraction)

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


class Started(Generic[T]):
    """The readiness handshake of a thread: it reports a value or the error that stopped it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def ok(self, value: T) -> None:
        self._value = value
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    def wait(self, timeout: float, what: str) -> T:
        if not self._event.wait(timeout):
            raise TimeoutError(f"{what} did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def block_signals() -> None:
    """Keep SIGINT/SIGTERM for the main thread, so Ctrl-C interrupts a blocking recv() there."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def is_current(thread: threading.Thread | None) -> bool:
    return thread is not None and thread is threading.current_thread()


def join(thread: threading.Thread | None, deadline: Deadline) -> bool:
    """Join ``thread``; True if it has ended, or is the caller (which cannot join itself and
    ends when it returns)."""
    if thread is None or thread.ident is None or is_current(thread):
        return True
    thread.join(deadline.remaining())
    return not thread.is_alive()
