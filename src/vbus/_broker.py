"""The broker: a ZeroMQ XSUB/XPUB forwarder in C on a thread of its own, plus a service thread.

The forwarder (``zmq.proxy_steerable``) moves every message from publishers (XSUB, where
publishers connect) to subscribers (XPUB) without touching Python. It stops on ``TERMINATE``
through its control socket and answers ``STATISTICS`` there.

The service thread is a publisher into the forwarder. XSUB forwards every new subscription to
its publishers, so the service sees each subscriber's ``$vbus/ready/<token>`` subscription
only after the XPUB has applied it, and its reply on that topic therefore proves to the
subscriber that everything it subscribed before the token is active. Each thread creates,
uses and closes its own sockets.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence

import msgspec
import zmq

from . import _wire
from ._endpoints import AddressError, Endpoints, parse_address, tcp_with_port
from ._threads import Deadline, Started, block_signals, join
from ._waker import Waker

log = logging.getLogger("vbus.broker")

READY_TOPIC = "$vbus/ready/"
READY_SUBSCRIBE = b"\x01" + READY_TOPIC.encode()
READY_UNSUBSCRIBE = b"\x00" + READY_TOPIC.encode()
_START_TIMEOUT = 10.0


class BrokerStats(msgspec.Struct, frozen=True):
    """Counters of the forwarder: messages and bytes from publishers and to subscribers."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    subscribers: int = 0


def ready_frame(token_topic: str, sender: bytes) -> bytes:
    payload = _wire.Payload(_wire.KIND_MSGPACK, b"\xc0")  # msgpack nil
    frame, _ = _wire.build_frames(token_topic.encode() + b"\0", 0, sender, 1, time.time(), payload)
    return frame


class Broker:
    """Starts on construction (returns when both threads serve); ``stop()`` ends it."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], binds: Sequence[str] = (),
                 *, hwm: int = 10_000) -> None:
        self.id = secrets.token_hex(4)
        self._context = context
        self._hwm = hwm
        self.inproc = parse_address(f"inproc://vbus-{self.id}")
        self._control = f"inproc://vbus-{self.id}.control"
        wanted = [parse_address(b) for b in binds]
        self._sender = bytes.fromhex(self.id) * 2
        self._subscribers: set[bytes] = set()

        started: Started[list[Endpoints]] = Started()
        self._proxy = threading.Thread(
            target=self._run_proxy, args=(wanted, started), name=f"vbus-broker-{self.id}"
        )
        self._proxy.start()
        self.endpoints = started.wait(_START_TIMEOUT, "the broker")

        self._waker = Waker()
        service_started: Started[None] = Started()
        self._service = threading.Thread(
            target=self._run_service, args=(service_started,), name=f"vbus-broker-{self.id}-svc"
        )
        self._service.start()
        try:
            service_started.wait(_START_TIMEOUT, "the broker's service thread")
        except BaseException:
            self.stop(Deadline(_START_TIMEOUT))
            raise

    # -- forwarder thread -------------------------------------------------------------------
    def _run_proxy(self, wanted: list[Endpoints], started: Started[list[Endpoints]]) -> None:
        block_signals()
        ctx = self._context
        front, back, control = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB), ctx.socket(zmq.REP)
        try:
            for sock in (front, back, control):
                sock.linger = 0
            front.rcvhwm = self._hwm
            back.sndhwm = self._hwm
            front.bind(self.inproc.publish)
            back.bind(self.inproc.subscribe)
            control.bind(self._control)
            bound = [_bind_pair(front, back, ep) for ep in wanted]
            front.send(b"\x01")  # subscribe to everything: publishers see this as "accepted"
        except BaseException as exc:
            for sock in (front, back, control):
                sock.close(0)
            started.fail(exc)
            return
        started.ok(bound)
        try:
            zmq.proxy_steerable(front, back, None, control)
        except zmq.ContextTerminated:
            log.warning("broker %s: forwarder stopped by context termination", self.id)
        except zmq.ZMQError as exc:
            log.error("broker %s: forwarder failed: %s", self.id, exc)
        finally:
            for sock in (front, back, control):
                sock.close(0)

    def _request(self, command: bytes, timeout: float) -> list[bytes] | None:
        req = self._context.socket(zmq.REQ)
        try:
            req.linger = 0
            req.connect(self._control)
            req.send(command)
            if command == b"TERMINATE" or not req.poll(int(timeout * 1000)):
                return None
            return req.recv_multipart()
        except zmq.ZMQError:
            return None
        finally:
            req.close(0)

    def stats(self, timeout: float = 1.0) -> BrokerStats:
        reply = self._request(b"STATISTICS", timeout) if self._proxy.is_alive() else None
        count = len(self._subscribers)
        if not reply or len(reply) != 8:
            return BrokerStats(subscribers=count)
        n = [int.from_bytes(part, "little") for part in reply]
        # frontend: msgs in, bytes in, msgs out, bytes out; then the same for the backend.
        return BrokerStats(n[0], n[1], n[6], n[7], count)

    # -- service thread ---------------------------------------------------------------------
    def _run_service(self, started: Started[None]) -> None:
        block_signals()
        sock = self._context.socket(zmq.XPUB)
        try:
            sock.linger = 0
            sock.connect(self.inproc.publish)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._waker.fileno(), zmq.POLLIN)
        except BaseException as exc:
            sock.close(0)
            started.fail(exc)
            return
        started.ok(None)
        try:
            while True:
                events = dict(poller.poll())  # woken by stop() through the waker
                if self._waker.fileno() in events:
                    return
                self._drain_subscriptions(sock)
        except zmq.ZMQError as exc:
            log.error("broker %s: service thread failed: %s", self.id, exc)
        finally:
            sock.close(0)

    def _drain_subscriptions(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event.startswith(READY_SUBSCRIBE) and event.endswith(b"\0"):
                token = event[1:-1]
                if not token.isascii():
                    continue  # not one of ours
                try:
                    sock.send(ready_frame(token.decode("ascii"), self._sender), zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("broker %s: could not confirm subscription %r", self.id, token)
                self._subscribers.add(token)
            elif event.startswith(READY_UNSUBSCRIBE):
                self._subscribers.discard(event[1:-1])

    # -- shutdown ---------------------------------------------------------------------------
    def stop(self, deadline: Deadline) -> list[str]:
        """Stop both threads; return the names of those that did not end in time."""
        if self._proxy.is_alive():
            self._request(b"TERMINATE", 0)
        waker = getattr(self, "_waker", None)
        if waker is not None:
            waker.wake()
        stuck = [t.name for t in (self._proxy, getattr(self, "_service", None))
                 if t is not None and not join(t, deadline)]
        if waker is not None and not stuck:
            waker.close()  # idempotent
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
