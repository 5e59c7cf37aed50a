"""Sequence tracking and burst-limited reporting, sans-io."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

MAX_STREAMS = 16_384
"""(publisher, topic) pairs a subscriber tracks at most; the least recently heard give way."""


class SequenceTracker:
    """Counts messages lost between a subscriber and each (publisher, topic) it hears.

    The first message seen from a publisher on a topic sets the baseline (the subscriber may
    have joined late); after that every skipped sequence number is a loss. At most ``limit``
    streams are tracked, least recently heard first out (``evicted`` counts them), so that a
    peer inventing senders or topics cannot grow a subscriber without bound; an evicted
    stream heard again starts from a new baseline.
    """

    __slots__ = ("_last", "_limit", "lost", "evicted")

    def __init__(self, limit: int = MAX_STREAMS) -> None:
        self._last: dict[tuple[bytes, str], int] = {}
        self._limit = limit
        self.lost = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._last)

    def observe(self, sender: bytes, topic: str, seq: int, count: int = 1) -> int:
        """Record ``count`` consecutive seqs from ``seq``; return how many messages were lost
        just before them (0 if none)."""
        key = (sender, topic)
        streams = self._last
        last = streams.pop(key, None)  # re-inserted below: the dict's order is recency
        streams[key] = seq + count - 1
        if last is None:
            if len(streams) > self._limit:
                del streams[next(iter(streams))]
                self.evicted += 1
            return 0
        if seq <= last + 1:
            return 0
        gap = seq - last - 1
        self.lost += gap
        return gap

    def last(self, sender: bytes, topic: str) -> int | None:
        """The last seq seen from ``sender`` on ``topic``, if it is tracked."""
        return self._last.get((sender, topic))


class BurstLog:
    """Logs the first event of a burst at once and the rest of the burst as one summary line.

    A burst ends after ``quiet`` seconds without events; the summary is written when the next
    event comes (or on ``flush``), so a flood of losses or errors costs one line a burst.
    """

    __slots__ = ("_logger", "_what", "_quiet", "_clock", "_last", "_pending")

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        quiet: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._quiet = quiet
        self._clock = clock
        self._last = float("-inf")
        self._pending = 0

    def event(self, count: int, detail: str, exc_info: BaseException | None = None) -> bool:
        """Count ``count`` events; return True if this one was logged."""
        now = self._clock()
        new_burst = now - self._last > self._quiet
        self._last = now
        if not new_burst:
            self._pending += count
            return False
        self.flush()
        self._logger.warning("%s: %s", self._what, detail, exc_info=exc_info)
        return True

    def flush(self) -> None:
        if self._pending:
            self._logger.warning("%s: %d more in the last burst", self._what, self._pending)
            self._pending = 0
