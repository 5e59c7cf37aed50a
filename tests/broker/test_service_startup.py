"""What reaches a broker before its service thread is ready is taken, not lost: subscriptions
and the connections of peers that were reconnecting.

A broker binds its ports before its service thread starts, so peers that were reconnecting
(their broker was restarted at the same address) subscribe at once, and ZeroMQ sends their
subscriptions only that one time. The service used to read them while it waited for its own
subscription and throw them away: a server reconnected that way was never routed a request
again (NoResponder for ever, seen in CI as a failed broker-restart test, 2 runs in 60 under
load), and a subscriber's readiness token was never confirmed.

The test makes the race certain: before the real service thread runs, a raw peer subscribes
(a serve marker and a readiness token) and a spy on the forwarder's publisher side proves the
forwarder holds those subscriptions, so they are replayed to the service as it connects.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import zmq

import vbus
from tests._support import LeakCheck
from vbus._broker import service as _service
from vbus._proto import control as _control
from vbus._proto import requests as proto
from vbus._proto import wire as _wire

TOPIC = "dev/early"


def test_subscriptions_made_before_the_service_starts_are_taken(
        leakcheck: LeakCheck, monkeypatch: pytest.MonkeyPatch) -> None:
    server_id = secrets.token_hex(8)
    token = b"early" + secrets.token_hex(4).encode()
    handed: dict[str, Any] = {}
    real_run = _service.BrokerService.run

    def run_after_an_early_peer(self: _service.BrokerService, started: Any) -> None:
        ctx = self._context
        spy = ctx.socket(zmq.XPUB)
        peer = ctx.socket(zmq.SUB)
        spy.linger = peer.linger = 0
        spy.connect(self._publish_endpoint)  # the forwarder replays what it holds to us too
        peer.subscribe(proto.serve_prefix(server_id))
        peer.subscribe(proto.marker(TOPIC, server_id))
        peer.subscribe(_control.READY + token + b"\0")
        peer.connect(self._subscribe_endpoint)
        wanted = {b"\x01" + proto.marker(TOPIC, server_id),
                  b"\x01" + _control.READY + token + b"\0"}
        seen: set[bytes] = set()
        while not wanted <= seen and spy.poll(5000):
            seen.add(spy.recv())
        spy.close(0)
        handed["peer"], handed["held"] = peer, wanted <= seen
        real_run(self, started)

    monkeypatch.setattr(_service.BrokerService, "run", run_after_an_early_peer)
    with vbus.Bus() as bus:
        peer: zmq.Socket[bytes] = handed["peer"]
        try:
            assert handed["held"], "the forwarder never held the early peer's subscriptions"
            # The readiness token is confirmed...
            assert peer.poll(5000), "the early subscriber's readiness token was never confirmed"
            assert peer.recv().startswith(_control.READY + token + b"\0")
            # ...and the serve marker registered: a request is routed to the early server.
            broker = bus._broker
            assert broker is not None
            replier = bus._core.context.socket(zmq.XPUB)
            replier.linger = 0
            try:
                replier.connect(broker.inproc.publish)
                assert replier.poll(5000) and replier.recv() == b"\x01"  # the forwarder's
                asking = bus.submit(bus.async_request(TOPIC, "ping", timeout=5.0))
                assert peer.poll(5000), "the early server was never routed a request"
                first = peer.recv()
                env = _wire.parse_envelope(first)
                assert env.topic == f"$vbus/serve/{server_id}"
                frame, _ = _wire.build_frames(
                    proto.reply_prefix(env.sender.hex(), proto.OK), 0, bytes(8), env.seq,
                    env.time, _wire.Payload(_wire.KIND_MSGPACK, b"\xa4pong"))
                replier.send(frame)
                assert asking.result(5.0).data == "pong"
            finally:
                replier.close(0)
        finally:
            peer.close(0)


def test_a_connection_made_before_the_service_starts_is_watched(
        leakcheck: LeakCheck, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection caps and the subscription-bytes cut know a connection by ZeroMQ's
    monitor event; the event of one accepted before anybody listened to the monitor was
    dropped, so a peer that reconnected at once to a restarted broker escaped both."""
    handed: dict[str, Any] = {}
    real_run = _service.BrokerService.run

    def run_after_an_early_connection(self: _service.BrokerService, started: Any) -> None:
        port = next(iter(self._connections._subscriber_ports))
        early = self._context.socket(zmq.SUB)
        early.linger = 0
        handed["early"] = early
        events = early.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            early.connect(f"tcp://127.0.0.1:{port}")
            handed["accepted"] = events.poll(5000) == zmq.POLLIN  # so the broker accepted it
        finally:
            early.disable_monitor()
            events.close(0)
        real_run(self, started)

    monkeypatch.setattr(_service.BrokerService, "run", run_after_an_early_connection)
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        try:
            assert handed["accepted"], "the early peer never connected"
            stats = bus.subscribe("$vbus/stats")
            seen = [stats.recv(timeout=5.0).data["connections"] for _ in range(3)]
            # Each stats message is a marker: three in a row without it prove it unseen.
            assert 1 in seen, f"the early connection was never counted: {seen}"
        finally:
            handed["early"].close(0)
