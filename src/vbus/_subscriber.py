"""Subscribers: the socket side. The protocol (parsing, handshake, seam, losses) is the inbox's.

``BaseSubscriber`` moves frames from its SUB socket into its Inbox and hands out Messages; it
does no waiting. Its two shells are siblings that add only the I/O wait and the spelling:
``Subscriber`` waits in ``zmq.Poller`` (``recv``, ``for``, ``with``), ``AsyncSubscriber`` in
the event loop's reader (``await recv``, ``async for``, ``async with``). That is the whole
sync/async difference; a parity test (tests/client/test_api.py) keeps their methods in step.

Ownership and close, in one place:
- The SUB socket and the waker fd are used by one receiver at a time (``_claim``); whoever
  holds the claim is the only thread inside ZeroMQ for this socket.
- ``close()`` with no receiver closes both at once, under the lock. With a receiver, it
  marks the subscriber CLOSING and wakes it through the waker; the receiver closes the socket
  and the waker itself on its way out (``_release``) and raises Closed. close() waits for
  that up to its timeout and then returns anyway: it never closes a socket under a thread
  that may be inside it, so a short timeout costs at most a socket closed a little later,
  never a crash.
- close() called in the receiver's own thread (a signal handler interrupting recv(), a task
  on the receiver's loop) only marks and wakes: the receiver finishes when control returns.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, Protocol, cast

import msgspec
import zmq

from ._errors import Closed
from ._message import Message, T
from ._proto import control as _control
from ._proto.inbox import Inbox
from ._threads import Deadline
from ._waker import Waker

log = logging.getLogger("vbus.subscriber")

YIELD_EVERY = 64
DRAIN_LIMIT = 256  # ZeroMQ messages moved into the inbox per look at the socket
LossHook = Callable[[str, str, int], object]
"""``on_loss(topic, sender, count)``: called in the receiving thread when a gap is found."""


class SubscriberOwner(Protocol):
    """What a subscriber needs of the bus that made it."""

    def _report(self, reporter_id: bytes, report: _control.Report) -> None: ...
    def _forget(self, child: BaseSubscriber[Any]) -> None: ...
    def _socket_closed(self) -> None: ...


class SubscriberStats(msgspec.Struct, frozen=True):
    """``received`` were delivered; ``dropped`` were lost before reaching this subscriber
    (counted from sequence gaps); ``errors`` failed to decode or raised in a callback;
    ``invalid`` were not vbus messages at all; ``duplicates`` were live copies of retained
    values already delivered; ``evicted`` counts (publisher, topic) streams forgotten to
    keep the subscriber's state bounded."""

    pattern: str
    received: int
    dropped: int
    errors: int
    invalid: int
    duplicates: int = 0
    evicted: int = 0


class _ReceiverState(enum.Enum):
    OPEN = "open"  # receiving
    CLOSING = "closing"  # close() was called while a receiver was inside; it will close
    CLOSED = "closed"  # the socket and the waker are closed


_OPEN = _ReceiverState.OPEN  # the fast paths' test, without an attribute lookup
# Plain ints: pyzmq's enums cost a Python-level Flag.__and__ (about a microsecond) a use.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)


def recv_into(sock: zmq.Socket[bytes], inbox: Inbox) -> bool:
    """Move one whole ZeroMQ message into the inbox; False when none is queued."""
    try:
        first = sock.recv(_NOBLOCK)
    except zmq.Again:
        return False
    rest: list[memoryview] = []
    while sock.getsockopt(_RCVMORE):
        rest.append(sock.recv(_NOBLOCK, copy=False).buffer)
    inbox.feed(first, rest)
    return True


