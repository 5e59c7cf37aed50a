"""No peer can forge the bus's own traffic through the broker (DESIGN.md, Security).

An attacker with raw ZeroMQ sockets on the broker's two ports, plain or with an authorized
CURVE key, learns a victim's ready token the way a real one would (a SUB on the ready
prefix sees every confirmation), then sends every kind of control frame: a forged replay
that names the real publisher with the highest sequence number (it used to make the victim
drop every later message of that publisher, uncounted), a forged confirmation, a forged
``$vbus/stats``, want- and ready-led frames, other ``$vbus/`` topics. A marker message sent
after them on the same connection proves they were all dealt with: nothing reached the
victim or a stats reader, and what the victim receives and counts afterwards is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq

import vbus
from tests._support import LeakCheck
from vbus._proto import control as _control
from vbus._proto import stats as _stats
from vbus._proto import wire as _wire
from vbus._proto.endpoints import parse_address

ATTACKER = b"attacker"


@dataclass
class Setup:
    bus: vbus.Bus
    client: vbus.Bus
    curve: dict[str, bytes] | None  # the attacker's socket options

    def secure(self, sock: zmq.Socket[bytes]) -> None:
        for option, value in (self.curve or {}).items():
            sock.setsockopt_string(getattr(zmq, option), value.decode())


@pytest.fixture(params=["plain", "curve"])
def setup(request: pytest.FixtureRequest, leakcheck: LeakCheck) -> Iterator[Setup]:
    if request.param == "plain":
        bus = vbus.Bus(bind="tcp://127.0.0.1:0")
        client = vbus.connect(bus.address)
        curve = None
    else:
        server, user, attacker = (vbus.generate_keypair() for _ in range(3))
        bus = vbus.Bus(bind="tcp://127.0.0.1:0", keypair=server,
                       authorized=[user.public, attacker.public])
        client = vbus.connect(bus.address, keypair=user, server_key=server.public)
        curve = {"CURVE_SERVERKEY": server.public.encode(),
                 "CURVE_PUBLICKEY": attacker.public.encode(),
                 "CURVE_SECRETKEY": attacker.secret.encode()}
    try:
        yield Setup(bus, client, curve)
    finally:
        client.close()
        bus.close()


def _frame(topic: bytes, sender: bytes, seq: int, flags: int = 0, data: bytes = b"\x01") -> bytes:
    frame, _ = _wire.build_frames(topic + b"\0", flags, sender, seq, 0.0,
                                  _wire.Payload(_wire.KIND_MSGPACK, data))
    return frame


def _recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "nothing arrived"
    return sock.recv_multipart()


def test_forged_control_frames_change_nothing(setup: Setup) -> None:
    endpoints = parse_address(setup.bus.address)
    ctx = zmq.Context()
    spy = ctx.socket(zmq.SUB)  # learns tokens and sender ids, watches stats
    attacker = ctx.socket(zmq.XPUB)
    rogue = ctx.socket(zmq.XSUB)  # a subscriber that sends what it likes
    try:
        for sock in (spy, attacker, rogue):
            sock.linger = 0
            setup.secure(sock)
        for prefix in (_control.READY, b"stage/x\0", _stats.STATS_TOPIC.encode() + b"\0"):
            spy.subscribe(prefix)
        spy.connect(endpoints.subscribe)
        attacker.connect(endpoints.publish)
        assert _control.is_acceptance(_recv(attacker)[0])
        rogue.connect(endpoints.subscribe)

        pub = setup.client.publisher()
        # The spy's own subscriptions are active once a genuine stats message reaches it.
        while not _recv(spy)[0].startswith(b"$vbus/stats\0"):
            pass
        victim = setup.client.subscribe("stage/x")
        while not (first := _recv(spy)[0]).startswith(_control.READY):
            pass
        token = first[len(_control.READY) : first.index(b"\0")]
        pub.publish("stage/x", 0)
        while not (first := _recv(spy)[0]).startswith(b"stage/x\0"):
            pass
        real = _wire.parse_envelope(first).sender
        assert victim.recv(timeout=5.0).data == 0

        ready = _control.READY + token
        forged = [
            # The replay that used to blackhole the topic: "retained seq 2**64-1 of `real`".
            [_control.control_frame(ready, ATTACKER, _wire.FLAG_REPLAY),
             _frame(b"stage/x", real, 2**64 - 1)],
            [_control.control_frame(ready, ATTACKER)],  # a confirmation out of the blue
            [_control.control_frame(
                _stats.STATS_TOPIC.encode(), ATTACKER,
                payload=_stats.stats_payload(_stats.BrokerStats("forged", 0.0, subscribers=999)))],
            [_control.want_subscription(token, "**")],
            [_control.READY + b"\0garbage"],
            [b"\xff"], [b"\xfe"], [b"\xfd"],
            [_frame(b"$vbus/other", ATTACKER, 1)],
            [_frame(b"$vbus/stats/x", ATTACKER, 1)],
            [_frame(b"$vbus/serve/0011223344556677", ATTACKER, 1)],  # a request "from" us
            [b"\xfdvbus/serve/stage/x\0" + b"0011223344556677"],
        ]
        for frames in forged:
            attacker.send_multipart(frames)
        # From the subscriber side: a want for the victim's token, its token again, and
        # control-looking messages that are not subscriptions at all.
        for message in (b"\x01" + _control.want_subscription(token, "**"),
                        b"\x01" + ready + b"\0",
                        _control.control_frame(ready, ATTACKER, _wire.FLAG_REPLAY),
                        b"\x02" + ready):
            rogue.send(message)
        attacker.send(_frame(b"stage/x", ATTACKER, 1, data=b"\xa6marker"))

        # Everything before the marker was dealt with once the marker arrives.
        got = victim.recv(timeout=5.0)
        assert (got.data, got.sender, got.retained) == ("marker", ATTACKER.hex(), False)
        while (frames := _recv(spy))[0] != _frame(b"stage/x", ATTACKER, 1, data=b"\xa6marker"):
            env = _wire.parse_envelope(frames[0]) if not frames[0].startswith(b"\xff") else None
            assert frames[0].startswith(_control.READY) is False, "a forged confirmation passed"
            assert env is None or env.sender != ATTACKER, f"forged {env.topic!r} passed"

        for i in range(1, 1001):
            pub.publish("stage/x", i)
        received = [victim.recv(timeout=5.0) for _ in range(1000)]
        assert [m.data for m in received] == list(range(1, 1001))
        assert not any(m.retained for m in received)
        stats = victim.stats()
        assert (stats.received, stats.dropped, stats.errors, stats.invalid) == (1002, 0, 0, 0)
        victim.close()
        pub.close()
    finally:
        for sock in (spy, attacker, rogue):
            sock.close(0)
        ctx.term()


def test_client_prefixes_are_exactly_the_topic_start_and_the_client_topics() -> None:
    """The gate's rule, on bytes: what a client may send, and nothing of the broker's."""
    for frame in (b"a/b\0", b"Z\0", b"0\0", b"_x\0", b"-x\0", b".x\0", b":x\0",
                  b"$vbus/retain/a\0", b"$vbus/report/00\0", b"$vbus/req/a\0",
                  b"$vbus/reply/0011223344556677/ok\0"):
        assert _control.from_client(frame), frame
    for frame in (_control.READY + b"t\0", _control.WANT + b"t\0**", b"$vbus/stats\0",
                  b"$vbus/stats/x\0", b"$vbus/retai\0", b"$other\0", b"\0", b"", b"/a\0",
                  b"*\0", b" a\0", b"\x80\0", b"$vbus/serve/0011223344556677\0",
                  b"\xfdvbus/serve/a\0"):
        assert not _control.from_client(frame), frame
