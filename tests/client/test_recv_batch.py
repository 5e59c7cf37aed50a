"""Subscriber.recv_batch() and its async twin: every message that is here, in one call."""

from __future__ import annotations

import asyncio

import pytest

import vbus


@pytest.mark.timeout(30)
def test_recv_batch_gives_every_message_in_order_and_waits_for_the_first(
    any_bus: vbus.Bus,
) -> None:
    sub = any_bus.subscribe("rb/*")
    pub = any_bus.publisher()
    with pytest.raises(TimeoutError):
        sub.recv_batch(timeout=0.05)
    n = 5000
    for i in range(n):  # a burst: batches on the wire, several of them in each call
        pub.publish("rb/a" if i % 500 < 250 else "rb/b", i)
    pub.publish("rb/end", None)
    got: list[vbus.Message] = []
    calls = 0
    while not got or got[-1].topic != "rb/end":
        batch = sub.recv_batch(timeout=10.0)
        assert batch, "recv_batch returned nothing"
        got += batch
        calls += 1
    assert [m.data for m in got[:-1]] == list(range(n))
    assert calls < n // 2  # many messages a call
    assert sub.stats().received == n + 1
    assert sub.stats().dropped == 0
    sub.close()
    with pytest.raises(vbus.Closed):
        sub.recv_batch(timeout=0.1)


@pytest.mark.timeout(30)
def test_recv_batch_and_recv_share_one_queue(bus: vbus.Bus) -> None:
    sub = bus.subscribe("rb/x")
    pub = bus.publisher()
    for i in range(100):
        pub.publish("rb/x", i)
    first = sub.recv(timeout=5.0).data
    rest: list[int] = []
    while len(rest) < 99:
        rest += [m.data for m in sub.recv_batch(timeout=5.0)]
    assert [first, *rest] == list(range(100))


@pytest.mark.timeout(30)
def test_async_recv_batch(bus: vbus.Bus) -> None:
    async def main() -> list[int]:
        async with bus.async_subscribe("rb/*") as sub:
            pub = bus.publisher()
            with pytest.raises(TimeoutError):
                await sub.recv_batch(timeout=0.05)
            for i in range(2000):
                pub.publish("rb/a", i)
            got: list[int] = []
            while len(got) < 2000:
                got += [m.data for m in await sub.recv_batch(timeout=10.0)]
            return got

    assert asyncio.run(main()) == list(range(2000))
