"""Threads sharing one Publisher: a lane (socket and outbox) per publishing thread.

Each thread's messages keep their order across its topics and carry one sender id, the
lane's; lanes are made on a thread's first publish, reused once their thread has ended,
bounded by MAX_LANES, and closed by the publisher's close().
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

import vbus
from vbus import _publisher

TOPICS = ("lane/a", "lane/b/c", "lane/d")
END = "lane/end"


def _publish_runs(pub: vbus.Publisher, index: int, count: int) -> None:
    """``count`` messages over TOPICS in runs of varying length (batches of each topic, and
    the switches between them), then the thread's end marker."""
    topic = 0
    for i in range(count):
        if i % (7 + index) == 0:
            topic = (topic + 1) % len(TOPICS)
        pub.publish(TOPICS[topic], [index, i])
    pub.publish(END, index)


def _threads(count: int, target: Callable[[int], Any]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
        assert not t.is_alive()


Collected = tuple[dict[int, list[int]], dict[int, set[str]]]


def _collect(sub: vbus.Subscriber, markers: int) -> Collected:
    """Until ``markers`` end markers: each thread's counters, and the senders they carried.
    A thread's end marker follows all of its messages (order across its topics)."""
    values: dict[int, list[int]] = {}
    senders: dict[int, set[str]] = {}
    seen = 0
    while seen < markers:
        msg = sub.recv(timeout=10.0)
        if msg.topic == END:
            senders.setdefault(msg.data, set()).add(msg.sender)
            seen += 1
            continue
        index, i = msg.data
        values.setdefault(index, []).append(i)
        senders.setdefault(index, set()).add(msg.sender)
    return values, senders


@pytest.mark.timeout(60)
def test_each_thread_gets_a_lane_and_keeps_its_order_across_topics(any_bus: vbus.Bus) -> None:
    bus = any_bus
    sub = bus.subscribe("lane/**", hwm=100_000)
    pub = bus.publisher()
    threads, count = 4, 3000
    barrier = threading.Barrier(threads)
    got: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: got.update(result=_collect(sub, threads)))
    reader.start()

    def work(index: int) -> None:
        barrier.wait(10.0)  # all four alive at once: four lanes
        _publish_runs(pub, index, count)

    _threads(threads, work)
    reader.join(30.0)
    assert not reader.is_alive()
    values, senders = got["result"]
    assert sub.stats().dropped == 0
    for index in range(threads):
        assert values[index] == list(range(count)), f"thread {index}: order or loss"
        assert len(senders[index]) == 1, f"thread {index} came through several senders"
    lanes = {next(iter(s)) for s in senders.values()}
    assert len(lanes) == threads  # one sender id a thread ...
    assert lanes == set(pub.senders)  # ... each of them one of the publisher's
    assert pub.id in lanes
    stats = pub.stats()
    assert (stats.published, stats.dropped) == (threads * (count + 1), 0)
    assert stats.sender == pub.id
    assert bus.stats().publishers == 1  # lanes are part of their publisher
    pub.close()
    sub.close()


@pytest.mark.timeout(30)
def test_a_lane_of_a_thread_that_ended_is_reused(bus: vbus.Bus) -> None:
    sub = bus.subscribe("lane/**")
    pub = bus.publisher()
    for index in range(3):  # one after the other: each finds the last one's lane free

        def run(_thread: int, index: int = index) -> None:
            _publish_runs(pub, index, 50)

        _threads(1, run)
    values, senders = _collect(sub, 3)
    assert pub.senders == (pub.id,)
    assert all(s == {pub.id} for s in senders.values())
    assert all(values[i] == list(range(50)) for i in range(3))
    pub.close()
    sub.close()


@pytest.mark.timeout(30)
def test_lanes_are_bounded_and_threads_past_the_bound_share_them(
    bus: vbus.Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_publisher, "MAX_LANES", 3)
    sub = bus.subscribe("lane/**", hwm=100_000)
    pub = bus.publisher()
    threads = 5
    barrier = threading.Barrier(threads)

    def work(index: int) -> None:
        barrier.wait(10.0)
        _publish_runs(pub, index, 500)

    _threads(threads, work)
    values, senders = _collect(sub, threads)
    assert len(pub.senders) == 3
    assert set().union(*senders.values()) == set(pub.senders)
    for index in range(threads):  # a shared lane keeps each thread's order too
        assert values[index] == list(range(500))
        assert len(senders[index]) == 1
    pub.close()
    sub.close()


