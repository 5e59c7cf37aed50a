"""The broker's service thread: confirms subscriptions, keeps retained values, publishes stats.

It is a publisher into the forwarder (XPUB on the XSUB side) and a subscriber of it (SUB on the
XPUB side). XSUB forwards every new subscription to its publishers, so the service sees each
subscriber's ``$vbus/ready/<token>`` only after the XPUB has applied it: its reply on that
topic proves to the subscriber that everything subscribed before the token is active.
"""

from __future__ import annotations

import logging
import secrets
import struct
import time
from collections.abc import Callable, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import _broker_requests, _control, _wire
from ._errors import DecodeError, TopicError
from ._ledger import Ledger, RetainedStore
from ._security import Authorizer, zap_reply
from ._seq import BurstLog
from ._threads import Started, block_signals
from ._topics import Pattern, compile_pattern
from ._waker import Waker

log = logging.getLogger("vbus.broker")

STATS_PERIOD = 1.0
MAX_PENDING_WANTS = 10_000
_SUBSCRIBE, _UNSUBSCRIBE = b"\x01", b"\x00"


class BrokerService:
    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        broker_id: str,
        publish_endpoint: str,
        subscribe_endpoint: str,
        forwarder_stats: Callable[[], dict[str, int]],
        monitors: Sequence[str] = (),
        zap: zmq.Socket[bytes] | None = None,
        authorizer: Authorizer | None = None,
        queue: int = 1000,
    ) -> None:
        self._context = context
        self._id = broker_id
        self._sender = bytes.fromhex(broker_id) * 2
        self._publish_endpoint = publish_endpoint
        self._subscribe_endpoint = subscribe_endpoint
        self._forwarder_stats = forwarder_stats
        self._monitor_endpoints = monitors
        self._zap = zap
        self._authorizer = authorizer
        self._denied: dict[str, None] = {}  # who was denied already: logged once each
        self.peers = {"accepted": 0, "disconnected": 0, "rejected": 0, "denied": 0,
                      "replays_skipped": 0}
        self._max_replay = max(1, queue // 2)
        self._rejections = BurstLog(log, "broker refused a network peer")
        self._failures = BurstLog(log, "broker service skipped bad input")
        self.waker = Waker()
        self.subscribers: set[bytes] = set()
        self.retained = RetainedStore()
        self._wants: dict[bytes, Pattern] = {}
        self._ledger = Ledger(broker_id, time.time())
        self.requests = _broker_requests.RequestRouter(self._sender)

    def run(self, started: Started[None]) -> None:
        block_signals()
        ctx = self._context
        out, into = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB)
        monitors = [ctx.socket(zmq.PAIR) for _ in self._monitor_endpoints]
        try:
            for sock in (out, into, *monitors):
                sock.linger = 0
            for sock, endpoint in zip(monitors, self._monitor_endpoints, strict=True):
                sock.connect(endpoint)
            into.rcvhwm = 100_000  # retained copies and reports: room for long bursts
            out.connect(self._publish_endpoint)
            into.subscribe(_control.RETAIN)
            into.subscribe(_control.REPORT)
            into.subscribe(_broker_requests.REQUEST)
            into.connect(self._subscribe_endpoint)
            self._confirm_own_subscription(out, into)
            poller = zmq.Poller()
            poller.register(out, zmq.POLLIN)
            poller.register(into, zmq.POLLIN)
            poller.register(self.waker.fileno(), zmq.POLLIN)
            for sock in monitors:
                poller.register(sock, zmq.POLLIN)
            if self._zap is not None:
                poller.register(self._zap, zmq.POLLIN)
        except BaseException as exc:
            self._close(out, into, monitors)
            started.fail(exc)
            return
        started.ok(None)
        try:
            self._serve(poller, out, into, monitors)
        except zmq.ZMQError as exc:
            log.error("broker %s: service thread failed: %s", self._id, exc)
        finally:
            self._close(out, into, monitors)

    def _close(self, out: zmq.Socket[bytes], into: zmq.Socket[bytes],
               monitors: list[zmq.Socket[bytes]]) -> None:
        for sock in (out, into, *monitors):
            sock.close(0)
        if self._zap is not None:
            self._zap.close(0)

    def _confirm_own_subscription(self, out: zmq.Socket[bytes], into: zmq.Socket[bytes]) -> None:
        # Our SUB is a subscriber like any other: wait until the forwarder applies it, or a
        # retained value published right after the bus starts could pass us by.
        token = _control.READY + secrets.token_hex(8).encode()
        into.subscribe(token + b"\0")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if out.poll(100) and out.recv() == _SUBSCRIBE + token + b"\0":
                out.send(_control.control_frame(token, self._sender))
                break
        while time.monotonic() < deadline:
            if into.poll(100) and into.recv().startswith(token):
                into.unsubscribe(token + b"\0")
                return
        raise TimeoutError("the broker's service could not subscribe to its own forwarder")

    def _serve(self, poller: zmq.Poller, out: zmq.Socket[bytes], into: zmq.Socket[bytes],
               monitors: list[zmq.Socket[bytes]]) -> None:
        waker = self.waker.fileno()
        next_stats = time.monotonic() + STATS_PERIOD
        while True:
            timeout = max(next_stats - time.monotonic(), 0.0)
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if waker in events:
                return  # stop() woke us
            try:
                if into in events:
                    self._drain_data(into)
                    _broker_requests.flush(self.requests, out)  # before any confirmation
                if out in events:
                    self._drain_subscriptions(out, into)
                    _broker_requests.flush(self.requests, out)
                for sock in monitors:
                    if sock in events:
                        self._drain_monitor(sock)
                if self._zap is not None and self._zap in events:
                    self._authenticate(self._zap)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_PERIOD
                    self._publish_stats(out)
            except zmq.ZMQError:
                raise
            except Exception as exc:  # whatever a peer sent, the broker keeps serving
                self._failures.event(1, f"{exc!r}", exc_info=exc)

    def _drain_data(self, into: zmq.Socket[bytes]) -> None:
        while True:
            try:
                first = into.recv(zmq.NOBLOCK)
                rest = []
                while into.rcvmore:
                    rest.append(into.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if first.startswith(_control.RETAIN):
                self.retained.take(first, rest)
            elif first.startswith(_control.REPORT):
                self._take_report(first)
            elif first.startswith(_broker_requests.REQUEST):
                self.requests.request(first, rest)

    def _drain_monitor(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = parse_monitor_message(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except (ValueError, struct.error):
                continue
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                self.peers["accepted"] += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                self.peers["disconnected"] += 1
            else:
                self.peers["rejected"] += 1
                if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # denials are logged by ZAP
                    self._rejections.event(1, f"{_event_name(kind)} on {event['endpoint']!r}")

    def _authenticate(self, zap: zmq.Socket[bytes]) -> None:
        assert self._authorizer is not None
        while True:
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

    def _take_report(self, first: bytes) -> None:
        try:
            env = _wire.parse_envelope(first)
            report = _control.REPORT_DECODER.decode(memoryview(first)[env.offset :])
        except (DecodeError, ValueError):
            return
        self._ledger.take(env.sender, report)

    def _drain_subscriptions(self, out: zmq.Socket[bytes], into: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = out.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            change, body = event[:1], event[1:]
            if self.requests.subscription(change == _SUBSCRIBE, body):
                continue
            if body.startswith(_control.READY) and body.endswith(b"\0"):
                token = body[len(_control.READY) : -1]
                if change == _SUBSCRIBE and token.isascii():
                    self.subscribers.add(token)  # before the reply: counted once confirmed
                    self._confirm(out, into, token)
                elif change == _UNSUBSCRIBE:
                    self.subscribers.discard(token)
            elif body.startswith(_control.WANT):
                want = _control.parse_want(body)
                if want is None:
                    continue
                if change == _SUBSCRIBE:
                    try:
                        self._wants[want[0]] = compile_pattern(want[1])
                    except TopicError:
                        continue
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
                self._drain_data(into)
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
            log.warning("broker %s: could not confirm subscription %r", self._id, token)

    def _publish_stats(self, out: zmq.Socket[bytes]) -> None:
        stats = self._ledger.snapshot(time.time(), self._forwarder_stats(), len(self.subscribers))
        stats["peers"] = dict(self.peers)
        stats["retained"] = len(self.retained)
        stats["requests"] = _broker_requests.stats_dict(self.requests)
        frame = _control.control_frame(
            _control.STATS_TOPIC.encode(), self._sender, payload=_control.stats_payload(stats)
        )
        try:
            out.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # a stats message is superseded by the next one a second later


def _event_name(kind: int) -> str:
    try:
        return zmq.Event(kind).name or str(kind)
    except ValueError:
        return str(kind)
