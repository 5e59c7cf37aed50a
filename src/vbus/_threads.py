"""Small thread helpers: a started() handshake, deadline arithmetic, and the one join."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
"""Seconds a call that waits on the bus (connect(), request(), the command line's
--timeout) waits when not told."""


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
    """The readiness handshake of a thread: it reports a value or the error that stopped it.

    A bare lock, held until the report, not a threading.Event: Ctrl-C in the waiting (main)
    thread can leave an Event's condition lock held (inside its Python code), and the
    reporting thread would then block in set() forever; a lock's acquire is one C call."""

    def __init__(self) -> None:
        self._pending = threading.Lock()
        self._pending.acquire()
        self._reported = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def ok(self, value: T) -> None:
        self._value = value
        self._report()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._report()

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            self._pending.release()

    def wait(self, timeout: float, what: str) -> T:
        if not self._reported:
            if not self._pending.acquire(timeout=max(timeout, 0.0)):
                raise TimeoutError(f"{what} did not start within {timeout:g} s")
            self._pending.release()  # for any other waiter
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
    # threading books every Thread in a WeakSet (for CPython's own tests) whose callback, run
    # in the thread that drops the last reference (ours, as we return), is Python code where
    # Ctrl-C can land only to be swallowed ("Exception ignored in WeakSet._remove").
    getattr(threading, "_dangling", set()).discard(thread)
    try:
        thread.start()
        started.wait(timeout, what)
    except RuntimeError as exc:
        # CPython's Condition.wait (inside start() and Event.wait), hit by Ctrl-C just after
        # it released its lock, leaves the lock free and then fails to release it again:
        # RuntimeError('release unlocked lock') stands in for the KeyboardInterrupt. Raise
        # what the user pressed. (The condition is left consistent: its lock is free.)
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        raise
    finally:
        if _settle_start(thread):
            thread.join(timeout)


_LAUNCH_WAIT = 0.1  # a launched thread marks itself started within microseconds...
_UNLAUNCHED_AFTER = 0.8  # ...and seen on a loaded machine within 0.1 s+, never near this


def _settle_start(thread: threading.Thread) -> bool:
    """True once ``thread`` is marked started (join() refuses it before); False if Ctrl-C
    cut its start() short before it launched the thread, which then never runs.

    Interrupted inside start(), the thread runs but may not be marked yet: the mark comes at
    once. Polled, never waited on: Ctrl-C inside the mark's Event.wait, just as
    Condition.__enter__ took the condition's lock, leaves that lock held by this thread, and
    both a wait here and the new thread marking itself would deadlock on it."""
    mark = getattr(thread, "_started", None)
    if mark is None or _poll(mark.is_set, _LAUNCH_WAIT):
        return True
    lock = getattr(getattr(mark, "_cond", None), "_lock", None)
    if lock is not None and lock.locked():
        lock.release()  # ours: the new thread holds it only for an instant, to mark itself
    # Never launched, or launched by a busy machine: only a long silence tells them apart
    # (taking a launched thread out of the books would crash its start: KeyError in _limbo).
    if _poll(mark.is_set, _UNLAUNCHED_AFTER):
        return True
    _forget_unlaunched(thread)
    return False


def _poll(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)  # sleep-ok: only after Ctrl-C in start(); nothing else to wait on
    return True


def _forget_unlaunched(thread: threading.Thread) -> None:
    """Take a thread whose start() Ctrl-C cut short before it launched the thread out of
    threading's list of threads being born, where enumerate() would list it forever. The
    build it was to run never ran: nothing else is left."""
    lock = getattr(threading, "_active_limbo_lock", None)
    limbo = getattr(threading, "_limbo", None)
    if lock is None or limbo is None:
        return
    with lock:
        started = getattr(thread, "_started", None)
        if started is not None and not started.is_set():
            limbo.pop(thread, None)


def is_current(thread: threading.Thread | None) -> bool:
    """True if ``thread`` is the calling thread. Compared by ident, not with current_thread():
    called from a thread that threading did not start (a QThread, a C library's), that would
    register a dummy Thread for good."""
    return thread is not None and thread.ident == threading.get_ident() and thread.is_alive()


def current_in(threads: Iterable[threading.Thread]) -> bool:
    """True if the calling thread is one of ``threads`` (by ident, like ``is_current``)."""
    return any(is_current(t) for t in threads)


def join(thread: threading.Thread | None, deadline: Deadline) -> bool:
    """Join ``thread`` until ``deadline``; True once it has ended, was never started, or is the
    caller (which cannot join itself and ends when it returns). Safe from any thread,
    a QThread included (see ``is_current``)."""
    if thread is None or thread.ident is None or is_current(thread):
        return True
    thread.join(deadline.remaining())
    return not thread.is_alive()
