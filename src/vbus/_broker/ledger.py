"""The broker's bookkeeping, sans-io: retained values and the statistics it publishes."""

from __future__ import annotations

import bisect
import heapq
import itertools

import msgspec

from .._errors import DecodeError
from .._proto import control as _control
from .._proto import wire as _wire
from .._proto.stats import BrokerStats, ForwarderStats, TopicStats
from .._proto.topics import Pattern

MAX_RETAINED_TOPICS = 100_000
MAX_REPORTERS = 100_000
MAX_SUBSCRIBERS = 100_000
MAX_TOPICS = 100_000
"""Topics the ledger keeps totals of."""
MAX_REPORT_TOPICS = 100_000
"""Topics taken from one publisher's report."""
MAX_STATS_TOPICS = 1000
"""Topics one ``$vbus/stats`` message lists (the busiest); ``topics_total`` counts all."""
_MAX_COUNT = 2**63 - 1  # sums of many reports stay encodable


class RetainedStore:
    """The latest retained message of each topic, as the frames to replay.

    At most ``limit`` topics: past that a new topic's value is refused (and counted), so a
    careless or hostile publisher cannot grow the broker without bound."""

    def __init__(self, limit: int = MAX_RETAINED_TOPICS) -> None:
        self._frames: dict[str, list[bytes]] = {}
        self._limit = limit
        self._sorted: list[str] | None = []  # the topics in order; None: to be rebuilt
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
            if self._frames.pop(env.topic, None) is not None:
                self._sorted = None
        elif env.topic in self._frames:
            self._frames[env.topic] = [original, *rest]
        elif len(self._frames) < self._limit:
            self._frames[env.topic] = [original, *rest]
            self._sorted = None
        else:
            self.refused += 1
            return False
        return True

    def matching(self, pattern: Pattern, limit: int | None = None) -> list[list[bytes]]:
        """The frames of every topic ``pattern`` matches, in topic order (the first
        ``limit``). Looks only where the pattern's prefixes say: an exact topic costs one
        lookup, ``a/**`` the topics under ``a``; only a leading wildcard scans them all."""
        if self._sorted is None:
            self._sorted = sorted(self._frames)
        topics: set[str] = set()
        for prefix in pattern.prefixes:
            text = prefix.decode("ascii")
            if text.endswith("\0"):
                if text[:-1] in self._frames:
                    topics.add(text[:-1])
                continue
            start = bisect.bisect_left(self._sorted, text)
            for topic in itertools.islice(self._sorted, start, None):
                if not topic.startswith(text):
                    break
                topics.add(topic)
        found = [t for t in sorted(topics) if pattern.match(t)]
        if limit is not None:
            found = found[:limit]
        return [self._frames[t] for t in found]


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
    """Aggregates reports into the ``$vbus/stats`` message (totals and rates per topic).

    Bounded and incremental: a report changes the totals by its difference from the same
    sender's previous one, so a snapshot costs what changed since the last one, not what is
    known. At most ``MAX_TOPICS`` topics are tracked (a new one past that is counted in
    ``topics_refused``), at most ``MAX_REPORT_TOPICS`` of one report; a snapshot lists the
    ``MAX_STATS_TOPICS`` busiest topics (by message rate) and says how many there are."""

    def __init__(self, broker_id: str, started: float) -> None:
        self._id = broker_id
        self._started = started
        self._publishers: dict[bytes, _Account] = {}
        self._subscribers: dict[bytes, int] = {}  # sender -> dropped
        self._totals: dict[str, list[int]] = {}  # topic -> [messages, bytes, reporters]
        self._changed: dict[str, tuple[int, int] | None] = {}  # since the last snapshot
        self._last_time: float | None = None
        self._dropped = 0
        self._open = 0  # publishers not closed
        self.topics_refused = 0

    def take(self, sender: bytes, report: _control.Report) -> None:
        if report.kind != "publisher":
            if sender not in self._subscribers and len(self._subscribers) >= MAX_REPORTERS:
                self._dropped -= self._subscribers.pop(next(iter(self._subscribers)))
            self._dropped += report.dropped - self._subscribers.get(sender, 0)
            self._subscribers[sender] = report.dropped
            return
        old = self._publishers.pop(sender, None)
        if old is None and len(self._publishers) >= MAX_REPORTERS:
            self._forget(self._publishers.pop(next(iter(self._publishers))))
        if old is not None:
            self._forget(old)
        account = _Account(report.dropped, report.closed, {})
        for topic, (messages, size) in report.topics.items():
            if len(account.topics) >= MAX_REPORT_TOPICS:
                self.topics_refused += 1
                continue
            if self._add(topic, messages, size):
                account.topics[topic] = (messages, size)
        self._publishers[sender] = account
        self._dropped += account.dropped
        self._open += not account.closed

    def _forget(self, account: _Account) -> None:
        self._dropped -= account.dropped
        self._open -= not account.closed
        for topic, (messages, size) in account.topics.items():
            self._add(topic, -messages, -size, -1)

    def _add(self, topic: str, messages: int, size: int, reporters: int = 1) -> bool:
        total = self._totals.get(topic)
        if total is None:
            if reporters < 0:
                return False
            if len(self._totals) >= MAX_TOPICS:
                self.topics_refused += 1
                return False
            self._changed.setdefault(topic, None)  # new: no rate before its next snapshot
            self._totals[topic] = [messages, size, reporters]
            return True
        if topic not in self._changed:
            self._changed[topic] = (total[0], total[1])
        total[0] += messages
        total[1] += size
        total[2] += reporters
        if total[2] <= 0:  # no publisher reports it any more
            del self._totals[topic]
        return True

    def snapshot(self, now: float, forwarder: ForwarderStats, subscribers: int) -> BrokerStats:
        """The ``$vbus/stats`` message as of ``now`` (the service adds its own counters)."""
        dt = None if self._last_time is None else max(now - self._last_time, 1e-9)
        rates: dict[str, tuple[float, float]] = {}
        for topic, before in self._changed.items():
            total = self._totals.get(topic)
            if total is not None and before is not None and dt:
                rates[topic] = ((total[0] - before[0]) / dt, (total[1] - before[1]) / dt)
        self._changed = {}
        self._last_time = now
        if len(self._totals) <= MAX_STATS_TOPICS:
            shown = sorted(self._totals)
        else:
            busiest = heapq.nlargest(MAX_STATS_TOPICS, rates, key=lambda t: rates[t][0])
            idle = (t for t in self._totals if t not in rates)
            shown = sorted([*busiest, *itertools.islice(idle, MAX_STATS_TOPICS - len(busiest))])
        topics = {}
        for topic in shown:
            messages, size, _ = self._totals[topic]
            message_rate, byte_rate = rates.get(topic, (0.0, 0.0))
            topics[topic] = TopicStats(min(messages, _MAX_COUNT), min(size, _MAX_COUNT),
                                       message_rate, byte_rate)
        return BrokerStats(
            broker=self._id,
            time=now,
            uptime=now - self._started,
            messages_in=forwarder.messages_in,
            bytes_in=forwarder.bytes_in,
            messages_out=forwarder.messages_out,
            bytes_out=forwarder.bytes_out,
            subscribers=subscribers,
            publishers=self._open,
            dropped=min(self._dropped, _MAX_COUNT),
            topics=topics,
            topics_total=len(self._totals),
        )


class _Account(msgspec.Struct):
    """What one publisher's latest report added to the totals."""

    dropped: int
    closed: bool
    topics: dict[str, tuple[int, int]]
