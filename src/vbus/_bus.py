"""The Bus: a thin facade over a _Core that owns everything the bus made — the ZeroMQ context,
an optional embedded broker, the publishers and subscribers, the background loop and the
callback threads — and shuts them all down in order (``_Core.shutdown``, the one place).

Nothing the bus starts holds a reference to the Bus itself, only to its core: a Bus that is
dropped without close() (or never reached its caller, because Ctrl-C landed just as Bus()
returned) is collected, and its finalizer closes the core. The cores still open are closed at
interpreter exit, before Python waits for non-daemon threads, so a program that forgets
close() exits promptly. After ``os.fork()``, the child's cores are marked dead without
touching a socket: every call raises Closed.
"""

from __future__ import annotations

import atexit
import builtins
import concurrent.futures
import contextlib
import enum
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar, overload

import msgspec
import zmq

from . import _requests, _shm
from ._broker.forwarder import MAX_MESSAGE_SIZE, Broker
from ._context import ContextKeeper
from ._errors import AddressError, Closed, ConnectError, VbusError
from ._flusher import Flusher
from ._handshake import connect_publisher, connect_subscriber, probe
from ._loop import BackgroundLoop
from ._message import Message
from ._proto import control as _control
from ._proto import shm as _shm_proto
from ._proto.endpoints import Endpoints, is_loopback, parse_address
from ._proto.limits import DEFAULT_MAX_QUEUE_BYTES, effective_hwm
from ._proto.outbox import Outbox
from ._proto.topics import compile_pattern
from ._publisher import (
    LINGER,
    AsyncPublisher,
    BasePublisher,
    Publisher,
    PublisherStats,
    new_outbox,
)
from ._requests import RequestStats
from ._security import (
    Authorized,
    ClientSecurity,
    Keypair,
    client_security,
    server_security,
)
from ._subscriber import (
    AsyncSubscriber,
    BaseSubscriber,
    LossHook,
    Subscriber,
    SubscriberStats,
)
from ._threads import (
    DEFAULT_TIMEOUT,
    Deadline,
    block_signals,
    build_uninterrupted,
    current_in,
    join,
)
from ._waker import Waker

log = logging.getLogger("vbus")

T = TypeVar("T")
Callback = Callable[[Message], Any]
S = TypeVar("S", bound=BaseSubscriber[Any])
P = TypeVar("P", bound=BasePublisher)
Child = BasePublisher | BaseSubscriber[Any]
C = TypeVar("C", bound=Child)

BATCH_DELAY = 0.0005
EXIT_CLOSE_TIMEOUT = 1.0
_START_TIMEOUT = 10.0


class BusStats(msgspec.Struct, frozen=True):
    """Counters. ``messages_*``/``bytes_*`` are the embedded broker's (zero for a client of a
    remote broker); ``subscribers`` counts subscriptions active at the broker (for a client:
    its own); ``dropped`` adds up the losses every local subscriber and publisher counted."""

    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int
    subscribers: int
    publishers: int
    dropped: int
    per_subscriber: tuple[SubscriberStats, ...]
    per_publisher: tuple[PublisherStats, ...]
    requests: RequestStats = RequestStats()


class _BusState(enum.Enum):
    OPEN = "open"  # in use
    CLOSING = "closing"  # close() is under way (maybe in another thread)
    CLOSED = "closed"  # close() has returned; parts that missed its deadline may still end
    FORKED = "forked"  # this process is a fork's child: the bus is the parent's, never touched


class Handle:
    """A callback subscription made by ``bus.on()``: ``close()`` stops it. Calling the handle
    calls the callback, so ``@bus.on(...)`` leaves a usable function behind."""

    def __init__(self, callback: Callback, sub: BaseSubscriber[Any]) -> None:
        self.callback = callback
        self._sub = sub

    @property
    def pattern(self) -> str:
        return self._sub.pattern

    @property
    def closed(self) -> bool:
        return self._sub.closed

    def stats(self) -> SubscriberStats:
        return self._sub.stats()

    def close(self, timeout: float = 1.0) -> None:
        """Stop calling the callback. A call in progress finishes first (up to ``timeout``)."""
        self._sub.close(timeout)

    def __call__(self, msg: Message) -> Any:
        return self.callback(msg)

    def __repr__(self) -> str:
        return f"<vbus.Handle {self.pattern!r} -> {self.callback!r}>"


