"""Helpers the tests share: the leak check every bus-making test runs, free ports, a raw
ready subscriber, and the command-line tests' subprocesses.

Child processes (``childproc.py``) and a standalone broker in its own process (``brokerproc.py``)
live beside this module.
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from vbus._cli import mcap as _mcap
from vbus._message import Message


def fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class LeakCheck:
    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.fds = fds()

    def assert_clean(self, grace: float = 2.0) -> None:
        # Threads that a close() from inside a callback let finish on their own get a grace
        # period to end; joining them is what a second close() would do.
        deadline = time.monotonic() + grace
        for thread in self._new_threads():
            thread.join(max(deadline - time.monotonic(), 0.0))
        left = [t.name for t in self._new_threads()]
        assert not left, f"threads left behind: {left}"
        leaked = fds() - self.fds
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


# -- sockets ------------------------------------------------------------------------------------
def free_port_pair() -> int:
    """A free TCP port whose successor is free too (a vbus tcp address binds both)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def ready_subscriber(ctx: zmq.Context[zmq.Socket[bytes]], address: str, topic: bytes,
                     raw_publisher: zmq.Socket[bytes] | None = None,
                     rcvhwm: int = 0) -> zmq.Socket[bytes]:
    """A raw SUB of ``topic`` whose subscription is active: a vbus broker confirms a ready
    token subscribed after it; a raw proxy forwards it to ``raw_publisher``."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = rcvhwm
    sub.subscribe(topic)
    token = b"\xffvbus/ready/" + secrets.token_hex(8).encode() + b"\0"
    if raw_publisher is None:
        sub.subscribe(token)
    sub.connect(f"tcp://{host}:{int(port) + 1}")
    deadline = time.monotonic() + 5.0
    sock = sub if raw_publisher is None else raw_publisher
    while True:
        assert sock.poll(max(int((deadline - time.monotonic()) * 1000), 1)), "no subscription"
        got = sock.recv()
        if got.startswith(token) or got == b"\x01" + topic:
            break
    if raw_publisher is None:
        sub.unsubscribe(token)
    return sub


# -- the command line ---------------------------------------------------------------------------
VBUS = [sys.executable, "-m", "vbus"]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
WAIT = 20.0  # deadline for anything a subprocess should do promptly


def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VBUS, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


class Proc:
    """A vbus subprocess whose stdout and stderr lines can be awaited with a deadline."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen([*VBUS, *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=ENV)
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.err_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.out)),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.err)),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream: Any, into: queue.Queue[str | None]) -> None:
        for line in stream:
            into.put(line.rstrip("\n"))
        into.put(None)

    def line(self, stream: str = "out", timeout: float = WAIT) -> str:
        q = self.out if stream == "out" else self.err
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line on std{stream} within {timeout} s") from None
        if line is None:
            q.put(None)
            raise AssertionError(f"std{stream} closed; stderr: {self.rest('err')}")
        if stream == "err":
            self.err_lines.append(line)
        return line

    def wait_for(self, text: str, stream: str = "err", timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.line(stream, max(deadline - time.monotonic(), 0.01))
            if text in line:
                return line

    def rest(self, stream: str = "out") -> list[str]:
        """Every line still to come (call once the process has ended or is ending)."""
        q = self.out if stream == "out" else self.err
        lines: list[str] = []
        while True:
            try:
                line = q.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"std{stream} did not close within {WAIT} s") from None
            if line is None:
                q.put(None)
                if stream == "err":
                    self.err_lines.extend(lines)
                return lines
            lines.append(line)

    def finish(self, timeout: float = WAIT) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=WAIT)
        for t in self._readers:
            t.join(WAIT)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


def start(procs: list[Proc], *args: str) -> Proc:
    p = Proc(*args)
    procs.append(p)
    return p


def subscribed(procs: list[Proc], address: str, pattern: str, *args: str) -> Proc:
    """``vbus sub``, returned once it says its subscription is active."""
    p = start(procs, "sub", address, pattern, *args)
    p.wait_for(f"subscribed to {pattern} at {address}")
    return p


def one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"vbus {command}: error: "), lines[0]
    return lines[0]


def timed_recording(path: Path, offsets: list[float]) -> None:
    """A recording made without vbus record: one message at each offset (seconds)."""
    with open(path, "wb") as f:
        writer = _mcap.McapWriter(f, library="test", compress=True)
        schema = writer.register_schema(_mcap.VALUE, "jsonschema", _mcap.SCHEMAS[_mcap.VALUE])
        channel = writer.register_channel("timed/x", "json", schema,
                                          {"vbus.recording_format": "2"})
        t0 = 1_700_000_000 * 10**9
        for i, offset in enumerate(offsets):
            msg = Message("timed/x", i, "72657061796572ab", i + 1, 1.7e9 + offset)
            _, body, _ = _mcap.encode_message(msg)
            writer.add_message(channel, t0 + int(offset * 1e9), t0, i + 1, body)
        writer.finish()


# -- absence, proven ----------------------------------------------------------------------------
SHM_DIR = Path("/dev/shm")


def dev_shm() -> set[str]:
    """The names in /dev/shm now (vbus itself never makes one: its pools are memfds)."""
    try:
        return {p.name for p in SHM_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def shm_left_since(before: set[str]) -> set[str]:
    """Names in /dev/shm that appeared since ``before`` and that no process outside this
    test's own process tree holds open or mapped: what this test's processes left. Another
    program on the machine (a Zenoh benchmark, say) may make and hold its own meanwhile."""
    new = dev_shm() - before
    if not new:
        return new
    mine = _my_tree()
    foreign: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        foreign |= {name for name in new if _holds(proc, SHM_DIR / name)}
    return new - foreign


def _my_tree() -> set[int]:
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit():
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    mine = {os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= more
        grew = bool(more)
    return mine


def _holds(proc: Path, path: Path) -> bool:
    try:
        if str(path) in (proc / "maps").read_text():
            return True
        return any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def flood_read_as_it_goes(pub: Any, fast: Any, topic: str, n: int,
                          step: int = 1000) -> list[Any]:
    """Publish 0..n-1 on ``topic`` in steps, ``fast`` reading each step before the next:
    the broker's intake then never holds more than a step, however long its forwarder
    thread waits for a core (all at once, a loaded machine overflowed an intake of 2000:
    the publisher's drops, counted, but not the flood the test meant). A stalled
    subscriber beside ``fast`` still sees the whole flood."""
    got: list[Any] = []
    for start in range(0, n, step):
        for i in range(start, min(start + step, n)):
            pub.publish(topic, i)
        got += [fast.recv(timeout=5.0).data for _ in range(min(step, n - start))]
    return got


def until_marker_gets_through(pub: Any, sub: Any, topic: str,
                              within: float = 10.0) -> tuple[list[Any], int]:
    """What ``sub`` still holds of a flood ``pub`` sent on ``topic``: the data before a marker
    that ``pub`` publishes last. A full queue drops a marker like any message, so a new one
    goes out every 0.2 s until one gets through; returns the data before it and how many
    markers were published (the lost ones count as ``sub``'s drops)."""
    got: list[Any] = []
    markers = 0
    deadline = time.monotonic() + within
    while True:
        pub.publish(topic, {"marker": markers})
        markers += 1
        try:
            while True:
                data = sub.recv(timeout=0.2).data
                if isinstance(data, dict) and "marker" in data:
                    return got, markers
                got.append(data)
        except TimeoutError:
            assert time.monotonic() < deadline, f"no marker came through on {topic!r}"