@pytest.mark.timeout(30)
def test_close_closes_every_lane(bus: vbus.Bus) -> None:
    """Lanes' sockets are closed by the publisher's close() (the leakcheck fixture checks
    that no fd is left); a thread with a lane, and a new thread, then get Closed."""
    pub = bus.publisher()
    errors: list[BaseException] = []
    lane_made = threading.Event()
    go_on = threading.Event()

    def worker() -> None:
        pub.publish("lane/a", 1)
        lane_made.set()
        go_on.wait(10.0)
        try:
            pub.publish("lane/a", 2)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    pub.publish("lane/a", 0)  # this thread has the publisher's own socket
    t = threading.Thread(target=worker)
    t.start()
    assert lane_made.wait(10.0)
    assert len(pub.senders) == 2
    pub.close()
    assert pub.closed
    go_on.set()
    t.join(10.0)
    assert len(errors) == 1 and isinstance(errors[0], vbus.Closed)

    def late() -> None:
        try:
            pub.publish("lane/a", 3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    _threads(1, lambda _i: late())
    assert len(errors) == 2 and isinstance(errors[1], vbus.Closed)
    with pytest.raises(vbus.Closed):
        pub.publish("lane/a", 4)


@pytest.mark.timeout(30)
def test_bus_close_closes_lanes_of_a_publisher_left_open(leakcheck: object) -> None:
    bus = vbus.Bus()
    pub = bus.publisher()
    pub.publish("lane/a", 0)
    _threads(3, lambda i: pub.publish("lane/a", i))
    assert len(pub.senders) >= 2  # this thread has the publisher's socket: 1-3 lanes more
    bus.close()
    assert pub.closed


@pytest.mark.timeout(30)
def test_threads_alive_together_never_share_a_lane_whatever_their_idents(bus: vbus.Bus) -> None:
    """A new thread often gets the ident of one that ended (the C library reuses them): it
    must not inherit that thread's lane while another live thread is given the same one."""
    sub = bus.subscribe("lane/**", hwm=100_000)
    pub = bus.publisher()
    for round_ in range(20):
        _threads(1, lambda _i: pub.publish("lane/a", -1))  # its lane is free once it ends
        barrier = threading.Barrier(2)

        def work(index: int, round_: int = round_, barrier: threading.Barrier = barrier) -> None:
            pub.publish("lane/a", -1)  # its lane: taken while the other thread is alive too
            barrier.wait(10.0)
            _publish_runs(pub, round_ * 10 + index, 20)

        _threads(2, work)
    senders: dict[int, set[str]] = {}
    seen = 0
    while seen < 40:
        msg = sub.recv(timeout=10.0)
        if msg.topic == END:
            seen += 1
        if msg.topic == END or msg.data == -1:
            continue
        senders.setdefault(msg.data[0], set()).add(msg.sender)
    for round_ in range(20):
        first, second = senders[round_ * 10], senders[round_ * 10 + 1]
        assert len(first) == len(second) == 1
        assert first != second, f"round {round_}: two live threads on one lane"


FORK_CHILD = r"""
import os, sys, threading, time, warnings
import vbus

warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
bus = vbus.Bus()
pub = bus.publisher()
pub.publish("lane/a", 0)  # this thread's lane: the publisher's own socket
pub._lanes_lock.acquire()  # as if another thread were making its lane at the fork
pid = os.fork()
if pid == 0:
    outcome = []
    def new_thread():
        try:
            pub.publish("lane/a", 1)  # a thread without a lane: it would need that lock
            outcome.append("published")
        except vbus.Closed:
            outcome.append("closed")
    t = threading.Thread(target=new_thread, daemon=True)
    t.start()
    t.join(5.0)
    pub.close()  # must not wait for the lock either
    os._exit(0 if outcome == ["closed"] else 3 if not outcome else 4)
pub._lanes_lock.release()
end = time.monotonic() + 10.0
while time.monotonic() < end:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.01)  # sleep-ok: a child's exit, polled with WNOHANG under a deadline
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("HANG")
    sys.exit(1)
bus.close()
code = os.waitstatus_to_exitcode(status)
print("CHILD", code)
sys.exit(0 if code == 0 else 2)
"""


@pytest.mark.timeout(60)
def test_after_fork_a_new_thread_gets_closed_not_a_lock_held_at_the_fork() -> None:
    proc = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True,
                          timeout=40, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CHILD 0" in proc.stdout
