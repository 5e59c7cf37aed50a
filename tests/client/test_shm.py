"""Large numpy frames through shared memory, end to end through a broker: identical data,
read-only views never overwritten, loans, pool exhaustion, twins for subscribers off it.

The publisher and subscribers are clients of a broker bound on tcp (same host), so frames of
64 KiB and more take the shared pool. The scenarios that kill processes are in
test_shm_pool.py and the child roles of shm_child.py."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import vbus
from tests._support import dev_shm, shm_left_since
from vbus import _shm

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _shm.AVAILABLE, reason="shared-memory frames need Linux"),
]
MIB = 1024 * 1024
CHILD = str(Path(__file__).with_name("shm_child.py"))


@pytest.fixture
def broker(leakcheck: object) -> Iterator[vbus.Bus]:
    owner = vbus.Bus(bind="tcp://127.0.0.1:0", hwm=10_000)
    yield owner
    owner.close()


def client(broker: vbus.Bus, shm_pool_bytes: int | None = None) -> vbus.Bus:
    return vbus.connect(broker.address, hwm=10_000, shm_pool_bytes=shm_pool_bytes)


DTYPES = ["bool", "int8", "uint16", "int32", "int64", "float16", "float32", ">f8",
          "complex128", "datetime64[ns]", "S7", "U3", [("x", "<f4"), ("n", "<i8")],
          {"names": ["a", "b"], "formats": ["u1", "<f8"], "offsets": [0, 8], "itemsize": 24}]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70_000,), (300, 257), (9, 64, 129)], ids=str)
def test_every_dtype_and_shape_arrives_identical_through_shared_memory(
        broker: vbus.Bus, dtype: object, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(7)
    frame = np.frombuffer(rng.bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize),  # type: ignore[call-overload]
                          dtype=dtype).reshape(shape)
    if frame.dtype.kind == "U":
        frame = np.full(shape, "abc", dtype=dtype)  # random bytes are not valid code points
    with client(broker) as a, client(broker) as b:
        sub = b.subscribe("cam/**")
        pub = a.publisher()
        pub.publish("cam/frame", frame)
        pub.publish("cam/frame", np.asfortranarray(frame))  # not C-contiguous: copied in
        for sent in (frame, np.ascontiguousarray(np.asfortranarray(frame))):
            msg = sub.recv(timeout=5)
            assert isinstance(msg.data, np.ndarray)
            assert msg.data.dtype == frame.dtype and msg.data.shape == frame.shape
            assert msg.data.tobytes() == sent.tobytes()
            assert not msg.data.flags.writeable
        assert pub.stats().shm_frames == 2
        del msg


def test_small_frames_and_other_values_keep_the_bytes_path(broker: vbus.Bus) -> None:
    with client(broker) as a, client(broker) as b:
        sub = b.subscribe("x")
        pub = a.publisher()
        pub.publish("x", np.zeros(1000))  # 8 kB: under the threshold
        pub.publish("x", {"frame": np.zeros(100_000)})  # nested arrays: a tree, as before
        assert sub.recv(timeout=5).data.nbytes == 8000
        assert sub.recv(timeout=5).data["frame"].nbytes == 800_000
        assert pub.stats().shm_frames == 0


def test_a_held_view_is_never_overwritten_while_later_frames_flow(broker: vbus.Bus) -> None:
    # 8 MiB: a subscriber may hold half of it, the kept view and the frames on their way
    with client(broker, shm_pool_bytes=8 * MIB) as a, client(broker) as b:
        sub = b.subscribe("cam")
        pub = a.publisher()
        first = np.arange(MIB // 8, dtype=np.float64)
        pub.publish("cam", first)
        kept = sub.recv(timeout=5).data
        for n in range(60):  # 60 MiB through a pool of 8 MiB
            pub.publish("cam", np.full(MIB // 8, n, dtype=np.float64))
            msg = sub.recv(timeout=5)
            assert (msg.data == n).all()
            del msg
        assert (kept == first).all()
        assert pub.stats().shm_frames == 61
        assert sub.stats().dropped == 0
        del kept


def test_hoarding_subscribers_exhaust_the_pool_and_publish_never_blocks(
        broker: vbus.Bus) -> None:
    with client(broker, shm_pool_bytes=4 * MIB) as a, client(broker) as b:
        topics = ["cam/a", "cam/b"]
        subs = [b.subscribe(t) for t in topics]
        pub = a.publisher()
        kept: list[list[np.ndarray]] = [[], []]
        for topic, sub, views in zip(topics, subs, kept, strict=True):
            pub.publish(topic, np.full(MIB // 4, -1, dtype=np.int32))
            views.append(sub.recv(timeout=5).data)  # each now holds one block of the pool
        for n in range(12):  # 1 MiB each, nobody reads: each subscriber holds its share
            started = time.monotonic()
            pub.publish(topics[n % 2], np.full(MIB // 4, n, dtype=np.int32))
            assert time.monotonic() - started < 0.5  # never waits for a slot
        for topic in topics:
            pub.publish(topic, "end")  # the marker: everything before it has arrived
        for sub, views in zip(subs, kept, strict=True):
            while isinstance(data := sub.recv(timeout=5).data, np.ndarray):
                views.append(data)  # keep every view: hoard
        stats = pub.stats()
        assert stats.shm_exhausted > 0  # the pool was full: those frames went as bytes
        assert stats.shm_frames + stats.shm_exhausted == 14
        for sub, views in zip(subs, kept, strict=True):
            assert len(views) + sub.stats().dropped == 7  # arrived, or lost and counted
            for v in views:
                assert (v == v[0]).all()  # and what arrived is intact
        del kept, views, data


def test_a_subscriber_forced_off_shared_memory_gets_identical_data(broker: vbus.Bus) -> None:
    with client(broker) as a, client(broker) as b:
        on = b.subscribe("cam/**")
        off = b.subscribe("cam/**", shm=False)
        pub = a.publisher()
        frames = [np.random.default_rng(n).random((300, 300)) for n in range(5)]
        loan = pub.loan((512, 512), "uint16")
        loan[:] = 5
        for frame in frames:
            pub.publish("cam/x", frame)
        pub.publish("cam/loan", loan)
        for sub in (on, off):
            for expected in [*frames, loan]:
                msg = sub.recv(timeout=5)
                assert msg.data.tobytes() == expected.tobytes()
                assert msg.data.dtype == expected.dtype and msg.data.shape == expected.shape
            assert sub.stats().dropped == 0 and sub.stats().errors == 0
        stats = pub.stats()
        assert stats.shm_frames == 6 and stats.shm_twins == 6
        del msg, loan


def test_a_loan_is_published_without_a_copy(broker: vbus.Bus) -> None:
    with client(broker) as a, client(broker) as b:
        sub = b.subscribe("cam")
        pub = a.publisher()
        frame = pub.loan((1024, 1024), "uint16")
        assert frame.flags.writeable
        frame[:] = 3
        pub.publish("cam", frame)
        assert not frame.flags.writeable  # the subscribers' views share it now
        msg = sub.recv(timeout=5)
        assert (msg.data == 3).all() and msg.data.shape == (1024, 1024)
        for _ in range(200):  # loans never published are given back when collected
            pub.loan((1024, 1024), "uint16")
        assert pub.stats().shm_exhausted == 0
        del msg, frame


def test_without_a_pool_loan_is_an_ordinary_array(leakcheck: object) -> None:
    with vbus.Bus() as bus:  # in process: frames are shared without a pool already
        pub = bus.publisher()
        sub = bus.subscribe("cam")
        frame = pub.loan((256, 256), "float32")
        frame[:] = 1
        pub.publish("cam", frame)
        assert (sub.recv(timeout=5).data == 1).all()
        assert pub.stats().shm_frames == 0
    with pytest.raises(ValueError, match="shm_pool_bytes"):
        vbus.Bus(shm_pool_bytes=1000)


def test_pool_off_on_request(broker: vbus.Bus) -> None:
    with client(broker, shm_pool_bytes=0) as a, client(broker) as b:
        sub = b.subscribe("cam")
        pub = a.publisher()
        pub.publish("cam", np.ones(100_000))
        assert (sub.recv(timeout=5).data == 1).all()
        assert pub.stats().shm_frames == 0



@pytest.mark.parametrize("victim", ["publisher", "subscriber"])
def test_sigkill_of_either_side_leaves_nothing_and_the_survivor_healthy(victim: str) -> None:
    before = dev_shm()
    out = subprocess.run([sys.executable, CHILD, f"bus_{victim}_killed"], capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("survived"), out.stdout + out.stderr
    assert not shm_left_since(before)  # nothing new (other programs may remove their own)
    gc.collect()


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


REMOTE_PUBLISHER = """
import sys, numpy as np, vbus
with vbus.connect(sys.argv[1]) as bus:
    pub = bus.publisher()
    print("ready", flush=True)
    n = 0
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        pub.publish("cam/frame", np.full(100_000, n, dtype=np.int64))  # 800 kB
        pub.publish("cam/mark", n)  # the marker: the frame came before it, or was lost
        n += 1
        print("sent", n, flush=True)
    print("stats", pub.stats().shm_frames, pub.stats().shm_twins, flush=True)
