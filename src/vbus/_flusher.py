"""The flusher: sends the batches that publishers started and nobody completed in time.

A publisher sends each message at once unless it is publishing in a burst; then it batches, and
a batch goes out when full, when the next message comes after it is ``delay`` old, or, if no
more come, when this thread finds it due. One thread per bus, started with the first batch;
it sleeps on a condition, woken when a publisher starts a batch or when the bus closes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from ._threads import Deadline, block_signals, join

log = logging.getLogger("vbus")


class Batching(Protocol):
    """What the flusher needs of a publisher (``_publisher.Publisher``)."""

    def _flush_due(self) -> float | None:
        """Send the batches that are due; when the next one is due (wall clock), or None."""
        ...


class Flusher:
    def __init__(self, name: str, delay: float) -> None:
        self.delay = delay
        self.name = name
        self._cond = threading.Condition()
        self._due: dict[Batching, float] = {}  # publisher -> when its oldest batch is due (wall)
        self._stopped = False
        self.thread: threading.Thread | None = None
        # Counted for tests and profiles: publishers' requests (``due`` calls, one per batch
        # opened) and wake-ups of this thread (timeouts and notifications alike).
        self.requests = 0
        self.wakeups = 0

    def due(self, publisher: Batching, at: float) -> None:
        """A publisher started a batch that is due at ``at`` (wall clock). Called under its
        lock."""
        with self._cond:
            self.requests += 1
            if self._stopped:
                return  # the publisher flushes when it closes
            wake = not self._due
            self._due.setdefault(publisher, at)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name)
                self.thread.start()
            elif wake:
                self._cond.notify()

    def _run(self) -> None:
        block_signals()
        while True:
            with self._cond:
                while not self._due and not self._stopped:
                    self._cond.wait()  # woken by due() or stop()
                    self.wakeups += 1
                if self._stopped:
                    return
                wait = min(self._due.values()) - time.time()
                if wait > 0:
                    self._cond.wait(wait)
                    self.wakeups += 1
                    continue
                now = time.time()
                ready = [p for p, at in self._due.items() if at <= now]
                for p in ready:
                    del self._due[p]
            # Without our lock: a publisher takes its own lock first, then ours.
            for p in ready:
                try:
                    again = p._flush_due()
                except Exception as exc:  # a publisher that failed is not ours to retry
                    log.debug("flusher: %r: %r", p, exc)
                    continue
                if again is not None:
                    with self._cond:
                        if not self._stopped:
                            self._due[p] = min(again, self._due.get(p, again))

    def stop(self, deadline: Deadline) -> bool:
        with self._cond:
            self._stopped = True
            self._due.clear()
            self._cond.notify()
        return join(self.thread, deadline)
