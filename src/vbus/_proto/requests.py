"""Request/reply's frames, sans-io (see docs/protocol.md, "Request and reply"); the client
side (_requests.py) and the broker's router (_broker/requests.py) both build and parse them.

- ``\\xfdvbus/serve/<topic>\\0<server>``: subscribed (never published) by a server; the broker
  service sees it on its XPUB, and its unsubscription (explicit, or ZeroMQ's when the server's
  connection goes) removes the server. ``<server>`` is 16 lowercase hex digits, unique per
  server, so the forwarder's XPUB, which forwards only a prefix's first subscription and last
  unsubscription, passes every one of them. 0xFD sorts before the ``\\xfe``/``\\xff`` topics
  of the readiness handshake, so a not-yet-connected SUB sends the marker before its token.
- ``$vbus/req/<topic>``: a request, client -> service. Header sender = the requester's id,
  seq = the request id (per requester, from 1, never reused), payload = the request data.
- ``$vbus/serve/<server>``: the service forwards the request to the one server it picked:
  same header and payload, only the topic is replaced.
- ``$vbus/reply/<requester>/<status>``: the answer, server -> requester (``ok``: the payload
  is the handler's return value; ``error``: a map {"type", "message"}), or service ->
  requester (``none``: nobody serves the topic). seq = the request id.
"""

from __future__ import annotations

import time

import msgspec

from .._errors import TopicError
from . import wire as _wire
from .topics import validate_topic

MARKER = b"\xfdvbus/serve/"
REQUEST = b"$vbus/req/"
SERVE = b"$vbus/serve/"
REPLY = b"$vbus/reply/"
OK, ERROR, NONE = "ok", "error", "none"
ID_SIZE = 16  # hex digits of a requester or server id (8 random bytes)

_HEX = frozenset(b"0123456789abcdef")
_ENCODER = msgspec.msgpack.Encoder()


class ErrorBody(msgspec.Struct, frozen=True):
    """The payload of an ``error`` reply."""

    type: str
    message: str


ERROR_DECODER = msgspec.msgpack.Decoder(ErrorBody)


def is_id(value: bytes) -> bool:
    return len(value) == ID_SIZE and _HEX.issuperset(value)


def marker(topic: str, server: str) -> bytes:
    return MARKER + topic.encode("ascii") + b"\0" + server.encode("ascii")


def parse_marker(body: bytes) -> tuple[str, str] | None:
    """(topic, server) of a serve marker (the subscription without its 0x01/0x00), or None."""
    topic, sep, server = body[len(MARKER) :].partition(b"\0")
    if not sep or not is_id(server):
        return None
    try:
        return validate_topic(topic.decode("ascii")), server.decode("ascii")
    except (UnicodeDecodeError, TopicError):
        return None


def request_prefix(topic: str) -> bytes:
    return REQUEST + topic.encode("ascii") + b"\0"


def serve_prefix(server: str) -> bytes:
    return SERVE + server.encode("ascii") + b"\0"


def reply_subscription(requester: str) -> bytes:
    return REPLY + requester.encode("ascii") + b"/"


def reply_prefix(requester: str, status: str) -> bytes:
    return REPLY + requester.encode("ascii") + b"/" + status.encode("ascii") + b"\0"


def error_payload(type_name: str, message: str) -> _wire.Payload:
    return _wire.Payload(_wire.KIND_MSGPACK, _ENCODER.encode(ErrorBody(type_name, message)))


def no_responder_frame(requester: str, request_id: int, sender: bytes, why: str = "") -> bytes:
    """A ``none`` answer; its payload is ``why`` (a reason for people, may be empty)."""
    payload = _wire.Payload(_wire.KIND_MSGPACK, _ENCODER.encode(why))
    frame, _ = _wire.build_frames(
        reply_prefix(requester, NONE), 0, sender, request_id, time.time(), payload
    )
    return frame


