"""The ``$vbus/stats`` message, sans-io: the one schema the broker publishes and tools read.

The broker's service thread builds a ``BrokerStats`` once a second (its ledger fills the
totals and rates, the service its own counters) and publishes it, msgpack-encoded, on
``STATS_TOPIC``; ``vbus stats``, ``vbus topics`` and any other reader decode it with
``decode``. Every field but ``broker`` and ``time`` has a default, so a reader accepts a
message from an older or newer broker (missing counters are 0, unknown keys are ignored).
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import wire as _wire

STATS_TOPIC = "$vbus/stats"


class TopicStats(msgspec.Struct, frozen=True):
    """One topic's totals (the publishers' own counts) and rates since the last message."""

    messages: int = 0
    bytes: int = 0
    message_rate: float = 0.0
    byte_rate: float = 0.0


class ForwarderStats(msgspec.Struct, frozen=True):
    """The C forwarder's counters: ZeroMQ messages and bytes in from publishers and out (a
    message sent to several subscribers counts once)."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0


class RouterStats(msgspec.Struct, frozen=True):
    """The broker's request router (see _broker/requests.py)."""

    servers: int = 0
    routed: int = 0
    no_responder: int = 0
    invalid: int = 0
    refused: int = 0
    dropped: int = 0


class BrokerStats(msgspec.Struct, frozen=True):
    """The ``$vbus/stats`` message."""

    broker: str
    time: float
    uptime: float = 0.0
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    subscribers: int = 0  # confirmed subscriptions (ready tokens)
    publishers: int | None = None  # open publishers that report; None: a broker that does not say
    dropped: int = 0  # messages lost anywhere on the bus, as publishers and subscribers report
    topics: dict[str, TopicStats] = {}  # the busiest topics (at most ledger.MAX_STATS_TOPICS)
    topics_total: int = 0  # every topic the ledger keeps totals of
    peers: dict[str, int] = {}  # network peers: accepted, rejected, denied, ...
    connections: int = 0
    subscriptions: int = 0  # distinct subscriptions the forwarder holds
    retained: int = 0  # topics with a retained value
    requests: RouterStats = RouterStats()


_ENCODER = msgspec.msgpack.Encoder()


def stats_payload(stats: BrokerStats) -> _wire.Payload:
    return _wire.Payload(_wire.KIND_MSGPACK, _ENCODER.encode(stats))


def decode(data: Any) -> BrokerStats:
    """A ``$vbus/stats`` message's decoded data as ``BrokerStats``; raises
    ``msgspec.ValidationError`` naming what does not fit."""
    return msgspec.convert(data, BrokerStats)
