"""Hostile and broken input: foreign ZeroMQ peers, garbage, wrong versions, oversized
messages. The broker and every subscriber keep serving, bad messages are counted."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vbus
from tests._support import LeakCheck
from vbus._proto import control as _control
from vbus._proto import wire as _wire
from vbus._proto.endpoints import parse_address


class Foreign:
    """A raw ZeroMQ publisher aimed at a broker, ready once the broker subscribed to it."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.linger = 0
        self.sock.connect(parse_address(address).publish)
        assert self.sock.poll(5000), "broker did not subscribe to the foreign publisher"
        assert _control.is_acceptance(self.sock.recv())

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close(linger=2000)  # what was sent goes out (a marker last), within 2 s
        self.ctx.term()


@pytest.fixture
def net_bus(leakcheck: LeakCheck) -> Iterator[vbus.Bus]:
    with vbus.Bus(bind="tcp://127.0.0.1:0", max_message_size=1 << 20) as bus:
        yield bus


def _valid(topic: str, version: int = _wire.VERSION, kind: int = _wire.KIND_MSGPACK) -> bytes:
    payload = _wire.Payload(kind, b"\x01")
    frame, _ = _wire.build_frames(topic.encode() + b"\0", 0, b"12345678", 1, 0.0, payload)
    return frame[: len(topic) + 1] + bytes([version]) + frame[len(topic) + 2 :]


MARKER = "marker"


def _marker(topic: str = "stage/x") -> bytes:
    """A well-formed message, sent last by a foreign publisher: the messages of one
    connection keep their order, so what has not arrived before it is not coming."""
    payload = _wire.encode_payload(MARKER, _wire.new_encoder())
    frame, _ = _wire.build_frames(topic.encode() + b"\0", 0, b"MARKER00", 1, 0.0, payload)
    return frame


FOREIGN_MARKER = b"MARKER00".hex()


def _until_marker(sub: vbus.Subscriber, sender: str = FOREIGN_MARKER) -> list[vbus.Message]:
    """Every message before ``sender``'s marker (others' markers included)."""
    got = []
    while (msg := sub.recv(timeout=5.0)).data != MARKER or msg.sender != sender:
        got.append(msg)
    return got


def _legit_traffic_flows(bus: vbus.Bus, sub: vbus.Subscriber, n: int = 100) -> None:
    pub = bus.publisher()
    for i in range(n):
        pub.publish("stage/x", i)
    pub.publish("stage/x", MARKER)
    got = [m.data for m in _until_marker(sub, pub.id) if m.data != MARKER]
    assert got == list(range(n))
    pub.close()


def test_crafted_bad_messages_are_counted_exactly(net_bus: vbus.Bus) -> None:
    exact = net_bus.subscribe("stage/x")
    everything = net_bus.subscribe("**")
    bad = [
        [b"stage/x\0"],  # header missing
        [b"stage/x\0" + b"\x01\x00\x00"],  # header truncated
        [_valid("stage/x", version=2)],  # a future wire version
        [_valid("stage/x", version=0)],
        [_valid("stage/x", kind=9)],  # unknown payload kind
        [_valid("stage/x"), b"unexpected second frame"],  # frames do not match the flags
        [_valid("stage/x"), b"a", b"b"],
        [b"stage/x\0" + b"\xff" * 40],
        [b"no terminator at all"],
    ]
    foreign = Foreign(net_bus.address)
    try:
        for frames in bad:
            foreign.send(frames)
        foreign.send([_valid("stage/x")])  # a well-formed foreign message still gets through
        foreign.send([_marker()])
    finally:
        foreign.close()
    got = _until_marker(exact)
    assert [m.data for m in got] == [1]
    assert exact.stats().invalid == len(bad) - 1  # the last one never matched 'stage/x\0'
    assert [m.data for m in _until_marker(everything)] == [1]
    assert everything.stats().invalid == len(bad)
    _legit_traffic_flows(net_bus, exact)


