"""Child processes for the shared-memory tests: a pool that publishes on command, and a
resolver that keeps views. They talk to the test over stdin/stdout, one line a command.

    python shm_child.py publisher   # "frame N" -> prints the descriptor (hex); "stats"; "quit"
    python shm_child.py subscriber  # "take HEX" -> resolves, keeps the view, prints "ok SUM"
    python shm_child.py survivor    # makes a publisher child, kills it, reads its frames
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

import vbus
from vbus import _shm

MIB = 1024 * 1024


def frame(n: int) -> np.ndarray:
    return np.full((512, 512), n, dtype=np.float64)  # 2 MiB


def publisher() -> None:
    pool = _shm.Pool(32 * MIB)
    print("ready", pool.name, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "frame":
            d = pool.place_frame("cam/x", frame(int(cmd[1])))
            print(d.hex() if d is not None else "none", flush=True)
        elif cmd[0] == "stats":
            print("live", len(pool.ledger.live), "clients", pool.ledger.clients, flush=True)
        elif cmd[0] == "quit":
            break
    pool.close()


def subscriber() -> None:
    res = _shm.Resolver(["cam/**"])
    views = []
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "take":
            view = res.resolve(memoryview(bytes.fromhex(cmd[1])))
            views.append(view)
            print("ok", float(view.sum()), flush=True)
        elif cmd[0] == "quit":
            break


def survivor() -> None:
    """Views of a dead publisher's frames stay valid: read them after kill -9."""
    child = subprocess.Popen([sys.executable, __file__, "publisher"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().startswith("ready")
    res = _shm.Resolver(["cam/**"])
    descriptors = []
    for n in range(3):
        child.stdin.write(f"frame {n}\n")
        child.stdin.flush()
        descriptors.append(bytes.fromhex(child.stdout.readline().strip()))
    views = [res.resolve(memoryview(descriptors[0]))]  # claimed; the later ones are held
    child.stdin.write("frame 3\n")
    child.stdin.flush()
    descriptors.append(bytes.fromhex(child.stdout.readline().strip()))
    views.append(res.resolve(memoryview(descriptors[3])))
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    # The publisher is gone: what we hold is intact, a frame held for us still arrives,
    # and a frame we would have to claim is lost, counted (never a SIGBUS).
    for view, n in zip(views, (0, 3), strict=True):
        assert (view == n).all(), n
    assert res.resolve(memoryview(descriptors[1])) is None, "a claim on a dead pool succeeded"
    assert "gone" in res.why, res.why
    assert res.lost == 1
    res.close()
    print("survived", flush=True)


def spawn(role: str, *args: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, __file__, role, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().startswith("ready")
    return child


def tell(child: subprocess.Popen[str], line: str) -> str:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()
    return child.stdout.readline().strip()


def bus_pub(address: str) -> None:
    with vbus.connect(address) as bus:
        pub = bus.publisher()
        print("ready", flush=True)
        for line in sys.stdin:
            n = int(line)
            pub.publish("cam/x", frame(n))
            print("sent", n, flush=True)


def bus_sub(address: str) -> None:
    with vbus.connect(address) as bus:
        sub = bus.subscribe("cam/**")
        print("ready", flush=True)
        views = []
        for msg in sub:
            views.append(msg.data)
            print("got", int(msg.data[0, 0]), flush=True)


def bus_publisher_killed() -> None:
    """A subscriber whose publisher dies (kill -9) with frames in flight stays healthy."""
    with vbus.Bus(bind="tcp://127.0.0.1:0") as broker, vbus.connect(broker.address) as bus:
        sub = bus.subscribe("cam/**")
        child = spawn("bus_pub", broker.address)
        assert tell(child, "1") == "sent 1"
        first = sub.recv(timeout=10).data  # connects to the pool: later frames held for us
        assert tell(child, "2") == "sent 2"
        assert tell(child, "3") == "sent 3"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        later = [sub.recv(timeout=10).data for _ in range(2)]  # sent before it died
        assert (first == 1).all()
        assert [int(v[0, 0]) for v in later] == [2, 3]
        assert all((v == n).all() for v, n in zip(later, (2, 3), strict=True))
        pub = bus.publisher()  # the subscriber goes on with other publishers
        pub.publish("cam/y", frame(9))
        assert (sub.recv(timeout=10).data == 9).all()
        assert sub.stats().dropped == 0
        del first, later
    print("survived", flush=True)


def bus_subscriber_killed() -> None:
    """A publisher whose subscriber dies (kill -9) holding views gets its pool back."""
    with vbus.Bus(bind="tcp://127.0.0.1:0") as broker, \
            vbus.connect(broker.address, shm_pool_bytes=16 * MIB) as bus:
        pub = bus.publisher()
        child = spawn("bus_sub", broker.address)
        assert child.stdout is not None
        for n in range(3):
            pub.publish("cam/x", frame(n))
            assert child.stdout.readline().split() == ["got", str(n)]
        pool = pub._outbox.shm.pool
        assert len(pool.ledger.live) == 3  # the child keeps its views
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while pool.ledger.live or pool.ledger.clients:  # the pool thread sees the hang-up
            assert time.monotonic() < deadline, "the dead subscriber's holds were kept"
            time.sleep(0.01)  # sleep-ok: the pool's holds, no event to wait on
        local = bus.subscribe("cam/**")
        for n in range(20):  # 40 MiB through the 16 MiB pool: all of it is free again
            pub.publish("cam/x", frame(n))
            assert (local.recv(timeout=10).data == n).all()
        assert pub.stats().shm_exhausted == 0
    print("survived", flush=True)


if __name__ == "__main__":
    roles = {"publisher": publisher, "subscriber": subscriber, "survivor": survivor,
             "bus_pub": bus_pub, "bus_sub": bus_sub,
             "bus_publisher_killed": bus_publisher_killed,
             "bus_subscriber_killed": bus_subscriber_killed}
    roles[sys.argv[1]](*sys.argv[2:])  # type: ignore[operator]