class BaseSubscriber(Generic[T]):
    """What both shells share: the claim on the socket, moving frames into the inbox, losses,
    close and stats. ``T`` is the type of ``Message.data`` (``subscribe(..., type=T)``)."""

    _polled = False  # the last wait found the socket readable (the sync shell's poll)

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        inbox: Inbox,
        *,
        on_loss: LossHook | None = None,
        owner: SubscriberOwner | None = None,
    ) -> None:
        self._sock = sock
        self._inbox = inbox
        self._messages = inbox.messages
        self._on_loss = on_loss
        self._pattern = inbox.pattern
        self._owner = owner
        self._id = secrets.token_bytes(8)
        self._next_report = 0.0
        self._callback_errors = 0
        self._lock = threading.RLock()  # re-entrant: close() may run in a signal handler
        self._state = _ReceiverState.OPEN
        self._receiver: int | None = None  # ident of the thread inside recv()
        self._closed_event = threading.Event()
        self._waker = Waker()
        try:
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(self._waker.fileno(), zmq.POLLIN)
        except BaseException:  # Ctrl-C: close the fd now, not when the traceback is collected
            self._waker.close()
            raise

    @property
    def pattern(self) -> str:
        return self._pattern.text

    @property
    def closed(self) -> bool:
        return self._state is not _ReceiverState.OPEN

    # -- receiving (the part the shells share) ----------------------------------------------
    def _claim(self) -> None:
        with self._lock:
            if self._state is not _ReceiverState.OPEN:
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
            if self._state is _ReceiverState.CLOSING:
                self._finish_close()

    def _next_queued(self) -> Message[T] | None:
        """The next message already here, or None; raises Closed once closing. The caller
        holds the claim, so it alone is inside the socket."""
        messages = self._messages
        while True:
            if self._state is not _ReceiverState.OPEN:
                raise Closed(f"subscriber {self._pattern.text!r} was closed")
            if messages:
                return messages.popleft()
            inbox, sock = self._inbox, self._sock
            events = cast("Callable[[int], int]", sock.getsockopt)
            moved = 0
            # The poll that just woke us said the socket is readable: no need to ask again
            # before the first recv (an idle subscriber's every message pays for that look).
            readable, self._polled = self._polled, False
            try:
                # Ask EVENTS before each recv: an empty socket answers it in a third of the
                # time a recv takes to raise zmq.Again, and every look ends on an empty one.
                while (moved < DRAIN_LIMIT and (readable or events(_EVENTS) & _POLLIN)
                       and recv_into(sock, inbox)):
                    readable = False
                    moved += 1
            except zmq.ZMQError as exc:  # never expected: nobody closes the socket under us
                raise Closed(f"subscriber {self._pattern.text!r}: {exc}") from None
            if inbox.losses:
                self._losses()
            if not moved:
                return None

    def _losses(self) -> None:
        shm = self._inbox.shm
        if shm is not None and shm.wants_twins:  # shm: a publisher of another host is heard
            for prefix in shm.take_twins():
                self._sock.subscribe(_control.TWIN + prefix)
        losses, self._inbox.losses = self._inbox.losses, []
        hook = self._on_loss
        if hook is not None:
            for topic, sender, lost in losses:
                try:
                    hook(topic, sender, lost)
                except Exception as exc:
                    self._inbox.errors += 1
                    self._inbox.error_log.event(1, f"on_loss hook raised {exc!r}", exc_info=exc)
        owner = self._owner
        now = time.monotonic()
        if owner is not None and now >= self._next_report:
            self._next_report = now + 1.0
            owner._report(self._id, self._inbox.report())

    def _callback_failed(self, exc: BaseException) -> None:
        self._callback_errors += 1
        self._inbox.error_log.event(1, f"callback raised {exc!r}", exc_info=exc)

    def _take_queued(self, first: Message[T]) -> list[Message[T]]:
        """``first`` and what the inbox holds already, without a call per message."""
        # popleft, not a copy and a clear: a recv() in another thread may take one
        # meanwhile, and never both of us.
        messages = self._messages
        pop = messages.popleft
        batch = [first]
        try:
            batch += [pop() for _ in range(len(messages))]
        except IndexError:
            pass  # another thread took the last ones
        return batch

    # -- closing ----------------------------------------------------------------------------
    def close(self, timeout: float = 1.0) -> None:
        """Close; a recv() waiting in another thread or task raises Closed. Idempotent.

        Returns within ``timeout``; a receiver that has not let go by then closes the
        socket itself as soon as it runs again."""
        with self._lock:
            if self._state is _ReceiverState.CLOSED:
                return
            if self._state is _ReceiverState.OPEN:
                if self._receiver is None:
                    self._finish_close()
                    return
                self._state = _ReceiverState.CLOSING
                self._waker.wake()
            if self._receiver == threading.get_ident():
                self._close_from_receiver_thread()
                return
        if not self._closed_event.wait(max(timeout, 0.0)):
            log.info("subscriber %r: the receiver did not let go within %g s; it closes "
                     "the socket when it runs again", self._pattern.text, timeout)

    def _close_from_receiver_thread(self) -> None:
        pass  # sync: the receiver is below us on this stack; recv() closes on its way out

    def _finish_close(self) -> None:
        # Caller holds self._lock, and no receiver is inside the socket.
        if self._state is _ReceiverState.CLOSED:
            return
        self._state = _ReceiverState.CLOSED
        self._sock.close(0)
        self._waker.close()
        if self._inbox.shm is not None:  # shm: its pools' connections (views keep theirs)
            self._inbox.shm.close()
        self._closed_event.set()
        owner = self._owner
        if owner is not None:
            if self._inbox.lost:
                owner._report(self._id, self._inbox.report())
            owner._forget(self)
            owner._socket_closed()

    def _mark_dead(self) -> None:
        """After fork, in the child: every call raises Closed and nothing is touched."""
        self._state = _ReceiverState.CLOSED
        self._closed_event.set()

    def stats(self) -> SubscriberStats:
        inbox = self._inbox
        return SubscriberStats(
            self._pattern.text, inbox.received, inbox.lost,
            inbox.errors + self._callback_errors, inbox.invalid, inbox.duplicates,
            inbox.evicted,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._pattern.text!r} {self._state.value}>"


