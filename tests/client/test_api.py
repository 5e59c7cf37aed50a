"""The public surface: __all__, the error tree, sync/async parity, stats."""

from __future__ import annotations

import inspect
import types

import pytest
import zmq

import vbus
from tests._support import flood_read_as_it_goes, until_marker_gets_through
from vbus._proto import wire as _wire
from vbus._proto.topics import topic_prefix


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
IO_METHODS = {"recv", "recv_batch", "publish"}


@pytest.mark.parametrize(("sync", "async_"), [(vbus.Publisher, vbus.AsyncPublisher),
                                               (vbus.Subscriber, vbus.AsyncSubscriber)])
def test_sync_and_async_twins_do_not_drift(sync: type, async_: type) -> None:
    shared = [c for c in sync.__mro__ if c is not object and issubclass(async_, c)]
    assert shared, "one core, twin shells"
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


def test_async_subscriber_is_a_sibling_not_a_broken_subclass() -> None:
    """httpx's model: the shells share a base and each spells only its own protocol, so an
    AsyncSubscriber is no Subscriber whose ``for``/``with`` would raise TypeError."""
    assert vbus.Subscriber.__mro__[1] is vbus.AsyncSubscriber.__mro__[1]
    assert not issubclass(vbus.AsyncSubscriber, vbus.Subscriber)
    for sync_only in ("__iter__", "__next__", "__enter__", "__exit__"):
        assert not hasattr(vbus.AsyncSubscriber, sync_only), sync_only
    for async_only in ("__aiter__", "__anext__", "__aenter__", "__aexit__"):
        assert not hasattr(vbus.Subscriber, async_only), async_only


def test_async_publisher_is_a_sibling_whose_publish_is_awaited() -> None:
    """An AsyncPublisher is no Publisher: code that takes a Publisher (``vbus.psygnal.forward``
    given a publisher) would call its publish() and drop the coroutine unawaited."""
    assert vbus.Publisher.__mro__[1] is vbus.AsyncPublisher.__mro__[1]
    assert not issubclass(vbus.AsyncPublisher, vbus.Publisher)
    assert not hasattr(vbus.AsyncPublisher, "__enter__")
    assert not hasattr(vbus.Publisher, "__aenter__")


def test_subscriber_and_message_are_generic_in_the_payload_type() -> None:
    """``subscribe(p, type=State)`` reaches the checker as ``Subscriber[State]`` (checked by
    mypy in test_typing.py); at run time the aliases exist and build the same classes."""
    assert vbus.Message[int] is not None and vbus.Subscriber[int] is not None
    msg = vbus.Message[int]("t", 1, "s", 1, 0.0)
    assert type(msg) is vbus.Message and msg.data == 1


def test_bus_has_a_sync_and_an_async_factory_for_each_role() -> None:
    for sync_name, async_name in [("publisher", "async_publisher"),
                                  ("subscribe", "async_subscribe"),
                                  ("request", "async_request")]:
        s = inspect.signature(getattr(vbus.Bus, sync_name))
        a = inspect.signature(getattr(vbus.Bus, async_name))
        assert s.parameters.keys() == a.parameters.keys()
    assert inspect.iscoroutinefunction(vbus.Bus.async_request)
    assert not inspect.iscoroutinefunction(vbus.Bus.request)


def test_stats_count_messages_subscribers_and_drops(leakcheck: object) -> None:
    with vbus.Bus(batch_delay=0) as bus:  # unbatched: one ZeroMQ message a publish
        pub = bus.publisher()
        sub = bus.subscribe("s/*")
        own = bus.subscribe("$vbus/**")  # the bus's own traffic: stats, reports
        pub.publish("s/warm", b"")  # the first publish and receive report at once
        sub.recv(timeout=2.0)
        size = len(_wire.build_frames(topic_prefix("s/a"), 0, bytes(8), 2, 0.0,
                                      _wire.encode_payload(bytes(100), _wire.new_encoder()))[0])
        for _attempt in range(5):
            own.recv(timeout=3.0)  # $vbus/stats once a second, reports at most as often
            before = bus.stats()
            for _ in range(10):
                pub.publish("s/a", bytes(100))
            for _ in range(10):
                sub.recv(timeout=2.0)
            after = bus.stats()
            try:
                own.recv(timeout=0.05)  # the bus's own message crossed ours: measure again
            except TimeoutError:
                break
        # the broker counts ZeroMQ messages and bytes, in from publishers and out
        assert (after.messages_in - before.messages_in, after.bytes_in - before.bytes_in) == (
            10, 10 * size)
        assert (after.messages_out - before.messages_out,
                after.bytes_out - before.bytes_out) == (10, 10 * size)
        assert after.subscribers == 2
        assert after.publishers == 1
        assert {s.pattern: s.received for s in after.per_subscriber}["s/*"] == 11
        assert [p.published for p in after.per_publisher] == [11]
        assert after.dropped == 0
        sub.close()
        own.close()
        assert bus.stats().per_subscriber == ()


def test_slow_subscriber_loses_alone_and_counts_it(leakcheck: object) -> None:
    with vbus.Bus(hwm=2000, batch_delay=0) as bus:  # the slow one must overflow
        _slow_subscriber_loses_alone(bus)


def _slow_subscriber_loses_alone(bus: vbus.Bus) -> None:
    fast = bus.subscribe("flood", hwm=100_000)
    slow = bus.subscribe("flood", hwm=10)
    pub = bus.publisher()
    n = 20_000
    assert flood_read_as_it_goes(pub, fast, "flood", n) == list(range(n))
    kept, markers = until_marker_gets_through(pub, slow, "flood")
    stats = slow.stats()
    assert stats.received == len(kept) + 1 < n
    # losses after the last kept message showed when the marker came
    assert stats.dropped + stats.received == n + markers
    assert pub.stats().dropped == 0
