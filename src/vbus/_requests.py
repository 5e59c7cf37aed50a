"""Request/reply, the client side: ``serve(bus, topic, handler)``, ``request(bus, ...)`` and
``async_request(bus, ...)``; the Bus's methods of the same names call these.

Each bus that uses request/reply gets one agent, made on first use: a thread owning one SUB
socket that receives the bus's replies (``$vbus/reply/<agent>/``) and the requests the broker
routes to the bus's servers (``$vbus/serve/<server>``), and one XPUB shared under a lock (like
a Publisher) that requesters, handlers and the agent send on. A requester registers its
request under a fresh id and sends it from its own thread; the agent hands the reply over
(threading.Event or the requester's event loop) and counts a reply whose request is gone
(timed out, cancelled, closed) as late: ids are never reused, so a late reply can never be
taken for another request's. A sync handler runs on a thread of its own, an async one in a
task on the bus's loop; each server handles one request at a time, in arrival order (a device
command must not run twice at once): several servers of a topic share its load. Frames and
routing: _proto/requests.py and _broker/requests.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec
import zmq

from ._errors import Closed, ConnectError, DecodeError, EncodeError, NoResponder, RemoteError
from ._message import Message
from ._proto import control as _control
from ._proto import requests as proto
from ._proto import wire as _wire
from ._proto.endpoints import Endpoints
from ._proto.seq import BurstLog
from ._proto.topics import compile_pattern, validate_topic
from ._threads import DEFAULT_TIMEOUT, Deadline, block_signals, current_in, is_current, join
from ._waker import Waker

log = logging.getLogger("vbus.requests")

_DRAIN_EVERY = 64
_DRAIN_BATCH = 1000
_REPLY_LINGER = 0.25
MAX_QUEUED = 10_000
"""Requests one server may have waiting; more are answered NoResponder ("busy") at once."""
Handler = Callable[[Message], Any]
H = TypeVar("H", bound=Handler)
T = TypeVar("T")


class RequestStats(msgspec.Struct, frozen=True):
    """Request/reply counters of one bus. As requester: ``sent`` requests, of which
    ``answered`` (a reply), ``remote_errors`` (the handler raised), ``no_responder``,
    ``timed_out`` and ``closed`` (woken by close); ``late`` replies came after their request
    had given up and were dropped. As server: ``served`` requests answered, ``failed`` ones
    whose handler raised (answered with the error), ``refused`` ones turned away because the
    server had MAX_QUEUED waiting, across its ``servers``."""

    sent: int = 0
    answered: int = 0
    remote_errors: int = 0
    no_responder: int = 0
    timed_out: int = 0
    closed: int = 0
    late: int = 0
    served: int = 0
    failed: int = 0
    refused: int = 0
    servers: int = 0


# -- the one seam with the Bus's internals -----------------------------------------------------
class CoreLike(Protocol):
    """What request/reply needs of a bus's core (``_bus._Core``): what to connect with, and
    the readiness handshake that close() wakes. Also the key of the bus's agent."""

    @property
    def context(self) -> zmq.Context[zmq.Socket[bytes]]: ...
    @property
    def endpoints(self) -> Endpoints | None: ...
    @property
    def timeout(self) -> float: ...
    @property
    def hwm(self) -> int | None: ...
    @property
    def max_queue_bytes(self) -> int | None: ...
    @property
    def configure(self) -> Callable[[zmq.Socket[bytes]], None] | None: ...
    def handshake(self) -> contextlib.AbstractContextManager[Waker]: ...


class BusLike(Protocol):
    """What request/reply needs of the Bus that calls it (``_bus.Bus``)."""

    @property
    def _core(self) -> CoreLike: ...
    @property
    def closed(self) -> bool: ...
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]: ...


class _Link(NamedTuple):
    pub: zmq.Socket[bytes]
    sub: zmq.Socket[bytes]
    timeout: float


