"""The broker's data path, measured against raw pyzmq ``zmq.proxy`` in the same run.

Run as a script for the figures (standalone broker processes over tcp, raw pyzmq clients so
that only the broker differs)::

    python tests/broker/test_broker_forwarding.py [--before /path/to/old/src]

The test below is the smoke version: a few hundred messages through each kind of broker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq

from tests._support import ready_subscriber

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

    def cpu(self) -> float:
        """CPU seconds (user + system) the broker process used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


SENDER = textwrap.dedent(
    """
    import sys, zmq
    address, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    wanted = bytes.fromhex(sys.argv[4])
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.sndhwm = 10_000
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.connect(address)
    while pub.poll(5000):  # accepted (vbus) / our subscriber's subscription forwarded (raw)
        if pub.recv().startswith(wanted):
            break
    else:
        sys.exit("no subscription")
    frame = b"bench/x\\0" + bytes(size)
    for _ in range(count):
        pub.send(frame, copy=size < 65536)
    pub.close(linger=30_000)
    ctx.term()
    """
)


def forward(address: str, size: int, count: int, raw: bool,
            timeout: float = 20.0) -> tuple[float, int]:
    """(messages per second, messages received) for ``count`` messages of ``size`` bytes:
    a sender process, the broker process, and this one receiving (so no two share a GIL)."""
    ctx = zmq.Context()
    sub = None
    try:
        if raw:
            host, port = address[len("tcp://"):].rsplit(":", 1)
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.rcvhwm = 0
            sub.subscribe(TOPIC)
            sub.connect(f"tcp://{host}:{int(port) + 1}")
        else:
            sub = ready_subscriber(ctx, address, TOPIC)
        wanted = (b"\x01" + TOPIC if raw else b"\x01").hex()
        sender = subprocess.Popen([sys.executable, "-c", SENDER, address, str(size),
                                   str(count), wanted])
        got = 0
        first = last = 0.0
        sub.rcvtimeo = int(timeout * 1000)
        try:
            while got < count:
                sub.recv(copy=False)
                last = time.perf_counter()
                if not got:
                    first = last
                got += 1
        except zmq.Again:
            pass
        sender.wait(timeout=timeout)
        return (got - 1) / max(last - first, 1e-9), got
    finally:
        if sub is not None:
            sub.close(0)
        ctx.term()


def _vbus_src() -> str:
    return str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["raw", "vbus"])
def test_forwarding_smoke(kind: str) -> None:
    child = BrokerChild(RAW if kind == "raw" else VBUS, 1000, _vbus_src())
    try:
        rate, got = forward(child.address, 64, 300, kind == "raw")
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
    cases = [(64, 100_000, 2000), (1 << 20, 300, 50)]  # within the default byte bound
    for size, count, hwm in cases:
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        cpus: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, (script, src) in kinds.items():
                child = BrokerChild(script, hwm, src)
                try:
                    before = child.cpu()
                    rate, got = forward(child.address, size, count, kind == "raw")
                    cpu = (child.cpu() - before) / max(got, 1) * 1e6
                finally:
                    child.close()
                rates[kind].append(rate)
                cpus[kind].append(cpu)
                print(f"  {size:>8} B {kind:>6}: {rate:12,.0f} msg/s  ({got}/{count}), broker "
                      f"CPU {cpu:8.2f} us/msg", flush=True)
        raw, raw_cpu = statistics.median(rates["raw"]), statistics.median(cpus["raw"])
        for kind in kinds:
            med, cpu = statistics.median(rates[kind]), statistics.median(cpus[kind])
            print(f"{size:>8} B {kind:>6}: median {med:12,.0f} msg/s  ratio to raw "
                  f"{med / raw:.3f}; broker CPU {cpu:.2f} us/msg, ratio to raw "
                  f"{cpu / raw_cpu:.3f}", flush=True)


if __name__ == "__main__":
    main()
