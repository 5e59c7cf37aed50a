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
from ._threads import Deadline

_PREFIX_CACHE_LIMIT = 4096
_DRAIN_EVERY = 256
LINGER = 0.25
MAX_LANES = 16
"""Lanes (sockets) of one Publisher at most; more publishing threads than that share them."""
_wall = time.time
# Plain ints: pyzmq's flag enums cost a Python-level Flag.__or__/__and__ at each use.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class PublisherOwner(Protocol):
    """What a publisher needs of the bus that made it."""

    def _forget(self, child: BasePublisher) -> None: ...
    def _socket_closed(self) -> None: ...
    def _batch_started(self, publisher: BasePublisher, due: float) -> None: ...


class PublisherStats(msgspec.Struct, frozen=True):
    """``shm_frames`` went through the shared pool (by descriptor), ``shm_exhausted`` found
    it full and went as bytes, ``shm_twins`` also went as bytes to subscribers off it."""

    sender: str
    published: int
    dropped: int
    shm_frames: int = 0
    shm_exhausted: int = 0
    shm_twins: int = 0


class BasePublisher:
    """What both shells share: lanes, the outbox, sending, stats, loans, close. The shells
    differ only in the spelling of ``publish``/``clear_retained`` and of ``with``: the send
    itself never blocks, so the async one is the same call, awaitable.

    Each publishing thread gets a *lane* of its own: a socket and an outbox, so that threads
    never hand a lock to one another (under the GIL, that hand-off costs more than the
    publish). The first thread that publishes uses the publisher's own socket, made by
    ``bus.publisher()``; each other thread's first publish makes its lane (a handshake with
    the broker, once per thread: lanes of threads that ended are reused), up to MAX_LANES,
    after which threads share lanes. A lane is a sender of its own: ``Message.sender`` names
    the lane a message went through (``pub.id`` for the first publishing thread, one of
    ``pub.senders`` for others), and order holds per publishing thread, across its topics.
    """

    def __init__(self, sock: zmq.Socket[bytes], outbox: Outbox, *,
                 owner: PublisherOwner | None = None, linger: float = LINGER,
                 lanes: Callable[[], BasePublisher] | None = None) -> None:
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
        # Any of the three: the one flag that publish() looks at, before and under the lock.
        self._halted = False
        # Lanes: each publishing thread's, found in ``_local`` (per thread, so a new thread
        # that reuses an ended one's ident never finds the old entry); ``_make_lane`` (None
        # for a lane itself, and after close) makes another thread's.
        self._local = threading.local()
        self._make_lane = lanes
        self._lanes: list[BasePublisher] = []  # made for other threads, closed by close()
        self._users: list[tuple[threading.Thread, BasePublisher]] = []  # which thread has which
        self._lanes_lock = threading.Lock()
        self._lanes_making = 0  # handshakes under way for new lanes (they count to the bound)

    @property
    def id(self) -> str:
        """The sender id that subscribers see in ``Message.sender``: of this publisher's own
        lane, the first thread's that published (other threads': ``senders``)."""
        return self._outbox.sender.hex()

    @property
    def senders(self) -> tuple[str, ...]:
        """Every sender id this publisher's messages carry: ``id`` first, then one per lane
        that other publishing threads use."""
        return (self.id, *(lane.id for lane in list(self._lanes)))

    @property
    def closed(self) -> bool:
        return self._closed or self._close_requested or self._dead

    def _publish(self, topic: str, data: Any, *, retain: bool = False) -> None:
        """Publish ``data`` on ``topic``; with ``retain`` the broker keeps it as the topic's
        last value for subscribers that join later. Raises TopicError or EncodeError before
        anything is sent, Closed after close()."""
        # The hot path: one call into the outbox under the lock, one flag before and under it.
        try:
            lane = self._local.lane
        except AttributeError:
            lane = self._lane()
        if lane is not self:
            BasePublisher._publish(lane, topic, data, retain=retain)
            return
        prefix = self._prefixes.get(topic)
        if prefix is None:
            prefix = self._learn(topic)
        if self._halted and self._dead:
            raise Closed("publisher belongs to the parent process (fork)")
        outbox = self._outbox
        lock = self._lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost more than the rest
        try:
            if self._halted:
                self._closed_under_lock()
            sends = outbox.publish(topic, prefix, data, retain, _wall())
            if sends:
                self._transmit(sends)
            if outbox.batch_started:
                self._batch_started()
        finally:
            lock.release()

    def _clear_retained(self, topic: str) -> None:
        """Forget the retained value of ``topic`` at the broker."""
        lane = self._lane()
        prefix = lane._prefixes.get(topic) or lane._learn(topic)
        lane._run(lambda: lane._outbox.clear_retained(prefix))

    # -- lanes ----------------------------------------------------------------------------
    def _lane(self) -> BasePublisher:
        """The calling thread's lane (this publisher itself for the first thread)."""
        local = self._local
        try:
            lane: BasePublisher = local.lane
        except AttributeError:
            lane = local.lane = self if self._make_lane is None else self._new_thread()
        return lane

    def _new_thread(self) -> BasePublisher:
        # A thread's first publish: a free lane (this publisher's own socket first), a new
        # one, or past MAX_LANES the least shared one. A thread keeps its lane while it runs,
        # so its messages keep their order.
        if self._dead:  # after fork, in the child: the lock may have been held at the fork
            return self  # (whose publish then raises Closed)
        thread = threading.current_thread()
        with self._lanes_lock:
            if self._make_lane is None:  # closed (or closing) meanwhile
                return self
            self._users = [(t, lane) for t, lane in self._users if t.is_alive()]
            users: dict[int, int] = {}  # id(lane): threads that have it
            for _, lane in self._users:
                users[id(lane)] = users.get(id(lane), 0) + 1
            lanes = (self, *self._lanes)
            chosen = next((lane for lane in lanes if id(lane) not in users), None)
            if chosen is None and len(lanes) + self._lanes_making >= MAX_LANES:
                chosen = min(lanes, key=lambda lane: users.get(id(lane), 0))
            if chosen is not None:
                self._users.append((thread, chosen))
                return chosen
            make = self._make_lane
            self._lanes_making += 1
        try:
            lane = make()  # the handshake, outside our lock: other threads go on publishing
        finally:
            with self._lanes_lock:
                self._lanes_making -= 1
        try:
            with self._lanes_lock:
                if self._make_lane is None:  # closed meanwhile
                    lane._close(0.0, 0.0)
                    return self
                self._lanes.append(lane)
                self._users.append((thread, lane))
        except BaseException:  # Ctrl-C before the lane is ours to close: close it now
            if lane not in self._lanes:
                lane._close(0.0, 0.0)
            raise
        return lane

    def _batch_started(self) -> None:
        # Caller holds the lock: the outbox opened a batch, the bus's flusher sends it if
        # nothing else does in time.
        outbox = self._outbox
        outbox.batch_started = False
        due = outbox.due()
        if due is not None and self._owner is not None:
            self._owner._batch_started(self, due)

    def _run(self, make: Callable[[], Sequence[Send]]) -> None:
        if self._dead:
            raise Closed("publisher belongs to the parent process (fork)")
        with self._lock:
            if self._halted:
                self._closed_under_lock()
            self._transmit(make())

    def _closed_under_lock(self) -> None:
        # Caller holds the lock: carry out a close that could not take it, then refuse.
        if self._dead:
            raise Closed("publisher belongs to the parent process (fork)")
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
            if self._halted:
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
        lane = self._lane()
        lane._run(lambda: lane._outbox.relay(frame, external))

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
                    sock.send(frames[0], _NOBLOCK)
                else:
                    sock.send(frames[0], _NOBLOCK_MORE)
                    for extra in frames[1:-1]:
                        sock.send(extra, _NOBLOCK_MORE, copy=False)
                    if send.tracked:
                        tracker = sock.send(frames[-1], _NOBLOCK, copy=False, track=True)
                        outbox.track(tracker, send.tracked)
                    elif send.window:
                        tracker = sock.send(frames[-1], _NOBLOCK, copy=False, track=True)
                        outbox.track_chunks(tracker, send.window)
                    else:
                        sock.send(frames[-1], _NOBLOCK, copy=False)
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
                self._sock.recv(_NOBLOCK)
            except zmq.Again:
                return

    def stats(self) -> PublisherStats:
        """Counters of every lane together, under ``id``."""
        boxes = [self._outbox, *(lane._outbox for lane in list(self._lanes))]
        pools = [b.shm for b in boxes if b.shm is not None]  # shm: each lane's pool
        return PublisherStats(self.id, sum(b.published for b in boxes),
                              sum(b.dropped for b in boxes), sum(p.sent for p in pools),
                              sum(p.exhausted for p in pools), sum(p.twinned for p in pools))

    def loan(self, shape: int | tuple[int, ...], dtype: Any) -> Any:
        """A writable numpy array to fill and then publish (from this thread) without a
        copy: in the shared pool when this publisher has one and it has room, else an
        ordinary array (it then goes as bytes). After ``publish`` the array is read-only: it
        belongs to the subscribers' views. An array never published is given back when it
        is collected."""
        import numpy

        if self.closed:
            raise Closed("publisher is closed")
        lane = self._lane()  # the lane this thread publishes through: its pool
        pool = lane._outbox.shm
        with lane._lock:
            array = pool.loan(shape, dtype) if pool is not None else None
        return array if array is not None else numpy.empty(shape, dtype)

    def close(self) -> None:
        """Close the publisher. Idempotent; ``publish`` afterwards raises Closed.

        Messages still queued for a network broker get up to 0.25 s to leave."""
        self._close(self._linger, timeout=1.0)

    def _close(self, linger: float, timeout: float) -> bool:
        """Close within ``timeout``; False if another thread holds a socket, which then
        closes it the next time it takes the lock."""
        if self._dead:
            return True  # after fork, in the child: nothing to close, no lock to take
        lanes_closed = True
        if self._make_lane is not None:
            with self._lanes_lock:
                self._make_lane = None  # no new lane from now on
                lanes = list(self._lanes)
            deadline = Deadline(timeout)
            lanes_closed = all([lane._close(linger, deadline.remaining() or 0.0)
                                for lane in lanes])
            timeout = deadline.remaining() or 0.0
        return self._close_own(linger, timeout) and lanes_closed

    def _close_own(self, linger: float, timeout: float) -> bool:
        if self._closed or self._dead:
            return True
        # Never wait on our own thread: a signal handler may have interrupted a publish here.
        if not self._lock.acquire(timeout=min(max(timeout, 0.0), 0.1)):
            self._close_requested = self._halted = True
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
            self._closed = self._halted = True
            self._sock.close(int(max(linger, 0.0) * 1000))
            if outbox.shm is not None:  # shm: its thread, socket and memfd
                outbox.shm.close()
            owner = self._owner
            if owner is not None:
                owner._forget(self)
                owner._socket_closed()

    def _mark_dead(self) -> None:
        """After fork, in the child: every call raises Closed, nothing touches the socket."""
        self._dead = self._halted = True
        for lane in list(self._lanes):
            lane._mark_dead()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.id} {state}>"


class Publisher(BasePublisher):
    """Publishes to the bus: ``publish``, ``with``, ``close``. Thread-safe; ``publish`` never
    blocks; each publishing thread goes through a lane of its own (see BasePublisher)."""

    # The shared implementations themselves, not wrappers: a call more per message costs
    # more than a tenth of a publish.
    publish = BasePublisher._publish
    clear_retained = BasePublisher._clear_retained

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(BasePublisher):
    """The asyncio twin of Publisher: ``await publish(...)``. Sends never block the loop."""

    async def publish(self, topic: str, data: Any, *, retain: bool = False) -> None:
        """Publish ``data`` on ``topic`` (see Publisher.publish); never blocks the loop."""
        self._publish(topic, data, retain=retain)

    async def clear_retained(self, topic: str) -> None:
        """Forget the retained value of ``topic`` at the broker."""
        self._clear_retained(topic)

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def new_outbox(*, batch_delay: float, chunk: bool, inflight_limit: int,
               chunk_window: int = 0) -> Outbox:
    return Outbox(secrets.token_bytes(_wire.SENDER_SIZE), batch_delay=batch_delay,
                  chunk=chunk, inflight_limit=inflight_limit, chunk_window=chunk_window)
