"""vbus.Message: what a subscriber receives."""

from __future__ import annotations

from typing import Any

import msgspec


# gc=False: a Message is immutable and made by the subscriber, so it can never be part of a
# reference cycle; untracked by the garbage collector, it is about a quarter cheaper to make.
class Message(msgspec.Struct, frozen=True, gc=False):
    """One received message. Immutable.

    ``sender`` is the publisher's id, ``seq`` counts from 1 per publisher and topic, ``time`` is
    the publisher's clock (seconds since the epoch) at publish, ``retained`` marks a topic's
    last value replayed by the broker to a late subscriber.
    """

    topic: str
    data: Any
    sender: str
    seq: int
    time: float
    retained: bool = False
