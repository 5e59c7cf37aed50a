"""The broker's bookkeeping, sans-io: retained values and the statistics it publishes."""

from __future__ import annotations

from typing import Any

from . import _control, _wire
from ._errors import DecodeError
from ._topics import Pattern

MAX_RETAINED_TOPICS = 100_000
MAX_REPORTERS = 100_000
MAX_SUBSCRIBERS = 100_000
_MAX_COUNT = 2**63 - 1  # sums of many reports stay encodable


class RetainedStore:
    """The latest retained message of each topic, as the frames to replay.

    At most ``limit`` topics: past that a new topic's value is refused (and counted), so a
    careless or hostile publisher cannot grow the broker without bound."""

    def __init__(self, limit: int = MAX_RETAINED_TOPICS) -> None:
        self._frames: dict[str, list[bytes]] = {}
        self._limit = limit
        self.refused = 0

    def __len__(self) -> int:
        return len(self._frames)

    def take(self, first: bytes, rest: list[bytes]) -> bool:
        """Keep (or clear) from a ``$vbus/retain/<topic>`` message; False if it is invalid."""
        original = first[len(_control.RETAIN) :]
        try:
            env = _wire.parse_envelope(original)
        except DecodeError:
            return False
        if env.flags & _wire.FLAG_CLEAR:
            self._frames.pop(env.topic, None)
        elif env.topic in self._frames or len(self._frames) < self._limit:
            self._frames[env.topic] = [original, *rest]
        else:
            self.refused += 1
            return False
        return True

    def matching(self, pattern: Pattern) -> list[list[bytes]]:
        return [frames for topic, frames in sorted(self._frames.items()) if pattern.match(topic)]


class SubscriberCount:
    """The number of confirmed subscribers (ready tokens), exact, in bounded memory.

    The forwarder reports each token once when it appears and once when its last subscriber
    goes (its XPUB passes on only the first subscription and the last unsubscription of a
    prefix), so a count is exact. Up to ``limit`` tokens are kept by name, the rest counted
    only: a flood of bogus tokens costs no more than the bound."""

    def __init__(self, limit: int = MAX_SUBSCRIBERS) -> None:
        self._tokens: set[bytes] = set()
        self._untracked = 0
        self._limit = limit

    def __len__(self) -> int:
        return len(self._tokens) + self._untracked

    def __contains__(self, token: object) -> bool:
        return token in self._tokens

    def add(self, token: bytes) -> None:
        if token in self._tokens:
            return
        if len(self._tokens) < self._limit:
            self._tokens.add(token)
        else:
            self._untracked += 1

    def discard(self, token: bytes) -> None:
        if token in self._tokens:
            self._tokens.discard(token)
        elif self._untracked:
            self._untracked -= 1


class Ledger:
    """Aggregates reports into the ``$vbus/stats`` map (totals and rates per topic)."""

    def __init__(self, broker_id: str, started: float) -> None:
        self._id = broker_id
        self._started = started
        self._publishers: dict[bytes, _control.Report] = {}
        self._subscribers: dict[bytes, _control.Report] = {}
        self._last_time: float | None = None
        self._last_totals: dict[str, tuple[int, int]] = {}

    def take(self, sender: bytes, report: _control.Report) -> None:
        book = self._publishers if report.kind == "publisher" else self._subscribers
        if sender not in book and len(book) >= MAX_REPORTERS:
            book.pop(next(iter(book)))  # the oldest reporter's counts give way
        book[sender] = report

    def snapshot(self, now: float, forwarder: dict[str, int], subscribers: int) -> dict[str, Any]:
        totals: dict[str, tuple[int, int]] = {}
        for report in self._publishers.values():
            for topic, (messages, size) in report.topics.items():
                m, b = totals.get(topic, (0, 0))
                totals[topic] = (m + messages, b + size)
        dt = None if self._last_time is None else max(now - self._last_time, 1e-9)
        totals = {t: (min(m, _MAX_COUNT), min(b, _MAX_COUNT)) for t, (m, b) in totals.items()}
        topics = {}
        for topic, (messages, size) in sorted(totals.items()):
            pm, pb = self._last_totals.get(topic, (messages, size))
            topics[topic] = {
                "messages": messages,
                "bytes": size,
                "message_rate": (messages - pm) / dt if dt else 0.0,
                "byte_rate": (size - pb) / dt if dt else 0.0,
            }
        self._last_time, self._last_totals = now, totals
        dropped = min(_MAX_COUNT, sum(r.dropped for r in self._publishers.values()) + sum(
            r.dropped for r in self._subscribers.values()
        ))
        return {
            "broker": self._id,
            "time": now,
            "uptime": now - self._started,
            **forwarder,
            "subscribers": subscribers,
            "publishers": sum(not r.closed for r in self._publishers.values()),
            "dropped": dropped,
            "topics": topics,
        }
