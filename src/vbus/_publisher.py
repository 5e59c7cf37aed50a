"""Publishers: one core, twin shells.

A publisher is an XPUB socket connected to the broker's XSUB. The broker subscribes to
everything, and that subscription reaching us is the proof that the broker takes our messages:
``connect_publisher`` waits for it, so the first message published is never lost to the slow
joiner. Sends never block (XPUB_NODROP + NOBLOCK): a message that finds the queue to the broker
full is dropped and counted here, and its sequence number is spent so subscribers see the gap.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import msgspec
import zmq

from . import _wire
from ._errors import Closed, ConnectError
from ._threads import Deadline
from ._topics import topic_prefix, validate_topic

_PREFIX_CACHE_LIMIT = 4096
_DRAIN_EVERY = 256


class PublisherStats(msgspec.Struct, frozen=True):
    sender: str
    published: int
    dropped: int


def connect_publisher(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, timeout: float, hwm: int
) -> zmq.Socket[bytes]:
    """An XPUB connected to ``endpoint``, returned once the broker has subscribed to it."""
    sock = context.socket(zmq.XPUB)
    try:
        sock.linger = 0
        sock.sndhwm = hwm
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.connect(endpoint)
        deadline = Deadline(timeout)
        while True:
            remaining = deadline.remaining() or 0.0
            if not sock.poll(int(remaining * 1000)):
                raise ConnectError(f"no broker answered at {endpoint} within {timeout:g} s")
            if sock.recv() == b"\x01":
                return sock
    except BaseException:
        sock.close(0)
        raise


class Publisher:
    """Publishes to the bus. Thread-safe; ``publish`` never blocks."""

    def __init__(self, sock: zmq.Socket[bytes], *, owner: Any = None) -> None:
        self._sock = sock
        self._owner = owner
        self._lock = threading.Lock()
        self._encoder = _wire.new_encoder()
        self._sender = secrets.token_bytes(_wire.SENDER_SIZE)
        self._prefixes: dict[str, bytes] = {}
        self._seqs: dict[str, int] = {}
        self._published = 0
        self._dropped = 0
        self._closed = False

    @property
    def id(self) -> str:
        """The sender id that subscribers see in ``Message.sender``."""
        return self._sender.hex()

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, topic: str, data: Any, *, retain: bool = False) -> None:
        """Publish ``data`` on ``topic``. Raises TopicError or EncodeError before sending."""
        self._publish(topic, data, retain)

    def _publish(self, topic: str, data: Any, retain: bool) -> None:
        prefix = self._prefixes.get(topic)
        if prefix is None:
            prefix = self._learn(topic)
        flags = _wire.FLAG_RETAINED if retain else 0
        with self._lock:
            if self._closed:
                raise Closed("publisher is closed")
            payload = _wire.encode_payload(data, self._encoder)
            seq = self._seqs.get(topic, 0) + 1
            self._seqs[topic] = seq
            frame, external = _wire.build_frames(
                prefix, flags, self._sender, seq, time.time(), payload
            )
            self._send(frame, external)

    def _publish_frames(self, frame: bytes, external: Any = None) -> None:
        """Send a message that is already framed (replay keeps its original header)."""
        with self._lock:
            if self._closed:
                raise Closed("publisher is closed")
            self._send(frame, external)

    def _send(self, frame: bytes, external: Any) -> None:
        # Caller holds self._lock.
        sock = self._sock
        try:
            if external is None:
                sock.send(frame, zmq.NOBLOCK)
            else:
                sock.send(frame, zmq.NOBLOCK | zmq.SNDMORE)
                sock.send(external, zmq.NOBLOCK, copy=False)
            self._published += 1
        except zmq.Again:
            self._dropped += 1
        if (self._published + self._dropped) % _DRAIN_EVERY == 0:
            self._drain()

    def _learn(self, topic: str) -> bytes:
        validate_topic(topic)
        if len(self._prefixes) >= _PREFIX_CACHE_LIMIT:
            self._prefixes.clear()
        prefix = self._prefixes[topic] = topic_prefix(topic)
        return prefix

    def _drain(self) -> None:
        # The broker forwards subscription changes to publishers; we need none of them.
        while True:
            try:
                self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def stats(self) -> PublisherStats:
        return PublisherStats(self.id, self._published, self._dropped)

    def close(self) -> None:
        """Close the publisher. Idempotent; ``publish`` afterwards raises Closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close(0)
        if self._owner is not None:
            self._owner._forget(self)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.id} {state}>"


class AsyncPublisher(Publisher):
    """The asyncio twin of Publisher: ``await publish(...)``. Sends never block the loop."""

    async def publish(self, topic: str, data: Any, *, retain: bool = False) -> None:  # type: ignore[override]
        """Publish ``data`` on ``topic``. Raises TopicError or EncodeError before sending."""
        self._publish(topic, data, retain)

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
