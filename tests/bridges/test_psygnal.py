"""vbus.psygnal: devices' psygnal signals published, and bus messages as a psygnal signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import vbus

pytest.importorskip("psygnal")

import psygnal  # noqa: E402
from psygnal import EmitLoopError, Signal  # noqa: E402

from vbus.psygnal import Relay, forward  # noqa: E402

pytestmark = pytest.mark.timeout(30)

# Bus options of these tests: the defaults (batches keep order across topics, and a value
# holding an array leaves the batching fast path by itself).
BUS_OPTIONS: dict[str, Any] = {}


@pytest.fixture
def bus(leakcheck: Any) -> Iterator[vbus.Bus]:
    b = vbus.Bus(**BUS_OPTIONS)
    yield b
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 1.0


class Stage:
    sigPosition = Signal(float)
    sigMoved = Signal(float, str)
    sigStopped = Signal()
    sigFrame = Signal(object, dict)
    sigAnything = Signal(object)


def test_one_argument_as_itself_several_as_a_list_none_as_none(bus: vbus.Bus) -> None:
    stage = Stage()
    sub = bus.subscribe("stage/*")
    forward(bus, stage.sigPosition, "stage/position")
    forward(bus, stage.sigMoved, "stage/moved")
    forward(bus, stage.sigStopped, "stage/stopped")
    forward(bus, stage.sigAnything, "stage/scaled", convert=lambda v: v * 10)
    stage.sigPosition.emit(1.5)
    stage.sigMoved.emit(2.5, "mm")
    stage.sigStopped.emit()
    stage.sigAnything.emit(4)
    got = [(m.topic, m.data) for m in (sub.recv(2.0) for _ in range(4))]
    assert got == [  # one publisher for all: emission order across topics
        ("stage/position", 1.5),
        ("stage/moved", [2.5, "mm"]),
        ("stage/stopped", None),
        ("stage/scaled", 40),
    ]


def test_close_stops_forwarding(bus: vbus.Bus) -> None:
    stage = Stage()
    sub = bus.subscribe("stage/*")
    handle = forward(bus, stage.sigPosition, "stage/position")
    marker = forward(bus, stage.sigMoved, "stage/marker")
    stage.sigPosition.emit(1.0)
    handle.close()
    handle.close()  # idempotent
    assert handle.closed
    stage.sigPosition.emit(2.0)  # not published
    stage.sigMoved.emit(0.0, "marker")  # same publisher: would come after 2.0
    assert [sub.recv(2.0).data for _ in range(2)] == [1.0, [0.0, "marker"]]
    marker.close()


def test_unencodable_arguments_name_the_signal_at_the_emit_site(bus: vbus.Bus) -> None:
    stage = Stage()
    forward(bus, stage.sigAnything, "stage/any")
    with pytest.raises(EmitLoopError) as raised:
        stage.sigAnything.emit(object())
    cause = raised.value.__cause__
    assert isinstance(cause, vbus.EncodeError)
    assert "Stage.sigAnything(object) cannot be published on 'stage/any'" in str(cause)
    assert "sigAnything" in str(raised.value)  # psygnal's own message names it too


def test_bad_arguments_to_forward(bus: vbus.Bus) -> None:
    stage = Stage()
    with pytest.raises(vbus.TopicError):
        forward(bus, stage.sigPosition, "stage/")
    with pytest.raises(TypeError, match="SignalInstance"):
        forward(bus, Stage.sigPosition, "stage/x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AsyncPublisher"):
        forward(bus.async_publisher(), stage.sigPosition, "stage/x")  # type: ignore[arg-type]


def test_emissions_after_the_bus_closed_are_ignored(leakcheck: Any) -> None:
    stage = Stage()
    bus = vbus.Bus()
    forward(bus, stage.sigPosition, "stage/position")
    bus.close()
    stage.sigPosition.emit(1.0)  # no error: nothing to forward to


def test_forward_to_a_given_publisher(bus: vbus.Bus) -> None:
    stage = Stage()
    pub = bus.publisher()
    sub = bus.subscribe("stage/position")
    forward(pub, stage.sigPosition, "stage/position", retain=True)
    stage.sigPosition.emit(3.0)
    msg = sub.recv(2.0)
    assert (msg.data, msg.sender) == (3.0, pub.id)
    late = bus.subscribe("stage/position")
    assert late.recv(2.0).retained


def test_arrays_in_emissions(bus: vbus.Bus) -> None:
    stage = Stage()
    sub = bus.subscribe("camera/frame")
    forward(bus, stage.sigFrame, "camera/frame")
    frame = np.arange(512 * 256, dtype=np.uint16).reshape(512, 256)  # 256 KiB
    stage.sigFrame.emit(frame, {"exposure": 0.01})
    data = sub.recv(2.0).data
    assert data[1] == {"exposure": 0.01}
    assert data[0].dtype == np.uint16 and data[0].shape == (512, 256)
    assert np.array_equal(data[0], frame)
    assert np.shares_memory(data[0], frame)  # in process, 64 KiB and more: zero-copy


# -- Relay ---------------------------------------------------------------------------------------
def test_relay_is_active_when_it_returns_and_keeps_order(bus: vbus.Bus) -> None:
    relay = Relay(bus, "stage/*")
    got: list[tuple[str, Any]] = []
    threads: set[str] = set()
    done = threading.Event()

    def slot(msg: vbus.Message) -> None:
        got.append((msg.topic, msg.data))
        threads.add(threading.current_thread().name)
        if msg.data == "end":
            done.set()

    relay.received.connect(slot)
    pub = bus.publisher()
    for i in range(200):
        pub.publish("stage/x" if i % 2 else "stage/y", i)
    pub.publish("stage/x", "end")
    assert done.wait(5.0)
    assert [d for _, d in got] == [*range(200), "end"]
    assert len(threads) == 1 and next(iter(threads)).startswith("vbus-loop-")  # the bus's loop
    relay.close()
    assert relay.closed


def test_relay_on_a_thread_the_user_names(bus: vbus.Bus) -> None:
    relay = Relay(bus, "stage/*", thread="current")
    seen: list[tuple[Any, int]] = []
    relay.received.connect(lambda msg: seen.append((msg.data, threading.get_ident())))
    pub = bus.publisher()
    pub.publish("stage/x", 1)
    pub.publish("stage/x", 2)
    deadline = time.monotonic() + 5.0
    while len(seen) < 2 and time.monotonic() < deadline:
        # this thread's own event loop, as a Qt timer or an app's main loop would run it
        psygnal.emit_queued()
        threading.Event().wait(0.005)
    assert seen == [(1, threading.get_ident()), (2, threading.get_ident())]
    relay.close()


def test_relay_close_from_its_own_slot_and_from_another_thread(bus: vbus.Bus) -> None:
    first = Relay(bus, "a/*")
    got: list[Any] = []
    closed_itself = threading.Event()

    def close_on_first(msg: vbus.Message) -> None:
        got.append(msg.data)
        first.close()
        closed_itself.set()

    first.received.connect(close_on_first)
    marker = Relay(bus, "a/*")
    marked = threading.Event()
    marker.received.connect(lambda msg: marked.set() if msg.data == "marker" else None)
    pub = bus.publisher()
    pub.publish("a/b", 1)
    pub.publish("a/b", 2)
    pub.publish("a/b", "marker")
    assert closed_itself.wait(5.0) and marked.wait(5.0)
    assert first.closed
    assert got == [1]  # nothing after close(), though 2 and the marker reached the marker relay
    started = time.monotonic()
    closer = threading.Thread(target=marker.close)
    closer.start()
    closer.join(2.0)
    assert not closer.is_alive() and time.monotonic() - started < 1.0
    assert marker.closed


def test_a_slot_that_raises_is_logged_and_delivery_goes_on(
    bus: vbus.Bus, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay(bus, "a/*")
    got: list[Any] = []
    done = threading.Event()

    def slot(msg: vbus.Message) -> None:
        if msg.data == 1:
            raise ValueError("bad slot")
        got.append(msg.data)
        done.set()

    relay.received.connect(slot)
    pub = bus.publisher()
    pub.publish("a/b", 1)
    pub.publish("a/b", 2)
    assert done.wait(5.0)
    assert got == [2] and relay.errors == 1
    assert "bad slot" in caplog.text
    relay.close()


def test_bus_close_stops_the_relay(leakcheck: Any) -> None:
    bus = vbus.Bus()
    relay = Relay(bus, "a/*")
    bus.close()
    assert relay.closed  # close() cancelled it and joined the loop
    relay.close()  # after the bus: harmless


def test_bad_pattern_and_closed_bus(bus: vbus.Bus) -> None:
    with pytest.raises(vbus.TopicError):
        Relay(bus, "a/**/")
    closed = vbus.Bus()
    closed.close()
    with pytest.raises(vbus.Closed):
        Relay(closed, "a/*")


DEVICE = textwrap.dedent("""
    # A device in another process: its psygnal signal forwarded to the bus at ADDRESS.
    import sys
    from psygnal import Signal
    import vbus
    from vbus.psygnal import forward

    class Stage:
        sigPosition = Signal(float, str)

    stage = Stage()
    with vbus.connect(sys.argv[1]) as bus:
        forward(bus, stage.sigPosition, "stage/position")
        for i in range(100):
            stage.sigPosition.emit(i / 10, "mm")
""")


def test_signals_across_processes(leakcheck: Any) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        relay = Relay(bus, "stage/*")
        got: list[Any] = []
        done = threading.Event()

        def slot(msg: vbus.Message) -> None:
            got.append(msg.data)
            if len(got) == 100:
                done.set()

        relay.received.connect(slot)
        child = subprocess.run([sys.executable, "-c", DEVICE, bus.address], timeout=20,
                               capture_output=True, text=True)
        assert child.returncode == 0, child.stderr
        assert done.wait(5.0)
        assert got == [[i / 10, "mm"] for i in range(100)]
        relay.close()
