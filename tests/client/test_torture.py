"""Shutdown torture: randomized buses with traffic in flight, closed from every kind of thread.

The normal suite runs a short version; the long one is on demand:
    VBUS_TORTURE_CYCLES=1000 python -m pytest tests/client/test_torture.py -s -o timeout=900
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import statistics
import threading
import time

import vbus
from tests._support import LeakCheck
from tests._support import fds as _fds

CYCLES = int(os.environ.get("VBUS_TORTURE_CYCLES", "150"))
SEED = int(os.environ.get("VBUS_TORTURE_SEED", "20261126"))
KINDS = ["sync", "async", "sync_callback", "async_callback", "submitted"]
CLOSERS = ["main", "worker", "sync_callback", "async_callback"]


def _flood(pub: vbus.Publisher, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        try:
            pub.publish("t/flood", i)
        except vbus.Closed:
            return
        i += 1


def _read(sub: vbus.Subscriber) -> None:
    for _ in sub:
        pass


async def _aread(asub: vbus.AsyncSubscriber) -> None:
    async for _ in asub:
        pass


def _cycle(rng: random.Random) -> tuple[float, dict[str, int]]:
    bus = vbus.Bus(bind="tcp://127.0.0.1:0" if rng.random() < 0.3 else None)
    helpers: list[threading.Thread] = []
    kinds = rng.sample(KINDS, k=rng.randint(1, len(KINDS)))
    for kind in kinds:
        if kind == "sync":
            helpers.append(threading.Thread(target=_read, args=(bus.subscribe("t/**"),)))
        elif kind == "async":
            asub = bus.async_subscribe("t/*")
            helpers.append(threading.Thread(target=asyncio.run, args=(_aread(asub),)))
        elif kind == "sync_callback":
            bus.on("t/flood", lambda msg: None)
        elif kind == "async_callback":
            bus.on("t/**", _noop)
        else:
            bus.submit(_aread(bus.async_subscribe("t/flood")))
    stop = threading.Event()
    helpers.append(threading.Thread(target=_flood, args=(bus.publisher(), stop)))
    for t in helpers:
        t.start()
    took: concurrent.futures.Future[float] = concurrent.futures.Future()

    def close_here(msg: object = None) -> None:
        if not took.done():
            started = time.perf_counter()
            bus.close()
            took.set_result(time.perf_counter() - started)

    async def close_async(msg: object) -> None:
        close_here()

    closer = rng.choice(CLOSERS)
    if closer == "main":
        close_here()
    elif closer == "worker":
        threading.Thread(target=close_here).start()
    elif closer == "sync_callback":
        bus.on("t/flood", close_here)
    else:
        bus.on("t/flood", close_async)
    seconds = took.result(timeout=5.0)
    stop.set()
    for t in helpers:
        t.join(5.0)
        assert not t.is_alive(), f"{t.name} did not end after close ({kinds}, {closer})"
    bus.close()  # idempotent; joins what a callback could not join itself
    return seconds, {"kinds": len(kinds)}


async def _noop(msg: vbus.Message) -> None:
    pass


def test_shutdown_torture(leakcheck: LeakCheck) -> None:
    rng = random.Random(SEED)
    threads_before = threading.active_count()
    fds_before = len(_fds())
    times = []
    for cycle in range(CYCLES):
        seconds, _ = _cycle(rng)
        times.append(seconds)
        assert seconds < 1.0, f"cycle {cycle}: close() took {seconds:.3f} s"
        deadline = time.monotonic() + 2.0
        while threading.active_count() > threads_before and time.monotonic() < deadline:
            time.sleep(0.001)  # sleep-ok: a callback-closed bus's last thread is finishing
        assert threading.active_count() == threads_before, f"cycle {cycle}: threads leaked"
        assert len(_fds()) == fds_before, f"cycle {cycle}: file descriptors leaked"
    print(
        f"\ntorture: {CYCLES} cycles (seed {SEED}), close() median "
        f"{1000 * statistics.median(times):.1f} ms, slowest {1000 * max(times):.1f} ms"
    )
