"""The broker: ZeroMQ XSUB/XPUB forwarders in C on threads of their own, plus a service thread.

The forwarder (``zmq.proxy_steerable``) moves every message from publishers (XSUB, where
publishers connect) to subscribers (XPUB) without touching Python. It stops on ``TERMINATE``
through its control socket and answers ``STATISTICS`` there. The service thread (see
service.py) confirms subscriptions, keeps retained values and publishes ``$vbus/stats``.
Each thread creates, uses and closes its own sockets (the gate's are made by the forwarder
thread and handed over before the gate thread starts; the forwarder never touches them again).

Network publishers do not reach the forwarder directly but through a gate, a second C
forwarder: a SUB socket (which, unlike XSUB, filters what it receives by its own
subscriptions) subscribed only to what clients may send (``_control.CLIENT_PREFIXES``: topics,
``$vbus/retain/``, ``$vbus/report/``), feeding a PUB into the forwarder's XSUB. So no peer can
inject the broker's own control traffic (readiness confirmations, replays, stats): those
frames are dropped in C before they reach the forwarder, whose only other inputs are
in-process (the service and this process's own publishers).

    network publishers -> SUB (gate, filters) -> PUB --inproc--> XSUB -> XPUB -> subscribers
                    service, in-process publishers -----inproc--> XSUB
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence

import msgspec
import zmq

from .._errors import AddressError
from .._proto import control as _control
from .._proto import limits as _limits
from .._proto.endpoints import Endpoints, parse_address, tcp_with_port
from .._proto.stats import ForwarderStats
from .._security import ZAP_ENDPOINT, ServerSecurity
from .._threads import Deadline, Started, block_signals, join
from .service import BrokerService, forwarder_counts

log = logging.getLogger("vbus.broker")

_START_TIMEOUT = 10.0
MAX_MESSAGE_SIZE = 256 * 1024 * 1024
"""Default bound (bytes) of one frame from a network peer; a peer sending more is dropped."""
MAX_SUBSCRIPTION_SIZE = 16 * 1024
"""Bound (bytes) of one message a subscriber sends (they only send subscriptions)."""
MONITORED_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class BrokerCounters(msgspec.Struct, frozen=True):
    """``Broker.stats()``, read by ``Bus.stats()``: the forwarder's counters, asked now (ZeroMQ
    messages and bytes in from publishers and out; a message sent to several subscribers
    counts once), and the confirmed subscribers. The ``$vbus/stats`` message, which holds
    these and more, is ``_proto.stats.BrokerStats``."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    subscribers: int = 0


