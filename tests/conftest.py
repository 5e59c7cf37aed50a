"""Shared fixtures: every test that makes a bus checks that close() left nothing behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

import vbus


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(scope="session", autouse=True)
def _pyzmq_warmup() -> None:
    """pyzmq starts one process-wide garbage-collector thread (and context) on its first
    zero-copy send; start it up front so it is not mistaken for a leak of the first test."""
    zmq.Frame(bytearray(zmq.COPY_THRESHOLD * 2), copy=False)
    import asyncio

    asyncio.run(asyncio.sleep(0))


class LeakCheck:
    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.fds = _fds()

    def assert_clean(self, grace: float = 2.0) -> None:
        # Threads that a close() from inside a callback let finish on their own get a grace
        # period to end; joining them is what a second close() would do.
        deadline = time.monotonic() + grace
        for thread in self._new_threads():
            thread.join(max(deadline - time.monotonic(), 0.0))
        left = [t.name for t in self._new_threads()]
        assert not left, f"threads left behind: {left}"
        leaked = _fds() - self.fds
        described = {fd: _describe(fd) for fd in leaked}
        assert not leaked, f"file descriptors left behind: {described}"


    def _new_threads(self) -> list[threading.Thread]:
        # Threads Python did not start (Qt's own, say) show up as dummies: not ours to join.
        return [t for t in set(threading.enumerate()) - self.threads
                if not isinstance(t, threading._DummyThread)]


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def leakcheck() -> Iterator[LeakCheck]:
    check = LeakCheck()
    yield check
    check.assert_clean()


@pytest.fixture
def bus(leakcheck: LeakCheck) -> Iterator[vbus.Bus]:
    b = vbus.Bus()
    yield b
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 1.0


@pytest.fixture(params=["inproc", "ipc", "tcp"])
def any_bus(request: pytest.FixtureRequest, leakcheck: LeakCheck,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[vbus.Bus]:
    """A bus reached over each transport: its own embedded broker, or a client of it."""
    # Room for the floods some tests make: a publisher that outruns the broker drops (and
    # counts) what does not fit, which those tests do not want.
    hwm = 10_000
    if request.param == "inproc":
        owner = vbus.Bus(hwm=hwm)
        client = owner
    elif request.param == "ipc":
        path = tmp_path_factory.mktemp("ipc") / "bus"
        owner = vbus.Bus(bind=f"ipc://{path}", hwm=hwm)
        client = vbus.connect(owner.address, hwm=hwm)
    else:
        owner = vbus.Bus(bind="tcp://127.0.0.1:0", hwm=hwm)
        client = vbus.connect(owner.address, hwm=hwm)
    yield client
    client.close()
    owner.close()
