"""Subscribers: one core, twin shells.

``Subscriber`` holds everything: the socket, decoding, filtering, sequence tracking and the
close protocol. ``AsyncSubscriber`` overrides only how to wait for the socket (the event
loop's reader instead of ``zmq.Poller``) and the spelling of iteration.

Close protocol: a socket is closed by the thread using it. ``close()`` from elsewhere marks the
subscriber closing and wakes the waiter through a file descriptor it polls beside the socket;
the waiter then closes the socket and raises Closed. When no one is waiting, ``close()`` closes
the socket itself (the lock makes that hand-over safe).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import zmq

from . import _batch, _control, _wire
from ._errors import Closed, ConnectError, DecodeError
from ._message import Message
from ._seq import BurstLog, SequenceTracker
from ._threads import Deadline
from ._topics import Pattern
from ._waker import Waker

log = logging.getLogger("vbus.subscriber")

Raw = tuple[bytes, list[zmq.Frame]]
YIELD_EVERY = 64
_UNDECODABLE = object()  # a batch entry that failed validation (counted, not delivered)
LossHook = Callable[[str, str, int], object]
"""``on_loss(topic, sender, count)``: called in the receiving thread when a gap is found."""


class SubscriberStats(msgspec.Struct, frozen=True):
    """``received`` were delivered; ``dropped`` were lost before reaching this subscriber
    (counted from sequence gaps); ``errors`` failed to decode or raised in a callback;
    ``invalid`` were not vbus messages at all."""

    pattern: str
    received: int
    dropped: int
    errors: int
    invalid: int


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _recv_raw(sock: zmq.Socket[bytes]) -> Raw:
    """One whole message; raises zmq.Again when none is queued."""
    first = sock.recv(zmq.NOBLOCK)
    rest: list[zmq.Frame] = []
    while sock.getsockopt(zmq.RCVMORE):
        rest.append(sock.recv(zmq.NOBLOCK, copy=False))
    return first, rest


def connect_subscriber(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    pattern: Pattern,
    *,
    timeout: float,
    hwm: int,
    configure: Callable[[zmq.Socket[bytes]], None] | None = None,
) -> tuple[zmq.Socket[bytes], bytes, list[Raw]]:
    """A SUB socket whose subscription the broker has confirmed active.

    Returns the socket, its ready-token prefix and what arrived before the confirmation:
    the retained values the broker replays first, then live traffic, in delivery order.
    """
    sock = context.socket(zmq.SUB)
    try:
        sock.linger = 0
        sock.rcvhwm = hwm
        if configure is not None:
            configure(sock)
        for prefix in pattern.prefixes:
            sock.subscribe(prefix)
        token = secrets.token_hex(8).encode()
        want = _control.want_subscription(token, pattern.text)
        ready = _control.READY + token + b"\0"
        sock.subscribe(want)  # tells the broker which retained values to replay
        sock.subscribe(ready)  # last: its confirmation covers everything before it
        sock.connect(endpoint)
        deadline = Deadline(timeout)
        replays: list[Raw] = []
        early: list[Raw] = []
        while True:
            remaining = deadline.remaining() or 0.0
            if not sock.poll(int(remaining * 1000)):
                raise ConnectError(
                    f"broker at {endpoint} did not confirm subscription {pattern.text!r} "
                    f"within {timeout:g} s"
                )
            raw = _recv_raw(sock)
            if not raw[0].startswith(ready):
                early.append(raw)
            elif raw[1]:
                replays.append(raw)
            else:
                sock.unsubscribe(want)
                return sock, ready, replays + early
    except BaseException:
        sock.close(0)
        raise


class Subscriber:
    """Receives the messages whose topic matches a pattern. ``recv``, iterate, ``close``."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        pattern: Pattern,
        ready: bytes,
        early: list[Raw],
        *,
        type: Any = None,
        on_loss: LossHook | None = None,
        owner: Any = None,
    ) -> None:
        self._sock = sock
        self._on_loss = on_loss
        self._pattern = pattern
        self._match = pattern.matches
        self._ready = ready
        self._early: deque[Raw] = deque(early)
        self._type = type
        self._decoder = (
            msgspec.msgpack.Decoder() if type is None else msgspec.msgpack.Decoder(type)
        )
        self._owner = owner
        self._seqs = SequenceTracker()
        self._batched: deque[Message] = deque()  # decoded from a batch, not yet returned
        self._batch_decoder = _batch.entries_decoder(type)
        self._replayed: dict[tuple[bytes, str], int] = {}
        self._id = secrets.token_bytes(8)
        self._next_report = 0.0
        self._senders: dict[bytes, str] = {}
        self._received = 0
        self._errors = 0
        self._invalid = 0
        self._loss_log = BurstLog(log, f"subscriber {pattern.text!r} lost messages")
        self._error_log = BurstLog(log, f"subscriber {pattern.text!r} skipped a message")
        self._lock = threading.Lock()
        self._state = _State.OPEN
        self._receiver: int | None = None  # ident of the thread inside recv()
        self._closed_event = threading.Event()
        self._last_raw: tuple[bytes, list[Any]] | None = None  # frames of the last decoded
        self._recorded: object = None  # the frames _recv_frames returned last
        self._waker = Waker()
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._waker.fileno(), zmq.POLLIN)

    @property
    def pattern(self) -> str:
        return self._pattern.text

    @property
    def closed(self) -> bool:
        return self._state is not _State.OPEN

    # -- receiving (the part the shells share) ----------------------------------------------
    def _claim(self) -> None:
        with self._lock:
            if self._state is not _State.OPEN:
                raise Closed(f"subscriber {self._pattern.text!r} is closed")
            if self._receiver is not None:
                raise RuntimeError(
                    f"subscriber {self._pattern.text!r} is already receiving in another thread "
                    "or task; use one subscriber per consumer"
                )
            self._receiver = threading.get_ident()

    def _release(self) -> None:
        with self._lock:
            self._receiver = None
            if self._state is _State.CLOSING:
                self._finish_close()

    def _next_queued(self) -> Message | None:
        """The next deliverable message already here, or None; raises Closed once closing."""
        while True:
            if self._state is not _State.OPEN:
                raise Closed(f"subscriber {self._pattern.text!r} was closed")
            if self._batched:
                return self._batched.popleft()
            if self._early:
                raw = self._early.popleft()
            else:
                try:
                    raw = _recv_raw(self._sock)
                except zmq.Again:
                    return None
            msg = self._decode(*raw)
            if msg is not None:
                return msg

    def _decode(
        self, first: bytes, rest: list[zmq.Frame], replay: bool = False
    ) -> Message | None:
        if first.startswith(_control.READY):
            if rest and first.startswith(self._ready):
                # a retained value the broker replays to us: the original follows
                return self._decode(rest[0].bytes, rest[1:], replay=True)
            return None  # readiness confirmations: ours after a reconnect, or another's
        try:
            env = _wire.parse_envelope(first)
            if (env.flags & _wire.FLAG_EXTERNAL) != (_wire.FLAG_EXTERNAL if rest else 0) or (
                len(rest) > 1
            ):
                raise DecodeError(f"{len(rest) + 1} frames do not match the header's flags")
        except DecodeError as exc:
            self._invalid += 1
            self._error_log.event(1, f"not a vbus message ({exc})")
            return None
        topic = env.topic
        if self._match is not None and not self._match(topic):
            return None
        sender = self._senders.get(env.sender)
        if sender is None:
            sender = self._senders[env.sender] = env.sender.hex()
        if env.kind == _wire.KIND_BATCH:
            return self._decode_batch(env, first, sender)
        if replay:
            self._replayed[(env.sender, topic)] = env.seq
        else:
            if self._replayed and self._already_replayed(env.sender, topic, env.seq):
                return None
            lost = self._seqs.observe(env.sender, topic, env.seq)
            if lost:
                self._loss_log.event(lost, f"{lost} message(s) on {topic!r} from {sender}")
                self._report_loss()
                if self._on_loss is not None:
                    self._call_loss_hook(topic, sender, lost)
        try:
            external = rest[0].buffer if rest else None
            data = _wire.decode_payload(
                env.kind, memoryview(first)[env.offset :], external, self._decoder
            )
            if self._type is not None and env.kind != _wire.KIND_MSGPACK:
                data = self._convert(data)
        except DecodeError as exc:
            self._errors += 1
            self._error_log.event(1, f"{topic!r} from {sender}: {exc}")
            return None
        self._received += 1
        self._last_raw = (first, rest)
        return Message(
            topic, data, sender, env.seq, env.time, bool(env.flags & _wire.FLAG_RETAINED)
        )

    def _decode_batch(self, env: _wire.Envelope, first: bytes, sender: str) -> Message | None:
        topic = env.topic
        payload = memoryview(first)[env.offset :]
        try:
            try:
                entries = self._batch_decoder.decode(payload)
            except msgspec.ValidationError:
                entries = self._decode_entries_one_by_one(payload, topic, sender)
        except Exception as exc:  # hostile input: anything but a clean batch is counted
            self._errors += 1
            self._error_log.event(1, f"{topic!r} from {sender}: malformed batch ({exc!r})")
            # Its messages were received, not lost: keep the sequence count in step.
            self._seqs.observe(env.sender, topic, env.seq, max(_batch.count(payload), 1))
            return None
        seq = env.seq
        if self._replayed:
            replayed = self._replayed.get((env.sender, topic))
            if replayed is not None and replayed >= seq:
                skip = replayed - seq + 1  # already delivered as retained values
                entries, seq = entries[skip:], seq + skip
                if entries:
                    del self._replayed[(env.sender, topic)]
        if not entries:
            return None
        lost = self._seqs.observe(env.sender, topic, seq, len(entries))
        if lost:
            self._loss_log.event(lost, f"{lost} message(s) on {topic!r} from {sender}")
            self._report_loss()
            if self._on_loss is not None:
                self._call_loss_hook(topic, sender, lost)
        messages = [
            Message(topic, memoryview(data) if type(data) is bytes and self._type is None
                    else data, sender, seq + i, when, False)
            for i, (when, data) in enumerate(entries)
            if data is not _UNDECODABLE
        ]
        self._received += len(messages)
        if not messages:
            return None
        self._last_raw = (first, [])
        self._batched.extend(messages[1:])
        return messages[0]

    def _decode_entries_one_by_one(
        self, payload: memoryview, topic: str, sender: str
    ) -> list[tuple[float, Any]]:
        # One entry failed validation: find it, count it, keep the others (and their seqs).
        entries: list[tuple[float, Any]] = []
        for when, raw in _batch.RAW_ENTRIES.decode(payload):
            try:
                entries.append((when, self._decoder.decode(raw)))
            except msgspec.ValidationError as exc:
                self._errors += 1
                self._error_log.event(1, f"{topic!r} from {sender}: payload does not match "
                                         f"the requested type: {exc}")
                entries.append((when, _UNDECODABLE))
        return entries

    def _call_loss_hook(self, topic: str, sender: str, lost: int) -> None:
        try:
            self._on_loss(topic, sender, lost)  # type: ignore[misc]
        except Exception as exc:
            self._errors += 1
            self._error_log.event(1, f"on_loss hook raised {exc!r}", exc_info=exc)

    def _already_replayed(self, sender: bytes, topic: str, seq: int) -> bool:
        # The seam between replayed retained values and live traffic: a live message the
        # replay already delivered is a duplicate. The first live one past it ends the seam.
        replayed = self._replayed.pop((sender, topic), None)
        if replayed is not None and seq <= replayed:
            self._replayed[(sender, topic)] = replayed
            return True
        return False

    def _report_loss(self) -> None:
        owner = self._owner
        now = time.monotonic()
        if owner is not None and now >= self._next_report:
            self._next_report = now + 1.0
            owner._report(self._id, self._report())

    def _report(self) -> _control.Report:
        return _control.Report("subscriber", received=self._received, dropped=self._seqs.lost)

    def _convert(self, data: Any) -> Any:
        wanted = self._type
        if wanted is bytes and isinstance(data, memoryview):
            return bytes(data)
        if isinstance(wanted, type) and isinstance(data, wanted):
            return data
        raise DecodeError(f"payload of type {type(data).__name__} is not a {wanted!r}")

    def _callback_failed(self, exc: BaseException) -> None:
        self._errors += 1
        self._error_log.event(1, f"callback raised {exc!r}", exc_info=exc)

    # -- the sync shell ---------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Message:
        """The next message. TimeoutError after ``timeout`` s; Closed once closed."""
        if self._batched and self._state is _State.OPEN:
            try:
                return self._batched.popleft()  # the fast path of a flood
            except IndexError:
                pass  # another thread took it
        self._claim()
        try:
            deadline = Deadline(timeout)
            while True:
                msg = self._next_queued()
                if msg is not None:
                    return msg
                if deadline.expired():
                    raise TimeoutError(f"no message on {self._pattern.text!r} within {timeout} s")
                self._wait(deadline)
        finally:
            self._release()

    def _recv_frames(
        self, timeout: float | None = None
    ) -> tuple[Message, tuple[bytes, bytes | None] | None]:
        """Like recv(), plus the frames the message came in, as published (frame 1 and the
        external frame or None), for recording; None instead when they came with the message
        before (a batch carries several). A replayed retained value gives its own frames."""
        msg = self.recv(timeout)
        raw = self._last_raw
        if raw is None or raw is self._recorded:
            return msg, None
        self._recorded = raw
        first, rest = raw
        return msg, (first, rest[0].bytes if rest else None)

    def _wait(self, deadline: Deadline) -> None:
        remaining = deadline.remaining()
        self._poller.poll(None if remaining is None else max(int(remaining * 1000), 1))

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        try:
            return self.recv()
        except Closed:
            raise StopIteration from None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- closing ----------------------------------------------------------------------------
    def close(self, timeout: float = 1.0) -> None:
        """Close; a recv() waiting in another thread or task raises Closed. Idempotent."""
        with self._lock:
            if self._state is _State.OPEN:
                self._state = _State.CLOSING
                if self._receiver is None:
                    self._finish_close()
                    return
                self._waker.wake()
            if self._receiver == threading.get_ident():
                # The receiver is suspended in this very thread (a task awaiting recv on this
                # loop, or a signal handler interrupting recv): nobody is inside ZeroMQ.
                self._close_from_receiver_thread()
                return
        if not self._closed_event.wait(timeout):
            log.warning(
                "subscriber %r: the thread in recv() did not let go within %g s; forcing",
                self._pattern.text,
                timeout,
            )
            with self._lock:
                self._finish_close()

    def _close_from_receiver_thread(self) -> None:
        pass  # sync: recv() closes the socket when the handler returns into it

    def _finish_close(self) -> None:
        # Caller holds self._lock.
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._sock.close(0)
        if self._seqs.lost and self._owner is not None:
            self._owner._report(self._id, self._report())
        self._waker.close()
        self._closed_event.set()
        if self._owner is not None:
            self._owner._forget(self)

    def stats(self) -> SubscriberStats:
        return SubscriberStats(
            self._pattern.text, self._received, self._seqs.lost, self._errors, self._invalid
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._pattern.text!r} {self._state.value}>"


