"""The Bus: owns a ZeroMQ context, an optional embedded broker, the publishers and subscribers
made from it, the background loop and the callback threads, and shuts them all down in order.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import enum
import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar, overload

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from . import _control, _requests
from ._broker import MAX_MESSAGE_SIZE, Broker
from ._control import Report, report_frame
from ._endpoints import AddressError, is_loopback, parse_address
from ._errors import Closed, ConnectError, VbusError
from ._flusher import Flusher
from ._loop import BackgroundLoop
from ._message import Message
from ._publisher import LINGER, AsyncPublisher, Publisher, PublisherStats, connect_publisher
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
    LossHook,
    Subscriber,
    SubscriberStats,
    connect_subscriber,
)
from ._threads import Deadline, block_signals, join
from ._topics import compile_pattern

log = logging.getLogger("vbus")

T = TypeVar("T")
Callback = Callable[[Message], Any]
C = TypeVar("C", bound=Callback)
S = TypeVar("S", bound=Subscriber)

DEFAULT_HWM = 1000
DEFAULT_TIMEOUT = 5.0
BATCH_DELAY = 0.0005


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


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Bus:
    """A message bus. ``Bus()`` embeds a broker in this process; ``bind=`` also makes it
    reachable over ``ipc://`` or ``tcp://``. Use ``vbus.connect()`` for a broker elsewhere."""

    def __init__(
        self,
        bind: str | Sequence[str] | None = None,
        *,
        hwm: int = DEFAULT_HWM,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int = MAX_MESSAGE_SIZE,
        keypair: Keypair | None = None,
        authorized: Authorized | None = None,
        batch_delay: float = BATCH_DELAY,
    ) -> None:
        """``hwm``: queue bound, in ZeroMQ messages (a batch of small messages is one), of
        each publisher, of the broker's intake, and of each subscriber unless it sets its
        own. ``timeout``: how long readiness handshakes may take. ``max_message_size``
        (bytes): the largest frame a network peer may send the broker; a peer that sends
        more is disconnected. In-process traffic has no such limit. ``keypair`` and
        ``authorized`` (public keys, or a directory of ``*.pub`` files) make every network
        endpoint speak CURVE and admit only those keys. ``batch_delay`` (seconds) bounds how
        long a publisher in a burst may hold a message to send it with others; 0 disables
        batching."""
        if max_message_size < 1:
            raise ValueError(f"max_message_size must be positive, not {max_message_size}")
        security = server_security(keypair, authorized)
        binds = [bind] if isinstance(bind, str) else list(bind or ())
        for b in binds:
            endpoints = parse_address(b)
            if endpoints.address.startswith("inproc://"):
                raise AddressError(f"bind {b!r}: in-process access needs no bind")
            if security is None and not is_loopback(endpoints):
                log.warning("vbus: %s is open to the network without keys: anyone who can "
                            "reach it can read and publish (see docs/security.md)", b)
        self._setup(hwm, timeout, zmq.Context(), owns_context=True, batch_delay=batch_delay)
        try:
            self._broker: Broker | None = Broker(
                self._context, binds, hwm=hwm, max_message_size=max_message_size,
                security=security,
            )
        except BaseException:
            self._context.term()
            raise
        self._endpoints = self._broker.inproc
        network = self._broker.endpoints
        self._address = network[0].address if network else self._broker.inproc.address
        _INPROC_OWNERS[self._broker.inproc.address] = self
        _register(self)

    @classmethod
    def _client(cls, address: str, timeout: float, hwm: int,
                security: ClientSecurity | None = None,
                batch_delay: float = BATCH_DELAY) -> Bus:
        endpoints = parse_address(address)
        if endpoints.address.endswith(":0"):
            raise AddressError(f"connect {address!r}: port 0 is only for bind")
        owner = _INPROC_OWNERS.get(endpoints.address) if not endpoints.is_network else None
        if not endpoints.is_network and (owner is None or owner.closed):
            raise ConnectError(f"no vbus broker at {address} in this process")
        self = cls.__new__(cls)
        context = owner._context if owner is not None else zmq.Context()
        self._setup(hwm, timeout, context, owns_context=owner is None, batch_delay=batch_delay)
        self._broker = None
        self._endpoints = endpoints
        self._address = endpoints.address
        self._configure = security.apply if security is not None and owner is None else None
        try:
            failure = _probe(context, endpoints.publish, timeout, self._configure)
        except BaseException:
            self._terminate_context(Deadline(1.0))
            raise
        if failure is not None:
            self._terminate_context(Deadline(1.0))
            raise ConnectError(failure.format(address=address, timeout=timeout))
        if owner is not None:
            owner._inproc_clients.add(self)
        _register(self)
        return self

    def _setup(self, hwm: int, timeout: float, context: zmq.Context[zmq.Socket[bytes]],
               *, owns_context: bool, batch_delay: float) -> None:
        if hwm < 1:
            raise ValueError(f"hwm must be at least 1, not {hwm}")
        if not 0 <= batch_delay <= 1.0:
            raise ValueError(f"batch_delay must be between 0 and 1 s, not {batch_delay}")
        self._flusher = (
            Flusher(f"vbus-flusher-{id(self):x}", batch_delay) if batch_delay > 0 else None
        )
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self._hwm = hwm
        self._timeout = timeout
        self._configure: Callable[[zmq.Socket[bytes]], None] | None = None
        self._context = context
        self._owns_context = owns_context
        self._lock = threading.Lock()
        self._state = _State.OPEN
        self._closed_event = threading.Event()
        self._children: set[Publisher | Subscriber] = set()
        self._callback_threads: list[threading.Thread] = []
        self._loop: BackgroundLoop | None = None
        self._reporter: Publisher | None = None
        self._terminator: threading.Thread | None = None
        self._inproc_clients: weakref.WeakSet[Bus] = weakref.WeakSet()

    # -- properties -------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The address to hand to ``vbus.connect()``: the first bound one, else in-process."""
        return self._address

    @property
    def closed(self) -> bool:
        return self._state is not _State.OPEN

    def _closing(self) -> bool:
        return self._state is not _State.OPEN

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise Closed("the bus is closed")

    def _adopt(self, child: Any) -> Any:
        with self._lock:
            if self._state is _State.OPEN:
                self._children.add(child)
                return child
        child.close()
        raise Closed("the bus was closed")

    def _forget(self, child: Publisher | Subscriber) -> None:
        with self._lock:
            self._children.discard(child)

    # -- publishing -------------------------------------------------------------------------
    def publisher(self) -> Publisher:
        """A thread-safe publisher, returned once the broker accepts its messages."""
        pub: Publisher = self._publisher(Publisher)
        return pub

    def async_publisher(self) -> AsyncPublisher:
        """An asyncio publisher, returned once the broker accepts its messages."""
        pub: AsyncPublisher = self._publisher(AsyncPublisher)
        return pub

    def _publisher(self, cls: type[Publisher]) -> Any:
        self._check_open()
        sock = connect_publisher(self._context, self._endpoints.publish, self._timeout,
                                 self._hwm, self._configure)
        return self._adopt(cls(sock, owner=self, flusher=self._flusher))

    def _report(self, reporter_id: bytes, report: Report) -> None:
        """Send a subscriber's counters to the broker's $vbus/stats. Best effort."""
        with self._lock:
            if self._state is not _State.OPEN:
                return
            reporter = self._reporter
        try:
            if reporter is None:
                # No readiness wait: this runs in receiving threads and on the loop, where it
                # must not block. A report sent before the broker took us is simply skipped.
                sock = self._context.socket(zmq.XPUB)
                sock.linger = 0
                if self._configure is not None:
                    self._configure(sock)
                sock.connect(self._endpoints.publish)
                with self._lock:
                    if self._reporter is None and self._state is _State.OPEN:
                        self._reporter = Publisher(sock)
                    else:
                        sock.close(0)
                    reporter = self._reporter
            if reporter is not None:
                reporter._send_control(report_frame(reporter_id, report))
        except (VbusError, zmq.ZMQError) as exc:
            log.debug("vbus: could not report counters: %s", exc)

    # -- subscribing ------------------------------------------------------------------------
    def subscribe(
        self,
        pattern: str,
        *,
        type: Any = None,
        hwm: int | None = None,
        on_loss: LossHook | None = None,
    ) -> Subscriber:
        """A sync subscriber, returned once its subscription is active at the broker.

        ``type`` decodes and validates payloads into it; ``hwm`` bounds its queue (messages);
        ``on_loss(topic, sender, count)`` is called in the receiving thread for every gap.
        """
        return self._subscribe(Subscriber, pattern, type, hwm, on_loss)

    def async_subscribe(
        self,
        pattern: str,
        *,
        type: Any = None,
        hwm: int | None = None,
        on_loss: LossHook | None = None,
    ) -> AsyncSubscriber:
        """An asyncio subscriber, returned once its subscription is active at the broker.
        The options are those of ``subscribe``."""
        return self._subscribe(AsyncSubscriber, pattern, type, hwm, on_loss)

    def _subscribe(self, cls: type[S], pattern: str, type: Any, hwm: int | None,
                   on_loss: LossHook | None = None) -> S:
        compiled = compile_pattern(pattern)
        if hwm is not None and hwm < 1:
            raise ValueError(f"hwm must be at least 1, not {hwm}")
        self._check_open()
        sock, ready, early = connect_subscriber(
            self._context, self._endpoints.subscribe, compiled,
            timeout=self._timeout, hwm=hwm or self._hwm, configure=self._configure,
        )
        sub: S = self._adopt(
            cls(sock, compiled, ready, early, type=type, on_loss=on_loss, owner=self)
        )
        return sub

    @overload
    def on(self, pattern: str, *, type: Any = None, hwm: int | None = None,
           on_loss: LossHook | None = None) -> Callable[[C], C]: ...
    @overload
    def on(self, pattern: str, callback: C, *, type: Any = None, hwm: int | None = None,
           on_loss: LossHook | None = None) -> C: ...

    def on(self, pattern: str, callback: Any = None, *, type: Any = None,
           hwm: int | None = None, on_loss: LossHook | None = None) -> Any:
        """Run ``callback(msg)`` for every message matching ``pattern``; usable as decorator.

        Async callbacks run on the bus's background loop; sync callbacks on a thread of their
        own each, so a slow one stalls only itself. Either way in order, per subscription. An
        exception is logged and counted, and the subscription goes on. Returns once the
        subscription is active. The options are those of ``subscribe``.
        """
        compile_pattern(pattern)

        def decorator(fn: C) -> C:
            self._start_callback(pattern, fn, type, hwm, on_loss)
            return fn

        return decorator if callback is None else decorator(callback)

    def _start_callback(self, pattern: str, callback: Callback, type: Any, hwm: int | None,
                        on_loss: LossHook | None) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {callback!r}")
        if _is_async(callback):
            asub = self._subscribe(AsyncSubscriber, pattern, type, hwm, on_loss)
            try:
                self._ensure_loop().submit(_run_async_callback(asub, callback, self._closing))
            except BaseException:
                asub.close()
                raise
            return
        sub = self._subscribe(Subscriber, pattern, type, hwm, on_loss)
        thread = threading.Thread(
            target=_run_sync_callback, args=(sub, callback, self._closing),
            name=f"vbus-callback-{pattern}",
        )
        with self._lock:
            self._callback_threads.append(thread)
        thread.start()

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
    def _ensure_loop(self) -> BackgroundLoop:
        with self._lock:
            if self._state is not _State.OPEN:
                raise Closed("the bus is closed")
            if self._loop is None:
                self._loop = BackgroundLoop(name=f"vbus-loop-{id(self):x}")
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the bus's background loop; cancelled when the bus closes."""
        if not inspect.iscoroutine(coro):
            raise TypeError(f"submit() takes a coroutine, not {coro!r}")
        try:
            loop = self._ensure_loop()
        except Closed:
            coro.close()
            raise
        return loop.submit(coro)

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> BusStats:
        with self._lock:
            children = list(self._children)
        subs = tuple(c.stats() for c in children if isinstance(c, Subscriber))
        pubs = tuple(c.stats() for c in children if isinstance(c, Publisher))
        broker = self._broker
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

        Idempotent. Called from one of the bus's own threads (a callback), it shuts down
        everything but that thread, which ends as soon as the callback returns. A part that
        does not stop in time is named in a warning and left behind; a later ``close()``
        from elsewhere finishes the job (joins what is left).
        """
        deadline = Deadline(timeout)
        with self._lock:
            first = self._state is _State.OPEN
            if first:
                self._state = _State.CLOSING
        if not first:
            if self._in_own_thread():
                return
            self._closed_event.wait(deadline.remaining())
        try:
            stuck = self._shutdown(deadline)
        finally:
            if first:
                self._state = _State.CLOSED
                self._closed_event.set()
                _unregister(self)
        if stuck:
            log.warning("vbus: close() forced past %s", ", ".join(stuck))

    def _shutdown(self, deadline: Deadline) -> list[str]:
        """The shutdown order, in one place. Every step is idempotent; a step that cannot
        finish in time is reported and skipped, so the next one still gets its turn."""
        # 1. clients sharing our context (vbus.connect to our inproc address)
        for client in list(self._inproc_clients):
            client.close(deadline.remaining() or 0.0)
        # 1b. request/reply: requests in flight woken with Closed, handlers in flight finish
        stuck = _requests.close_requests(self, deadline)
        # 2. publishers, then subscribers: each subscriber wakes its waiter, which closes the
        #    socket it owns, and waits for that (a sync callback's thread ends with it)
        with self._lock:
            children = sorted(self._children, key=lambda c: isinstance(c, Subscriber))
        if self._reporter is not None:
            children.insert(0, self._reporter)
        for child in children:
            if isinstance(child, Subscriber):
                child.close(timeout=deadline.remaining() or 0.0)
            else:
                child._close(min(LINGER, (deadline.remaining() or 0.0) / 4))
        # 3. the background loop (cancels async callbacks and submitted coroutines) and the
        #    callback threads, joined unless we are one of them; a stuck user callback may
        #    not eat the time the broker and the context need
        stuck += self._join_threads(deadline.share(0.8))
        if self._flusher is not None and not self._flusher.stop(deadline):
            stuck.append(self._flusher.name)
        # 4. the broker: forwarder terminated through its control socket, threads joined
        if self._broker is not None:
            stuck += self._broker.stop(deadline)
            _INPROC_OWNERS.pop(self._broker.inproc.address, None)
        # 5. the context, once every socket in it is closed
        stuck += self._terminate_context(deadline)
        return stuck

    def _join_threads(self, deadline: Deadline) -> list[str]:
        stuck: list[str] = []
        loop = self._loop
        if loop is not None and not loop.stop(deadline) and not loop.in_loop_thread:
            stuck.append(loop.thread.name)
        for thread in self._callback_threads:
            if not join(thread, deadline):
                stuck.append(thread.name)
        return stuck

    def _in_own_thread(self) -> bool:
        current = threading.current_thread()
        loop = self._loop
        return (current in self._callback_threads or (loop is not None and loop.in_loop_thread)
                or _requests.in_own_thread(self))

    def _terminate_context(self, deadline: Deadline) -> list[str]:
        ctx = self._context
        if not self._owns_context or ctx.closed:
            return []
        terminator = self._terminator
        if terminator is None:
            open_sockets = [s for s in list(getattr(ctx, "_sockets", ())) if not s.closed]
            if not open_sockets:
                ctx.term()  # no socket left: returns at once
                return []
            # A socket is still open in a thread that did not stop: term() waits for it, so
            # it runs on a thread of its own that we wait for no longer than the deadline.
            terminator = self._terminator = threading.Thread(
                target=ctx.term, name=f"vbus-context-term-{id(self):x}"
            )
            terminator.start()
        return [] if join(terminator, deadline) else [terminator.name]

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vbus.Bus {self._address} {self._state.value}>"


def connect(
    address: str,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    hwm: int = DEFAULT_HWM,
    keypair: Keypair | None = None,
    server_key: str | None = None,
    batch_delay: float = BATCH_DELAY,
) -> Bus:
    """A bus that is a client of the broker at ``address`` (another process or host).

    Raises ConnectError naming the address when no broker answers within ``timeout`` or
    the broker refuses us. ``keypair`` and ``server_key`` (the broker's public key) are
    needed for a broker with CURVE security. ``batch_delay`` as for ``Bus``.
    """
    return Bus._client(address, timeout, hwm, client_security(keypair, server_key), batch_delay)


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _probe(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, timeout: float,
           configure: Callable[[zmq.Socket[bytes]], None] | None) -> str | None:
    """None if a broker at ``endpoint`` takes a publisher within ``timeout``, else why not
    (a template for ConnectError). A monitor tells a refusal from silence."""
    sock = context.socket(zmq.XPUB)
    sock.linger = 0
    monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
    try:
        if configure is not None:
            configure(sock)
        sock.connect(endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = Deadline(timeout)
        while not deadline.expired():
            events = dict(poller.poll(int((deadline.remaining() or 0.0) * 1000) + 1))
            if sock in events and _control.is_acceptance(sock.recv()):
                return None
            if monitor in events:
                # A failed handshake is final: ZeroMQ would only fail it again on retry.
                event = parse_monitor_message(monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return "the broker at {address} refused this client's key (not authorized)"
                return ("the security handshake with {address} failed: check this client's "
                        "keys and the broker's public key (does the broker use CURVE keys, "
                        "and is it this one?)")
        return "no vbus broker answered at {address} within {timeout:g} s"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def _is_async(callback: Callback) -> bool:
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 - async callable objects
    )


async def _run_async_callback(
    sub: AsyncSubscriber, callback: Callback, closing: Callable[[], bool]
) -> None:
    try:
        async for msg in sub:
            try:
                await callback(msg)
            except Closed as exc:
                if not closing():  # while the bus closes, that is no fault of the callback
                    sub._callback_failed(exc)
            except Exception as exc:
                sub._callback_failed(exc)
    finally:
        sub.close()


def _run_sync_callback(
    sub: Subscriber, callback: Callback, closing: Callable[[], bool]
) -> None:
    block_signals()
    try:
        for msg in sub:
            try:
                callback(msg)
            except Closed as exc:
                if not closing():  # while the bus closes, that is no fault of the callback
                    sub._callback_failed(exc)
            except Exception as exc:
                sub._callback_failed(exc)
    finally:
        sub.close()


# -- buses left open at exit -------------------------------------------------------------------
# threading's own exit hook runs before it joins non-daemon threads, so a program that forgets
# close() does not wait forever on the broker's threads.
_LIVE: set[Bus] = set()
_LIVE_LOCK = threading.Lock()
_INPROC_OWNERS: weakref.WeakValueDictionary[str, Bus] = weakref.WeakValueDictionary()
_hook_installed = False


def _register(bus: Bus) -> None:
    global _hook_installed
    with _LIVE_LOCK:
        _LIVE.add(bus)
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


def _unregister(bus: Bus) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(bus)


def _close_all() -> None:
    with _LIVE_LOCK:
        buses = list(_LIVE)
    for bus in buses:
        bus.close(timeout=2.0)
