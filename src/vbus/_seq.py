"""Sequence tracking and burst-limited reporting, sans-io."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class SequenceTracker:
    """Counts messages lost between a subscriber and each (publisher, topic) it hears.

    The first message seen from a publisher on a topic sets the baseline (the subscriber may
    have joined late); after that every skipped sequence number is a loss.
    """

    __slots__ = ("_last", "lost")

    def __init__(self) -> None:
        self._last: dict[tuple[bytes, str], int] = {}
        self.lost = 0

    def observe(self, sender: bytes, topic: str, seq: int, count: int = 1) -> int:
        """Record ``count`` consecutive seqs from ``seq``; return how many messages were lost
        just before them (0 if none)."""
        key = (sender, topic)
        last = self._last.get(key)
        self._last[key] = seq + count - 1
        if last is None or seq <= last + 1:
            return 0
        gap = seq - last - 1
        self.lost += gap
        return gap


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
