"""Bogus subscriptions: a raw XSUB floods a standalone broker (a child process) with 200 000
ready tokens (``\\x01\\xffvbus/ready/<random>\\0``), from one connection or from many.

The broker cuts a subscriber connection past its subscription byte budget, and the one that
sent the most while it holds more subscriptions than its total bound; ZeroMQ frees what a
connection subscribed when it goes. Measured: the broker's peak RSS (VmHWM), how long a
legitimate subscribe takes during the flood, how soon ``$vbus/stats`` counts subscribers
truly once the attacker leaves, and how fast SIGTERM ends the broker.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import vbus
from tests._support import LeakCheck
from vbus._proto.endpoints import parse_address

FLOOD = 200_000
MAX_RSS_MIB = 300


class StandaloneBroker:
    def __init__(self, *args: str) -> None:
        # Its log goes to a file: a pipe nobody reads would stall the broker once full.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vbus", "broker", "--bind", "tcp://127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("tcp://"), self.stop()

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024  # MiB
        raise AssertionError(f"no {field}")

    def terminate(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10.0)
        return time.monotonic() - started

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10.0)
        self.log.seek(0)
        err = self.log.read()
        self.log.close()
        return err


@pytest.fixture
def broker(leakcheck: LeakCheck) -> Iterator[StandaloneBroker]:
    b = StandaloneBroker()
    try:
        yield b
    finally:
        b.stop()


def _subscribers(stats: vbus.Subscriber) -> int:
    data: Any = stats.recv(timeout=3.0).data
    return int(data["subscribers"])


def _flood(address: str, connections: int, per_connection: int, underway: threading.Event,
           done: threading.Event, reconnect: bool = True) -> None:
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(connections):
            sock = ctx.socket(zmq.XSUB)
            sock.linger = 0
            sock.sndhwm = 0
            if not reconnect:
                sock.reconnect_ivl = -1
            sock.connect(parse_address(address).subscribe)
            socks.append(sock)
        for n in range(per_connection):
            for sock in socks:
                sock.send(b"\x01\xffvbus/ready/" + secrets.token_hex(8).encode() + b"\0")
            if n * connections >= FLOOD // 10:
                underway.set()
        underway.set()
        done.wait(30.0)  # the attacker stays until told to leave
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reconnect", [False, True], ids=["once", "reconnecting"])
def test_bogus_subscriptions_are_bounded(broker: StandaloneBroker, reconnect: bool) -> None:
    """Once: the flood as a raw XSUB sends it. Reconnecting: ZeroMQ's default, the cut XSUB
    comes back every 100 ms and sends all 200 000 again, a burst the broker's C sockets
    take in before the cut; bounded, but a legitimate subscribe may wait a few seconds."""
    connections = 1
    figures: dict[str, float] = {"rss_before_mib": broker.status("VmRSS")}
    client = vbus.connect(broker.address)
    try:
        stats = client.subscribe("$vbus/stats")
        before = _subscribers(stats)
        underway, leave = threading.Event(), threading.Event()
        attacker = threading.Thread(target=_flood, args=(broker.address, connections,
                                                         FLOOD // connections, underway, leave,
                                                         reconnect))
        attacker.start()
        try:
            assert underway.wait(30.0)  # a tenth of the flood is out: now the legitimate client
            started = time.monotonic()
            sub = client.subscribe("stage/x")
            figures["subscribe_s"] = time.monotonic() - started
            pub = client.publisher()
            pub.publish("stage/x", 1)
            assert sub.recv(timeout=5.0).data == 1
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:  # the flood is through once it was counted
                data: Any = stats.recv(timeout=3.0).data
                if data["peers"]["cut_subscribers"] >= 1:
                    break
            figures["peak_rss_mib"] = broker.status("VmHWM")
        finally:
            leave.set()
            attacker.join(30.0)
        left = time.monotonic()
        deadline = left + 5.0
        count = -1
        while time.monotonic() < deadline:
            count = _subscribers(stats)
            if count == before + 1:
                break
        figures["count_true_after_s"] = time.monotonic() - left
        figures["peak_rss_mib"] = max(figures["peak_rss_mib"], broker.status("VmHWM"))
        assert count == before + 1, f"subscribers {count}, expected {before + 1}"
        pub.close()
        sub.close()
        stats.close()
    finally:
        client.close()
    figures["sigterm_exit_s"] = broker.terminate()
    print(f"\nflood of {FLOOD}, {'reconnecting' if reconnect else 'once'}: {figures}")
    assert broker.proc.returncode == 0
    assert figures["subscribe_s"] < (5.0 if reconnect else 2.0)
    assert figures["peak_rss_mib"] < MAX_RSS_MIB
    assert figures["sigterm_exit_s"] < 2.0


def test_an_empty_token_is_not_a_subscriber(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        stats = bus.subscribe("$vbus/stats")
        before = _subscribers(stats)
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.XSUB)
        rogue.linger = 0
        try:
            rogue.connect(parse_address(bus.address).subscribe)
            for bad in (b"\x01\xffvbus/ready/\0", b"\x01\xffvbus/ready/" + b"x" * 65 + b"\0",
                        b"\x01\xffvbus/ready/\xff\xfe\0"):
                rogue.send(bad)
            marker = bus.subscribe("stage/x")  # confirmed after the rogue's were handled
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                data: Any = stats.recv(timeout=3.0).data
                if data["peers"]["bad_tokens"] >= 3:
                    break
            assert data["peers"]["bad_tokens"] == 3
            assert data["subscribers"] == before + 1
            marker.close()
        finally:
            rogue.close(0)
            ctx.term()
        stats.close()