class _Core:
    """Everything a bus owns, and the shutdown order. Children call back into it through
    the small Owner protocols of _publisher.py and _subscriber.py."""

    def __init__(self, keeper: ContextKeeper, *, owns_context: bool, hwm: int | None,
                 timeout: float, batch_delay: float, max_queue_bytes: int | None, chunk: bool,
                 name: str) -> None:
        self.keeper = keeper
        self.context = keeper.context
        self.owns_context = owns_context
        self.hwm = hwm
        self.timeout = timeout
        self.max_queue_bytes = max_queue_bytes
        self.chunk = chunk
        self.name = name
        self.batch_delay = batch_delay
        self.shm_pool_bytes: int | None = None  # shm: publishers' pool size (0: no pool)
        self.flusher = Flusher(f"vbus-flusher-{name}", batch_delay) if batch_delay > 0 else None
        self.configure: Callable[[zmq.Socket[bytes]], None] | None = None
        self.lock = threading.RLock()  # re-entrant: close() may run in a signal handler
        self.state = _BusState.OPEN
        self.closer: int | None = None  # the thread inside close()
        self.closed_event = threading.Event()
        self.children: set[Child] = set()
        self.callback_threads: list[threading.Thread] = []
        self.loop: BackgroundLoop | None = None
        self.reporter: BasePublisher | None = None
        self.broker: Broker | None = None
        self.endpoints: Endpoints | None = None
        self.inproc_clients: weakref.WeakSet[_Core] = weakref.WeakSet()
        # Woken when close() begins: handshakes under way (subscribe(), publisher() in other
        # threads) wait on it too; closed by the last of them once the bus is closed.
        self.closing = Waker()
        self.handshakes: set[object] = set()  # a token per handshake under way
        self.done = False  # everything stopped and joined: nothing left for a second close

    # -- the Owner protocols ------------------------------------------------------------------
    def _forget(self, child: Child) -> None:
        with self.lock:
            self.children.discard(child)

    def _socket_closed(self) -> None:
        if self.owns_context:
            self.keeper.socket_closed()

    def _batch_started(self, publisher: BasePublisher, due: float) -> None:
        if self.flusher is not None:
            self.flusher.due(publisher, due)

    def _report(self, reporter_id: bytes, report: _control.Report) -> None:
        """Send a subscriber's counters to the broker's $vbus/stats. Best effort."""
        with self.lock:
            if self.state is not _BusState.OPEN or self.endpoints is None:
                return
            reporter = self.reporter
        try:
            if reporter is None:
                # No readiness wait: this runs in receiving threads and on the loop, where it
                # must not block. A report sent before the broker took us is simply skipped.
                sock = self.context.socket(zmq.XPUB)
                sock.linger = 0
                if self.configure is not None:
                    self.configure(sock)
                sock.connect(self.endpoints.publish)
                with self.lock:
                    if self.reporter is None and self.state is _BusState.OPEN:
                        self.reporter = Publisher(sock, self.new_outbox(0.0), owner=self)
                    else:
                        sock.close(0)
                    reporter = self.reporter
            if reporter is not None:
                reporter._send_control(_control.report_frame(reporter_id, report))
        except (VbusError, zmq.ZMQError) as exc:
            log.debug("vbus: could not report counters: %s", exc)

    # -- making children ----------------------------------------------------------------------
    def check_open(self) -> None:
        if self.state is not _BusState.OPEN:
            raise Closed("the bus is closed" if self.state is not _BusState.FORKED else
                         "the bus belongs to the parent process (fork)")

    def adopt(self, child: C) -> C:
        with self.lock:
            if self.state is _BusState.OPEN:
                self.children.add(child)
                return child
        if isinstance(child, BaseSubscriber):
            child.close(0)
        else:
            child._close(0.0, 0.0)
        raise Closed("the bus was closed")

    @contextlib.contextmanager
    def handshake(self) -> Iterator[Waker]:
        """Around a readiness wait: the waker close() fires, kept open while it is used."""
        # A token added inside the try (one C call): Ctrl-C anywhere before it adds nothing,
        # anywhere after it reaches the finally. A counter incremented before the try had a
        # window in which an interrupt left it one too high, and the waker was never closed.
        token = object()
        try:
            with self.lock:
                self.check_open()
                self.handshakes.add(token)
            yield self.closing
        finally:
            with self.lock:
                self.handshakes.discard(token)
                if not self.handshakes and self.state is not _BusState.OPEN:
                    self.closing.close()

    def new_outbox(self, batch_delay: float | None = None) -> Outbox:
        outbox = new_outbox(
            batch_delay=self.batch_delay if batch_delay is None else batch_delay,
            chunk=self.chunk,
            inflight_limit=self.max_queue_bytes or DEFAULT_MAX_QUEUE_BYTES,
            chunk_window=effective_hwm(self.hwm, self.max_queue_bytes),  # the socket's hwm
        )
        if self.shm_pool_bytes != 0 and self.chunk and _shm.AVAILABLE:  # shm: on first use
            assert self.endpoints is not None
            endpoint, configure = self.endpoints.subscribe, self.configure
            # By default the pool fits in the bus's byte bound, as every queue does.
            size = self.shm_pool_bytes or min(_shm_proto.DEFAULT_POOL_BYTES,
                                              self.max_queue_bytes or DEFAULT_MAX_QUEUE_BYTES)
            outbox.shm = _shm.Placer(max(size, _shm_proto.MIN_POOL_BYTES), lambda: (
                _shm.TwinWatcher(self.context, endpoint, configure)))
        return outbox

    def publisher(self, cls: type[P]) -> P:
        sock, linger = self.publisher_socket()
        return self.adopt(cls(sock, self.new_outbox(), owner=self, linger=linger,
                              lanes=self.lane))

    def lane(self) -> Publisher:
        """Another publishing thread's lane of a publisher (closed by that publisher)."""
        sock, linger = self.publisher_socket()
        return Publisher(sock, self.new_outbox(), owner=self, linger=linger)

    def publisher_socket(self) -> tuple[zmq.Socket[bytes], float]:
        self.check_open()
        assert self.endpoints is not None
        with self.handshake() as closing:
            sock = connect_publisher(self.context, self.endpoints.publish, self.timeout,
                                     effective_hwm(self.hwm, self.max_queue_bytes),
                                     self.configure, closing)
        return sock, LINGER if self.endpoints.is_network else 0.0

    def subscribe(self, cls: type[S], pattern: str, type: Any, hwm: int | None,
                  on_loss: LossHook | None, max_queue_bytes: int | None,
                  shm: bool = True) -> S:
        compiled = compile_pattern(pattern)
        if hwm is not None and hwm < 1:
            raise ValueError(f"hwm must be at least 1, not {hwm}")
        budget = self.max_queue_bytes if max_queue_bytes is None else max_queue_bytes
        queue = effective_hwm(self.hwm if hwm is None else hwm, budget)  # validates both
        self.check_open()
        assert self.endpoints is not None
        with self.handshake() as closing:
            sock, inbox = connect_subscriber(
                self.context, self.endpoints.subscribe, compiled, timeout=self.timeout,
                hwm=queue, type=type, max_assembly_bytes=budget or DEFAULT_MAX_QUEUE_BYTES,
                configure=self.configure, closing=closing,
                shm=_shm.Resolver([pattern], forced=not shm,  # shm: bytes twins if off it,
                                  twins=self.endpoints.is_network  # or maybe on another host
                                  and not is_loopback(self.endpoints)),
            )
        try:
            sub: S = cls(sock, inbox, on_loss=on_loss, owner=self)
        except BaseException:
            sock.close(0)
            raise
        return self.adopt(sub)

    def ensure_loop(self) -> BackgroundLoop:
        with self.lock:
            self.check_open()
            if self.loop is None:
                self.loop = BackgroundLoop(name=f"vbus-loop-{self.name}")
            return self.loop

    def in_own_thread(self) -> bool:
        # By ident, not threading.current_thread(): that would register a dummy Thread for
        # a QThread (see _threads.is_current).
        loop = self.loop
        return (current_in(self.callback_threads)
                or (loop is not None and loop.in_loop_thread) or _requests.in_own_thread(self))

    # -- shutdown -----------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        deadline = Deadline(timeout)
        me = threading.get_ident()
        with self.lock:
            if self.state is _BusState.FORKED or self.closer == me:
                return  # the parent's bus; or a signal handler interrupting our own close()
            first = self.state is _BusState.OPEN
            if first:
                self.state = _BusState.CLOSING
            elif self.done:
                return
            self.closer = me
        try:
            if not first and self.in_own_thread():
                return
            stuck = self.shutdown(deadline)
        finally:
            with self.lock:
                self.closer = None
                if self.state is _BusState.CLOSING:
                    self.state = _BusState.CLOSED
            self.closed_event.set()
        if not stuck:
            if not self.in_own_thread():  # else our own thread is left to join, later
                self.done = True
                _unregister(self)
        elif timeout >= 0.1:
            log.warning("vbus: close() went on past %s; they finish on their own",
                        ", ".join(stuck))
        else:
            log.debug("vbus: close(timeout=%g) left %s to finish on their own", timeout,
                      ", ".join(stuck))

    def shutdown(self, deadline: Deadline) -> list[str]:
        """The shutdown order, in one place. Every step is idempotent and bounded by the
        deadline; a step that cannot finish in time is named and left to finish on its own
        (a later close() joins what is left), so the next step still gets its turn."""
        stuck: list[str] = []
        self.closing.wake()  # 0. handshakes under way in other threads end with Closed
        # 1. clients sharing our context (vbus.connect to our inproc address)
        for client in list(self.inproc_clients):
            client.close(deadline.remaining() or 0.0)
            if not client.done:
                stuck.append(f"client {client.name}")
        # 1b. request/reply: requests in flight woken with Closed, handlers in flight finish
        stuck += _requests.close_requests(self, deadline)
        # 2. publishers (each closes its socket under its lock, or has the thread inside it
        #    do so), then subscribers (each wakes its receiver, which closes its socket)
        with self.lock:
            children = sorted(self.children, key=lambda c: isinstance(c, BaseSubscriber))
            if self.reporter is not None:
                children.insert(0, self.reporter)
        for child in children:
            if isinstance(child, BaseSubscriber):
                child.close(timeout=deadline.share(0.5).remaining() or 0.0)
            elif not child._close(min(LINGER, (deadline.remaining() or 0.0) / 4),
                                  deadline.remaining() or 0.0):
                stuck.append(f"publisher {child.id}")
        # 3. the background loop (cancels async callbacks and submitted coroutines) and the
        #    callback threads, joined unless we are one of them; a stuck user callback may
        #    not eat the time the broker needs
        stuck += self._join_threads(deadline.share(0.8))
        if self.flusher is not None and not self.flusher.stop(deadline):
            stuck.append(self.flusher.name)
        # 4. the broker: forwarder terminated through its control socket, threads joined
        if self.broker is not None:
            stuck += self.broker.stop(deadline)
            if self.endpoints is not None:
                _INPROC_OWNERS.pop(self.endpoints.address, None)
        with self.lock:
            if not self.handshakes:
                self.closing.close()  # else the last handshake closes it
        # 5. the context: ended now if no socket is open, else by whoever closes the last
        if self.owns_context and not self.keeper.release():
            stuck.append(f"{self.keeper.open_sockets()} socket(s) still in use")
        return stuck

    def _join_threads(self, deadline: Deadline) -> list[str]:
        stuck: list[str] = []
        loop = self.loop
        if loop is not None and not loop.stop(deadline) and not loop.in_loop_thread:
            stuck.append(loop.thread.name)
        for thread in self.callback_threads:
            if not join(thread, deadline):
                stuck.append(thread.name)
        return stuck

    def after_fork(self) -> None:
        """In the child: the parent's bus. Mark everything dead, touch no socket."""
        self.state = _BusState.FORKED
        self.done = True
        self.keeper.forked()
        self.lock = threading.RLock()  # the parent's lock may have been held at fork
        for child in list(self.children) + ([self.reporter] if self.reporter else []):
            child._mark_dead()
        self.closed_event.set()


