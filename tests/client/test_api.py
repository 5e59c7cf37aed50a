"""The public surface: __all__, the error tree, sync/async parity, stats."""

from __future__ import annotations

import inspect
import types

import pytest
import zmq

import vbus


def test_all_is_sorted_and_complete() -> None:
    assert vbus.__all__ == sorted(vbus.__all__)
    for name in vbus.__all__:
        assert hasattr(vbus, name), name
    public = {
        n for n in dir(vbus)
        if not n.startswith("_") and not isinstance(getattr(vbus, n), types.ModuleType)
    }  # submodules (vbus.qt, once imported) are not names of the package's own
    assert public == set(vbus.__all__)


def test_error_tree() -> None:
    for err in (vbus.Closed, vbus.TopicError, vbus.EncodeError, vbus.DecodeError,
                vbus.ConnectError, vbus.AddressError, vbus.NoResponder, vbus.RemoteError):
        assert issubclass(err, vbus.VbusError)
        assert not issubclass(err, zmq.ZMQError)
    assert issubclass(vbus.TopicError, ValueError)


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


TWINS = {"__iter__": "__aiter__", "__next__": "__anext__", "__enter__": "__aenter__",
         "__exit__": "__aexit__"}
IO_METHODS = {"recv", "publish"}


@pytest.mark.parametrize(("sync", "async_"), [(vbus.Publisher, vbus.AsyncPublisher),
                                               (vbus.Subscriber, vbus.AsyncSubscriber)])
def test_sync_and_async_twins_do_not_drift(sync: type, async_: type) -> None:
    assert issubclass(async_, sync), "one core, twin shells"
    assert _public(sync) == _public(async_)
    for name in _public(sync):
        s, a = getattr(sync, name), getattr(async_, name)
        if name in IO_METHODS:
            assert inspect.iscoroutinefunction(a), f"{async_.__name__}.{name} must be async"
            assert not inspect.iscoroutinefunction(s)
            assert inspect.signature(s).parameters.keys() == inspect.signature(a).parameters.keys()
    for sync_name, async_name in TWINS.items():
        if hasattr(sync, sync_name):
            assert hasattr(async_, async_name), f"{async_.__name__} lacks {async_name}"


def test_bus_has_a_sync_and_an_async_factory_for_each_role() -> None:
    for sync_name, async_name in [("publisher", "async_publisher"),
                                  ("subscribe", "async_subscribe"),
                                  ("request", "async_request")]:
        s = inspect.signature(getattr(vbus.Bus, sync_name))
        a = inspect.signature(getattr(vbus.Bus, async_name))
        assert s.parameters.keys() == a.parameters.keys()
    assert inspect.iscoroutinefunction(vbus.Bus.async_request)
    assert not inspect.iscoroutinefunction(vbus.Bus.request)


def test_stats_count_messages_subscribers_and_drops(bus: vbus.Bus) -> None:
    pub = bus.publisher()
    sub = bus.subscribe("s/*")
    for _ in range(10):
        pub.publish("s/a", bytes(100))
    for _ in range(10):
        sub.recv(timeout=2.0)
    stats = bus.stats()
    # the broker counts ZeroMQ messages: a burst of small ones travels as a batch
    assert stats.messages_in >= 1 and stats.messages_out >= 1
    assert stats.bytes_in >= 10 * 100 and stats.bytes_out >= 10 * 100
    assert stats.subscribers == 1
    assert stats.publishers == 1
    assert stats.per_subscriber[0].received == 10
    assert stats.per_publisher[0].published == 10
    assert stats.dropped == 0
    sub.close()
    assert bus.stats().per_subscriber == ()


def test_slow_subscriber_loses_alone_and_counts_it(leakcheck: object) -> None:
    with vbus.Bus(hwm=2000, batch_delay=0) as bus:  # the slow one must overflow
        _slow_subscriber_loses_alone(bus)


def _slow_subscriber_loses_alone(bus: vbus.Bus) -> None:
    fast = bus.subscribe("flood", hwm=100_000)
    slow = bus.subscribe("flood", hwm=10)
    pub = bus.publisher()
    n = 20_000
    for i in range(n):
        pub.publish("flood", i)
    got_fast = [fast.recv(timeout=2.0).data for _ in range(n)]
    assert got_fast == list(range(n))
    received = 0
    while True:
        try:
            slow.recv(timeout=0.2)
            received += 1
        except TimeoutError:
            break
    stats = slow.stats()
    assert stats.received == received < n
    # losses after the last received message are invisible until the next one arrives
    pub.publish("flood", n)
    slow.recv(timeout=2.0)
    assert slow.stats().dropped + slow.stats().received == n + 1
    assert pub.stats().dropped == 0
