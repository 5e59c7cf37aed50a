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

from tests._support import dev_shm, shm_left_since
from vbus import _shm

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _shm.AVAILABLE, reason="shared-memory frames need Linux"),
]
CHILD = str(Path(__file__).with_name("shm_child.py"))



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
    assert not shm_left_since(before)  # nothing new (other programs may remove their own)


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
    assert not shm_left_since(before)  # nothing new (other programs may remove their own)


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


def _link(res: _shm.Resolver) -> _shm._Link:
    (link,) = res._links.values()
    return link


def test_releases_go_in_batches_and_a_held_view_stays_held(
        leakcheck: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # One packet (one wake-up of the pool's thread) for RELEASE_BATCH views, not one a view.
    monkeypatch.setattr(_shm, "RELEASE_DELAY", 3600.0)  # the count alone decides here
    pool = _shm.Pool(16 * 1024 * 1024)  # 1/16 of it is 1 MiB: 64 KiB frames are batched
    res = _shm.Resolver(["cam"])
    try:
        frame = np.arange(16 * 1024, dtype=np.int32)  # 64 KiB
        kept = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        link = _link(res)
        for n in range(_shm.RELEASE_BATCH - 1):
            view = res.resolve(memoryview(pool.place_frame("cam", frame + n)))  # type: ignore[arg-type]
            assert (view == frame + n).all()
            del view
        # The releases are queued on our side: none has been said (nothing to wait for).
        assert len(link._released) == _shm.RELEASE_BATCH - 1
        view = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        del view  # the RELEASE_BATCH-th: all of them go, in one packet
        assert not link._released
        # At the pool, every block but the one still viewed is given back.
        assert wait_until(lambda: [b.serial for b in pool.ledger.live.values()] == [1])
        assert (kept == frame).all()  # held all along, never overwritten
        assert res.lost == 0
    finally:
        del kept
        res.close()
        assert pool.close()


def test_a_release_waits_no_longer_than_the_next_frame_after_its_delay(
        leakcheck: object, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(_shm, "monotonic", lambda: clock[0])
    pool = _shm.Pool(16 * 1024 * 1024)
    res = _shm.Resolver(["cam"])
    try:
        frame = np.zeros(64 * 1024, dtype=np.uint8)
        view = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        link = _link(res)
        del view
        assert len(link._released) == 1  # young: it waits for company
        clock[0] += _shm.RELEASE_DELAY * 1.5  # then the next frame's arrival sends it
        view = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        assert not link._released
        assert wait_until(lambda: [b.serial for b in pool.ledger.live.values()] == [2])
        del view
        assert len(link._released) == 1
        clock[0] += _shm.RELEASE_DELAY / 2
        # A release when the oldest queued has waited its delay sends both.
        other = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        clock[0] += _shm.RELEASE_DELAY
        del other
        assert not link._released
        assert wait_until(lambda: not pool.ledger.live)
    finally:
        res.close()
        assert pool.close()


def test_closing_the_subscriber_says_its_queued_releases(leakcheck: object,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shm, "RELEASE_DELAY", 3600.0)
    pool = _shm.Pool(16 * 1024 * 1024)
    res = _shm.Resolver(["cam"])
    try:
        frame = np.ones(64 * 1024, dtype=np.uint8)
        kept = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        gone = res.resolve(memoryview(pool.place_frame("cam", frame)))  # type: ignore[arg-type]
        link = _link(res)
        del gone
        assert len(link._released) == 1
        res.close()  # the connection lasts while `kept` lives; the queued release goes now
        assert not link._released
        assert wait_until(lambda: [b.serial for b in pool.ledger.live.values()] == [1])
        assert (kept == 1).all()
        del kept  # the last view: the connection closes, the pool drops the client
        assert wait_until(lambda: not pool.ledger.live and not pool.ledger.clients)
    finally:
        res.close()
        assert pool.close()


def test_large_frames_are_released_at_once(leakcheck: object,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A release freeing 1/RELEASE_SHARE of the pool or more is not kept: a small pool (or
    # large frames) must not wait for memory the subscriber no longer uses.
    monkeypatch.setattr(_shm, "RELEASE_DELAY", 3600.0)
    pool = _shm.Pool(4 * 1024 * 1024)
    res = _shm.Resolver(["cam"])
    try:
        view = res.resolve(memoryview(pool.place_frame(  # type: ignore[arg-type]
            "cam", np.zeros(256 * 1024, dtype=np.uint8))))
        link = _link(res)
        del view
        assert not link._released
        assert wait_until(lambda: not pool.ledger.live)
    finally:
        res.close()
        assert pool.close()
