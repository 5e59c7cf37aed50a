"""``vbus broker --max-queue-bytes``: a subscriber that stops reading costs the standalone
broker a bounded amount of memory, whatever goes through it.

The publisher sends what vbus publishers send over a network (16 MiB camera frames as runs of
64 KiB chunks, see _proto/limits.py): raw pyzmq here, so only the broker is measured. The stalled
subscriber never reads; the broker's peak RSS (VmHWM) is compared with its bound.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest
import zmq

from tests._support import LeakCheck, ready_subscriber
from vbus._proto import limits as _limits

FRAME = 16 << 20
CHUNK = _limits.CHUNK_SIZE
FRAMES = 48  # 768 MiB through the broker
SLACK_MIB = 96  # the interpreter, libzmq, and what is in flight beyond the queues


def _peak_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_queue_mib", [32, 128])
def test_a_stalled_subscriber_costs_the_broker_a_bounded_amount(
        max_queue_mib: int, leakcheck: LeakCheck) -> None:
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vbus", "broker", "--bind", "tcp://127.0.0.1:0",
             "--max-queue-bytes", str(max_queue_mib << 20)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        ctx = zmq.Context()
        socks: list[zmq.Socket[bytes]] = []
        try:
            assert proc.stdout is not None
            address = proc.stdout.readline().strip()
            base = _peak_mib(proc.pid)
            stalled = ready_subscriber(ctx, address, b"camera/frame\0", rcvhwm=4)
            socks.append(stalled)
            pub = ctx.socket(zmq.XPUB)
            socks.append(pub)
            pub.linger = 0
            pub.setsockopt(zmq.XPUB_NODROP, 1)  # nothing lost on the way in: all of it reaches
            pub.sndtimeo = 10_000  # the broker (one that held the publisher back would fail)
            pub.connect(address)
            assert pub.poll(5000) and pub.recv()[:1] == b"\x01"
            chunk = b"camera/frame\0" + bytes(CHUNK)
            for _ in range(FRAMES * FRAME // CHUNK):
                pub.send(chunk, copy=False)
            # A marker through the same path: the broker handled everything before it.
            watcher = ready_subscriber(ctx, address, b"marker\0")
            socks.append(watcher)
            pub.send(b"marker\0")
            assert watcher.poll(30_000), "the broker did not forward the marker"
            peak = _peak_mib(proc.pid)
            print(f"\n--max-queue-bytes {max_queue_mib} MiB: broker peak RSS {peak} MiB "
                  f"(at start {base} MiB) after {FRAMES * FRAME >> 20} MiB to a stalled "
                  "subscriber")
            assert peak - base <= max_queue_mib + SLACK_MIB
        finally:
            for sock in socks:
                sock.close(0)
            ctx.term()
            proc.terminate()
            proc.wait(timeout=10.0)
            assert proc.stdout is not None
            proc.stdout.close()