def _connect(bus: BusLike, agent_id: str) -> _Link:
    """An XPUB the broker accepts and a SUB whose reply subscription the broker confirmed,
    through the bus's own context, endpoints and security. The only place that reaches into
    the Bus (its core): rewire it here if the Bus changes."""
    from ._handshake import connect_publisher, connect_subscriber
    from ._proto.limits import DEFAULT_MAX_QUEUE_BYTES, effective_hwm

    core = bus._core
    context, endpoints, timeout = core.context, core.endpoints, core.timeout
    if endpoints is None:
        raise Closed("the bus is closed")  # a core is given its endpoints before it is used
    hwm = effective_hwm(core.hwm, core.max_queue_bytes)
    with core.handshake() as closing:
        pub = connect_publisher(context, endpoints.publish, timeout, hwm, core.configure,
                                closing)
        try:
            sub, _inbox = connect_subscriber(
                context, endpoints.subscribe, compile_pattern(f"$vbus/reply/{agent_id}/*"),
                timeout=timeout, hwm=hwm, configure=core.configure, closing=closing,
                max_assembly_bytes=core.max_queue_bytes or DEFAULT_MAX_QUEUE_BYTES,
            )
        except BaseException:
            pub.close(0)
            raise
    return _Link(pub, sub, timeout)


# -- public functions (the Bus's methods) ------------------------------------------------------
def serve(bus: BusLike, topic: str, handler: Handler | None = None) -> Any:
    """Serve ``topic``: ``handler(msg)``'s return value is the reply. Without ``handler``, a
    decorator. Returns (the decorator returns) a ``Server`` handle, once the broker routes
    the topic's requests to it; ``close()`` stops serving."""
    validate_topic(topic)
    if handler is None:

        def decorator(fn: Handler) -> Server:
            return _serve(bus, topic, fn)

        return decorator
    return _serve(bus, topic, handler)


def request(bus: BusLike, topic: str, data: Any, timeout: float = DEFAULT_TIMEOUT) -> Message:
    """Send ``data`` to one server of ``topic`` and return its reply (a Message whose
    ``sender`` is the server's id). NoResponder at once when nobody serves the topic,
    TimeoutError after ``timeout`` s, RemoteError when the handler raised, Closed when the
    bus closes meanwhile."""
    prefix = _request_prefix(topic)
    _check_timeout(timeout)
    agent = _agent(bus)
    pending = _Pending(topic, prefix)
    rid = agent.start(pending, _encode(data))
    try:
        if not pending.event.wait(timeout) and agent.expire(rid):
            raise TimeoutError(f"no reply to the request on {topic!r} within {timeout:g} s")
    except BaseException:
        agent.forget(rid)
        raise
    return pending.outcome_now()


async def async_request(bus: BusLike, topic: str, data: Any,
                        timeout: float = DEFAULT_TIMEOUT) -> Message:
    """The asyncio twin of ``request``: awaits the reply without blocking the loop."""
    prefix = _request_prefix(topic)
    _check_timeout(timeout)
    agent = _agent(bus)
    loop = asyncio.get_running_loop()
    pending = _Pending(topic, prefix, loop)
    rid = agent.start(pending, _encode(data))
    assert pending.future is not None
    try:
        try:
            await asyncio.wait_for(pending.future, timeout)
        except asyncio.TimeoutError:
            if agent.expire(rid):
                raise TimeoutError(
                    f"no reply to the request on {topic!r} within {timeout:g} s"
                ) from None
    except BaseException:
        agent.forget(rid)
        raise
    return pending.outcome_now()


def request_stats(bus: BusLike) -> RequestStats:
    agent = _AGENTS.get(bus._core)
    return agent.stats() if isinstance(agent, _Agent) else RequestStats()


def in_own_thread(core: CoreLike) -> bool:
    """True in a thread the bus's request/reply part runs (a sync handler's): a close() from
    there must not wait for that thread to end. ``core``: the bus's core."""
    agent = _AGENTS.get(core)
    if not isinstance(agent, _Agent):
        return False
    return is_current(agent._thread) or current_in(list(agent.workers))