class Subscriber(BaseSubscriber[T]):
    """Receives the messages whose topic matches a pattern. ``recv``, iterate, ``close``."""

    def recv(self, timeout: float | None = None) -> Message[T]:
        """The next message. TimeoutError after ``timeout`` s; Closed once closed."""
        messages = self._messages
        if messages and self._state is _OPEN:
            try:
                return messages.popleft()  # the fast path of a flood
            except IndexError:
                pass  # another thread took it
        return self._recv_slow(timeout)

    def recv_batch(self, timeout: float | None = None) -> list[Message[T]]:
        """Every message that is here, in order, at least one: waits like ``recv()`` for
        the first. The way to keep up with a flood: one call however many messages came in
        a batch. TimeoutError after ``timeout`` s; Closed once closed."""
        return self._take_queued(self.recv(timeout))

    def _recv_slow(self, timeout: float | None) -> Message[T]:
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

    def _wait(self, deadline: Deadline) -> None:
        remaining = deadline.remaining()
        ready = self._poller.poll(None if remaining is None else max(int(remaining * 1000), 1))
        self._polled = any(item is self._sock for item, _ in ready)

    def __iter__(self) -> Iterator[Message[T]]:
        return self

    def __next__(self) -> Message[T]:
        messages = self._messages
        if messages and self._state is _OPEN:
            try:
                return messages.popleft()  # recv()'s fast path, without its call
            except IndexError:
                pass
        try:
            return self.recv()
        except Closed:
            raise StopIteration from None

    def __enter__(self) -> Subscriber[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscriber(BaseSubscriber[T]):
    """The asyncio twin of Subscriber: ``await recv()``, ``async for``, ``async with``.

    Use it from one event loop at a time. ``close()`` is a plain method, callable from any
    thread; a pending ``recv()`` then raises Closed.
    """

    _armed: tuple[asyncio.AbstractEventLoop, tuple[int, int], asyncio.Future[None]] | None = None
    _streak = 0
    _in_zmq = False

    async def recv(self, timeout: float | None = None) -> Message[T]:
        """The next message. TimeoutError after ``timeout`` s; Closed once closed."""
        self._claim()
        try:
            deadline = Deadline(timeout)
            while True:
                self._in_zmq = True
                try:
                    msg = self._next_queued()
                finally:
                    self._in_zmq = False
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

    async def recv_batch(self, timeout: float | None = None) -> list[Message[T]]:
        """Every message that is here, in order, at least one (see Subscriber.recv_batch)."""
        return self._take_queued(await self.recv(timeout))

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
            if self._state is _ReceiverState.OPEN and not (
                int(self._sock.getsockopt(_EVENTS)) & _POLLIN
            ):
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
        # Another task on the receiver's loop (or a signal handler on its thread) closes us
        # while recv() is suspended at an await: nothing is inside ZeroMQ then, so the socket
        # can be closed now, once its fds have left the loop. The suspended recv() then finds
        # the subscriber closed. If recv() is inside ZeroMQ below us (a signal handler), it
        # closes on its way out instead.
        if self._in_zmq:
            return
        self._disarm()
        self._finish_close()

    def __aiter__(self) -> AsyncIterator[Message[T]]:
        return self

    async def __anext__(self) -> Message[T]:
        try:
            return await self.recv()
        except Closed:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AsyncSubscriber[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
