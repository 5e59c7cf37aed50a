"""Failures of other processes: the rest keeps working and the counters tell the truth."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import vbus
from tests._support import LeakCheck


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        # stdin a pipe that stays open: a child waiting on input() must wait, not hit EOF
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate: object, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)  # sleep-ok: polling a counter kept by another process's broker


def test_publisher_process_killed_mid_stream(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        sub = bus.subscribe("stream/**", hwm=1_000_000)
        child = _child(
            f"""
            import vbus
            bus = vbus.connect({bus.address!r})
            pub = bus.publisher()
            i = 0
            while True:
                i += 1
                pub.publish("stream/n", i)
            """
        )
        try:
            first = sub.recv(timeout=10.0)
            got = [first.data]
            while len(got) < 2000:
                got.append(sub.recv(timeout=5.0).data)
            child.send_signal(signal.SIGKILL)
            child.wait(5.0)
            while True:  # what was in flight when it died
                try:
                    got.append(sub.recv(timeout=0.5).data)
                except TimeoutError:
                    break
        finally:
            child.kill()
            child.communicate()
        assert got == list(range(got[0], got[0] + len(got))), "in order, nothing missing"
        assert sub.stats().dropped == 0 and sub.stats().received == len(got)
        # the bus goes on: a new publisher, the same subscriber
        pub = bus.publisher()
        pub.publish("stream/after", "alive")
        assert sub.recv(timeout=2.0).data == "alive"


def test_subscriber_process_killed(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        local = bus.subscribe("data", hwm=1_000_000)
        baseline = bus.stats().subscribers
        child = _child(
            f"""
            import vbus
            bus = vbus.connect({bus.address!r})
            sub = bus.subscribe("data", hwm=10)
            print("ready", flush=True)
            input()  # never answered: the parent kills us
            """
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            assert bus.stats().subscribers == baseline + 1
            pub = bus.publisher()
            for i in range(20_000):  # the child never reads: it must not slow or stop us
                pub.publish("data", i)
            child.send_signal(signal.SIGKILL)
            child.wait(5.0)
        finally:
            child.kill()
            child.communicate()
        assert [local.recv(timeout=5.0).data for _ in range(20_000)] == list(range(20_000))
        assert pub.stats().dropped == 0
        _wait_for(lambda: bus.stats().subscribers == baseline)
        pub.publish("data", "after")
        assert local.recv(timeout=2.0).data == "after"