"""


@pytest.mark.skipif(not _can_unshare(), reason="needs a network namespace (unshare -n)")
def test_a_publisher_of_another_host_reaches_a_subscriber_by_twins(
        leakcheck: object, tmp_path: Path) -> None:
    # Another network namespace is another host to shared memory: its abstract sockets are
    # out of reach. The broker is on ipc://, which both namespaces share.
    with vbus.Bus(bind=f"ipc://{tmp_path}/bus") as broker, vbus.connect(broker.address) as b:
        sub = b.subscribe("cam/**")
        child = subprocess.Popen(["unshare", "-n", sys.executable, "-c", REMOTE_PUBLISHER,
                                  broker.address], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdin is not None and child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            got: list[np.ndarray] = []
            for _ in range(200):  # one frame at a time until five have come by twin
                child.stdin.write("frame\n")
                child.stdin.flush()
                assert child.stdout.readline().startswith("sent")
                while (msg := sub.recv(timeout=10)).topic == "cam/frame":
                    got.append(msg.data)  # else it could not be mapped: lost, counted
                if len(got) == 5:
                    break
            child.stdin.write("stop\n")
            child.stdin.flush()
            stats = child.stdout.readline().split()
            assert child.wait(10) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            for f in (child.stdin, child.stdout):
                if f is not None:
                    f.close()
        assert len(got) == 5
        first = int(got[0][0])
        for i, data in enumerate(got):
            assert (data == first + i).all()  # identical and in order once twins flow
        assert sub.stats().dropped == first  # the frames before the twins: counted
        assert stats[0] == "stats" and int(stats[2]) >= 5  # the publisher sent twins
        del got, data, msg
