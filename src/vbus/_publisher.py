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
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from . import _batch, _control, _wire
from ._batch import Batch
from ._errors import Closed, ConnectError, DecodeError, EncodeError
from ._flusher import Flusher
from ._threads import Deadline
from ._topics import topic_prefix, validate_topic

_PREFIX_CACHE_LIMIT = 4096
_DRAIN_EVERY = 256
REPORT_PERIOD = 1.0
LINGER = 0.25
BURST_GAP = 10e-6
"""A message this soon after the previous send starts a batch: a burst is under way."""
_OVERHEAD = 12  # bytes per message besides its payload, for the broker's byte counts
_PLAIN = frozenset({float, int, str, bool, type(None), dict, list, tuple})
_BATCHABLE = _batch.MAX_BYTES // 16  # larger payloads are sent on their own


class PublisherStats(msgspec.Struct, frozen=True):
    sender: str
    published: int
    dropped: int


def connect_publisher(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    timeout: float,
    hwm: int,
    configure: Callable[[zmq.Socket[bytes]], None] | None = None,
) -> zmq.Socket[bytes]:
    """An XPUB connected to ``endpoint``, returned once the broker has subscribed to it.
    ``configure`` sets options (CURVE keys) before it connects."""
    sock = context.socket(zmq.XPUB)
    try:
        sock.linger = 0
        sock.sndhwm = hwm
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        if configure is not None:
            configure(sock)
        sock.connect(endpoint)
        deadline = Deadline(timeout)
        while True:
            remaining = deadline.remaining() or 0.0
            if not sock.poll(int(remaining * 1000)):
                raise ConnectError(f"no broker answered at {endpoint} within {timeout:g} s")
            if _control.is_acceptance(sock.recv()):
                return sock
    except BaseException:
        sock.close(0)
        raise


