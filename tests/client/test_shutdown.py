"""Shutdown: close() returns in time from every kind of thread and leaves nothing behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import vbus
from tests._support import LeakCheck


def _timed_close(bus: vbus.Bus, timeout: float = 5.0) -> float:
    started = time.perf_counter()
    bus.close(timeout)
    return time.perf_counter() - started


def test_motivating_scenario_async_subscribers_on_background_loop(leakcheck: LeakCheck) -> None:
    """Sync code, async subscribers running on the background loop, then close: < 1 s."""
    bus = vbus.Bus()
    received: list[int] = []
    ready = threading.Event()

    @bus.on("sensor/**")
    async def on_sensor(msg: vbus.Message) -> None:
        received.append(msg.data)
        if len(received) == 10:
            ready.set()

    async def consumer() -> None:
        async for _ in bus.async_subscribe("sensor/**"):
            pass

    pending = bus.submit(consumer())
    pub = bus.publisher()
    for i in range(10):
        pub.publish("sensor/t", i)
    assert ready.wait(2.0)
    assert _timed_close(bus) < 1.0
    assert received == list(range(10))
    assert pending.done()


@pytest.mark.parametrize("where", ["main", "worker", "sync_callback", "async_callback"])
def test_close_from_every_kind_of_thread(leakcheck: LeakCheck, where: str) -> None:
    bus = vbus.Bus()
    sub = bus.subscribe("**")
    asub = bus.async_subscribe("**")
    pending = bus.submit(_drain(asub))
    took: concurrent.futures.Future[float] = concurrent.futures.Future()

    def close_here() -> None:
        took.set_result(_timed_close(bus))

    if where == "main":
        close_here()
    elif where == "worker":
        threading.Thread(target=close_here).start()
    elif where == "sync_callback":
        bus.on("go", lambda msg: close_here())
    else:

        @bus.on("go")
        async def closer(msg: vbus.Message) -> None:
            close_here()

    if where.endswith("callback"):
        bus.publisher().publish("go", 1)
    assert took.result(timeout=3.0) < 1.0
    with pytest.raises(vbus.Closed):
        sub.recv(timeout=1.0)
    assert bus.closed
    bus.close()  # idempotent, and joins what a callback could not join itself
    assert pending.done()


async def _drain(asub: vbus.AsyncSubscriber) -> None:
    async for _ in asub:
        pass


def test_close_wakes_recv_in_another_thread_within_100ms(leakcheck: LeakCheck) -> None:
    bus = vbus.Bus()
    sub = bus.subscribe("nothing/comes")
    woke: concurrent.futures.Future[tuple[type, float]] = concurrent.futures.Future()
    entered = threading.Event()

    def waiter() -> None:
        entered.set()
        try:
            sub.recv(timeout=30.0)
        except BaseException as exc:
            woke.set_result((type(exc), time.perf_counter()))

    t = threading.Thread(target=waiter)
    t.start()
    assert entered.wait(2.0)
    _wait_until_receiving(sub)
    closed_at = time.perf_counter()
    bus.close()
    kind, at = woke.result(timeout=2.0)
    t.join(2.0)
    assert kind is vbus.Closed
    assert at - closed_at < 0.1


def _wait_until_receiving(sub: vbus.Subscriber | vbus.AsyncSubscriber) -> None:
    # recv() marks itself as the receiver under the lock before it waits; make sure the
    # close() in the test races with a recv() that is really inside poll.
    deadline = time.monotonic() + 2.0
    while sub._receiver is None:  # noqa: SLF001 - white-box readiness of the test itself
        assert time.monotonic() < deadline
        time.sleep(0.001)  # sleep-ok: waiting for the other thread to enter recv(), not a message


def test_close_wakes_async_recv_on_a_foreign_loop(leakcheck: LeakCheck) -> None:
    bus = vbus.Bus()
    result: concurrent.futures.Future[type] = concurrent.futures.Future()
    asub = bus.async_subscribe("nothing")

    async def main() -> None:
        try:
            await asub.recv(timeout=30.0)
        except BaseException as exc:
            result.set_result(type(exc))

    t = threading.Thread(target=asyncio.run, args=(main(),))
    t.start()
    _wait_until_receiving(asub)
    started = time.perf_counter()
    bus.close()
    assert result.result(timeout=2.0) is vbus.Closed
    assert time.perf_counter() - started < 0.5
    t.join(2.0)


def test_closing_one_subscriber_from_another_task_on_the_same_loop(leakcheck: LeakCheck) -> None:
    with vbus.Bus() as bus:

        async def main() -> type:
            asub = bus.async_subscribe("x")
            waiting = asyncio.ensure_future(asub.recv(timeout=30.0))
            while asub._receiver is None:  # noqa: SLF001
                await asyncio.sleep(0)
            asub.close()
            assert asub.closed
            try:
                await waiting
            except vbus.Closed as exc:
                return type(exc)
            return type(None)

        assert asyncio.run(main()) is vbus.Closed


def test_use_after_close_raises_closed(leakcheck: LeakCheck) -> None:
    bus = vbus.Bus()
    pub = bus.publisher()
    sub = bus.subscribe("a")
    bus.close()
    for call in (
        lambda: pub.publish("a", 1),
        lambda: sub.recv(timeout=0.1),
        bus.publisher,
        lambda: bus.subscribe("a"),
        lambda: bus.on("a", print),
        lambda: bus.submit(asyncio.sleep(0)),
    ):
        with pytest.raises(vbus.Closed):
            call()
    assert list(sub) == []


def test_two_hundred_cycles_leave_nothing_behind(leakcheck: LeakCheck) -> None:
    slowest = 0.0
    for i in range(200):
        bus = vbus.Bus()
        got = threading.Event()
        sub = bus.subscribe("c/*")
        asub = bus.async_subscribe("c/*")
        def on_x(msg: vbus.Message, got: threading.Event = got) -> None:
            got.set()

        bus.on("c/x", on_x)

        @bus.on("c/*")
        async def on_c(msg: vbus.Message) -> None:
            pass

        pending = bus.submit(_drain(asub))
        pub = bus.publisher() if i % 2 else bus.async_publisher()
        if isinstance(pub, vbus.AsyncPublisher):
            asyncio.run(pub.publish("c/x", i))
        else:
            pub.publish("c/x", i)
        assert sub.recv(timeout=2.0).data == i
        assert got.wait(2.0)
        slowest = max(slowest, _timed_close(bus))
        assert pending.done()
    assert slowest < 1.0


def test_stuck_callback_is_named_and_close_still_returns(
    leakcheck: LeakCheck, caplog: pytest.LogCaptureFixture
) -> None:
    bus = vbus.Bus()
    release = threading.Event()
    entered = threading.Event()

    def stuck(msg: vbus.Message) -> None:
        entered.set()
        release.wait(10.0)

    bus.on("stuck", stuck)
    bus.publisher().publish("stuck", 1)
    assert entered.wait(2.0)
    with caplog.at_level(logging.WARNING, logger="vbus"):
        took = _timed_close(bus, timeout=0.3)
    assert took < 0.6
    assert "vbus-callback-stuck" in caplog.text
    release.set()
    bus.close()  # joins the callback thread now that it is free


def _run_script(code: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout,
    )


def test_program_that_forgets_close_exits_promptly() -> None:
    started = time.monotonic()
    done = _run_script(
        """
        import asyncio, vbus
        bus = vbus.Bus(bind="tcp://127.0.0.1:0")
        sub = bus.subscribe("a")
        @bus.on("a")
        async def cb(msg): pass
        bus.on("b", print)
        bus.submit(asyncio.sleep(3600))  # sleep-ok: only the exit may end it
        bus.publisher().publish("a", 1)
        print("ok", sub.recv(timeout=5).data)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok 1"
    assert time.monotonic() - started < 10.0


def test_ctrl_c_interrupts_a_blocking_recv() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import signal, vbus
            # A child of a background job inherits SIGINT ignored: Ctrl-C must be live here.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            bus = vbus.Bus()
            @bus.on("x")
            async def cb(msg): pass
            sub = bus.subscribe("never")
            try:
                print("waiting", flush=True)  # inside the try: SIGINT may come at once
                sub.recv()
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            bus.close()
            """
        )],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(__import__("signal").SIGINT)
        out, err = proc.communicate(timeout=5.0)
    finally:
        proc.kill()
        proc.wait()
    assert "interrupted" in out, err
    assert proc.returncode == 0, err
