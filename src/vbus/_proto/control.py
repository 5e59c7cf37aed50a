"""The bus's own topics and the frames built on them, sans-io.

- ``\\xffvbus/ready/<token>``: the broker confirms a subscription on it (see _broker/service.py).
  A message there with FLAG_REPLAY carries a retained message in its next frames.
- ``\\xfevbus/want/<token>\\0<pattern>``: subscribed (never published) just before the
  token, it tells the broker which retained values to replay to that subscriber.
- ``$vbus/retain/<topic>``: a publisher's copy of a retained message, kept by the broker;
  with FLAG_CLEAR it clears the topic's retained value.
- ``$vbus/report/<id>``: publishers' and subscribers' counters, aggregated by the broker.
- ``$vbus/stats``: the broker's statistics, once a second (the schema: _proto/stats.py).

The first byte of the first two is not a topic character on purpose. A SUB socket that is not yet
connected sends its subscriptions, once connected, in byte order (libzmq walks its trie), not
in the order they were made; 0xFE and 0xFF sort after every topic, so the pattern's prefixes
still go out before the request, and the request before the token whose confirmation proves
them all active. Once connected, subscriptions go out in call order, which is the same.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec

from . import requests as _requests
from . import wire as _wire

READY = b"\xffvbus/ready/"
WANT = b"\xfevbus/want/"
RETAIN = b"$vbus/retain/"
REPORT = b"$vbus/report/"

_NIL = _wire.Payload(_wire.KIND_MSGPACK, b"\xc0")

TOPIC_START = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:"
"""Every byte a topic may start with (see _proto/topics.py)."""
TWIN = b"$vbus/twin/"  # shm: a frame's bytes twin, for subscribers off shared memory
CLIENT_PREFIXES = (*(bytes([c]) for c in TOPIC_START), RETAIN, REPORT, _requests.REQUEST,
                   _requests.REPLY, TWIN)
"""What a network peer may send through the broker: messages whose first frame starts with
one of these (a topic; a retained copy, a report, a request, a server's reply; a bytes twin
of a shared-memory frame, see _proto/shm.py). Everything
else on the reserved namespace (0xFF/0xFE/0xFD-led control frames, ``$vbus/stats``,
``$vbus/serve/``, any other ``$`` topic) belongs to the broker and is dropped."""


def from_client(first: bytes) -> bool:
    """The rule the broker's network intake applies (in C, as SUB subscriptions)."""
    return first.startswith(CLIENT_PREFIXES)


def is_acceptance(message: bytes) -> bool:
    """A publisher is accepted by its broker when the broker subscribes to it: any
    subscription message (0x01, then a prefix) the broker's XSUB sends proves the link."""
    return message[:1] == b"\x01"


def control_frame(topic: bytes, sender: bytes, flags: int = 0, seq: int = 0,
                  payload: _wire.Payload = _NIL) -> bytes:
    """A one-frame message on a control topic (``topic`` without the terminator)."""
    frame, _ = _wire.build_frames(topic + b"\0", flags, sender, seq, time.time(), payload)
    return frame


def want_subscription(token: bytes, pattern: str) -> bytes:
    return WANT + token + b"\0" + pattern.encode("ascii")


def parse_want(subscription: bytes) -> tuple[bytes, str] | None:
    """(token, pattern) from a ``$vbus/want/...`` subscription body, or None if malformed."""
    body = subscription[len(WANT) :]
    token, sep, pattern = body.partition(b"\0")
    if not sep or not token:
        return None
    try:
        return token, pattern.decode("ascii")
    except UnicodeDecodeError:
        return None


Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # anything else is not a real count


class Report(msgspec.Struct, frozen=True, omit_defaults=True):
    """Counters a publisher or subscriber sends to the broker, cumulative since it started."""

    kind: str  # "publisher" or "subscriber"
    topics: dict[str, tuple[Count, Count]] = {}  # publisher: topic -> (messages, bytes)
    received: Count = 0
    dropped: Count = 0
    closed: bool = False  # the last report of a publisher that closed


_REPORT_ENCODER = msgspec.msgpack.Encoder()
REPORT_DECODER = msgspec.msgpack.Decoder(Report)


def report_frame(sender: bytes, report: Report) -> bytes:
    payload = _wire.Payload(_wire.KIND_MSGPACK, _REPORT_ENCODER.encode(report))
    return control_frame(REPORT + sender.hex().encode(), sender, payload=payload)

