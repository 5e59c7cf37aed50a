"""Request/reply through a real broker: serve, request, errors, late replies, close, stats."""

from __future__ import annotations

import asyncio
import functools
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

import vbus
from tests._support import LeakCheck

NEVER = 3600.0
"""A request timeout no test waits for (pytest-timeout ends a test long before)."""


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test, run in a fresh event loop of its own (a loop that is not the bus's)."""
    @functools.wraps(fn)
    def test(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return test


def test_a_sync_server_answers_with_its_return_value(any_bus: vbus.Bus) -> None:
    bus = any_bus
    with bus.serve("stage/move", lambda msg: {"moved_to": msg.data["x"]}) as server:
        reply = bus.request("stage/move", {"x": 1.0}, timeout=5.0)
    assert reply.data == {"moved_to": 1.0}
    assert reply.topic == "stage/move"
    assert reply.sender == server.id  # who answered


def test_an_async_server_runs_on_the_bus_loop(any_bus: vbus.Bus) -> None:
    bus = any_bus
    loop_threads: list[str] = []

    async def handler(msg: vbus.Message) -> list[object]:
        loop_threads.append(threading.current_thread().name)
        await asyncio.sleep(0)
        return ["async", msg.data]

    with bus.serve("camera/exposure", handler):
        assert bus.request("camera/exposure", 3).data == ["async", 3]
    assert loop_threads[0].startswith("vbus-loop-")


def test_a_sync_handler_runs_on_a_thread_of_its_own(bus: vbus.Bus) -> None:
    names: list[str] = []
    with bus.serve("who", lambda msg: names.append(threading.current_thread().name)):
        bus.request("who", None)
    assert names == ["vbus-server-who"]


def test_decorator_returns_a_callable_handle(bus: vbus.Bus) -> None:
    @bus.serve("double")
    def double(msg: vbus.Message) -> int:
        return int(msg.data) * 2

    assert isinstance(double, vbus.Server)
    assert bus.request("double", 21).data == 42
    assert double(vbus.Message("double", 2, "", 1, 0.0)) == 4  # still the function
    double.close()
    double.close()  # idempotent
    with pytest.raises(vbus.NoResponder):
        bus.request("double", 1)


def test_arrays_travel_both_ways(any_bus: vbus.Bus) -> None:
    bus = any_bus
    frame = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512)  # 512 KiB: own frame

    def handler(msg: vbus.Message) -> object:
        assert msg.data.shape == (512, 512) and msg.data.dtype == np.uint16
        return msg.data[::-1] + 1

    with bus.serve("analysis/run", handler):
        reply = bus.request("analysis/run", frame, timeout=5.0)
    np.testing.assert_array_equal(reply.data, frame[::-1] + 1)


@run_async
async def test_async_request_from_any_loop(bus: vbus.Bus) -> None:
    with bus.serve("q", lambda msg: msg.data + 1):
        replies = await asyncio.gather(*(bus.async_request("q", i) for i in range(50)))
    assert [r.data for r in replies] == list(range(1, 51))


def test_no_responder_comes_at_once(any_bus: vbus.Bus) -> None:
    bus = any_bus
    with bus.serve("warm", lambda msg: None):
        bus.request("warm", None)  # the bus's request machinery is up
    took = []
    for _ in range(50):
        started = time.perf_counter()
        with pytest.raises(vbus.NoResponder, match="'nobody/home'"):
            # Far beyond the test's own timeout: a NoResponder that waited for it would fail
            # the test, whatever the machine's load (no wall-clock bound asserted here).
            bus.request("nobody/home", 1, timeout=NEVER)
        took.append(time.perf_counter() - started)
    p50, worst = statistics.median(took), max(took)
    print(f"\nNoResponder: p50 {p50 * 1e3:.2f} ms, max {worst * 1e3:.2f} ms")
    assert bus.stats().requests.no_responder == 50
    assert bus.stats().requests.timed_out == 0


@run_async
async def test_async_no_responder_comes_at_once(bus: vbus.Bus) -> None:
    with pytest.raises(vbus.NoResponder):
        await bus.async_request("nobody/home", 1, timeout=NEVER)  # see the sync test


def test_remote_error_names_the_handlers_exception(any_bus: vbus.Bus) -> None:
    bus = any_bus

    def handler(msg: vbus.Message) -> None:
        raise ValueError(f"x={msg.data} is out of range")

    with bus.serve("stage/move", handler):
        with pytest.raises(vbus.RemoteError) as info:
            bus.request("stage/move", 99)
        # the server goes on serving after a failure
        with pytest.raises(vbus.RemoteError):
            bus.request("stage/move", 100)
    assert info.value.type_name == "ValueError"
    assert info.value.text == "x=99 is out of range"
    assert "ValueError" in str(info.value) and "stage/move" in str(info.value)
    stats = bus.stats().requests
    assert (stats.remote_errors, stats.failed, stats.served) == (2, 2, 0)


def test_a_reply_that_cannot_be_encoded_is_a_remote_error(bus: vbus.Bus) -> None:
    with bus.serve("bad", lambda msg: object()):
        with pytest.raises(vbus.RemoteError) as info:
            bus.request("bad", None)
    assert info.value.type_name == "EncodeError"


def test_timeout_then_the_late_reply_is_dropped_never_given_to_a_later_request(
        bus: vbus.Bus) -> None:
    release = threading.Event()

    def handler(msg: vbus.Message) -> str:
        if msg.data == "first":
            release.wait(10.0)
        return f"reply to {msg.data}"

    with bus.serve("slow", handler):
        started = time.perf_counter()
        with pytest.raises(TimeoutError, match="'slow'"):
            bus.request("slow", "first", timeout=0.2)
        assert 0.2 <= time.perf_counter() - started < 1.0
        release.set()  # the first reply now goes out, late
        # The server answers in order: the late reply reaches us before this one.
        assert bus.request("slow", "second").data == "reply to second"
        assert bus.request("slow", "third").data == "reply to third"
    stats = bus.stats().requests
    assert (stats.timed_out, stats.late, stats.answered) == (1, 1, 2)


@run_async
async def test_async_timeout_and_late_reply(bus: vbus.Bus) -> None:
    release = threading.Event()

    def handler(msg: vbus.Message) -> object:
        if msg.data == 1:
            release.wait(10.0)
        return msg.data

    with bus.serve("slow", handler):
        with pytest.raises(TimeoutError):
            await bus.async_request("slow", 1, timeout=0.1)
        release.set()
        assert (await bus.async_request("slow", 2)).data == 2
    assert bus.stats().requests.late == 1


def test_a_request_right_after_serve_returns_finds_its_server(any_bus: vbus.Bus) -> None:
    bus = any_bus
    for i in range(20):
        with bus.serve(f"fresh/{i}", lambda msg: msg.topic):
            assert bus.request(f"fresh/{i}", None).data == f"fresh/{i}"


def test_servers_on_other_buses_share_the_load(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as owner:
        clients = [vbus.connect(owner.address) for _ in range(3)]
        try:
            servers = [c.serve("work", lambda msg: None) for c in clients]
            who = [owner.request("work", i).sender for i in range(30)]
            assert {s.id: who.count(s.id) for s in servers} == {s.id: 10 for s in servers}
        finally:
            for c in clients:
                c.close()


def test_a_closed_server_gets_no_more_requests_and_answers_those_it_has(
        bus: vbus.Bus) -> None:
    entered, release = threading.Event(), threading.Event()

    def handler(msg: vbus.Message) -> int:
        entered.set()
        release.wait(10.0)
        return int(msg.data)

    server = bus.serve("s", handler)
    other = bus.serve("s", lambda msg: -1)
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(bus.request("s", 7).data))
    t.start()
    assert entered.wait(5.0)
    closer = threading.Thread(target=server.close)
    closer.start()
    release.set()
    closer.join(5.0)
    t.join(5.0)
    assert results == [7]  # the request in flight was answered
    assert all(bus.request("s", i).data == -1 for i in range(5))  # the other one only
    other.close()


def test_close_wakes_requests_in_flight_with_closed(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as server_bus:
        release = threading.Event()
        server_bus.serve("hang", lambda msg: release.wait(10.0))
        bus = vbus.connect(server_bus.address)
        errors: list[BaseException] = []
        woken: list[float] = []

        def ask() -> None:
            try:
                bus.request("hang", None, timeout=30.0)
            except BaseException as exc:
                errors.append(exc)
                woken.append(time.perf_counter())

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        # all four sent: the first is in the handler, the others queued behind it
        deadline = time.monotonic() + 5.0
        while bus.stats().requests.sent < 4 and time.monotonic() < deadline:
            time.sleep(0.001)  # sleep-ok: waiting for the test's own threads to send
        closed_at = time.perf_counter()
        bus.close(timeout=2.0)
        for t in threads:
            t.join(5.0)
        release.set()
        assert len(errors) == 4 and all(isinstance(e, vbus.Closed) for e in errors)
        assert max(woken) - closed_at < 0.1
        with pytest.raises(vbus.Closed):
            bus.request("hang", None)
        with pytest.raises(vbus.Closed):
            bus.serve("late", lambda msg: None)


@run_async
async def test_close_wakes_an_async_request(leakcheck: LeakCheck) -> None:
    bus = vbus.Bus()
    release = threading.Event()
    bus.serve("hang", lambda msg: release.wait(10.0))
    task = asyncio.ensure_future(bus.async_request("hang", None, timeout=30.0))
    while bus.stats().requests.sent < 1:
        await asyncio.sleep(0.001)  # sleep-ok: let the task send
    threading.Thread(target=bus.close, args=(0.5,)).start()
    with pytest.raises(vbus.Closed):
        await asyncio.wait_for(task, 2.0)
    release.set()
    await asyncio.get_running_loop().run_in_executor(None, bus.close)


def test_a_handler_in_flight_at_close_gets_the_close_timeout(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as requester:
        server_bus = vbus.connect(requester.address)
        entered = threading.Event()
        finished: list[bool] = []

        def handler(msg: vbus.Message) -> str:
            entered.set()
            time.sleep(0.3)  # sleep-ok: a handler at work
            finished.append(True)
            return "done"

        server_bus.serve("work", handler)
        replies: list[str] = []
        t = threading.Thread(target=lambda: replies.append(requester.request("work", 1).data))
        t.start()
        assert entered.wait(5.0)
        started = time.perf_counter()
        server_bus.close(timeout=5.0)
        took = time.perf_counter() - started
        t.join(5.0)
        assert finished == [True] and replies == ["done"]
        assert 0.1 < took < 2.0


def test_a_stuck_handler_does_not_hold_close_past_its_timeout(
        leakcheck: LeakCheck, caplog: pytest.LogCaptureFixture) -> None:
    bus = vbus.Bus()
    entered, release = threading.Event(), threading.Event()

    def handler(msg: vbus.Message) -> None:
        entered.set()
        release.wait(10.0)

    bus.serve("stuck", handler)
    t = threading.Thread(target=lambda: pytest.raises(vbus.Closed, bus.request, "stuck", 1))
    t.start()
    assert entered.wait(5.0)
    started = time.perf_counter()
    bus.close(timeout=0.5)
    assert time.perf_counter() - started < 0.9
    assert "vbus-server-stuck" in caplog.text
    release.set()
    t.join(5.0)
    bus.close()  # joins what was left


def test_close_from_inside_a_handler(leakcheck: LeakCheck) -> None:
    bus = vbus.Bus()
    other = vbus.Bus()
    closed = threading.Event()

    def handler(msg: vbus.Message) -> str:
        bus.close()
        closed.set()
        return "bye"

    bus.serve("quit", handler)
    client = vbus.connect(bus.address)
    with pytest.raises((vbus.Closed, TimeoutError, vbus.NoResponder)):
        client.request("quit", None, timeout=2.0)
    assert closed.wait(5.0)
    client.close()
    bus.close()
    other.close()


@run_async
async def test_close_from_inside_an_async_handler(leakcheck: LeakCheck) -> None:
    bus = vbus.Bus()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def handler(msg: vbus.Message) -> str:
        bus.close()
        loop.call_soon_threadsafe(done.set)
        return "bye"

    bus.serve("quit", handler)
    with pytest.raises(vbus.Closed):
        await bus.async_request("quit", None, timeout=5.0)
    await asyncio.wait_for(done.wait(), 5.0)
    await loop.run_in_executor(None, bus.close)


def test_nested_requests_from_a_handler(bus: vbus.Bus) -> None:
    bus.serve("inner", lambda msg: msg.data * 10)
    bus.serve("outer", lambda msg: bus.request("inner", msg.data).data + 1)
    assert bus.request("outer", 4).data == 41


def test_bad_input_is_refused_before_anything_is_sent(bus: vbus.Bus) -> None:
    with pytest.raises(vbus.TopicError):
        bus.request("bad//topic", 1)
    with pytest.raises(vbus.TopicError):
        bus.request("$vbus/stats", 1)
    with pytest.raises(vbus.TopicError):
        bus.serve("a/*", lambda msg: None)
    with pytest.raises(ValueError, match="timeout"):
        bus.request("t", 1, timeout=0)
    with pytest.raises(vbus.EncodeError):
        bus.request("t", object())
    with pytest.raises(TypeError, match="callable"):
        bus.serve("t", 42)  # type: ignore[call-overload]
    assert bus.stats().requests.sent == 0


def test_stats_count_both_sides(bus: vbus.Bus) -> None:
    with bus.serve("s", lambda msg: msg.data):
        for i in range(5):
            bus.request("s", i)
        stats = bus.stats().requests
        assert (stats.sent, stats.answered, stats.served, stats.servers) == (5, 5, 5, 1)
    stats = bus.stats().requests
    assert (stats.served, stats.servers) == (5, 0)  # a closed server's count stays


def test_the_brokers_stats_count_requests(bus: vbus.Bus) -> None:
    with bus.subscribe("$vbus/stats") as stats, bus.serve("s", lambda msg: None):
        bus.request("s", 1)
        with pytest.raises(vbus.NoResponder):
            bus.request("nobody", 1)
        deadline = time.monotonic() + 5.0
        while True:  # published once a second: the first one after both requests
            counts = stats.recv(timeout=3.0).data.get("requests", {})
            if counts.get("routed") == 1 and counts.get("no_responder") == 1:
                break
            assert time.monotonic() < deadline, counts
        assert counts["servers"] == 1


def test_a_server_with_a_full_queue_turns_requests_away_at_once(
        bus: vbus.Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    from vbus import _requests

    monkeypatch.setattr(_requests, "MAX_QUEUED", 2)
    entered, release = threading.Event(), threading.Event()

    def handler(msg: vbus.Message) -> object:
        if msg.data == 1:
            entered.set()
            release.wait(10.0)
        return msg.data

    with bus.serve("busy", handler):
        first = threading.Thread(target=bus.request, args=("busy", 1))
        first.start()
        assert entered.wait(5.0)

        async def three() -> list[object]:
            return await asyncio.gather(*(bus.async_request("busy", i) for i in (2, 3, 4)),
                                        return_exceptions=True)

        future = bus.submit(three())
        # the fourth is turned away while the first is still in the handler
        deadline = time.monotonic() + 5.0
        while bus.stats().requests.no_responder < 1 and time.monotonic() < deadline:
            time.sleep(0.001)  # sleep-ok: waiting for our own request's answer
        release.set()
        second, third, fourth = future.result(5.0)
        first.join(5.0)
    assert isinstance(second, vbus.Message) and isinstance(third, vbus.Message)
    assert [second.data, third.data] == [2, 3]
    assert isinstance(fourth, vbus.NoResponder) and "busy" in str(fourth)
    assert bus.stats().requests.refused == 1


def test_serve_and_request_from_a_coroutine_on_the_bus_loop(bus: vbus.Bus) -> None:
    async def handler(msg: vbus.Message) -> object:
        return msg.data

    async def on_the_loop() -> object:
        bus.serve("from/loop", handler)  # must not wait for the loop it runs on
        return (await bus.async_request("from/loop", "hi")).data

    assert bus.submit(on_the_loop()).result(5.0) == "hi"
