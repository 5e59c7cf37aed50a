"""Clients survive their broker: kill it (even with SIGKILL), start it again, and go on."""

from __future__ import annotations

import time

import pytest

import vbus
from tests._support import LeakCheck, free_port_pair
from tests.brokerproc import BrokerProcess


def _publish_until_received(pub: vbus.Publisher, sub: vbus.Subscriber, topic: str,
                            limit: float = 10.0) -> tuple[vbus.Message, float, int]:
    """Publish every 5 ms until the subscriber gets one; (message, seconds, published)."""
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < limit:
        pub.publish(topic, sent)
        sent += 1
        try:
            return sub.recv(timeout=0.005), time.monotonic() - started, sent
        except TimeoutError:
            continue
    raise AssertionError(f"nothing arrived within {limit} s of the broker's restart")


@pytest.mark.parametrize("how", ["kill", "stop"])
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_clients_survive_a_broker_restart(leakcheck: LeakCheck, tmp_path: object,
                                          how: str, transport: str) -> None:
    if transport == "tcp":
        address = f"tcp://127.0.0.1:{free_port_pair()}"
    else:
        address = f"ipc://{tmp_path}/broker"
    broker = BrokerProcess(address)
    try:
        with vbus.connect(broker.address) as bus:
            sub = bus.subscribe("restart/**", hwm=100_000)
            pub = bus.publisher()
            pub.publish("restart/x", -1)
            assert sub.recv(timeout=5.0).data == -1
            broker.kill() if how == "kill" else broker.stop()
            started = time.monotonic()
            for i in range(1000):  # the broker is down: never blocks, never raises
                pub.publish("restart/x", i)
            assert time.monotonic() - started < 1.0
            broker = BrokerProcess(address)
            _publish_until_received(pub, sub, "restart/x")
            # Both ends are back. What was published meanwhile either arrives (ZeroMQ queues
            # while disconnected) or shows as a sequence gap: one more message settles it.
            pub.publish("restart/x", "marker")
            msg = sub.recv(timeout=5.0)
            while msg.data != "marker":
                msg = sub.recv(timeout=5.0)
            stats = sub.stats()
            assert stats.received + stats.dropped == msg.seq  # a publisher-side drop too
            # and traffic flows on normally, in order, without loss
            for i in range(100):
                pub.publish("restart/y", i)
            assert [sub.recv(timeout=5.0).data for _ in range(100)] == list(range(100))
    finally:
        broker.stop()


def test_a_new_subscriber_after_restart_is_ready_when_it_returns(leakcheck: LeakCheck) -> None:
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    broker = BrokerProcess(address)
    try:
        with vbus.connect(address) as bus:
            pub = bus.publisher()
            broker.kill()
            broker = BrokerProcess(address)
            sub = bus.subscribe("fresh")  # readiness is proven by the new broker
            pub2 = bus.publisher()
            pub2.publish("fresh", "hello")
            assert sub.recv(timeout=5.0).data == "hello"
            pub.close()
    finally:
        broker.stop()