class Publisher:
    """Publishes to the bus. Thread-safe; ``publish`` never blocks."""

    def __init__(self, sock: zmq.Socket[bytes], *, owner: Any = None,
                 flusher: Flusher | None = None) -> None:
        self._sock = sock
        self._owner = owner
        self._flusher = flusher  # None: never batch
        self._batch_delay = flusher.delay if flusher is not None else 0.0
        self._batches: dict[str, Batch] = {}
        self._last_publish = 0.0
        self._sends = 0
        self._lock = threading.Lock()
        self._encoder = _wire.new_encoder()
        self._sender = secrets.token_bytes(_wire.SENDER_SIZE)
        self._prefixes: dict[str, bytes] = {}
        self._seqs: dict[str, int] = {}  # per topic: the last seq, i.e. messages published
        self._bytes: dict[str, int] = {}
        self._relayed: dict[str, int] = {}  # per topic: messages sent as ready-made frames
        self._published = 0
        self._dropped = 0
        self._next_report = 0.0
        self._closed = False

    @property
    def id(self) -> str:
        """The sender id that subscribers see in ``Message.sender``."""
        return self._sender.hex()

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, topic: str, data: Any, *, retain: bool = False) -> None:
        """Publish ``data`` on ``topic``; with ``retain`` the broker keeps it as the topic's
        last value for subscribers that join later. Raises TopicError or EncodeError before
        anything is sent, Closed after close()."""
        self._publish(topic, data, retain)

    def clear_retained(self, topic: str) -> None:
        """Forget the retained value of ``topic`` at the broker."""
        self._clear_retained(topic)

    def _publish(self, topic: str, data: Any, retain: bool) -> None:
        prefix = self._prefixes.get(topic)
        if prefix is None:
            prefix = self._learn(topic)
        with self._lock:
            if self._closed:
                raise Closed("publisher is closed")
            kind = type(data)
            if retain or self._flusher is None or not (
                kind in _PLAIN or (kind is bytes and len(data) <= _BATCHABLE)
            ):
                self._publish_unbatched(topic, prefix, data, retain)
                return
            # The hot path: a small plain value, batched when it comes in a burst.
            try:
                entry = self._encoder.encode(data)  # bytes become a msgpack bin entry
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                raise EncodeError(
                    f"cannot encode payload of type {kind.__name__}: {exc!r}"
                ) from None
            if len(entry) > _BATCHABLE:
                self._publish_unbatched(topic, prefix, data, retain)
                return
            seq = self._seqs.get(topic, 0) + 1
            self._seqs[topic] = seq
            now = time.time()
            batch = self._batches.get(topic)
            if batch is not None:
                if batch.add(now, entry) or now - batch.first_time >= self._batch_delay:
                    self._flush(topic, batch)
            elif now - self._last_publish < BURST_GAP:
                # A burst: batch from here on; full, late or idle batches go out on their own.
                self._batches[topic] = Batch(prefix, seq, now, entry)
                self._flusher.due(self, now)
            else:
                single = (
                    _wire.Payload(_wire.KIND_BYTES, data)
                    if kind is bytes
                    else _wire.Payload(_wire.KIND_MSGPACK, entry)
                )
                self._send_one(topic, prefix, seq, now, single, False)
            self._last_publish = now
            if now >= self._next_report:
                self._report(now)

    def _publish_unbatched(self, topic: str, prefix: bytes, data: Any, retain: bool) -> None:
        # Caller holds self._lock. Retained values, arrays, large or unusual payloads.
        payload = _wire.encode_payload(data, self._encoder)
        seq = self._seqs.get(topic, 0) + 1
        self._seqs[topic] = seq
        now = time.time()
        batch = self._batches.get(topic)
        if batch is not None:
            self._flush(topic, batch)  # this topic's earlier messages go first
        self._send_one(topic, prefix, seq, now, payload, retain)
        self._last_publish = now
        if now >= self._next_report:
            self._report(now)

    def _send_one(self, topic: str, prefix: bytes, seq: int, now: float,
                  payload: _wire.Payload, retain: bool) -> None:
        # Caller holds self._lock.
        if retain:
            # The broker's copy goes first: a subscriber joining in between then finds the
            # value either in the broker's store or in its live stream (deduplicated).
            copy, external = _wire.build_frames(
                prefix, _wire.FLAG_RETAINED, self._sender, seq, now, payload
            )
            self._send(_control.RETAIN + copy, external, count=0)
        frame, external = _wire.build_frames(prefix, 0, self._sender, seq, now, payload)
        self._send(frame, external)
        size = len(payload.inline) + (0 if external is None else external.nbytes)
        self._bytes[topic] = self._bytes.get(topic, 0) + size + _OVERHEAD

    def _flush(self, topic: str, batch: Batch) -> None:
        # Caller holds self._lock.
        del self._batches[topic]
        self._send(batch.frame(self._sender), None, count=batch.count)
        self._bytes[topic] = self._bytes.get(topic, 0) + batch.size + _OVERHEAD * batch.count

    def _flush_due(self, delay: float) -> float | None:
        """Send the batches that have waited ``delay``; return when the next one is due (wall
        clock), or None. The flusher calls this."""
        now = time.time()
        # Without the lock first: in a flood, publish() sends its own batches when full or
        # late, and the flusher need not contend for the lock with it.
        pending = list(self._batches.values())
        oldest = min((b.first_time for b in pending), default=None)
        if oldest is None:
            return None
        if oldest + delay > now:
            return oldest + delay
        with self._lock:
            if self._closed:
                return None
            next_due: float | None = None
            for topic, batch in list(self._batches.items()):
                due = batch.first_time + delay
                if due <= now:
                    self._flush(topic, batch)
                elif next_due is None or due < next_due:
                    next_due = due
            return next_due

    def _clear_retained(self, topic: str) -> None:
        prefix = self._prefixes.get(topic) or self._learn(topic)
        with self._lock:
            if self._closed:
                raise Closed("publisher is closed")
            frame = _control.control_frame(
                _control.RETAIN + prefix[:-1], self._sender, _wire.FLAG_CLEAR
            )
            self._send(frame, None, count=0)

    def _report(self, now: float, closed: bool = False) -> None:
        # Caller holds self._lock. Cumulative counters, at most once a second while publishing
        # and once at close: the broker's $vbus/stats sums them per topic.
        self._next_report = now + REPORT_PERIOD
        counts = dict(self._relayed)
        for t, n in self._seqs.items():
            counts[t] = counts.get(t, 0) + n
        topics = {t: (n, self._bytes.get(t, 0)) for t, n in counts.items()}
        report = _control.Report("publisher", topics=topics, dropped=self._dropped, closed=closed)
        self._send(_control.report_frame(self._sender, report), None, count=0)

    def _send_control(self, frame: bytes) -> None:
        """Send a one-frame control message (not counted as published)."""
        with self._lock:
            if self._closed:
                raise Closed("publisher is closed")
            self._send(frame, None, count=0)

    def _publish_frames(self, frame: bytes, external: Any = None) -> None:
        """Send a message that is already framed (replay keeps its original header)."""
        try:
            env = _wire.parse_envelope(frame)
            topic: str | None = env.topic
            count = 1
            if env.kind == _wire.KIND_BATCH:
                count = _batch.count(memoryview(frame)[env.offset :])
        except DecodeError:
            topic, count = None, 1
        with self._lock:
            if self._closed:
                raise Closed("publisher is closed")
            self._send(frame, external, count=count)
            if topic is not None:  # the broker's per-topic counts see replayed traffic too
                self._relayed[topic] = self._relayed.get(topic, 0) + count
                size = len(frame) + (0 if external is None else len(external))
                self._bytes[topic] = self._bytes.get(topic, 0) + size
                now = time.time()
                if now >= self._next_report:
                    self._report(now)

    def _send(self, frame: bytes, external: Any, count: int = 1) -> None:
        # Caller holds self._lock. ``count``: the messages in it (0 for control messages).
        sock = self._sock
        try:
            if external is None:
                sock.send(frame, zmq.NOBLOCK)
            else:
                sock.send(frame, zmq.NOBLOCK | zmq.SNDMORE)
                sock.send(external, zmq.NOBLOCK, copy=False)
            self._published += count
        except zmq.Again:
            self._dropped += count
        self._sends += 1
        if self._sends % _DRAIN_EVERY == 0:
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
        """Close the publisher. Idempotent; ``publish`` afterwards raises Closed.

        Messages still queued for a network broker get up to 0.25 s to leave."""
        self._close(LINGER)

    def _close(self, linger: float) -> None:
        with self._lock:
            if self._closed:
                return
            for topic, batch in list(self._batches.items()):
                self._flush(topic, batch)
            if self._published:
                self._report(time.time(), closed=True)
            self._closed = True
            self._sock.close(int(max(linger, 0.0) * 1000))
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
        """Publish ``data`` on ``topic`` (see Publisher.publish); never blocks the loop."""
        self._publish(topic, data, retain)

    async def clear_retained(self, topic: str) -> None:  # type: ignore[override]
        """Forget the retained value of ``topic`` at the broker."""
        self._clear_retained(topic)

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
