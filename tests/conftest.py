"""Shared fixtures: every test that makes a bus checks that close() left nothing behind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

import vbus
from tests._support import LeakCheck


@pytest.fixture(scope="session", autouse=True)
def _pyzmq_warmup() -> None:
    """pyzmq starts one process-wide garbage-collector thread (and context) on its first
    zero-copy send; start it up front so it is not mistaken for a leak of the first test."""
    zmq.Frame(bytearray(zmq.COPY_THRESHOLD * 2), copy=False)
    import asyncio

    asyncio.run(asyncio.sleep(0))


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