class Bus:
    """A message bus. ``Bus()`` embeds a broker in this process; ``bind=`` also makes it
    reachable over ``ipc://`` or ``tcp://``. Use ``vbus.connect()`` for a broker elsewhere."""

    _core: _Core
    _address: str

    def __init__(
        self,
        bind: str | Sequence[str] | None = None,
        *,
        hwm: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int = MAX_MESSAGE_SIZE,
        keypair: Keypair | None = None,
        authorized: Authorized | None = None,
        batch_delay: float = BATCH_DELAY,
        max_queue_bytes: int | None = None,
        shm_pool_bytes: int | None = None,
    ) -> None:
        """``hwm``: queue bound, in ZeroMQ messages (a batch of small messages is one), of
        each publisher, of the broker's intake, and of each subscriber unless it sets its
        own. ``max_queue_bytes`` (bytes, default 256 MiB) bounds what a stalled subscriber
        can make each process hold, whatever the message size: by default the count (1000)
        is lowered to fit it; an ``hwm`` given alone is taken as it is, for queues of many
        small messages. ``timeout``: how long readiness handshakes
        may take. ``max_message_size`` (bytes): the largest frame a network peer may send
        the broker; a peer that sends more is disconnected. ``keypair`` and ``authorized``
        (public keys, or a directory of ``*.pub`` files) make every network endpoint speak
        CURVE and admit only those keys. ``batch_delay`` (seconds) bounds how long a
        publisher in a burst may hold a message to send it with others; 0 disables
        batching. ``shm_pool_bytes`` (default 128 MiB, or ``max_queue_bytes`` if that is
        less; 0: none) sizes each publisher's
        shared pool: numpy frames of 64 KiB and more go to subscribers on this host through
        it, without crossing the broker (see docs/reliability.md)."""
        if max_message_size < 1:
            raise ValueError(f"max_message_size must be positive, not {max_message_size}")
        _check_options(hwm, timeout, batch_delay, max_queue_bytes)
        pool_bytes = _shm_pool_bytes(shm_pool_bytes)  # shm
        security = server_security(keypair, authorized)
        binds = [bind] if isinstance(bind, str) else list(bind or ())
        for b in binds:
            endpoints = parse_address(b)
            if endpoints.address.startswith("inproc://"):
                raise AddressError(f"bind {b!r}: in-process access needs no bind")
            if security is None and not is_loopback(endpoints):
                log.warning("vbus: %s is open to the network without keys: anyone who can "
                            "reach it can read and publish (see docs/security.md)", b)
        keeper = ContextKeeper()
        core = _Core(keeper, owns_context=True, hwm=hwm, timeout=timeout,
                     batch_delay=batch_delay, max_queue_bytes=max_queue_bytes,
                     chunk=bool(binds), name=f"{id(keeper):x}")
        core.shm_pool_bytes = pool_bytes  # shm
        try:
            # On a thread of its own: Ctrl-C cannot leave a broker half-started, and one
            # that started anyway is in core.broker for the cleanup below to stop.
            build_uninterrupted(
                lambda: Broker(core.context, binds, hwm=effective_hwm(hwm, max_queue_bytes, 2),
                               max_message_size=max_message_size, security=security),
                lambda broker: setattr(core, "broker", broker),
                "the broker", _START_TIMEOUT,
            )
            broker = core.broker
            assert broker is not None
            core.endpoints = broker.inproc
            network = broker.endpoints
            self._address = network[0].address if network else broker.inproc.address
            _INPROC_OWNERS[broker.inproc.address] = core
            self._core = core
            _register(self, core)
        except BaseException:
            core.close(1.0)
            raise

    @classmethod
    def _client(cls, address: str, timeout: float, hwm: int | None,
                security: ClientSecurity | None = None, batch_delay: float = BATCH_DELAY,
                max_queue_bytes: int | None = None, shm_pool_bytes: int | None = None) -> Bus:
        _check_options(hwm, timeout, batch_delay, max_queue_bytes)
        pool_bytes = _shm_pool_bytes(shm_pool_bytes)  # shm
        endpoints = parse_address(address)
        if endpoints.address.endswith(":0"):
            raise AddressError(f"connect {address!r}: port 0 is only for bind")
        owner = _INPROC_OWNERS.get(endpoints.address) if not endpoints.is_network else None
        if not endpoints.is_network and (owner is None or owner.state is not _BusState.OPEN):
            raise ConnectError(f"no vbus broker at {address} in this process")
        keeper = owner.keeper if owner is not None else ContextKeeper()
        core = _Core(keeper, owns_context=owner is None, hwm=hwm, timeout=timeout,
                     batch_delay=batch_delay, max_queue_bytes=max_queue_bytes,
                     chunk=endpoints.is_network or (owner is not None and owner.chunk),
                     name=f"client-{id(keeper):x}-{endpoints.address}")
        core.endpoints = endpoints
        core.shm_pool_bytes = pool_bytes  # shm
        core.configure = security.apply if security is not None and owner is None else None
        try:
            failure = probe(core.context, endpoints.publish, timeout, core.configure)
            if failure is not None:
                raise ConnectError(failure.format(address=address, timeout=timeout))
            self = cls.__new__(cls)
            self._core = core
            self._address = endpoints.address
            if owner is not None:
                owner.inproc_clients.add(core)
            _register(self, core)
            return self
        except BaseException:
            if core.owns_context:
                # Only this call has used the new context: close the sockets Ctrl-C left
                # half-made inside pyzmq (alive in the traceback's frames until we are done),
                # so that the context ends now rather than when they are collected.
                core.keeper.close_sockets()
            core.close(1.0)
            raise

    # -- properties -------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The address to hand to ``vbus.connect()``: the first bound one, else in-process."""
        return self._address

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address this bus is reachable at: each bound one, then in-process."""
        broker = self._core.broker
        if broker is None:
            return (self._address,)
        return (*(e.address for e in broker.endpoints), broker.inproc.address)

    @property
    def closed(self) -> bool:
        return self._core.state is not _BusState.OPEN

    @property
    def _broker(self) -> Broker | None:
        return self._core.broker

    # -- publishing -------------------------------------------------------------------------
    def publisher(self) -> Publisher:
        """A thread-safe publisher, returned once the broker accepts its messages."""
        return self._core.publisher(Publisher)

    def async_publisher(self) -> AsyncPublisher:
        """An asyncio publisher, returned once the broker accepts its messages."""
        return self._core.publisher(AsyncPublisher)

    # -- subscribing ------------------------------------------------------------------------
    @overload
    def subscribe(self, pattern: str, *, type: builtins.type[T], hwm: int | None = None,
                  on_loss: LossHook | None = None, max_queue_bytes: int | None = None,
                  shm: bool = True) -> Subscriber[T]: ...
    @overload
    def subscribe(self, pattern: str, *, type: Any = None, hwm: int | None = None,
                  on_loss: LossHook | None = None, max_queue_bytes: int | None = None,
                  shm: bool = True) -> Subscriber[Any]: ...

    def subscribe(
        self,
        pattern: str,
        *,
        type: Any = None,
        hwm: int | None = None,
        on_loss: LossHook | None = None,
        max_queue_bytes: int | None = None,
        shm: bool = True,
    ) -> Subscriber[Any]:
        """A sync subscriber, returned once its subscription is active at the broker.

        ``type`` decodes and validates payloads into it (and types ``Message.data`` for the
        checker: ``subscribe(p, type=State)`` gives ``Subscriber[State]``); ``hwm`` bounds its
        queue (messages) and ``max_queue_bytes`` (bytes; default: the bus's) what it may hold
        queued; ``on_loss(topic, sender, count)`` is called in the receiving thread for every
        gap. Large numpy frames of publishers on this host arrive as read-only views of their
        shared memory; ``shm=False`` takes them as bytes instead (see docs/reliability.md).
        """
        return self._core.subscribe(Subscriber, pattern, type, hwm, on_loss, max_queue_bytes,
                                    shm)

    @overload
    def async_subscribe(self, pattern: str, *, type: builtins.type[T], hwm: int | None = None,
                        on_loss: LossHook | None = None,
                        max_queue_bytes: int | None = None,
                        shm: bool = True) -> AsyncSubscriber[T]: ...
    @overload
    def async_subscribe(self, pattern: str, *, type: Any = None, hwm: int | None = None,
                        on_loss: LossHook | None = None,
                        max_queue_bytes: int | None = None,
                        shm: bool = True) -> AsyncSubscriber[Any]: ...

    def async_subscribe(
        self,
        pattern: str,
        *,
        type: Any = None,
        hwm: int | None = None,
        on_loss: LossHook | None = None,
        max_queue_bytes: int | None = None,
        shm: bool = True,
    ) -> AsyncSubscriber[Any]:
        """An asyncio subscriber, returned once its subscription is active at the broker.
        The options are those of ``subscribe``."""
        return self._core.subscribe(AsyncSubscriber, pattern, type, hwm, on_loss,
                                    max_queue_bytes, shm)

    @overload
    def on(self, pattern: str, *, type: Any = None, hwm: int | None = None,
           on_loss: LossHook | None = None) -> Callable[[Callback], Handle]: ...
    @overload
    def on(self, pattern: str, callback: Callback, *, type: Any = None,
           hwm: int | None = None, on_loss: LossHook | None = None) -> Handle: ...

    def on(self, pattern: str, callback: Any = None, *, type: Any = None,
           hwm: int | None = None, on_loss: LossHook | None = None) -> Any:
        """Run ``callback(msg)`` for every message matching ``pattern``; usable as decorator.

        Async callbacks run on the bus's background loop; sync callbacks on a thread of their
        own each, so a slow one stalls only itself. Either way in order, per subscription. An
        exception is logged and counted, and the subscription goes on. Returns, once the
        subscription is active, a Handle whose ``close()`` stops it (calling the handle calls
        the callback). A sync callback stuck in its own code does not keep the process alive
        after close() or at exit. The options are those of ``subscribe``.
        """
        compile_pattern(pattern)

        def decorator(fn: Callback) -> Handle:
            return self._start_callback(pattern, fn, type, hwm, on_loss)

        return decorator if callback is None else decorator(callback)

    def _start_callback(self, pattern: str, callback: Callback, type: Any, hwm: int | None,
                        on_loss: LossHook | None) -> Handle:
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {callback!r}")
        core = self._core
        if _is_async(callback):
            asub = core.subscribe(AsyncSubscriber, pattern, type, hwm, on_loss, None)
            try:
                core.ensure_loop().submit(_run_async_callback(asub, callback, core))
            except BaseException:
                asub.close()
                raise
            return Handle(callback, asub)
        sub = core.subscribe(Subscriber, pattern, type, hwm, on_loss, None)
        try:
            # A daemon: user code stuck in the callback must not keep the process alive.
            # close() still joins it (within its timeout).
            thread = threading.Thread(
                target=_run_sync_callback, args=(sub, callback, core),
                name=f"vbus-callback-{pattern}", daemon=True,
            )
            with core.lock:
                core.check_open()
                core.callback_threads.append(thread)
            thread.start()
        except BaseException:
            sub.close(0)
            raise
        return Handle(callback, sub)

    # -- request/reply (vbus._requests) ------------------------------------------------------
    @overload
    def serve(self, topic: str) -> Callable[[Callable[[Message], Any]], _requests.Server]: ...
    @overload
    def serve(self, topic: str, handler: Callable[[Message], Any]) -> _requests.Server: ...

    def serve(self, topic: str, handler: Callable[[Message], Any] | None = None) -> Any:
        """Serve requests on ``topic``: ``handler(msg)`` (sync, on a thread of its own, or
        async, on the bus's loop) returns the reply. Usable as a decorator. Returns a Server
        handle once the broker routes the topic's requests to it; ``close()`` stops it.
        Several servers of a topic share its requests, round-robin."""
        return _requests.serve(self, topic, handler)

    def request(self, topic: str, data: Any, timeout: float = 5.0) -> Message:
        """Send ``data`` to one server of ``topic``; its reply. NoResponder at once if nobody
        serves it, TimeoutError after ``timeout``, RemoteError if the handler raised."""
        return _requests.request(self, topic, data, timeout)

    async def async_request(self, topic: str, data: Any, timeout: float = 5.0) -> Message:
        """The asyncio twin of ``request``."""
        return await _requests.async_request(self, topic, data, timeout)

    # -- the background loop ----------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the bus's background loop; cancelled when the bus closes."""
        if not inspect.iscoroutine(coro):
            raise TypeError(f"submit() takes a coroutine, not {coro!r}")
        try:
            loop = self._core.ensure_loop()
        except Closed:
            coro.close()
            raise
        return loop.submit(coro)

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> BusStats:
        core = self._core
        with core.lock:
            children = list(core.children)
        subs = tuple(c.stats() for c in children if isinstance(c, BaseSubscriber))
        pubs = tuple(c.stats() for c in children
                     if isinstance(c, BasePublisher) and c is not core.reporter)
        broker = core.broker
        b = broker.stats() if broker is not None and not self.closed else None
        return BusStats(
            messages_in=b.messages_in if b else 0,
            bytes_in=b.bytes_in if b else 0,
            messages_out=b.messages_out if b else 0,
            bytes_out=b.bytes_out if b else 0,
            subscribers=b.subscribers if b else len(subs),
            publishers=len(pubs),
            dropped=sum(s.dropped for s in subs) + sum(p.dropped for p in pubs),
            per_subscriber=subs,
            per_publisher=pubs,
            requests=_requests.request_stats(self),
        )

    # -- shutdown ---------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop everything the bus made and return within ``timeout``, from any thread.

        Idempotent, and safe from a signal handler. Called from one of the bus's own
        threads (a callback), it shuts down everything but that thread, which ends as soon
        as the callback returns. A part that does not stop in time (a receiver that has not
        run since, a stuck callback) is left to finish on its own: it closes its socket when
        it next runs, and the context ends after the last socket. A later ``close()`` joins
        what is left.
        """
        self._core.close(timeout)

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vbus.Bus {self._address} {self._core.state.value}>"


def connect(
    address: str,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    hwm: int | None = None,
    keypair: Keypair | None = None,
    server_key: str | None = None,
    batch_delay: float = BATCH_DELAY,
    max_queue_bytes: int | None = None,
    shm_pool_bytes: int | None = None,
) -> Bus:
    """A bus that is a client of the broker at ``address`` (another process or host).

    Raises ConnectError naming the address when no broker answers within ``timeout`` or
    the broker refuses us. ``keypair`` and ``server_key`` (the broker's public key) are
    needed for a broker with CURVE security. ``batch_delay``, ``hwm`` and
    ``max_queue_bytes`` as for ``Bus``. ``shm_pool_bytes`` sizes each publisher's shared
    pool for large numpy frames to subscribers on this host (default 128 MiB; 0: none).
    """
    return Bus._client(address, timeout, hwm, client_security(keypair, server_key),
                       batch_delay, max_queue_bytes, shm_pool_bytes)


def _shm_pool_bytes(size: int | None) -> int | None:
    # shm: None is the default size; 0 turns shared memory off for this bus's publishers.
    if size is None:
        return None
    if size and size < _shm_proto.MIN_POOL_BYTES:
        raise ValueError(f"shm_pool_bytes must be 0 or at least {_shm_proto.MIN_POOL_BYTES}, "
                         f"not {size}")
    return size


def _check_options(hwm: int | None, timeout: float, batch_delay: float,
                   max_queue_bytes: int | None) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    if not 0 <= batch_delay <= 1.0:
        raise ValueError(f"batch_delay must be between 0 and 1 s, not {batch_delay}")
    effective_hwm(hwm, max_queue_bytes)  # validates both


def _is_async(callback: Callback) -> bool:
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 - async callable objects
    )


def _closing(core: _Core) -> bool:
    return core.state is not _BusState.OPEN


async def _run_async_callback(sub: AsyncSubscriber[Any], callback: Callback, core: _Core) -> None:
    try:
        async for msg in sub:
            try:
                await callback(msg)
            except Closed as exc:
                if not _closing(core):  # while the bus closes, that is no fault of the callback
                    sub._callback_failed(exc)
            except Exception as exc:
                sub._callback_failed(exc)
    finally:
        sub.close()


def _run_sync_callback(sub: Subscriber[Any], callback: Callback, core: _Core) -> None:
    block_signals()
    try:
        for msg in sub:
            try:
                callback(msg)
            except Closed as exc:
                if not _closing(core):  # while the bus closes, that is no fault of the callback
                    sub._callback_failed(exc)
            except Exception as exc:
                sub._callback_failed(exc)
    finally:
        sub.close()


# -- buses left open: at exit, when dropped, after fork -------------------------------------------
# Cores, not buses: a core never references its Bus, so an unreferenced Bus is collected and
# its finalizer closes the core. threading's own exit hook runs before it joins non-daemon
# threads, so a program that forgets close() does not wait forever on the broker's threads.
_LIVE: set[_Core] = set()
_LIVE_LOCK = threading.RLock()
_INPROC_OWNERS: weakref.WeakValueDictionary[str, _Core] = weakref.WeakValueDictionary()
_hook_installed = False


def _register(bus: Bus, core: _Core) -> None:
    global _hook_installed
    finalizer = weakref.finalize(bus, core.close, EXIT_CLOSE_TIMEOUT)
    finalizer.atexit = False  # at exit, _close_all does it, earlier
    with _LIVE_LOCK:
        _LIVE.add(core)
        if _hook_installed:
            return
        _hook_installed = True
    register_early = getattr(threading, "_register_atexit", None)
    if register_early is not None:
        try:
            register_early(_close_all)
        except RuntimeError:
            pass  # the interpreter is already shutting down
    atexit.register(_close_all)


def _unregister(core: _Core) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(core)


def _close_all() -> None:
    with _LIVE_LOCK:
        cores = list(_LIVE)
    for core in cores:
        core.close(EXIT_CLOSE_TIMEOUT)


def _after_fork_in_child() -> None:
    global _LIVE_LOCK
    _LIVE_LOCK = threading.RLock()
    for core in list(_LIVE):
        core.after_fork()
    _LIVE.clear()
    _INPROC_OWNERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