class Broker:
    """Starts on construction (returns when both threads serve); ``stop()`` ends it."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], binds: Sequence[str] = (),
                 *, hwm: int = 1000, max_message_size: int = MAX_MESSAGE_SIZE,
                 max_queue_bytes: int | None = None,
                 security: ServerSecurity | None = None) -> None:
        """``hwm`` and ``max_queue_bytes`` bound the intake queue and each subscriber's
        queue, as one message count (``_limits.effective_hwm``: ``hwm`` alone is taken as
        it is; with ``max_queue_bytes`` it is lowered to fit that many bytes of chunk-sized
        messages); ``max_message_size`` bounds one frame from a network publisher."""
        if max_message_size < 1:
            raise ValueError(f"max_message_size must be positive, not {max_message_size}")
        self.id = secrets.token_hex(4)
        self._context = context
        self._security = security
        self._hwm = _limits.effective_hwm(hwm, max_queue_bytes, queues=2)
        self._max_message_size = max_message_size
        self.inproc = parse_address(f"inproc://vbus-{self.id}")
        self._control = f"inproc://vbus-{self.id}.control"
        self._gate_control = f"inproc://vbus-{self.id}.gate-control"
        self._gate_endpoint = f"inproc://vbus-{self.id}.gate"
        self._gate: threading.Thread | None = None
        wanted = [parse_address(b) for b in binds]
        zap = None
        if security is not None:
            # Bound before any network endpoint exists, so no connection can slip in
            # unauthenticated; from then on it belongs to the service thread.
            zap = context.socket(zmq.REP)
            zap.linger = 0
            try:
                zap.bind(ZAP_ENDPOINT)
            except zmq.ZMQError as exc:
                zap.close(0)
                raise AddressError(f"cannot serve authentication: {exc.strerror}") from None

        started: Started[tuple[list[Endpoints], list[zmq.Socket[bytes]]]] = Started()
        self._proxy = threading.Thread(
            target=self._run_proxy, args=(wanted, started), name=f"vbus-broker-{self.id}"
        )
        self._proxy.start()
        try:
            self.endpoints, watchers = started.wait(_START_TIMEOUT, "the broker")
        except BaseException:
            if zap is not None:
                zap.close(0)
            raise

        try:
            self.service = BrokerService(
                context, self.id, self.inproc.publish, self.inproc.subscribe, self._control,
                watchers, zap, security.authorizer if security is not None else None,
                self._hwm, [int(ep.subscribe.rsplit(":", 1)[1]) for ep in self.endpoints
                            if ep.subscribe.startswith("tcp://")],
            )
            service_started: Started[None] = Started()
            self._service = threading.Thread(
                target=self.service.run, args=(service_started,),
                name=f"vbus-broker-{self.id}-svc"
            )
            self._service.start()  # from here on the watchers and zap are that thread's
        except BaseException:
            for sock in (*watchers, *([zap] if zap is not None else [])):
                sock.close(0)
            self.stop(Deadline(_START_TIMEOUT))
            raise
        try:
            service_started.wait(_START_TIMEOUT, "the broker's service thread")
        except BaseException:
            self.stop(Deadline(_START_TIMEOUT))
            raise

    # -- forwarder thread -------------------------------------------------------------------
    def _run_proxy(self, wanted: list[Endpoints],
                   started: Started[tuple[list[Endpoints], list[zmq.Socket[bytes]]]]) -> None:
        block_signals()
        ctx = self._context
        front, back, control = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB), ctx.socket(zmq.REP)
        mine = [front, back, control]
        gate: list[zmq.Socket[bytes]] = []
        watchers: list[zmq.Socket[bytes]] = []
        try:
            for sock in mine:
                sock.linger = 0
            front.rcvhwm = self._hwm
            back.sndhwm = self._hwm  # per subscriber
            # Subscribers send subscriptions only: a peer sending a larger message is dropped.
            back.maxmsgsize = min(self._max_message_size, MAX_SUBSCRIPTION_SIZE)
            if self._security is not None:
                self._security.apply(back)  # network endpoints only: inproc has no handshake
            front.bind(self.inproc.publish)
            back.bind(self.inproc.subscribe)
            control.bind(self._control)
            if wanted:
                gate = self._make_gate()
                # Watched before the ports are bound: a peer that was reconnecting (its broker
                # restarted) connects at once, and an event with nobody at the monitor's other
                # end is dropped, so its connection would escape the caps. The watchers are
                # the service's once its thread starts.
                watchers = self._watch([(gate[0], "publish"), (back, "subscribe")])
                bound = [_bind_pair(gate[0], back, ep) for ep in wanted]
                front.connect(self._gate_endpoint)
            else:
                bound = []
            front.send(b"\x01")  # subscribe to everything: publishers see this as "accepted"
            if gate:
                self._gate = threading.Thread(target=self._run_gate, args=(gate,),
                                              name=f"vbus-broker-{self.id}-gate")
                self._gate.start()  # from here on the gate's sockets are that thread's
        except BaseException as exc:
            for sock in (*mine, *gate, *watchers):
                sock.close(0)
            started.fail(exc)
            return
        started.ok((bound, watchers))
        self._forward(front, back, control, "forwarder", mine)

    def _make_gate(self) -> list[zmq.Socket[bytes]]:
        """The network intake (SUB, bound by the caller), its PUB into the forwarder and the
        gate's control socket; made here so the ports can be bound next to the XPUB's."""
        ctx = self._context
        intake, out, control = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB), ctx.socket(zmq.REP)
        try:
            for sock in (intake, out, control):
                sock.linger = 0
            intake.rcvhwm = self._hwm
            # Network peers only: ZeroMQ drops the connection of a peer that sends more.
            intake.maxmsgsize = self._max_message_size
            if self._security is not None:
                self._security.apply(intake)
            for prefix in _control.CLIENT_PREFIXES:
                intake.subscribe(prefix)  # publishers see the first one as "accepted"
            out.sndhwm = 1
            out.setsockopt(zmq.XPUB_NODROP, 1)  # a full forwarder holds the gate back: no loss
            out.bind(self._gate_endpoint)
            control.bind(self._gate_control)
        except BaseException:
            for sock in (intake, out, control):
                sock.close(0)
            raise
        return [intake, out, control]

    def _run_gate(self, sockets: list[zmq.Socket[bytes]]) -> None:
        block_signals()
        intake, out, control = sockets
        self._forward(intake, out, control, "gate", sockets)

    def _forward(self, front: zmq.Socket[bytes], back: zmq.Socket[bytes],
                 control: zmq.Socket[bytes], what: str, mine: list[zmq.Socket[bytes]]) -> None:
        """Run a C forwarder until TERMINATE on ``control``, then close this thread's sockets."""
        try:
            zmq.proxy_steerable(front, back, None, control)
        except zmq.ContextTerminated:
            log.warning("broker %s: %s stopped by context termination", self.id, what)
        except zmq.ZMQError as exc:
            log.error("broker %s: %s failed: %s", self.id, what, exc)
        finally:
            for sock in mine:
                sock.close(0)

    def _watch(self, watched: list[tuple[zmq.Socket[bytes], str]]) -> list[zmq.Socket[bytes]]:
        """A connected PAIR on each socket's monitor (events: MONITORED_EVENTS)."""
        watchers: list[zmq.Socket[bytes]] = []
        try:
            for sock, side in watched:
                endpoint = f"inproc://vbus-{self.id}.monitor-{side}"
                sock.monitor(endpoint, MONITORED_EVENTS)
                watcher = self._context.socket(zmq.PAIR)
                watchers.append(watcher)
                watcher.linger = 0
                watcher.rcvhwm = 0  # nor may a connection event be lost
                watcher.connect(endpoint)
        except BaseException:
            for watcher in watchers:
                watcher.close(0)
            raise
        return watchers

    def _request(self, command: bytes, timeout: float,
                 endpoint: str | None = None) -> list[bytes] | None:
        try:
            req = self._context.socket(zmq.REQ)
        except zmq.ZMQError:
            return None  # the context has ended (so has the forwarder), or no fd is free
        try:
            # TERMINATE must not be dropped by the close below: it lingers (briefly).
            req.linger = 100 if command == b"TERMINATE" else 0
            req.connect(endpoint or self._control)
            if not req.poll(int(timeout * 1000) + 10, zmq.POLLOUT):
                return None  # nobody at the control socket: the forwarder has gone
            req.send(command, zmq.NOBLOCK)
            if command == b"TERMINATE" or not req.poll(int(timeout * 1000)):
                return None
            return req.recv_multipart()
        except zmq.ZMQError:
            return None
        finally:
            req.close(0)

    def _forwarder_counts(self, timeout: float = 1.0) -> ForwarderStats:
        reply = self._request(b"STATISTICS", timeout) if self._proxy.is_alive() else None
        return (forwarder_counts(reply) if reply else None) or ForwarderStats()

    def stats(self, timeout: float = 1.0) -> BrokerCounters:
        f = self._forwarder_counts(timeout)
        return BrokerCounters(f.messages_in, f.bytes_in, f.messages_out, f.bytes_out,
                              subscribers=len(self.service.subscribers))

    # -- shutdown ---------------------------------------------------------------------------
    def stop(self, deadline: Deadline) -> list[str]:
        """Stop both threads; return the names of those that did not end in time."""
        if not getattr(self, "_terminating", False):
            self._terminating = True  # once: a second request could find nobody to take it
            if self._gate is not None and self._gate.is_alive():
                self._request(b"TERMINATE", 0, self._gate_control)
        if self._proxy.is_alive() and not getattr(self, "_proxy_terminating", False):
            self._proxy_terminating = True
            self._request(b"TERMINATE", 0)
        service = getattr(self, "service", None)
        if service is not None:
            service.waker.wake()
        threads = (self._gate, self._proxy, getattr(self, "_service", None))
        stuck = [t.name for t in threads if t is not None and not join(t, deadline)]
        if service is not None and not stuck:
            service.waker.close()  # idempotent
        return stuck


