"""Callbacks on the background loop and on threads of their own; submit()."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

import pytest

import vbus


def test_callbacks_run_in_order_on_the_expected_threads(bus: vbus.Bus) -> None:
    async_seen: list[int] = []
    sync_seen: list[int] = []
    threads: set[str] = set()
    done = threading.Event()
    async_done = threading.Event()

    @bus.on("n")
    async def on_async(msg: vbus.Message) -> None:
        threads.add(threading.current_thread().name)
        async_seen.append(msg.data)
        if msg.data == 999:
            async_done.set()

    def on_sync(msg: vbus.Message) -> None:
        threads.add(threading.current_thread().name)
        sync_seen.append(msg.data)
        if msg.data == 999:
            done.set()

    handle = bus.on("n", on_sync)
    assert isinstance(handle, vbus.Handle) and handle.callback is on_sync
    pub = bus.publisher()
    for i in range(1000):
        pub.publish("n", i)
    assert done.wait(5.0)
    assert async_done.wait(5.0)
    assert sync_seen == list(range(1000))
    assert async_seen == list(range(1000))
    assert any(t.startswith("vbus-loop") for t in threads)
    assert "vbus-callback-n" in threads


def test_slow_sync_callback_does_not_stall_other_subscriptions(bus: vbus.Bus) -> None:
    release = threading.Event()
    fast_got = threading.Event()
    async_got = threading.Event()
    bus.on("work", lambda msg: release.wait(5.0))
    bus.on("work", lambda msg: fast_got.set())

    @bus.on("work")
    async def on_work(msg: vbus.Message) -> None:
        async_got.set()

    bus.publisher().publish("work", 1)
    try:
        assert fast_got.wait(2.0)
        assert async_got.wait(2.0)
    finally:
        release.set()


def test_exception_in_callback_is_logged_counted_and_survived(
    bus: vbus.Bus, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []
    sync_last, async_last = threading.Event(), threading.Event()

    def check(msg: vbus.Message, last: threading.Event) -> None:
        if msg.data % 2:
            raise ValueError(f"odd {msg.data}")
        seen.append(msg.data)
        if msg.data == 10:
            last.set()

    async def aflaky(msg: vbus.Message) -> None:
        check(msg, async_last)

    with caplog.at_level(logging.WARNING, logger="vbus"):
        bus.on("f", lambda msg: check(msg, sync_last))
        bus.on("f", aflaky)
        pub = bus.publisher()
        for i in range(11):
            pub.publish("f", i)
        assert sync_last.wait(2.0) and async_last.wait(2.0)
    stats = bus.stats().per_subscriber
    assert [s.errors for s in stats] == [5, 5]
    assert sorted(seen) == sorted(2 * [0, 2, 4, 6, 8, 10])
    assert "callback raised ValueError('odd 1')" in caplog.text
    assert "Traceback" in caplog.text


def test_submit_returns_a_concurrent_future(bus: vbus.Bus) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    fut = bus.submit(answer())
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=2.0) == 42
    with pytest.raises(TypeError, match="coroutine"):
        bus.submit(answer)  # type: ignore[arg-type]


def test_close_cancels_submitted_coroutines(leakcheck: object) -> None:
    bus = vbus.Bus()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)  # sleep-ok: a coroutine that only close() ends

    fut = bus.submit(forever())
    assert started.wait(2.0)
    bus.close()
    assert fut.cancelled()


def test_callback_may_publish_and_subscribe(bus: vbus.Bus) -> None:
    echoed = threading.Event()
    bus.on("echo", lambda msg: echoed.set())
    pub = bus.publisher()

    @bus.on("ping")
    async def on_ping(msg: vbus.Message) -> None:
        bus.subscribe("x").close()  # a blocking call on the loop, bounded by the handshake
        pub.publish("echo", msg.data)

    pub.publish("ping", 1)
    assert echoed.wait(2.0)
