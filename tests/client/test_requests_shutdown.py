"""Shutdown torture with requesters and servers in flight, closed from every kind of thread;
hostile frames on the request topics; a forked child's copy of a bus.

The long version:
    VBUS_TORTURE_CYCLES=500 python -m pytest tests/client/test_requests_shutdown.py
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import vbus
from tests._support import LeakCheck
from tests._support import fds as _fds
from vbus._proto import requests as proto
from vbus._proto import wire as _wire

CYCLES = int(os.environ.get("VBUS_TORTURE_CYCLES", "60"))
SEED = int(os.environ.get("VBUS_TORTURE_SEED", "20261201"))
SERVERS = ["sync", "async", "slow_sync", "slow_async"]
REQUESTERS = ["sync", "async_own_loop", "async_bus_loop"]
CLOSERS = ["main", "worker", "sync_handler", "async_handler"]
EXPECTED = (vbus.Closed, vbus.NoResponder, TimeoutError, vbus.RemoteError)


def _ask(bus: vbus.Bus, stop: threading.Event, errors: list[BaseException]) -> None:
    i = 0
    while not stop.is_set():
        try:
            bus.request("t/work", i, timeout=2.0)
        except vbus.Closed:
            return
        except EXPECTED:
            pass
        except BaseException as exc:
            errors.append(exc)
            return
        i += 1


async def _aask(bus: vbus.Bus, stop: threading.Event, errors: list[BaseException]) -> None:
    while not stop.is_set():
        try:
            await bus.async_request("t/work", 1, timeout=2.0)
        except vbus.Closed:
            return
        except EXPECTED:
            pass
        except BaseException as exc:
            errors.append(exc)
            return


def _cycle(rng: random.Random) -> float:
    bus = vbus.Bus(bind="tcp://127.0.0.1:0" if rng.random() < 0.3 else None)
    took: concurrent.futures.Future[float] = concurrent.futures.Future()

    def close_here() -> None:
        if not took.done():
            started = time.perf_counter()
            bus.close()
            took.set_result(time.perf_counter() - started)

    closer = rng.choice(CLOSERS)
    calls = 0
    close_after = rng.randint(1, 30)

    def sync_handler(msg: vbus.Message) -> object:
        nonlocal calls
        calls += 1
        if closer == "sync_handler" and calls >= close_after:
            close_here()
        return msg.data

    async def async_handler(msg: vbus.Message) -> object:
        nonlocal calls
        calls += 1
        if closer == "async_handler" and calls >= close_after:
            close_here()
        await asyncio.sleep(0)
        return msg.data

    def slow_sync(msg: vbus.Message) -> object:
        time.sleep(0.005)  # sleep-ok: a handler at work
        return sync_handler(msg)

    async def slow_async(msg: vbus.Message) -> object:
        await asyncio.sleep(0.005)  # sleep-ok: a handler at work
        return await async_handler(msg)

    handlers = {"sync": sync_handler, "async": async_handler, "slow_sync": slow_sync,
                "slow_async": slow_async}
    kinds = rng.sample(SERVERS, k=rng.randint(1, len(SERVERS)))
    if closer == "sync_handler" and not {"sync", "slow_sync"} & set(kinds):
        kinds.append("sync")
    if closer == "async_handler" and not {"async", "slow_async"} & set(kinds):
        kinds.append("async")
    for kind in kinds:
        bus.serve("t/work", handlers[kind])
    stop = threading.Event()
    errors: list[BaseException] = []
    helpers = []
    for kind in rng.sample(REQUESTERS, k=rng.randint(1, len(REQUESTERS))):
        if kind == "sync":
            helpers.append(threading.Thread(target=_ask, args=(bus, stop, errors)))
        elif kind == "async_own_loop":
            helpers.append(threading.Thread(target=asyncio.run,
                                            args=(_aask(bus, stop, errors),)))
        else:
            bus.submit(_aask(bus, stop, errors))
    for t in helpers:
        t.start()
    if closer == "main":
        close_here()
    elif closer == "worker":
        threading.Thread(target=close_here).start()
    seconds = took.result(timeout=5.0)
    stop.set()
    for t in helpers:
        t.join(5.0)
        assert not t.is_alive(), f"{t.name} did not end after close ({kinds}, {closer})"
    bus.close()
    assert not errors, errors
    return seconds


def test_request_shutdown_torture(leakcheck: LeakCheck) -> None:
    rng = random.Random(SEED)
    threads_before = threading.active_count()
    fds_before = len(_fds())
    times = []
    for cycle in range(CYCLES):
        seconds = _cycle(rng)
        times.append(seconds)
        assert seconds < 1.0, f"cycle {cycle}: close() took {seconds:.3f} s"
        deadline = time.monotonic() + 2.0
        while threading.active_count() > threads_before and time.monotonic() < deadline:
            time.sleep(0.001)  # sleep-ok: a handler-closed bus's last thread is finishing
        assert threading.active_count() == threads_before, f"cycle {cycle}: threads leaked"
        assert len(_fds()) == fds_before, f"cycle {cycle}: file descriptors leaked"
    print(f"\nrequest torture: {CYCLES} cycles (seed {SEED}), close() median "
          f"{1000 * statistics.median(times):.1f} ms, slowest {1000 * max(times):.1f} ms")


def test_hostile_frames_on_request_topics_harm_nobody(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as broker, vbus.connect(broker.address) as client:
        server = broker.serve("dev/x", lambda msg: msg.data)
        assert client.request("dev/x", 1).data == 1
        agent_id = next(iter(_agents_of(client)))
        pub = client.publisher()
        good, _ = _wire.build_frames(proto.request_prefix("dev/x"), 0, bytes(8), 1, 0.0,
                                     _wire.Payload(_wire.KIND_MSGPACK, b"\xc0"))
        junk = [
            b"$vbus/req/dev/x\0garbage",
            b"$vbus/req/\0" + good[len(b"$vbus/req/dev/x\0"):],
            proto.serve_prefix(server.id) + b"\x01\x00",  # to the server, not a message
            proto.reply_prefix(agent_id, "ok") + good[len(b"$vbus/req/dev/x\0"):],  # id 1:
            proto.reply_prefix(agent_id, "ok")[:-1] + b"x" + b"\0",  # late; unknown status
            proto.reply_prefix(agent_id, "error") + b"\x01\x00\x00\x00" + bytes(24) + b"\xc1",
        ]
        for frame in junk:
            pub._publish_frames(frame)
        # A forged reply for the next id, with a status nobody knows, is dropped too.
        forged, _ = _wire.build_frames(proto.reply_prefix(agent_id, "weird"), 0, bytes(8),
                                       2, 0.0, _wire.Payload(_wire.KIND_MSGPACK, b"\x01"))
        pub._publish_frames(forged)
        # The broker and both agents go on; the marker request is answered by the server.
        assert client.request("dev/x", "marker").data == "marker"
        assert broker.request("dev/x", "again").data == "again"
        assert client.stats().requests.late >= 1


def _agents_of(bus: vbus.Bus) -> list[str]:
    from vbus import _requests

    agent = _requests._AGENTS.get(bus._core)
    assert agent is not None
    return [agent.id]


FORK_CHILD = textwrap.dedent(
    """
    import os, sys, vbus
    bus = vbus.Bus()
    server = bus.serve("f", lambda msg: msg.data)
    assert bus.request("f", 1).data == 1
    pid = os.fork()
    if pid == 0:
        try:
            bus.request("f", 2, timeout=1.0)
            os._exit(3)
        except vbus.Closed:
            os._exit(0)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert bus.request("f", 3).data == 3  # the parent's bus is unharmed
    bus.close()
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_a_forked_childs_copy_of_a_bus_refuses_requests() -> None:
    done = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True,
                          timeout=30.0)
    assert done.returncode == 0, done.stderr


CTRL_C_CHILD = textwrap.dedent(
    """
    import os, signal, threading, time, vbus
    bus = vbus.Bus()
    release = threading.Event()
    bus.serve("slow", lambda msg: release.wait(10.0))
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    try:
        bus.request("slow", None, timeout=10.0)
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - started:.3f}", flush=True)
    release.set()
    bus.close()
    print("late", bus.stats().requests.late, "threads", threading.active_count(), flush=True)
    """
)


def test_ctrl_c_interrupts_a_request_in_the_main_thread() -> None:
    done = subprocess.run([sys.executable, "-c", CTRL_C_CHILD], capture_output=True,
                          text=True, timeout=30.0)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("interrupted after ")
    assert float(first.split()[-1]) < 0.3 + 0.1
    assert second.endswith("threads 1")