def _bind_pair(front: zmq.Socket[bytes], back: zmq.Socket[bytes], ep: Endpoints) -> Endpoints:
    try:
        if ep.publish.startswith("tcp://") and ep.publish.endswith(":0"):
            return _bind_free_tcp_pair(front, back, ep)
        front.bind(ep.publish)
        try:
            back.bind(ep.subscribe)
        except zmq.ZMQError:
            front.unbind(_last_endpoint(front))
            raise
        return ep
    except zmq.ZMQError as exc:
        raise AddressError(
            f"cannot bind {ep.address} (needs {ep.publish} and {ep.subscribe}): {exc.strerror}"
        ) from None


def _bind_free_tcp_pair(front: zmq.Socket[bytes], back: zmq.Socket[bytes],
                        ep: Endpoints) -> Endpoints:
    base = ep.publish[: ep.publish.rindex(":")]
    for _ in range(100):
        port = front.bind_to_random_port(base, min_port=20000, max_port=65000)
        try:
            back.bind(f"{base}:{port + 1}")
        except zmq.ZMQError:
            front.unbind(_last_endpoint(front))
            continue
        return tcp_with_port(ep.address, port)
    raise zmq.ZMQError(zmq.EADDRINUSE, "no two consecutive free ports found")


def _last_endpoint(sock: zmq.Socket[bytes]) -> str:
    endpoint = sock.last_endpoint
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