def test_undecodable_payloads_count_as_errors(net_bus: vbus.Bus) -> None:
    sub = net_bus.subscribe("stage/x")
    foreign = Foreign(net_bus.address)
    try:
        frame = _valid("stage/x")
        foreign.send([frame[:-1] + b"\xc1"])  # 0xc1 is never valid msgpack
        meta = _wire.new_encoder().encode(("<f8", (1000, 1000)))
        head, _ = _wire.build_frames(b"stage/x\0", 0, b"87654321", 1, 0.0,
                                     _wire.Payload(_wire.KIND_NDARRAY, meta, b"x"))
        foreign.send([head, b"too short for the shape"])
        foreign.send([_marker()])
    finally:
        foreign.close()
    assert _until_marker(sub) == []
    assert sub.stats().errors == 2
    _legit_traffic_flows(net_bus, sub)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.lists(st.binary(max_size=200), min_size=1, max_size=4),
                min_size=1, max_size=40))
def test_random_frames_never_kill_anything(net_bus: vbus.Bus, batch: list[list[bytes]]) -> None:
    everything = net_bus.subscribe("**")
    exact = net_bus.subscribe("stage/x")
    foreign = Foreign(net_bus.address)
    try:
        for frames in batch:
            foreign.send(frames)
        foreign.send([_marker()])
    finally:
        foreign.close()
    counted = _until_marker(everything)
    stats = everything.stats()
    assert stats.received == len(counted) + 1  # and the marker
    assert stats.received + stats.invalid + stats.errors <= len(batch) + 1  # and the marker
    _legit_traffic_flows(net_bus, exact)
    everything.close()
    exact.close()


def test_oversized_message_disconnects_the_sender_only(net_bus: vbus.Bus) -> None:
    sub = net_bus.subscribe("stage/x")
    foreign = Foreign(net_bus.address)
    try:
        foreign.send([_valid("stage/x") + bytes(2 << 20)])  # over the 1 MiB limit
        deadline = time.monotonic() + 5.0
        while _broker_peers(net_bus)["disconnected"] < 1:  # the broker cut that connection
            assert time.monotonic() < deadline, "the oversized sender was not disconnected"
            time.sleep(0.01)  # sleep-ok: the monitor events are counted by another thread
    finally:
        foreign.close()
    # ZeroMQ drops a message that is too large before it is whole: nothing of it reached a
    # queue. A marker from a new connection comes after anything the old one delivered.
    marker = Foreign(net_bus.address)
    try:
        marker.send([_marker()])
    finally:
        marker.close()
    assert _until_marker(sub) == []
    _legit_traffic_flows(net_bus, sub)
    assert _broker_peers(net_bus)["disconnected"] >= 1


def _broker_peers(bus: vbus.Bus) -> dict[str, int]:
    assert bus._broker is not None  # noqa: SLF001 - the embedded broker's own counters
    return dict(bus._broker.service.peers)  # noqa: SLF001


def test_raw_tcp_garbage_is_refused_and_the_broker_keeps_serving(net_bus: vbus.Bus) -> None:
    sub = net_bus.subscribe("stage/x")
    host, port = net_bus.address[len("tcp://"):].rsplit(":", 1)
    for target in (int(port), int(port) + 1):
        for blob in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" * 64, struct.pack("<Q", 2**63) * 8):
            with socket.create_connection((host, target), timeout=2.0) as s:
                s.sendall(blob)
                s.settimeout(0.5)
                try:
                    while s.recv(4096):  # until the broker hangs up on us
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
    _legit_traffic_flows(net_bus, sub)
    # Each connection is either refused in the handshake or (a blob ZeroMQ is still
    # waiting to make sense of when we hang up) counted as a disconnect.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        peers = _broker_peers(net_bus)
        if peers["rejected"] + peers["disconnected"] >= 6:
            break
        time.sleep(0.01)  # sleep-ok: the monitor events are counted by another thread
    assert peers["rejected"] >= 2 and peers["rejected"] + peers["disconnected"] >= 6


def test_hostile_subscriptions_do_not_disturb_the_broker(net_bus: vbus.Bus) -> None:
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.XSUB)
    rogue.linger = 0
    rogue.connect(parse_address(net_bus.address).subscribe)
    try:
        for bogus in (b"\x01\xffvbus/ready/\x00", b"\x01\xffvbus/ready/\xff\xfe\x00",
                      b"\x01\xfevbus/want/", b"\x01\xfevbus/want/t\x00bad pattern!",
                      b"\x01" + b"x" * 100_000, b"\x00never subscribed", b"\x02odd"):
            rogue.send(bogus)
        sub = net_bus.subscribe("stage/x")
        _legit_traffic_flows(net_bus, sub)
    finally:
        rogue.close(0)
        ctx.term()