def close_requests(core: CoreLike, deadline: Deadline) -> list[str]:
    """Close the bus's request/reply part: wake requests in flight with Closed, give the
    handlers in flight until ``deadline``, stop the agent. Returns what did not stop in time.
    The Bus calls this first in its shutdown, before its loop and its broker stop."""
    with _AGENTS_LOCK:
        agent = _AGENTS.get(core)
        if not isinstance(agent, _Agent):
            _AGENTS[core] = _CLOSED  # no agent is made for a closing bus
            return []
    return agent.close(deadline)


# -- machinery ---------------------------------------------------------------------------------
_CLOSED: Any = object()  # the value for a bus closed before it made an agent
_AGENTS: weakref.WeakKeyDictionary[CoreLike, Any] = weakref.WeakKeyDictionary()
_AGENTS_LOCK = threading.Lock()
_ENCODER = _wire.new_encoder()  # msgspec encoders may be shared between threads


_PREFIXES: dict[str, bytes] = {}  # valid topics -> their request prefix
_PREFIX_CACHE_LIMIT = 4096


def _request_prefix(topic: str) -> bytes:
    prefix = _PREFIXES.get(topic)
    if prefix is None:
        validate_topic(topic)
        if len(_PREFIXES) >= _PREFIX_CACHE_LIMIT:
            _PREFIXES.clear()
        prefix = _PREFIXES[topic] = proto.request_prefix(topic)
    return prefix


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _encode(data: Any) -> _wire.Payload:
    return _wire.encode_payload(data, _ENCODER)


def _agent(bus: BusLike) -> _Agent:
    # Keyed by the bus's core, which never references the Bus: a dropped Bus is collected.
    core = bus._core
    agent = _AGENTS.get(core)
    if isinstance(agent, _Agent):
        return agent  # closed or not: a closed one raises Closed itself
    with _AGENTS_LOCK:
        agent = _AGENTS.get(core)
        if isinstance(agent, _Agent):
            return agent
        if agent is _CLOSED or bus.closed:
            raise Closed("the bus is closed")
        made = _AGENTS[core] = _Agent(bus)
        return made


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


