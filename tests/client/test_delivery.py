"""Delivery guarantees: sequence gaps counted exactly, slow consumers lose alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import vbus
from tests._support import flood_read_as_it_goes, until_marker_gets_through


@pytest.fixture
def small_bus(leakcheck: object) -> Iterator[vbus.Bus]:
    """Queues of 2000 messages and no batching (a batch of small messages counts as one):
    a stalled subscriber overflows after 2000 + its own hwm."""
    with vbus.Bus(hwm=2000, batch_delay=0) as bus:
        yield bus


def test_on_loss_hook_and_exact_accounting_with_a_stalled_subscriber(
    small_bus: vbus.Bus,
) -> None:
    """50 000 messages, one fast and one stalled subscriber: received + dropped == published
    for each, the publisher never blocks, the fast one gets everything."""
    bus = small_bus
    losses: list[tuple[str, str, int]] = []
    fast = bus.subscribe("flood/*", hwm=200_000)
    stalled = bus.subscribe("flood/*", hwm=100, on_loss=lambda *a: losses.append(a))
    pub = bus.publisher()
    n = 50_000
    assert flood_read_as_it_goes(pub, fast, "flood/a", n) == list(range(n))
    # the stalled one wakes up: what it kept, then the gap shows with the next message
    kept, markers = until_marker_gets_through(pub, stalled, "flood/a")
    fs, ss = fast.stats(), stalled.stats()
    assert (fs.received, fs.dropped) == (n, 0)
    assert ss.received + ss.dropped == n + markers
    assert ss.dropped > 0 and ss.received == len(kept) + 1
    assert sum(count for _, _, count in losses) == ss.dropped
    assert {(t, s) for t, s, _ in losses} == {("flood/a", pub.id)}
    assert pub.stats().dropped == 0 and pub.stats().published == n + markers


def test_loss_hook_that_raises_is_counted_not_fatal(small_bus: vbus.Bus) -> None:
    bus = small_bus
    def broken(topic: str, sender: str, count: int) -> None:
        raise RuntimeError("hook bug")

    stalled = bus.subscribe("x", hwm=10, on_loss=broken)
    pub = bus.publisher()
    for i in range(30_000):  # more than the broker's queue for it (the bus's hwm) plus its own
        pub.publish("x", i)
    until_marker_gets_through(pub, stalled, "x")  # the gap shows, and the hook raises
    assert stalled.stats().errors == 1


def test_order_and_completeness_with_concurrent_publishers(bus: vbus.Bus) -> None:
    sub = bus.subscribe("multi/*", hwm=1_000_000)
    shared = bus.publisher()
    n = 5000

    def run(topic: str) -> None:
        for i in range(n):
            shared.publish(topic, i)

    threads = [threading.Thread(target=run, args=(f"multi/{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    per_topic: dict[str, list[int]] = {}
    for _ in range(4 * n):
        msg = sub.recv(timeout=5.0)
        per_topic.setdefault(msg.topic, []).append(msg.data)
    assert per_topic == {f"multi/{k}": list(range(n)) for k in range(4)}
    assert sub.stats().dropped == 0
