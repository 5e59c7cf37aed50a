"""Request/reply, sans-io: the frames (see docs/protocol.md, "Request and reply") and the
broker's router, a plain object fed subscription events and request frames that queues the
frames to send (``flush`` alone touches a socket).

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

Routing is round-robin per topic. Replies go from the server to the requester through the C
forwarder and never through the service (one Python hop fewer per round trip), so the service
cannot know how busy a server is: least-outstanding would need that.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq

from .._errors import DecodeError, TopicError
from .._proto import wire as _wire
from .._proto.topics import validate_topic

MARKER = b"\xfdvbus/serve/"
REQUEST = b"$vbus/req/"
_REQUEST_TEXT = REQUEST.decode()
SERVE = b"$vbus/serve/"
REPLY = b"$vbus/reply/"
OK, ERROR, NONE = "ok", "error", "none"
ID_SIZE = 16  # hex digits of a requester or server id (8 random bytes)
MAX_SERVERS = 100_000
"""Servers the broker keeps in total; a registration beyond that is refused and counted."""

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


class RouterStats(msgspec.Struct, frozen=True):
    servers: int
    routed: int
    no_responder: int
    invalid: int
    refused: int
    dropped: int


class RequestRouter:
    """The broker's side of request/reply. Feed it ``subscription()`` for every subscription
    event its XPUB reads and ``request()`` for every ``$vbus/req/`` message its SUB reads;
    send what ``take()`` returns (multipart messages) on its XPUB."""

    def __init__(self, sender: bytes, max_servers: int = MAX_SERVERS) -> None:
        self._sender = sender
        self._max_servers = max_servers
        self._servers: dict[str, list[str]] = {}  # topic -> server ids, in registration order
        self._turn: dict[str, int] = {}  # topic -> index of the next server to pick
        self._topic_of: dict[str, str] = {}  # server id -> its topic
        self._outbox: list[list[Any]] = []
        self.routed = 0
        self.no_responder = 0
        self.invalid = 0
        self.refused = 0
        self.dropped = 0

    def subscription(self, subscribe: bool, body: bytes) -> bool:
        """Take a subscription event's body; True if it was a serve marker (taken)."""
        if not body.startswith(MARKER):
            return False
        parsed = parse_marker(body)
        if parsed is None:
            self.invalid += 1
            return True
        topic, server = parsed
        if subscribe:
            self._add(topic, server)
        else:
            self._remove(server)
        return True

    def _add(self, topic: str, server: str) -> None:
        if server in self._topic_of:
            return  # a re-sent subscription (reconnect): already known
        if len(self._topic_of) >= self._max_servers:
            self.refused += 1
            return
        self._topic_of[server] = topic
        self._servers.setdefault(topic, []).append(server)

    def _remove(self, server: str) -> None:
        topic = self._topic_of.pop(server, None)
        if topic is None:
            return
        servers = self._servers[topic]
        index = servers.index(server)
        servers.pop(index)
        if not servers:
            del self._servers[topic]
            self._turn.pop(topic, None)
        elif self._turn.get(topic, 0) > index:
            self._turn[topic] -= 1  # the rotation goes on where it was

    def request(self, first: bytes, rest: list[Any]) -> None:
        """Take a request (frame 1 and the frames after it): forward it to one server of its
        topic, or answer ``none`` at once."""
        try:
            env = _wire.parse_envelope(first)
            topic = env.topic[len(_REQUEST_TEXT) :] if env.topic.startswith(_REQUEST_TEXT) else ""
            if not topic or env.seq == 0:
                raise DecodeError("not a request")
        except DecodeError:
            self.invalid += 1
            return
        servers = self._servers.get(topic)
        requester = env.sender.hex()
        if not servers:
            self.no_responder += 1
            self._outbox.append([no_responder_frame(requester, env.seq, self._sender)])
            return
        turn = self._turn.get(topic, 0) % len(servers)
        self._turn[topic] = turn + 1
        body = memoryview(first)[len(REQUEST) + len(topic) + 1 :]
        self._outbox.append([serve_prefix(servers[turn]) + body, *rest])
        self.routed += 1

    def take(self) -> list[list[Any]]:
        """The messages to send, in order; the router forgets them."""
        out, self._outbox = self._outbox, []
        return out

    def servers(self, topic: str) -> list[str]:
        return list(self._servers.get(topic, ()))

    def stats(self) -> RouterStats:
        return RouterStats(len(self._topic_of), self.routed, self.no_responder, self.invalid,
                           self.refused, self.dropped)


def stats_dict(router: RequestRouter) -> dict[str, int]:
    """The router's counters for ``$vbus/stats`` (key ``requests``)."""
    return msgspec.structs.asdict(router.stats())


def flush(router: RequestRouter, sock: zmq.Socket[bytes]) -> None:
    """Send what ``router`` queued on ``sock`` (the service's XPUB), never blocking: a message
    that finds the queue full is dropped and counted (its requester times out). The service
    calls this after each batch of input, so a request it routed goes out before any
    readiness confirmation it sends later: a server that is told it was unregistered has
    every request routed to it before that."""
    for frames in router.take():
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            router.dropped += 1
