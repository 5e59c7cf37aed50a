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

import numpy as np

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


if __name__ == "__main__":
    {"publisher": publisher, "subscriber": subscriber, "survivor": survivor}[sys.argv[1]]()
