"""Shared-memory frames under close(timeout=0) mid-flood, on either side, views held.

The side that closes runs in a child process (a hang or a crash there must not take the test
run with it), bus after bus, seeded; the other side is this process, and must stay healthy:
its views intact, its pool given back, its next frames through shared memory. Nothing may be
left in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import vbus
from tests._support import dev_shm, shm_left_since
from vbus import _shm

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not _shm.AVAILABLE, reason="shared-memory frames need Linux"),
]
CHILD = str(Path(__file__).with_name("shm_child.py"))
MIB = 1024 * 1024
CYCLES = 24
SEEDS = [int(s) for s in os.environ.get("VBUS_SHM_SEEDS", "1,2").split(",")]
"""More seeds: ``VBUS_SHM_SEEDS=1,2,3,4 pytest tests/client/test_shm_adversity.py``."""



def intact(view: np.ndarray) -> bool:
    return bool(view[0] == view[-1] == view[len(view) // 2])


def wait_until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # sleep-ok: the pool's holds of a closed peer have no event
    return True


def child(role: str, address: str, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, CHILD, role, address, str(seed), str(CYCLES)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], seed: int) -> str:
    try:
        out, err = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"seed {seed}: the child hung\n{out}\n{err}")
    assert proc.returncode == 0, f"seed {seed}: exit {proc.returncode}\n{out}\n{err}"
    assert out.split("\n")[-2:] == ["done", ""], f"seed {seed}:\n{out}\n{err}"
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_close_timeout_0_of_a_publisher_bus_mid_flood(leakcheck: object, seed: int) -> None:
    before = dev_shm()
    with vbus.Bus(bind="tcp://127.0.0.1:0") as broker, vbus.connect(broker.address) as bus:
        sub = bus.subscribe("cam/**")
        proc = child("closing_publisher", broker.address, seed)
        held: list[np.ndarray] = []
        got = 0
        while proc.poll() is None or got == 0:  # receive until the child is done
            try:
                msg = sub.recv(timeout=0.2)
            except TimeoutError:
                if proc.poll() is not None:
                    break
                continue
            got += 1
            held.append(msg.data)  # views of publishers closed meanwhile: kept a while
            if len(held) > 10 + seed:
                del held[got % len(held)]
        finish(proc, seed)
        assert got, "no frame came"
        assert all(intact(v) for v in held), "a view of a closed publisher's frame changed"
        del held
        # Healthy: a publisher of ours reaches it through shared memory, nothing lost.
        pub = bus.publisher()
        dropped = sub.stats().dropped
        for n in range(5):
            pub.publish("cam/mine", np.full(32 * 1024, n, dtype=np.int64))
            msg = sub.recv(timeout=10)
            while msg.topic != "cam/mine":  # the child's last frames, still queued
                msg = sub.recv(timeout=10)
            assert (msg.data == n).all()
        assert pub.stats().shm_frames == 5
        assert sub.stats().dropped == dropped
    assert not shm_left_since(before)


@pytest.mark.parametrize("seed", SEEDS)
def test_close_timeout_0_of_a_subscriber_bus_mid_flood(leakcheck: object, seed: int) -> None:
    before = dev_shm()
    with vbus.Bus(bind="tcp://127.0.0.1:0") as broker, \
            vbus.connect(broker.address, shm_pool_bytes=16 * MIB) as bus:
        pub = bus.publisher()
        stop = threading.Event()
        errors: list[BaseException] = []

        def flood() -> None:
            n = 0
            try:
                while not stop.is_set():
                    pub.publish("cam/x", np.full(16 * 1024 * (1 + n % 3), n, dtype=np.int64))
                    n += 1
                    if n % 64 == 0:
                        stop.wait(0.001)  # not a wait for a message: a flood, paced
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            proc = child("closing_subscriber", broker.address, seed)
            finish(proc, seed)
        finally:
            stop.set()
            thread.join(10)
        assert not thread.is_alive() and not errors, errors
        pool = pub._outbox.shm.pool
        assert pool is not None and pool.sent > 0
        # Every closed subscriber's holds are given back once its connection ends.
        assert wait_until(lambda: not pool.ledger.live and not pool.ledger.clients), (
            f"seed {seed}: {len(pool.ledger.live)} blocks held, {pool.ledger.clients} clients")
        local = bus.subscribe("cam/mine")
        for n in range(40):  # 40 x 768 kB through the 16 MiB pool: all of it is free again
            pub.publish("cam/mine", np.full(96 * 1024, n, dtype=np.int64))
            assert (local.recv(timeout=10).data == n).all()
        assert local.stats().dropped == 0
    assert not shm_left_since(before)
