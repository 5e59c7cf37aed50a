"""Request/reply, the broker's side, sans-io but for ``flush``: the router, a plain object fed
subscription events and request frames that queues the frames to send (``flush`` alone
touches a socket). The frames are _proto/requests.py's.

Routing is round-robin per topic. Replies go from the server to the requester through the C
forwarder and never through the service (one Python hop fewer per round trip), so the service
cannot know how busy a server is: least-outstanding would need that.
"""

from __future__ import annotations

from typing import Any

import zmq

from .._errors import DecodeError
from .._proto import wire as _wire
from .._proto.requests import MARKER, REQUEST, no_responder_frame, parse_marker, serve_prefix
from .._proto.stats import RouterStats

_REQUEST_TEXT = REQUEST.decode()
MAX_SERVERS = 100_000
"""Servers the broker keeps in total; a registration beyond that is refused and counted."""


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
