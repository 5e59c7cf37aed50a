"""The broker's service thread: confirms subscriptions, keeps retained values, publishes stats.

It is a publisher into the forwarder (XPUB on the XSUB side) and a subscriber of it (SUB on the
XPUB side). XSUB forwards every new subscription to its publishers, so the service sees each
subscriber's ``$vbus/ready/<token>`` only after the XPUB has applied it: its reply on that
topic proves to the subscriber that everything subscribed before the token is active.

It also watches the network peers (ZeroMQ's monitor events carry each accepted connection's
file descriptor): it caps connections in total and per peer host, and cuts a subscriber
connection that sends more subscription bytes than a subscriber ever needs (its subscriptions,
held by ZeroMQ in C, are freed when it goes). A ZeroMQ error (out of file descriptors, say) is
counted, logged once per burst and retried with a backoff: the thread never dies of one.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from .._errors import DecodeError, TopicError
from .._proto import control as _control
from .._proto import requests as _proto_requests
from .._proto import shm as _shm_proto
from .._proto import stats as _stats
from .._proto import wire as _wire
from .._proto.seq import BurstLog
from .._proto.stats import ForwarderStats
from .._proto.topics import Pattern, compile_pattern
from .._security import Authorizer, zap_reply
from .._threads import Started, block_signals
from .._waker import Waker
from . import requests as _broker_requests
from .ledger import Ledger, RetainedStore, SubscriberCount

log = logging.getLogger("vbus.broker")

STATS_PERIOD = 1.0
MAX_PENDING_WANTS = 10_000
MAX_TOKEN = 64
"""Longest ready token taken (vbus's are 16 characters); a longer one is not a subscriber."""
BATCH = 500
"""Messages taken from one socket per loop turn, so a flood on one delays the others (and
stop()) by one batch at most."""
MAX_CONNECTIONS = 4096
"""Network connections (both ports) the broker keeps at most; see also the fd limit below."""
MAX_CONNECTIONS_PER_PEER = 1024
"""Connections one peer host keeps at most."""
FD_RESERVE = 128
"""File descriptors kept free for the broker's own use (sockets, files) under RLIMIT_NOFILE."""
MAX_SUBSCRIPTION_BYTES = 64 * 1024
"""Bytes a subscriber connection may send over its life (a vbus subscriber sends a few
hundred: its pattern's prefixes, a want and a ready token); past that it is cut."""
MAX_SUBSCRIPTION_BYTES_TOTAL = 2 * 1024 * 1024
"""Bytes all subscriber connections may have sent together (ten thousand vbus subscribers
send about as much); past that the connections that sent the most are cut until the total
is back under the bound. Counted by the kernel (TCP_INFO), so the bound holds however far
the service is behind in handling what they sent."""
PENALTY_BYTES = 4096
"""The budget of a subscriber connection from a host whose connection was cut in the last
``PENALTY`` seconds: still ten times what a vbus subscriber sends, but a flooder that
reconnects (ZeroMQ does so by itself, and sends all its subscriptions again) is cut at once."""
PENALTY = 10.0
PEER_CHECK_PERIOD = 0.005
BACKOFF_MAX = 1.0
_SUBSCRIBE, _UNSUBSCRIBE = b"\x01", b"\x00"
_TCPI_BYTES_RECEIVED = 128  # offset in Linux's struct tcp_info (since 4.1)


class BrokerService:
    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        broker_id: str,
        publish_endpoint: str,
        subscribe_endpoint: str,
        control_endpoint: str,
        monitors: Sequence[zmq.Socket[bytes]] = (),
        zap: zmq.Socket[bytes] | None = None,
        authorizer: Authorizer | None = None,
        queue: int = 1000,
        subscriber_ports: Sequence[int] = (),
    ) -> None:
        self._context = context
        self._id = broker_id
        self._sender = bytes.fromhex(broker_id) * 2
        self._publish_endpoint = publish_endpoint
        self._subscribe_endpoint = subscribe_endpoint
        self._control_endpoint = control_endpoint
        self._monitors = list(monitors)  # PAIRs connected to the monitors, handed to us
        self._zap = zap
        self._authorizer = authorizer
        self._denied: dict[str, None] = {}  # who was denied already: logged once each
        self.peers = {"accepted": 0, "disconnected": 0, "rejected": 0, "denied": 0,
                      "replays_skipped": 0, "refused_connections": 0, "cut_subscribers": 0,
                      "bad_tokens": 0, "service_errors": 0}
        self._max_replay = max(1, queue // 2)
        self._rejections = BurstLog(log, "broker refused a network peer")
        self._failures = BurstLog(log, "broker service skipped bad input")
        self._errors = BurstLog(log, "broker service: ZeroMQ error, retrying")
        self._unconfirmed = BurstLog(log, "broker service")
        self.waker = Waker()
        self.subscribers = SubscriberCount()
        self.retained = RetainedStore()
        self._wants: dict[bytes, Pattern] = {}
        self._ledger = Ledger(broker_id, time.time())
        self._connections = Connections(self.peers, self._rejections, set(subscriber_ports))
        self._forwarder = ForwarderStats()
        self._subscriptions = 0  # distinct subscriptions the forwarder holds (as it told us)
        self.requests = _broker_requests.RequestRouter(self._sender)
        self.twins = _shm_proto.twin_registry(self._sender)  # shm: see _proto/shm.py

    # -- thread -----------------------------------------------------------------------------
    def run(self, started: Started[None]) -> None:
        block_signals()
        ctx = self._context
        out, into, control = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB), ctx.socket(zmq.REQ)
        monitors = self._monitors
        sockets = [out, into, control, *monitors]
        try:
            for sock in sockets:
                sock.linger = 0
            # Every subscription and unsubscription must reach us, however many come at
            # once: a dropped one would leave a subscriber unconfirmed or miscounted.
            out.rcvhwm = 0
            # Nor may a confirmation be dropped on its way into the forwarder (a full queue
            # there would leave a subscriber waiting): what we send is bounded by what we
            # receive (one confirmation a subscription, replays bounded per confirmation).
            out.sndhwm = 0
            control.setsockopt(zmq.REQ_RELAXED, 1)
            control.setsockopt(zmq.REQ_CORRELATE, 1)
            control.connect(self._control_endpoint)
            into.rcvhwm = 100_000  # retained copies and reports: room for long bursts
            out.connect(self._publish_endpoint)
            into.subscribe(_control.RETAIN)
            into.subscribe(_control.REPORT)
            into.subscribe(_proto_requests.REQUEST)
            into.connect(self._subscribe_endpoint)
            self._take_early(*self._confirm_own_subscription(out, into), out, into)
            self._ask_forwarder_stats(control)
            poller = zmq.Poller()
            for sock in (out, into, control, *monitors):
                poller.register(sock, zmq.POLLIN)
            poller.register(self.waker.fileno(), zmq.POLLIN)
            if self._zap is not None:
                poller.register(self._zap, zmq.POLLIN)
        except BaseException as exc:
            self._close(sockets)
            started.fail(exc)
            return
        started.ok(None)
        try:
            self._serve(poller, out, into, control, monitors)
        finally:
            self._close(sockets)

    def _close(self, sockets: list[zmq.Socket[bytes]]) -> None:
        for sock in sockets:
            sock.close(0)
        if self._zap is not None:
            self._zap.close(0)

    def _confirm_own_subscription(self, out: zmq.Socket[bytes],
                                  into: zmq.Socket[bytes]
                                  ) -> tuple[list[bytes], list[tuple[bytes, list[bytes]]]]:
        """Our SUB is a subscriber like any other: wait until the forwarder applies it, or a
        retained value published right after the bus starts could pass us by. Returns the
        other subscription events and the data messages read meanwhile, for the caller to
        take: the network ports are bound before this thread starts, so a peer that was
        reconnecting (its broker restarted) may already have subscribed (ZeroMQ sends its
        subscriptions only that once) or published."""
        token = _control.READY + secrets.token_hex(8).encode()
        own = _SUBSCRIBE + token + b"\0"
        into.subscribe(token + b"\0")
        early: list[bytes] = []
        data: list[tuple[bytes, list[bytes]]] = []
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if out.poll(100):
                event = out.recv()
                if event == own:
                    out.send(_control.control_frame(token, self._sender))
                    break
                early.append(event)
        while time.monotonic() < deadline:
            if into.poll(100):
                first, *rest = into.recv_multipart()
                if first.startswith(token):
                    into.unsubscribe(token + b"\0")
                    return early, data
                data.append((first, rest))
        raise TimeoutError("the broker's service could not subscribe to its own forwarder")

    def _take_early(self, events: list[bytes], data: list[tuple[bytes, list[bytes]]],
                    out: zmq.Socket[bytes], into: zmq.Socket[bytes]) -> None:
        """Take what came while we confirmed our own subscription: retained values before
        the confirmations that replay them, servers' markers before the requests routed
        to them."""
        def take(handle: Callable[..., None], *args: Any) -> None:
            try:
                handle(*args)
            except Exception as exc:  # whatever a peer sent, the broker starts
                self._failures.event(1, f"{exc!r}", exc_info=exc)

        requests = [m for m in data if m[0].startswith(_proto_requests.REQUEST)]
        for first, rest in data:
            if not first.startswith(_proto_requests.REQUEST):
                take(self._take_data, first, rest)
        for event in events:
            take(self._take_subscription, event, out, into)
        for first, rest in requests:
            take(self._take_data, first, rest)
        _broker_requests.flush(self.requests, out)

    def _serve(self, poller: zmq.Poller, out: zmq.Socket[bytes], into: zmq.Socket[bytes],
               control: zmq.Socket[bytes], monitors: list[zmq.Socket[bytes]]) -> None:
        waker = self.waker.fileno()
        next_stats = time.monotonic() + STATS_PERIOD
        next_check = float("inf")
        backoff = 0.0
        events: dict[object, int] = {}
        while True:
            now = time.monotonic()
            timeout = max(min(next_stats, next_check) - now, 0.0)
            try:
                if backoff:
                    # After an error wait for the stop signal only, then try everything again.
                    events = dict(poller.poll(int(backoff * 1000)))
                    if waker in events:
                        return
                    events = {sock: zmq.POLLIN for sock in (out, into, control, *monitors)}
                else:
                    events = dict(poller.poll(int(timeout * 1000) + 1))
                if waker in events:
                    return  # stop() woke us
                # Each drain takes a batch; what is left keeps its socket readable, so the
                # next poll returns at once, after the waker and the other sockets had a turn.
                if into in events:
                    self._drain_data(into)
                    _broker_requests.flush(self.requests, out)  # before any confirmation
                if out in events:
                    self._drain_subscriptions(out, into)
                    next_check = min(next_check, time.monotonic() + PEER_CHECK_PERIOD)
                    _broker_requests.flush(self.requests, out)
                if control in events:
                    self._take_forwarder_stats(control)
                for sock in monitors:
                    if sock in events:
                        self._drain_monitor(sock)
                        # A new connection may be a flooder back (ZeroMQ peers reconnect
                        # and resend everything): look at it soon, not after its burst.
                        next_check = min(next_check, time.monotonic() + PEER_CHECK_PERIOD)
                if self._zap is not None and self._zap in events:
                    self._authenticate(self._zap)
                now = time.monotonic()
                if now >= next_check:
                    next_check = float("inf")
                    self._connections.check_subscribers()
                if now >= next_stats:
                    next_stats = now + STATS_PERIOD
                    self._connections.sweep()
                    self._publish_stats(out)
                    self._ask_forwarder_stats(control)
                backoff = 0.0
            except zmq.ContextTerminated:
                return
            except zmq.ZMQError as exc:
                # EMFILE and the like: count it, say it once a burst, try again a bit later.
                self.peers["service_errors"] += 1
                backoff = min(max(backoff * 2, 0.01), BACKOFF_MAX)
                self._errors.event(1, f"{exc} (next try in {backoff:g} s)")
            except Exception as exc:  # whatever a peer sent, the broker keeps serving
                self._failures.event(1, f"{exc!r}", exc_info=exc)

    # -- data: retained copies and reports -----------------------------------------------------
    def _drain_data(self, into: zmq.Socket[bytes]) -> bool:
        """Take up to a batch; True if there may be more."""
        for _ in range(BATCH):
            try:
                first = into.recv(zmq.NOBLOCK)
                rest = []
                while into.rcvmore:
                    rest.append(into.recv(zmq.NOBLOCK))
            except zmq.Again:
                return False
            self._take_data(first, rest)
        return True

    def _take_data(self, first: bytes, rest: list[bytes]) -> None:
        if first.startswith(_control.RETAIN):
            self.retained.take(first, rest)
        elif first.startswith(_control.REPORT):
            self._take_report(first)
        elif first.startswith(_proto_requests.REQUEST):
            self.requests.request(first, rest)

    def _take_report(self, first: bytes) -> None:
        try:
            env = _wire.parse_envelope(first)
            report = _control.REPORT_DECODER.decode(memoryview(first)[env.offset :])
        except (DecodeError, ValueError):
            return
        self._ledger.take(env.sender, report)

    # -- network peers ------------------------------------------------------------------------
    def _drain_monitor(self, sock: zmq.Socket[bytes]) -> bool:
        for _ in range(BATCH):
            try:
                event = parse_monitor_message(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return False
            except (ValueError, struct.error):
                continue
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                self.peers["accepted"] += 1
                self._connections.accepted(int(event["value"]))
            elif kind == zmq.EVENT_DISCONNECTED:
                self.peers["disconnected"] += 1
                self._connections.disconnected(int(event["value"]))
            else:
                self.peers["rejected"] += 1
                if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # denials are logged by ZAP
                    self._rejections.event(1, f"{_event_name(kind)} on {event['endpoint']!r}")
        return True

    def _authenticate(self, zap: zmq.Socket[bytes]) -> None:
        assert self._authorizer is not None
        for _ in range(BATCH):
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, denied = zap_reply(request, self._authorizer)
            zap.send_multipart(reply)
            if denied is not None:
                self.peers["denied"] += 1
                who = denied.rsplit(":", 1)[0]  # the client's key and host, not its port
                if who not in self._denied:
                    log.warning("broker %s: %s", self._id, denied)
                    self._denied[who] = None
                    if len(self._denied) > 10_000:
                        self._denied.pop(next(iter(self._denied)))

    # -- subscriptions ------------------------------------------------------------------------
    def _drain_subscriptions(self, out: zmq.Socket[bytes], into: zmq.Socket[bytes]) -> bool:
        for _ in range(BATCH):
            try:
                event = out.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            self._take_subscription(event, out, into)
        return True

    def _take_subscription(self, event: bytes, out: zmq.Socket[bytes],
                           into: zmq.Socket[bytes]) -> None:
        change, body = event[:1], event[1:]
        if change == _SUBSCRIBE:
            self._subscriptions += 1
        elif change == _UNSUBSCRIBE:
            self._subscriptions = max(self._subscriptions - 1, 0)
        else:
            return  # a subscriber's stray message: nothing for us
        if self.requests.subscription(change == _SUBSCRIBE, body):
            return
        twins = self.twins.subscription(change == _SUBSCRIBE, body)  # shm: who takes bytes
        if twins is not None:
            for frame in twins:
                out.send(frame, zmq.NOBLOCK)
            return
        if body.startswith(_control.READY) and body.endswith(b"\0"):
            token = body[len(_control.READY) : -1]
            if not 0 < len(token) <= MAX_TOKEN or not token.isascii():
                self.peers["bad_tokens"] += 1
            elif change == _SUBSCRIBE:
                self.subscribers.add(token)  # before the reply: counted once confirmed
                self._confirm(out, into, token)
            else:
                self.subscribers.discard(token)
        elif body.startswith(_control.WANT):
            want = _control.parse_want(body)
            if want is None:
                return
            if change == _SUBSCRIBE:
                try:
                    self._wants[want[0]] = compile_pattern(want[1])
                except TopicError:
                    return
                if len(self._wants) > MAX_PENDING_WANTS:  # requests nobody confirmed
                    self._wants.pop(next(iter(self._wants)))
            else:
                self._wants.pop(want[0], None)

    def _confirm(self, out: zmq.Socket[bytes], into: zmq.Socket[bytes], token: bytes) -> None:
        ready = _control.READY + token
        pattern = self._wants.pop(token, None)
        try:
            if pattern is not None:
                # Retained copies forwarded before this subscription was applied are queued
                # on our SUB: take them first, so the replay misses none of them.
                while self._drain_data(into):
                    pass
                matching = self.retained.matching(pattern)
                if len(matching) > self._max_replay:
                    # More than the subscriber's queue could take at once: the rest would be
                    # lost silently, and with it the confirmation. Say so instead.
                    self.peers["replays_skipped"] += len(matching) - self._max_replay
                    log.warning("broker %s: %d retained values match %r; replaying the first "
                                "%d", self._id, len(matching), pattern.text, self._max_replay)
                    matching = matching[: self._max_replay]
                for frames in matching:
                    head = _control.control_frame(ready, self._sender, _wire.FLAG_REPLAY)
                    out.send_multipart([head, *frames], zmq.NOBLOCK)
            out.send(_control.control_frame(ready, self._sender), zmq.NOBLOCK)
        except zmq.Again:
            self._unconfirmed.event(1, f"could not confirm subscription {token!r}")

    # -- statistics ---------------------------------------------------------------------------
    def _ask_forwarder_stats(self, control: zmq.Socket[bytes]) -> None:
        # Asked now, answered by the next turn: the stats a second later carry the answer.
        try:
            control.send(b"STATISTICS", zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _take_forwarder_stats(self, control: zmq.Socket[bytes]) -> None:
        try:  # one reply per request: a REQ socket refuses a second recv
            reply = control.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self._forwarder = forwarder_counts(reply) or self._forwarder

    def _publish_stats(self, out: zmq.Socket[bytes]) -> None:
        stats = msgspec.structs.replace(
            self._ledger.snapshot(time.time(), self._forwarder, len(self.subscribers)),
            peers=dict(self.peers),
            connections=len(self._connections),
            subscriptions=self._subscriptions,
            retained=len(self.retained),
            requests=self.requests.stats(),
        )
        frame = _control.control_frame(
            _stats.STATS_TOPIC.encode(), self._sender, payload=_stats.stats_payload(stats)
        )
        try:
            out.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # a stats message is superseded by the next one a second later


def forwarder_counts(reply: list[bytes]) -> ForwarderStats | None:
    """The forwarder's counters from its STATISTICS reply (None if it is not one)."""
    if len(reply) != 8:
        return None
    n = [int.from_bytes(part, "little") for part in reply]
    # frontend: msgs in, bytes in, msgs out, bytes out; then the same for the backend.
    return ForwarderStats(messages_in=n[0], bytes_in=n[1], messages_out=n[6], bytes_out=n[7])


# -- connections, from the monitor's file descriptors ----------------------------------------------
@dataclass
class _Connection:
    fd: int
    local: object  # getsockname(): tells a reused descriptor from ours
    peer: object  # getpeername()
    host: str  # the peer's address without the port ('' for ipc)
    tcp: bool


class Connections:
    """The network connections the broker's sockets accepted, by file descriptor.

    ZeroMQ has no option to cap connections nor to drop one peer; it does tell (monitor
    events) the descriptor of each connection it accepts. The broker shuts down, at the
    socket level, a connection it does not want: ZeroMQ sees it end and cleans up as for any
    disconnect (a subscriber's subscriptions go with it). Before acting on a descriptor it
    checks that it still is the same connection (same local and peer address), so a
    descriptor reused since can never be touched."""

    def __init__(self, counters: dict[str, int], burst: BurstLog,
                 subscriber_ports: set[int]) -> None:
        self._by_fd: dict[int, _Connection] = {}
        self._subscriber_ports = subscriber_ports
        self._per_host: dict[str, int] = {}
        self._counters = counters
        self._burst = burst
        self.max_total = min(MAX_CONNECTIONS, _fd_budget())
        self.max_per_peer = min(MAX_CONNECTIONS_PER_PEER, self.max_total)
        self.max_subscription_bytes = MAX_SUBSCRIPTION_BYTES
        self.max_subscription_bytes_total = MAX_SUBSCRIPTION_BYTES_TOTAL
        self._penalty: dict[str, float] = {}  # host -> until when its budget is small

    def __len__(self) -> int:
        return len(self._by_fd)

    def accepted(self, fd: int) -> None:
        self.disconnected(fd)  # a descriptor we missed the end of
        names = _names(fd)
        if names is None:
            return  # gone already
        local, peer, tcp = names
        host = str(peer[0]) if tcp and isinstance(peer, tuple) else ""
        conn = _Connection(fd, local, peer, host, tcp)
        if len(self._by_fd) >= self.max_total:
            self._refuse(conn, f"{len(self._by_fd)} connections already (the most it keeps)")
        elif self._per_host.get(host, 0) >= self.max_per_peer:
            self._refuse(conn, f"{self._per_host[host]} connections from {host or 'ipc'} "
                               "already (the most it keeps per peer)")
        else:
            self._by_fd[fd] = conn
            self._per_host[host] = self._per_host.get(host, 0) + 1

    def disconnected(self, fd: int) -> None:
        conn = self._by_fd.pop(fd, None)
        if conn is not None:
            left = self._per_host[conn.host] - 1
            if left:
                self._per_host[conn.host] = left
            else:
                del self._per_host[conn.host]

    def sweep(self) -> None:
        """Forget connections whose descriptor now names something else (missed events)."""
        for fd, conn in list(self._by_fd.items()):
            if _names(fd) != (conn.local, conn.peer, conn.tcp):
                self.disconnected(fd)

    def check_subscribers(self) -> None:
        """Cut subscriber connections over their byte budget; while all of them together
        sent more than the total budget, cut those that sent the most."""
        sent: list[tuple[int, _Connection]] = []
        now = time.monotonic()
        for conn in list(self._by_fd.values()):
            if not conn.tcp or _local_port(conn) not in self._subscriber_ports:
                continue  # publishers' bytes are data; ipc peers are on this host
            received = _bytes_received(conn)
            if received is None:
                continue
            budget = self.max_subscription_bytes
            if self._penalty.get(conn.host, 0.0) > now:
                budget = min(budget, PENALTY_BYTES)
            if received > budget:
                self._cut(conn, f"sent {received} bytes of subscriptions (more than {budget})")
            else:
                sent.append((received, conn))
        total = sum(received for received, _ in sent)
        sent.sort(key=lambda item: item[0], reverse=True)
        for received, conn in sent:
            if total <= self.max_subscription_bytes_total:
                break
            self._cut(conn, f"subscribers sent {total} bytes of subscriptions together "
                            f"(more than {self.max_subscription_bytes_total}); this one "
                            f"{received}, among the most")
            total -= received

    def _refuse(self, conn: _Connection, why: str) -> None:
        self._counters["refused_connections"] += 1
        self._burst.event(1, f"connection from {conn.host or 'ipc'} refused: {why}")
        _shutdown(conn)

    def _cut(self, conn: _Connection, why: str) -> None:
        self._penalty[conn.host] = time.monotonic() + PENALTY
        if len(self._penalty) > MAX_CONNECTIONS:
            self._penalty.pop(next(iter(self._penalty)))
        self._counters["cut_subscribers"] += 1
        self._burst.event(1, f"subscriber {conn.peer} cut: {why}")
        _shutdown(conn)
        self.disconnected(conn.fd)


def _fd_budget() -> int:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(soft - FD_RESERVE, soft // 2, 1)


def _names(fd: int) -> tuple[object, object, bool] | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        return sock.getsockname(), sock.getpeername(), tcp
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays ZeroMQ's


def _same(conn: _Connection) -> socket.socket | None:
    """A socket object on the connection's descriptor if it still is that connection (the
    caller must detach it), else None."""
    try:
        sock = socket.socket(fileno=conn.fd)
    except OSError:
        return None
    try:
        if (sock.getsockname(), sock.getpeername()) == (conn.local, conn.peer):
            return sock
    except OSError:
        pass
    sock.detach()
    return None


def _local_port(conn: _Connection) -> int | None:
    local = conn.local
    return local[1] if isinstance(local, tuple) and len(local) >= 2 else None


def _bytes_received(conn: _Connection) -> int | None:
    """What a tcp connection received from its peer so far (Linux), or None."""
    sock = _same(conn)
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    finally:
        sock.detach()
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return None
    return int(struct.unpack_from("<Q", info, _TCPI_BYTES_RECEIVED)[0])


def _shutdown(conn: _Connection) -> None:
    sock = _same(conn)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def _event_name(kind: int) -> str:
    try:
        return zmq.Event(kind).name or str(kind)
    except ValueError:
        return str(kind)