class AsyncSubscriber(Subscriber):
    """The asyncio twin of Subscriber: ``await recv()``, ``async for``, ``async with``.

    Use it from one event loop at a time. ``close()`` is a plain method, callable from any
    thread; a pending ``recv()`` then raises Closed.
    """

    _armed: tuple[asyncio.AbstractEventLoop, tuple[int, int], asyncio.Future[None]] | None = None
    _streak = 0

    async def recv(self, timeout: float | None = None) -> Message:  # type: ignore[override]
        """The next message. TimeoutError after ``timeout`` s; Closed once closed."""
        self._claim()
        try:
            deadline = Deadline(timeout)
            while True:
                msg = self._next_queued()
                if msg is not None:
                    self._streak += 1
                    if self._streak >= YIELD_EVERY:
                        # A flood never waits: let the loop's other tasks run now and then.
                        self._streak = 0
                        await asyncio.sleep(0)
                    return msg
                self._streak = 0
                if deadline.expired():
                    raise TimeoutError(f"no message on {self._pattern.text!r} within {timeout} s")
                await self._wait_async(deadline)
        finally:
            self._release()

    async def _wait_async(self, deadline: Deadline) -> None:
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        fds = (self._sock.FD, self._waker.fileno())
        for fd in fds:
            loop.add_reader(fd, wake)
        self._armed = (loop, fds, woken)
        remaining = deadline.remaining()
        timer = loop.call_later(remaining, wake) if remaining is not None else None
        try:
            # ZeroMQ's FD is edge-triggered: look at EVENTS after arming, or miss a message.
            if not int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                await woken
        finally:
            if timer is not None:
                timer.cancel()
            self._disarm()

    def _disarm(self) -> None:
        armed, self._armed = self._armed, None
        if armed is not None:
            loop, fds, woken = armed
            for fd in fds:
                loop.remove_reader(fd)
            if not woken.done():
                woken.set_result(None)

    def _close_from_receiver_thread(self) -> None:
        # Another task on the receiver's loop closes us while recv() is suspended at an await
        # (waiting, or yielding during a flood): nothing is inside ZeroMQ, so the socket can
        # be closed now, once its fds have left the loop. The suspended recv() then finds
        # the subscriber closed.
        self._disarm()
        self._finish_close()

    def __iter__(self) -> Iterator[Message]:
        raise TypeError("AsyncSubscriber: use 'async for', not 'for'")

    def __enter__(self) -> Subscriber:
        raise TypeError("AsyncSubscriber: use 'async with', not 'with'")

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except Closed:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
