"""The shared pool across real processes: fd passing, holds, kill -9 of either side.

Scenarios that could crash the interpreter (a SIGBUS on a dead publisher's memory) run in a
child process with a timeout."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vbus import _shm

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _shm.AVAILABLE, reason="shared-memory frames need Linux"),
]
CHILD = str(Path(__file__).with_name("shm_child.py"))


def dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def wait_until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    # The pool thread's reaction to a peer's death has no event to wait on: poll it, bounded.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # sleep-ok: the pool thread's reaction to a death has no event
    return True


def test_views_of_a_publisher_killed_with_sigkill_stay_valid() -> None:
    before = dev_shm()
    out = subprocess.run([sys.executable, CHILD, "survivor"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("survived")
    assert not dev_shm() - before  # nothing new (other programs may remove their own)


def test_sigkill_of_a_subscriber_releases_its_holds(leakcheck: object) -> None:
    before = dev_shm()
    pool = _shm.Pool(16 * 1024 * 1024)
    child = subprocess.Popen([sys.executable, CHILD, "subscriber"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline().startswith("ready")
        for n in range(4):
            d = pool.place_frame("cam/x", np.full(300_000, n, dtype=np.float32))
            assert d is not None
            child.stdin.write(f"take {d.hex()}\n")
            child.stdin.flush()
            assert child.stdout.readline().split() == ["ok", str(float(n * 300_000))]
        assert len(pool.ledger.live) == 4  # every view the child keeps is held
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert wait_until(lambda: not pool.ledger.live and not pool.ledger.clients)
    finally:
        child.kill()
        child.wait(10)
        for f in (child.stdin, child.stdout):
            if f is not None:
                f.close()
        assert pool.close()
    assert not dev_shm() - before  # nothing new (other programs may remove their own)


def test_views_are_identical_read_only_and_never_overwritten(leakcheck: object) -> None:
    pool = _shm.Pool(4 * 1024 * 1024)
    res = _shm.Resolver(["cam/**"])
    try:
        first = np.arange(200_000, dtype=np.int32)
        kept = res.resolve(memoryview(pool.place_frame("cam/a", first)))  # type: ignore[arg-type]
        assert kept.dtype == first.dtype and kept.shape == first.shape
        assert not kept.flags.writeable
        with pytest.raises(ValueError):
            kept[0] = 1
        for n in range(40):  # 40 frames of 800 kB through a 4 MiB pool
            d = pool.place_frame("cam/a", np.full(200_000, n, dtype=np.int32))
            assert d is not None
            assert (res.resolve(memoryview(d)) == n).all()
            gc.collect()
            # The release travels to the pool thread: the next frame is held for us once
            # it is there (else it is over our share of the pool, and lost, counted).
            assert wait_until(lambda: len(pool.ledger.live) == 1)
        assert (kept == first).all()
        assert res.lost == 0
    finally:
        del kept
        res.close()
        assert pool.close()


def test_a_loan_is_published_without_a_copy_and_given_back_when_dropped(leakcheck: object) -> None:
    pool = _shm.Pool(2 * 1024 * 1024)
    res = _shm.Resolver(["**"])
    try:
        loan = pool.loan((1024, 512), "uint16")
        assert loan is not None and loan.flags.writeable
        loan[:] = 7
        view = res.resolve(memoryview(pool.place_frame("cam/a", loan)))  # type: ignore[arg-type]
        assert not loan.flags.writeable  # it belongs to its subscribers now
        assert (view == 7).all() and view.shape == (1024, 512)
        assert pool.loan((1024, 1024), "uint16") is None  # no room: counted
        assert pool.exhausted == 1
        del view
        gc.collect()
        spare = pool.loan((1024, 512), "uint16")
        assert spare is not None
        del spare, loan
        gc.collect()
        assert pool.loan((1024, 1024), "uint16") is not None  # both given back
    finally:
        res.close()
        assert pool.close()
