"""The broker's data path, measured against raw pyzmq ``zmq.proxy`` in the same run.

Run as a script for the figures (standalone broker processes over tcp, raw pyzmq clients so
that only the broker differs)::

    python tests/integration/test_broker_forwarding.py [--before /path/to/old/src]

The test below is the smoke version: a few hundred messages through each kind of broker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

RAW = textwrap.dedent(
    """
    import sys, threading, zmq
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    hwm = int(sys.argv[1])
    front.rcvhwm = back.sndhwm = hwm
    port = front.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
    back.bind(f"tcp://127.0.0.1:{port + 1}")
    front.send(b"\\x01")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), ctx.term()), daemon=True).start()
    try:
        zmq.proxy(front, back)
    except zmq.ContextTerminated:
        pass
    """
)
VBUS = textwrap.dedent(
    """
    import sys, vbus
    bus = vbus.Bus(bind="tcp://127.0.0.1:0", hwm=int(sys.argv[1]))
    print(bus.address, flush=True)
    sys.stdin.read()
    bus.close()
    """
)
TOPIC = b"bench/x\0"


class BrokerChild:
    def __init__(self, script: str, hwm: int, src: str | None = None) -> None:
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = src
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(hwm)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address, "broker child did not start"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def forward(address: str, size: int, count: int, timeout: float = 20.0) -> tuple[float, int]:
    """(messages per second, messages received) for ``count`` messages of ``size`` bytes."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB)
    try:
        for sock in (pub, sub):
            sock.linger = 0
        pub.sndhwm = 10_000
        pub.setsockopt(zmq.XPUB_NODROP, 1)
        sub.rcvhwm = 0
        pub.connect(f"tcp://{host}:{port}")
        sub.subscribe(TOPIC)
        sub.connect(f"tcp://{host}:{int(port) + 1}")
        deadline = time.monotonic() + 5.0
        while True:  # the broker forwards our subscriber's subscription once it applied it
            assert pub.poll(max(int((deadline - time.monotonic()) * 1000), 1)), "no subscription"
            if pub.recv() == b"\x01" + TOPIC:
                break
        frame = TOPIC + bytes(size)
        got = 0
        done = threading.Event()
        first_last: list[float] = []

        def receive() -> None:
            nonlocal got
            end = time.monotonic() + timeout
            while got < count and time.monotonic() < end:
                if sub.poll(200):
                    sub.recv(copy=False)
                    got += 1
            first_last.append(time.perf_counter())
            done.set()

        reader = threading.Thread(target=receive)
        started = time.perf_counter()
        reader.start()
        for _ in range(count):
            pub.send(frame, copy=size < 65536)
        reader.join(timeout + 5.0)
        return got / (first_last[0] - started), got
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def _vbus_src() -> str:
    return str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["raw", "vbus"])
def test_forwarding_smoke(kind: str) -> None:
    child = BrokerChild(RAW if kind == "raw" else VBUS, 1000, _vbus_src())
    try:
        rate, got = forward(child.address, 64, 300)
        assert got == 300 and rate > 0
    finally:
        child.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="src directory of the vbus to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kinds = {"raw": (RAW, None), "after": (VBUS, _vbus_src())}
    if args.before:
        kinds["before"] = (VBUS, args.before)
    cases = [(64, 200_000, 20_000), (1 << 20, 400, 50)]
    for size, count, hwm in cases:
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, (script, src) in kinds.items():
                child = BrokerChild(script, hwm, src)
                try:
                    rate, got = forward(child.address, size, count)
                finally:
                    child.close()
                rates[kind].append(rate)
                print(f"  {size:>8} B {kind:>6}: {rate:12,.0f} msg/s  ({got}/{count})",
                      flush=True)
        raw = statistics.median(rates["raw"])
        for kind in kinds:
            med = statistics.median(rates[kind])
            print(f"{size:>8} B {kind:>6}: median {med:12,.0f} msg/s  ratio to raw "
                  f"{med / raw:.3f}", flush=True)


if __name__ == "__main__":
    main()
