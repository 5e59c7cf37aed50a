"""Small thread helpers: a started() handshake and deadline arithmetic."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
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


_SYNCHRONOUS = {"SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP", "SIGSYS",
                "SIGKILL", "SIGSTOP"}


def block_signals() -> None:
    """Keep asynchronous signals for the main thread: Ctrl-C, SIGTERM and a user's SIGALRM
    then interrupt a blocking recv() there, and never land in one of vbus's threads."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _blockable())


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold asynchronous signals back for a few statements that make a resource and store it
    (an fd, a socket): Ctrl-C then lands before or after, never between the two, so nothing
    is made that no cleanup can see. Only the main thread gets Python signal handlers; in
    other threads this does nothing."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not (
        threading.main_thread()
    ):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _blockable())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _blockable() -> set[signal.Signals]:
    return {s for s in signal.valid_signals()
            if isinstance(s, signal.Signals) and s.name not in _SYNCHRONOUS}


def build_uninterrupted(build: Callable[[], T], keep: Callable[[T], object], what: str,
                        timeout: float) -> None:
    """``keep(build())`` on a thread of its own, where no signal can interrupt it halfway.

    ``keep`` stores the result where the caller's cleanup finds it. The caller waits; if the
    wait is interrupted (Ctrl-C), the build is let finish (``keep`` runs), and then the
    interruption propagates: the caller's cleanup undoes what was kept, and nothing is left
    half-made or running unseen. TimeoutError naming ``what`` after ``timeout``."""
    started: Started[None] = Started()

    def run() -> None:
        block_signals()
        try:
            keep(build())
        except BaseException as exc:
            started.fail(exc)
            return
        started.ok(None)

    thread = threading.Thread(target=run, name=f"vbus-start-{what}")
    try:
        thread.start()
        started.wait(timeout, what)
    finally:
        # Interrupted inside start(), the thread runs but may not be marked started yet,
        # and join() would refuse it: wait for the mark first (it comes at once).
        launched = getattr(thread, "_started", None)
        if launched is not None and not launched.is_set():
            launched.wait(1.0)
        if launched is None or launched.is_set():
            thread.join(timeout)


def is_current(thread: threading.Thread | None) -> bool:
    return thread is not None and thread is threading.current_thread()


def join(thread: threading.Thread | None, deadline: Deadline) -> bool:
    """Join ``thread``; True if it has ended, or is the caller (which cannot join itself and
    ends when it returns)."""
    if thread is None or thread.ident is None or is_current(thread):
        return True
    thread.join(deadline.remaining())
    return not thread.is_alive()
