"""Publishers: the socket side. What to send, and in which order, is the outbox's.

A publisher is an XPUB socket connected to the broker's XSUB. The broker subscribes to it, and
that subscription reaching us is the proof that the broker takes our messages:
``_handshake.connect_publisher`` waits for it, so the first message published is never lost
to the slow joiner. Sends never block (XPUB_NODROP + NOBLOCK): a message that finds the queue to the
broker full is dropped and counted, and its sequence number is spent so subscribers see the gap.

Ownership: the socket is used only under ``_lock``, so whoever holds the lock is the only
thread inside it, and closes it. close() that cannot take the lock in time (another thread is
mid-publish, or close() runs in a signal handler that interrupted a publish on this very
thread) leaves a request that the holder carries out the next time it takes the lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import zmq

from ._errors import Closed
from ._proto import wire as _wire
from ._proto.outbox import Outbox, Send
from ._proto.topics import topic_prefix, validate_topic

_PREFIX_CACHE_LIMIT = 4096
_DRAIN_EVERY = 256
LINGER = 0.25


class PublisherOwner(Protocol):
    """What a publisher needs of the bus that made it."""

    def _forget(self, child: Any) -> None: ...
    def _socket_closed(self) -> None: ...
    def _batch_started(self, publisher: Publisher, due: float) -> None: ...


class PublisherStats(msgspec.Struct, frozen=True):
    """``shm_frames`` went through the shared pool (by descriptor), ``shm_exhausted`` found
    it full and went as bytes, ``shm_twins`` also went as bytes to subscribers off it."""

    sender: str
    published: int
    dropped: int
    shm_frames: int = 0
    shm_exhausted: int = 0
    shm_twins: int = 0


class Publisher:
    """Publishes to the bus. Thread-safe; ``publish`` never blocks."""

    def __init__(self, sock: zmq.Socket[bytes], outbox: Outbox, *,
                 owner: PublisherOwner | None = None, linger: float = LINGER) -> None:
        self._sock = sock
        self._outbox = outbox
        self._owner = owner
        self._linger = linger
        self._lock = threading.Lock()
        self._prefixes: dict[str, bytes] = {}
        self._sends = 0
        self._closed = False
        self._close_requested = False
        self._dead = False  # after fork, in the child: nothing may touch the socket

    @property
    def id(self) -> str:
        """The sender id that subscribers see in ``Message.sender``."""
        return self._outbox.sender.hex()

    @property
    def closed(self) -> bool:
        return self._closed or self._close_requested or self._dead

    def publish(self, topic: str, data: Any, *, retain: bool = False) -> None:
        """Publish ``data`` on ``topic``; with ``retain`` the broker keeps it as the topic's
        last value for subscribers that join later. Raises TopicError or EncodeError before
        anything is sent, Closed after close()."""
        self._publish(topic, data, retain)

    def clear_retained(self, topic: str) -> None:
        """Forget the retained value of ``topic`` at the broker."""
        prefix = self._prefixes.get(topic) or self._learn(topic)
        self._run(lambda: self._outbox.clear_retained(prefix))

    def _publish(self, topic: str, data: Any, retain: bool) -> None:
        prefix = self._prefixes.get(topic)
        if prefix is None:
            prefix = self._learn(topic)
        if self._dead:
            raise Closed("publisher belongs to the parent process (fork)")
        outbox = self._outbox
        with self._lock:
            if self._closed or self._close_requested:
                self._closed_under_lock()
            sends = outbox.publish(topic, prefix, data, retain, time.time())
            if sends:
                self._transmit(sends)
            if outbox.batch_started:
                outbox.batch_started = False
                due = outbox.due()
                if due is not None and self._owner is not None:
                    self._owner._batch_started(self, due)

    def _run(self, make: Callable[[], Sequence[Send]]) -> None:
        if self._dead:
            raise Closed("publisher belongs to the parent process (fork)")
        with self._lock:
            if self._closed or self._close_requested:
                self._closed_under_lock()
            self._transmit(make())

    def _closed_under_lock(self) -> None:
        # Caller holds the lock: carry out a close that could not take it, then refuse.
        if not self._closed:
            self._close_locked(0.0)
        raise Closed("publisher is closed")

    def _flush_due(self) -> float | None:
        """Send the batch that has waited long enough; return when the next is due (wall
        clock), or None. The bus's flusher thread calls this."""
        outbox = self._outbox
        due = outbox.due()  # without the lock first: in a flood, publish() sends its own
        if due is None or self._dead:
            return None
        if due > time.time():
            return due
        with self._lock:
            if self._closed or self._close_requested:
                if not self._closed:
                    self._close_locked(0.0)
                return None
            self._transmit(outbox.flush_due(time.time()))
            return outbox.due()

    def _send_control(self, frame: bytes) -> None:
        """Send a one-frame control message (not counted as published)."""
        self._run(lambda: [Send([frame], count=0)])

    def _publish_frames(self, frame: bytes, external: Any = None) -> None:
        """Send a message that is already framed (replay keeps its original header)."""
        self._run(lambda: self._outbox.relay(frame, external))

    def _transmit(self, sends: Sequence[Send]) -> None:
        # Caller holds self._lock: the only thread in the socket.
        sock = self._sock
        outbox = self._outbox
        skipping = False
        for send in sends:
            if skipping:  # the rest of a chunked message whose earlier piece did not fit
                skipping = not send.last
                continue
            frames = send.frames
            # Counted before the send: an in-process subscriber may have the message (and a
            # reader the stats) before send() returns here.
            counted = send.count if send.last else 0
            outbox.published += counted
            try:
                if len(frames) == 1:
                    sock.send(frames[0], zmq.NOBLOCK)
                else:
                    sock.send(frames[0], zmq.NOBLOCK | zmq.SNDMORE)
                    for extra in frames[1:-1]:
                        sock.send(extra, zmq.NOBLOCK | zmq.SNDMORE, copy=False)
                    if send.tracked:
                        tracker = sock.send(frames[-1], zmq.NOBLOCK, copy=False, track=True)
                        outbox.track(tracker, send.tracked)
                    else:
                        sock.send(frames[-1], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                outbox.published -= counted
                outbox.dropped += send.count
                skipping = not send.last
            except zmq.ZMQError as exc:
                raise Closed(f"publisher: {exc}") from None
        self._sends += len(sends)
        if self._sends >= _DRAIN_EVERY:
            self._sends = 0
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
        pool = self._outbox.shm
        if pool is None:
            return PublisherStats(self.id, self._outbox.published, self._outbox.dropped)
        return PublisherStats(self.id, self._outbox.published, self._outbox.dropped,
                              pool.sent, pool.exhausted, pool.twinned)

    def loan(self, shape: int | tuple[int, ...], dtype: Any) -> Any:
        """A writable numpy array to fill and then publish without a copy: in the shared
        pool when this publisher has one and it has room, else an ordinary array (it then
        goes as bytes). After ``publish`` the array is read-only: it belongs to the
        subscribers' views. An array never published is given back when it is collected."""
        import numpy

        pool = self._outbox.shm
        if self.closed:
            raise Closed("publisher is closed")
        with self._lock:
            array = pool.loan(shape, dtype) if pool is not None else None
        return array if array is not None else numpy.empty(shape, dtype)

    def close(self) -> None:
        """Close the publisher. Idempotent; ``publish`` afterwards raises Closed.

        Messages still queued for a network broker get up to 0.25 s to leave."""
        self._close(self._linger, timeout=1.0)

    def _close(self, linger: float, timeout: float) -> bool:
        """Close within ``timeout``; False if another thread holds the socket, which then
        closes it the next time it takes the lock."""
        if self._closed or self._dead:
            return True
        # Never wait on our own thread: a signal handler may have interrupted a publish here.
        if not self._lock.acquire(timeout=min(max(timeout, 0.0), 0.1)):
            self._close_requested = True
            return False
        try:
            self._close_locked(linger)
        finally:
            self._lock.release()
        return True

    def _close_locked(self, linger: float) -> None:
        if self._closed:
            return
        outbox = self._outbox
        try:
            sends = outbox.flush()
            if outbox.published:
                sends.append(outbox.report(time.time(), closed=True))
            self._transmit(sends)
        except Closed:
            pass
        finally:
            self._closed = True
            self._sock.close(int(max(linger, 0.0) * 1000))
            if outbox.shm is not None:  # shm: its thread, socket and memfd
                outbox.shm.close()
            owner = self._owner
            if owner is not None:
                owner._forget(self)
                owner._socket_closed()

    def _mark_dead(self) -> None:
        """After fork, in the child: every call raises Closed, nothing touches the socket."""
        self._dead = True

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.id} {state}>"


class AsyncPublisher(Publisher):
    """The asyncio twin of Publisher: ``await publish(...)``. Sends never block the loop."""

    async def publish(self, topic: str, data: Any, *, retain: bool = False) -> None:  # type: ignore[override]
        """Publish ``data`` on ``topic`` (see Publisher.publish); never blocks the loop."""
        self._publish(topic, data, retain)

    async def clear_retained(self, topic: str) -> None:  # type: ignore[override]
        """Forget the retained value of ``topic`` at the broker."""
        Publisher.clear_retained(self, topic)

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def new_outbox(*, batch_delay: float, chunk: bool, inflight_limit: int) -> Outbox:
    return Outbox(secrets.token_bytes(_wire.SENDER_SIZE), batch_delay=batch_delay,
                  chunk=chunk, inflight_limit=inflight_limit)