class _Pending:
    """One request waiting for its outcome: a Message, or the exception to raise."""

    __slots__ = ("event", "future", "loop", "outcome", "prefix", "topic")

    def __init__(self, topic: str, prefix: bytes,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.topic = topic
        self.prefix = prefix
        self.loop = loop
        self.event = threading.Event()
        self.future: asyncio.Future[None] | None = (
            loop.create_future() if loop is not None else None
        )
        self.outcome: Any = None

    def resolve(self, outcome: Any) -> None:
        self.outcome = outcome
        self.event.set()
        if self.loop is not None and self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_settle, self.future)
            except RuntimeError:
                pass  # that loop is closed: nobody waits there any more

    def outcome_now(self) -> Message:
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, Message)
        return outcome


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Agent:
    """A bus's request/reply agent (see the module's doc)."""

    def __init__(self, bus: BusLike) -> None:
        self.id = secrets.token_hex(8)
        self.sender = bytes.fromhex(self.id)
        self._reply_topic = proto.reply_subscription(self.id).decode()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the pending requests, counters, servers
        self._send_lock = threading.Lock()  # the XPUB
        self._pending: dict[int, _Pending] = {}
        self._last_id = 0
        self._servers: dict[str, Server] = {}
        self._confirms: dict[bytes, threading.Event] = {}
        self._commands: deque[tuple[str, bytes]] = deque()
        self._counts = dict.fromkeys(
            ("sent", "answered", "remote_errors", "no_responder", "timed_out", "closed",
             "late"), 0)
        self._invalid = 0
        self._dropped_replies = 0
        self.workers: set[threading.Thread] = set()  # sync handlers' threads still running
        self._gone_served = 0  # by servers closed since
        self._gone_failed = 0
        self._gone_refused = 0
        self._sends = 0
        self._closed = False
        self._pub_closed = False
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()
        self._errors = BurstLog(log, "request/reply agent skipped bad input")
        link = _connect(bus, self.id)
        self._pub, self._sub, self.timeout = link.pub, link.sub, link.timeout
        try:
            self._bell = Waker()
            self._thread = threading.Thread(target=self._run,
                                            name=f"vbus-requests-{self.id[:8]}")
            self._thread.start()
        except BaseException:
            self._pub.close(0)
            self._sub.close(0)
            raise

    # -- requester side ---------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise Closed("the bus is closed")
        if os.getpid() != self._pid:
            raise Closed("this bus belongs to the process it was made in (before a fork)")

    def start(self, pending: _Pending, payload: _wire.Payload) -> int:
        """Register ``pending`` under a new id and send its request; returns the id."""
        self._check_usable()
        with self._lock:
            if self._closed:
                raise Closed("the bus is closed")
            self._last_id += 1
            rid = self._last_id
            self._pending[rid] = pending
            self._counts["sent"] += 1
        frame, external = _wire.build_frames(pending.prefix, 0, self.sender, rid, time.time(),
                                             payload)
        try:
            sent = self._send(frame, external)
        except BaseException:
            self.forget(rid)
            raise
        if not sent:
            self.expire(rid)
            raise TimeoutError(f"request on {pending.topic!r} not sent: the queue to the "
                               "broker is full")
        return rid

    def expire(self, rid: int) -> bool:
        """The requester gives up on ``rid``: True if it was still pending (timed out), False
        if its outcome came meanwhile (then it is there to take)."""
        with self._lock:
            if self._pending.pop(rid, None) is None:
                return False
            self._counts["timed_out"] += 1
            return True

    def forget(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    # -- sending ----------------------------------------------------------------------------
    def _send(self, frame: bytes, external: Any) -> bool:
        """Send one message; False if the queue to the broker is full. Closed once closed."""
        with self._send_lock:
            if self._pub_closed:
                raise Closed("the bus is closed")
            sock = self._pub
            try:
                if external is None:
                    sock.send(frame, zmq.NOBLOCK)
                else:
                    sock.send(frame, zmq.NOBLOCK | zmq.SNDMORE)
                    sock.send(external, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            self._sends += 1
            if self._sends % _DRAIN_EVERY == 0:
                # The broker forwards every subscription change to publishers: not ours.
                while True:
                    try:
                        sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            return True

    def reply(self, server: Server, requester: str, rid: int, status: str,
              payload: _wire.Payload) -> None:
        frame, external = _wire.build_frames(
            proto.reply_prefix(requester, status), 0, server.sender, rid, time.time(), payload
        )
        if not self._send(frame, external):
            with self._lock:
                self._dropped_replies += 1

    # -- the agent thread -------------------------------------------------------------------
    def _command(self, kind: str, arg: bytes = b"") -> None:
        self._commands.append((kind, arg))
        self._bell.wake()

    def _run(self) -> None:
        block_signals()
        sub = self._sub
        bell = self._bell.fileno()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(bell, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if bell in events:
                    self._bell.clear()
                    if not self._run_commands():
                        return
                if sub in events:
                    self._drain()
        except zmq.ZMQError as exc:
            log.error("vbus: request/reply agent failed: %s", exc)
        finally:
            sub.close(0)

    def _run_commands(self) -> bool:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "subscribe":
                self._sub.subscribe(arg)
            elif kind == "unsubscribe":
                self._sub.unsubscribe(arg)
            else:
                return False  # stop
        return True

    def _drain(self) -> None:
        sub = self._sub
        for _ in range(_DRAIN_BATCH):  # then back to poll: a flood cannot starve a close
            try:
                first = sub.recv(zmq.NOBLOCK)
                rest: list[zmq.Frame] = []
                while sub.getsockopt(zmq.RCVMORE):
                    rest.append(sub.recv(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return
            try:
                self._dispatch(first, rest)
            except Exception as exc:  # whatever a peer sent, the agent goes on
                self._invalid += 1
                self._errors.event(1, f"{exc!r}", exc_info=exc)

    def _dispatch(self, first: bytes, rest: list[zmq.Frame]) -> None:
        if first.startswith(_control.READY):
            token = first[: first.find(b"\0") + 1]
            confirm = self._confirms.pop(token, None)
            if confirm is not None:
                self._sub.unsubscribe(token)
                confirm.set()
            return  # else our reply subscription's, confirmed again after a reconnect
        env = _wire.parse_envelope(first)
        if bool(env.flags & _wire.FLAG_EXTERNAL) != bool(rest) or len(rest) > 1:
            raise DecodeError(f"{len(rest) + 1} frames do not match the header's flags")
        external = rest[0].buffer if rest else None
        topic = env.topic
        if topic.startswith(self._reply_topic):
            self._take_reply(env, topic[len(self._reply_topic) :], first, external)
        elif topic.startswith("$vbus/serve/"):
            server = self._servers.get(topic[len("$vbus/serve/") :])
            requester = env.sender.hex()
            if server is None or not server._take(env, first, external):
                # Routed to a server of ours that has just closed: say so at once.
                self.reply_none(requester, env.seq, "the server closed before handling it")

    def reply_none(self, requester: str, rid: int, why: str) -> None:
        frame = proto.no_responder_frame(requester, rid, self.sender, why)
        try:
            self._send(frame, None)
        except Closed:
            pass

    def _take_reply(self, env: _wire.Envelope, status: str, first: bytes,
                    external: memoryview | None) -> None:
        rid = env.seq
        with self._lock:
            pending = self._pending.get(rid)
            if pending is None:
                if 0 < rid <= self._last_id:
                    self._counts["late"] += 1
                else:
                    self._invalid += 1
                return
        topic = pending.topic
        inline = memoryview(first)[env.offset :]
        outcome: Any
        if status == proto.OK:
            try:
                data = _wire.decode_payload(env.kind, inline, external, self._decoder)
                outcome = Message(topic, data, env.sender.hex(), rid, env.time)
                counter = "answered"
            except DecodeError as exc:
                outcome, counter = DecodeError(f"reply on {topic!r}: {exc}"), "answered"
        elif status == proto.ERROR:
            try:
                body = proto.ERROR_DECODER.decode(inline)
                outcome = RemoteError(topic, body.type, body.message)
            except (msgspec.DecodeError, msgspec.ValidationError):
                outcome = RemoteError(topic, "?", "(malformed error reply)")
            counter = "remote_errors"
        elif status == proto.NONE:
            try:
                why = self._decoder.decode(inline)
            except msgspec.DecodeError:
                why = None
            detail = f" ({why})" if isinstance(why, str) and why else ""
            outcome, counter = NoResponder(f"nobody serves {topic!r}{detail}"), "no_responder"
        else:
            self._invalid += 1
            return
        with self._lock:
            if self._pending.pop(rid, None) is None:  # gave up meanwhile
                self._counts["late"] += 1
                return
            self._counts[counter] += 1
            pending.resolve(outcome)

    # -- server side ------------------------------------------------------------------------
    def register(self, server: Server) -> None:
        """Route ``server.topic``'s requests to ``server``; returns once the broker does."""
        self._check_usable()
        with self._lock:
            if self._closed:
                raise Closed("the bus is closed")
            self._servers[server.id] = server
        self._command("subscribe", proto.serve_prefix(server.id))  # before the marker
        self._command("subscribe", proto.marker(server.topic, server.id))
        if not self._confirm(Deadline(self.timeout)):
            raise ConnectError(f"the broker did not confirm serving {server.topic!r} within "
                               f"{self.timeout:g} s")
        self._check_usable()

    def unregister(self, servers: list[Server], deadline: Deadline) -> None:
        """Stop routing to ``servers``; returns once every request routed to them has
        reached their queues (or at the deadline)."""
        for server in servers:
            self._command("unsubscribe", proto.marker(server.topic, server.id))
        # The broker routes on its XPUB and confirms on it: once the confirmation is here,
        # so is every request it routed to these servers before it saw them go.
        self._confirm(deadline)
        with self._lock:
            for server in servers:
                self._servers.pop(server.id, None)
        for server in servers:
            self._command("unsubscribe", proto.serve_prefix(server.id))

    def _confirm(self, deadline: Deadline) -> bool:
        """A readiness round trip through the broker: True once the broker has seen every
        subscription change asked for before it."""
        token = _control.READY + secrets.token_hex(8).encode() + b"\0"
        event = threading.Event()
        self._confirms[token] = event
        self._command("subscribe", token)
        ok = event.wait(deadline.remaining())
        if not ok:
            self._confirms.pop(token, None)
        return ok

    # -- stats and close --------------------------------------------------------------------
    def stats(self) -> RequestStats:
        with self._lock:
            servers = list(self._servers.values())
            counts = dict(self._counts)
        return RequestStats(**counts, served=sum(s.served for s in servers) + self._gone_served,
                            failed=sum(s.failed for s in servers) + self._gone_failed,
                            refused=sum(s.refused for s in servers) + self._gone_refused,
                            servers=len(servers))

    def forget_server(self, server: Server) -> None:
        with self._lock:
            self._gone_served += server.served
            self._gone_failed += server.failed
            self._gone_refused += server.refused

    def close(self, deadline: Deadline) -> list[str]:
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            if os.getpid() != self._pid:
                return []  # a forked child's copy: its sockets and threads are the parent's
            pending, self._pending = self._pending, {}
            self._counts["closed"] += len(pending)
            for p in pending.values():
                p.resolve(Closed(f"the bus was closed with the request on {p.topic!r} "
                                 "in flight"))
            servers = list(self._servers.values())
        stuck: list[str] = []
        if servers:
            self.unregister(servers, deadline.share(0.25))
            for server in servers:
                server._stop()
            handlers = deadline.share(0.8)
            for server in servers:
                if not server._join(handlers):
                    stuck.append(server.name)
        for event in list(self._confirms.values()):
            event.set()  # a serve() waiting for its confirmation: woken, it finds us closed
        self._command("stop")
        if not join(self._thread, deadline):
            stuck.append(self._thread.name)
        else:
            self._bell.close()
        with self._send_lock:
            self._pub_closed = True
            self._pub.close(int(min(_REPLY_LINGER, deadline.remaining() or 0.0) * 1000))
        return stuck


class Server:
    """Serves one topic (see ``Bus.serve``). Callable: calls the handler. ``close()`` stops
    serving; the requests already routed here are still answered."""

    def __init__(self, agent: _Agent, topic: str, handler: Handler) -> None:
        self.topic = topic
        self.id = secrets.token_hex(8)
        self.sender = bytes.fromhex(self.id)
        self.name = f"vbus-server-{topic}"
        self.handler = handler
        self.served = 0
        self.failed = 0
        self.refused = 0  # requests turned away because MAX_QUEUED were waiting
        self._agent = agent
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async = False
        self._handoff = threading.Lock()  # the async worker's queue, once it has started
        self._early: deque[Any] = deque()  # requests that came before it started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue[Any] | None = None
        self._task: Any = None  # concurrent.futures.Future of the async worker

    def __call__(self, msg: Message) -> Any:
        return self.handler(msg)

    @property
    def closed(self) -> bool:
        return self._closed

    def _start(self, bus: BusLike) -> None:
        if _is_async(self.handler):
            # Not a blocking look-up of the loop: serve() may be called on that very loop.
            self._async = True
            self._task = bus.submit(self._work_async())
        else:
            self._thread = threading.Thread(target=self._work, name=self.name)
            self._agent.workers.add(self._thread)
            self._thread.start()

    # called by the agent thread
    def _take(self, env: _wire.Envelope, first: bytes, external: Any) -> bool:
        if self._stopping:
            return False
        queued = self._queued()
        if queued >= MAX_QUEUED:
            self._agent.reply_none(env.sender.hex(), env.seq,
                                   f"its server is busy ({queued} requests queued)")
            self.refused += 1
            return True
        return self._put((env, first, external))

    def _queued(self) -> int:
        if not self._async:
            return self._queue.qsize()
        inbox = self._aqueue
        return inbox.qsize() if inbox is not None else len(self._early)

    def _put(self, item: Any) -> bool:
        if not self._async:
            self._queue.put(item)
            return True
        with self._handoff:
            if self._loop is None or self._aqueue is None:
                self._early.append(item)  # the worker task has not started yet
                return True
            loop, inbox = self._loop, self._aqueue
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:
            return False  # the loop is closed
        return True

    def _stop(self) -> None:
        self._stopping = True
        self._put(None)

    def _join(self, deadline: Deadline) -> bool:
        if self._thread is not None:
            return join(self._thread, deadline)
        if self._task is None or self._task.done():
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and self._loop in (None, running):
            return True  # closed from the bus's loop: the worker ends once that returns
        try:
            self._task.result(deadline.remaining())
        except Exception:
            pass
        return bool(self._task.done())

    # the handler's side
    def _work(self) -> None:
        block_signals()
        try:
            self._work_on()
        finally:
            self._agent.workers.discard(threading.current_thread())

    def _work_on(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            msg = self._message(*item)
            if msg is None:
                continue
            try:
                result = self.handler(msg)
            except Exception as exc:
                self._failed(item[0], exc)
                continue
            self._answer(item[0], result)

    async def _work_async(self) -> None:
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        with self._handoff:
            for item in self._early:
                inbox.put_nowait(item)
            self._early.clear()
            self._aqueue, self._loop = inbox, asyncio.get_running_loop()
        while True:
            item = await inbox.get()
            if item is None:
                return
            msg = self._message(*item)
            if msg is None:
                continue
            try:
                result = await self.handler(msg)
            except Exception as exc:
                self._failed(item[0], exc)
                continue
            self._answer(item[0], result)

    def _message(self, env: _wire.Envelope, first: bytes, external: Any) -> Message | None:
        try:
            data = _wire.decode_payload(env.kind, memoryview(first)[env.offset :], external,
                                        self._decoder)
        except DecodeError as exc:
            self._failed(env, exc)
            return None
        return Message(self.topic, data, env.sender.hex(), env.seq, env.time)

    def _failed(self, env: _wire.Envelope, exc: BaseException) -> None:
        self.failed += 1
        log.debug("vbus: handler of %r raised %r", self.topic, exc)
        self._send(env, proto.ERROR, proto.error_payload(type(exc).__name__, str(exc)))

    def _answer(self, env: _wire.Envelope, result: Any) -> None:
        try:
            payload = _encode(result)
        except EncodeError as exc:
            self._failed(env, exc)
            return
        if self._send(env, proto.OK, payload):
            self.served += 1

    def _send(self, env: _wire.Envelope, status: str, payload: _wire.Payload) -> bool:
        try:
            self._agent.reply(self, env.sender.hex(), env.seq, status, payload)
            return True
        except Closed:
            return False  # a handler that outlived close(): its reply has nowhere to go

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: the broker routes no more requests here; those already routed are
        answered (within ``timeout``). Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = Deadline(timeout)
        agent = self._agent
        if not agent._closed:
            agent.unregister([self], deadline.share(0.5))
            self._stop()
            if not self._join(deadline):
                log.warning("vbus: %s did not finish its request within %g s", self.name,
                            timeout)
            agent.forget_server(self)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vbus.Server {self.topic!r} {self.id} {'closed' if self._closed else 'open'}>"


def _serve(bus: BusLike, topic: str, handler: Handler) -> Server:
    if not callable(handler):
        raise TypeError(f"handler must be callable, not {handler!r}")
    agent = _agent(bus)
    server = Server(agent, topic, handler)
    server._start(bus)
    try:
        agent.register(server)
    except BaseException:
        server._closed = True
        server._stop()
        with agent._lock:
            agent._servers.pop(server.id, None)
        agent._command("unsubscribe", proto.marker(topic, server.id))
        agent._command("unsubscribe", proto.serve_prefix(server.id))
        server._join(Deadline(1.0))
        raise
    return server
