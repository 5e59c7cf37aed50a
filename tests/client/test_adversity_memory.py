"""Memory bounded in bytes (issue 10, defects 8 and 9).

1. A subscriber that never reads, fed fresh 16 MiB numpy frames with default settings: the peak
   RSS of every process (one process with an embedded broker; or publisher, ``vbus broker`` and
   subscriber as three) stays within 256 MiB of queued data over its baseline, plus the frames
   in hand. The same with ``max_queue_bytes=32 MiB`` given to Bus()/connect()/subscribe() and
   ``vbus broker --max-queue-bytes``.
2. Sender churn: many valid messages, each from a new random sender id, crafted with
   ``vbus._proto.wire.build_frames`` and sent with ``Publisher._publish_frames``: the
   subscriber's RSS after the churn is less than 96 MiB over its baseline and it goes on
   working (a message from
   a real publisher arrives, no loss is counted for a sender whose seqs are consecutive).

Each process watches the RSS it is bound by after every frame and stops early once it is over,
so a core that does not bound memory fails at ~bound + a few frames instead of taking GiBs of a
shared machine. Every process runs with a hard timeout.

Knobs: VBUS_ADVERSITY_FRAMES (default 200), VBUS_ADVERSITY_SLACK_MIB (what a process may hold
besides its queues: frames in hand, allocator slack; default 48), VBUS_ADVERSITY_CHURN (messages,
default 500 000, ~11-20 s here; 1 M takes 22-40 s on this busy machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.childproc import Child, run_child

MiB = 1024 * 1024
FRAMES = int(os.environ.get("VBUS_ADVERSITY_FRAMES", "200"))
SLACK = int(os.environ.get("VBUS_ADVERSITY_SLACK_MIB", "48")) * MiB
DEFAULT_QUEUE = 256 * MiB
SMALL_QUEUE = 32 * MiB
CHURN = int(os.environ.get("VBUS_ADVERSITY_CHURN", "500000"))
# The subscriber's own state is bounded at about 5 MiB (16 384 streams, 4 096 sender names);
# the rest is the allocator's high-water mark, which a loaded machine (queues filling behind a
# slow subscriber) drives up: 7-15 MiB quiet, up to 59 MiB measured beside other test suites.
# The code before the fix grew 162 MiB at 500 k senders, 352 MiB at 1 M.
CHURN_GROWTH = 96 * MiB
CHURN_CONTROL = os.environ.get("VBUS_ADVERSITY_CHURN_CONTROL", "0")  # 1: one sender, no churn

EMBEDDED = r"""
import numpy as np
import vbus

MAXQ, FRAMES, LIMIT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
kw = {"max_queue_bytes": MAXQ} if MAXQ else {}
warm_up()
bus = vbus.Bus(**kw)
stalled = bus.subscribe("cam/frame", **kw)  # never read
done = bus.subscribe("end")
pub = bus.publisher()
base = vmstat("VmRSS")
print(f"BASE {base}", flush=True)
started = time.monotonic()
sent = 0
for i in range(FRAMES):
    frame = np.full((4096, 4096), i % 251, dtype=np.uint8)  # 16 MiB, fresh every time
    pub.publish("cam/frame", frame)
    del frame
    sent += 1
    rss = vmstat("VmRSS")
    if rss - base > LIMIT:
        print(f"OVER at frame {i}: RSS {(rss - base) / MiB:.0f} MiB over the baseline", flush=True)
        break
    if time.monotonic() - started > 30:
        break
# The marker goes through the broker after every frame before it: once it is here, the queues
# hold all they are going to hold.
for attempt in range(40):
    pub.publish("end", attempt)
    try:
        done.recv(timeout=0.5)
        break
    except TimeoutError:
        pass
else:
    fail("the end marker never arrived")
peak = vmstat("VmHWM") - base
print(f"SENT {sent} in {time.monotonic() - started:.1f} s, stats {pub.stats()}", flush=True)
print(f"PEAK embedded {peak}", flush=True)
bus.close()
print("DONE", flush=True)
"""


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("queue", ["default", "32MiB"])
def test_stalled_subscriber_of_16mib_frames_embedded(queue: str) -> None:
    maxq = 0 if queue == "default" else SMALL_QUEUE
    limit = (maxq or DEFAULT_QUEUE) + SLACK
    child = run_child(EMBEDDED, timeout=60.0, args=(str(maxq), str(FRAMES), str(limit)))
    print(f"\nembedded, queue {queue}: {child.how()} in {child.elapsed:.1f} s; "
          f"{child.values('OVER')} {child.values('SENT')}; peak over baseline "
          f"{[_mib(int(v.split()[-1])) for v in child.values('PEAK')]} (limit {_mib(limit)})")
    child.check("DONE")
    assert not child.values("OVER"), child.report()
    peak = int(child.value("PEAK embedded").split()[-1])
    assert peak <= limit, f"peak RSS {_mib(peak)} over the baseline, limit {_mib(limit)}"


SUBSCRIBER = r"""
import vbus

ADDRESS, MAXQ = sys.argv[1], int(sys.argv[2])
kw = {"max_queue_bytes": MAXQ} if MAXQ else {}
warm_up()
bus = vbus.connect(ADDRESS, **kw)
stalled = bus.subscribe("cam/frame", **kw)  # never read
done = bus.subscribe("end")
pub = bus.publisher()
base = vmstat("VmRSS")
pub.publish("sub/ready", {"pid": os.getpid(), "base": base}, retain=True)
print(f"BASE {base}", flush=True)
try:
    done.recv(timeout=45.0)
except TimeoutError:
    fail("the end marker never arrived")
pub.publish("sub/done", 1)
peak = vmstat("VmHWM") - base
print(f"PEAK subscriber {peak}", flush=True)
bus.close()
print("DONE", flush=True)
"""

PUBLISHER = r"""
import numpy as np
import vbus

ADDRESS, MAXQ, FRAMES, LIMIT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BROKER_PID, BROKER_BASE = int(sys.argv[5]), int(sys.argv[6])
kw = {"max_queue_bytes": MAXQ} if MAXQ else {}
warm_up()
bus = vbus.connect(ADDRESS, **kw)
ready = bus.subscribe("sub/ready")
acks = bus.subscribe("sub/done")
info = ready.recv(timeout=30.0).data  # retained: the subscriber is in place
pub = bus.publisher()
base = vmstat("VmRSS")
watched = {"publisher": ("self", base), "broker": (BROKER_PID, BROKER_BASE),
           "subscriber": (info["pid"], info["base"])}
started = time.monotonic()
sent = 0
for i in range(FRAMES):
    frame = np.full((4096, 4096), i % 251, dtype=np.uint8)  # 16 MiB, fresh every time
    pub.publish("cam/frame", frame)
    del frame
    sent += 1
    over = {name: vmstat("VmRSS", pid) - b for name, (pid, b) in watched.items()
            if vmstat("VmRSS", pid) - b > LIMIT}
    if over:
        print(f"OVER at frame {i}: {over}", flush=True)
        break
    if time.monotonic() - started > 30:
        break
for attempt in range(40):
    pub.publish("end", attempt)
    try:
        acks.recv(timeout=0.5)
        break
    except TimeoutError:
        pass
else:
    fail("the subscriber never confirmed the end marker")
print(f"SENT {sent} in {time.monotonic() - started:.1f} s, stats {pub.stats()}", flush=True)
print(f"PEAK publisher {vmstat('VmHWM') - base}", flush=True)
pub.clear_retained("sub/ready")
bus.close()
print("DONE", flush=True)
"""


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("queue", ["default", "32MiB"])
def test_stalled_subscriber_of_16mib_frames_standalone(queue: str) -> None:
    """Publisher, `vbus broker` and subscriber: three processes, each bounded."""
    maxq = 0 if queue == "default" else SMALL_QUEUE
    limit = (maxq or DEFAULT_QUEUE) + SLACK
    command = [sys.executable, "-m", "vbus", "broker", "--bind", "tcp://127.0.0.1:0"]
    if maxq:
        command += ["--max-queue-bytes", str(maxq)]
    broker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert broker.stdout is not None
        address = broker.stdout.readline().strip()
        if not address:
            broker.wait(10.0)
            pytest.fail(f"`{' '.join(command[1:])}` did not start (exit {broker.returncode}): "
                        f"{broker.stderr.read() if broker.stderr else ''}")
        broker_base = _vm(broker.pid, "VmRSS")
        results: dict[str, Child] = {}

        def run(name: str, code: str, args: tuple[str, ...]) -> None:
            results[name] = run_child(code, timeout=60.0, args=args)

        threads = [
            threading.Thread(target=run, args=("subscriber", SUBSCRIBER, (address, str(maxq)))),
            threading.Thread(target=run, args=("publisher", PUBLISHER, (
                address, str(maxq), str(FRAMES), str(limit), str(broker.pid),
                str(broker_base)))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(70.0)
        broker_peak = _vm(broker.pid, "VmHWM") - broker_base
    finally:
        broker.terminate()
        try:
            _, broker_err = broker.communicate(timeout=10.0)
        except subprocess.TimeoutExpired:
            broker.kill()
            _, broker_err = broker.communicate(timeout=10.0)
    pub, sub = results["publisher"], results["subscriber"]
    peaks = {
        "publisher": int(pub.value("PEAK publisher").split()[-1]) if pub.values("PEAK") else -1,
        "broker": broker_peak,
        "subscriber": int(sub.value("PEAK subscriber").split()[-1]) if sub.values("PEAK") else -1,
    }
    print(f"\nstandalone, queue {queue}: publisher {pub.how()}, subscriber {sub.how()}, broker "
          f"exit {broker.returncode}; {pub.values('OVER')} {pub.values('SENT')}; peak RSS over "
          f"baseline {({k: _mib(v) for k, v in peaks.items()})} (limit {_mib(limit)})")
    pub.check("DONE")
    sub.check("DONE")
    assert not pub.values("OVER"), pub.report()
    over = {k: _mib(v) for k, v in peaks.items() if v > limit}
    assert not over, f"peak RSS over the baseline beyond {_mib(limit)}: {over}"
    assert broker.returncode == 0, broker_err


CHURN_SUBSCRIBER = r"""
import vbus

ADDRESS, TOTAL, BLOCK = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
warm_up()
bus = vbus.Bus(bind=ADDRESS, hwm=4 * BLOCK)
sub = bus.subscribe("churn/*", hwm=4 * BLOCK)
pub = bus.publisher()
pub.publish("ready", 1, retain=True)  # the sender waits for it: our subscription is active
base = None
received = 0
started = time.monotonic()
for msg in sub:
    if msg.topic == "churn/end":
        break
    received += 1
    i = msg.data
    if i == BLOCK - 1 and base is None:
        base = vmstat("VmRSS")  # after a warm-up block from one sender
        print(f"BASE {base}", flush=True)
    if (i + 1) % BLOCK == 0:
        pub.publish("ack", i)
    if time.monotonic() - started > 80:
        fail(f"too slow: {received} messages in 80 s")
# What stays is state; the peak (VmHWM) also holds passing bursts in the queues.
growth = vmstat("VmRSS") - base
print(f"PEAKGROWTH {vmstat('VmHWM') - base}", flush=True)
stats = sub.stats()
print(f"RECEIVED {received} in {time.monotonic() - started:.1f} s; stats {stats}", flush=True)
print(f"GROWTH {growth}", flush=True)
print(f"END {msg.sender} {msg.data}", flush=True)
if stats.dropped:
    fail(f"{stats.dropped} losses counted, where none happened")
bus.close()
print("DONE", flush=True)
"""

CHURN_SENDER = r"""
import random
import vbus
from vbus._proto import wire as _wire

ADDRESS, TOTAL, BLOCK = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CONTROL = sys.argv[4] == "1"  # the control experiment: one sender only, no churn
warm_up()
bus = vbus.connect(ADDRESS, timeout=30.0, hwm=4 * BLOCK)  # the subscriber binds it
bus.subscribe("ready").recv(timeout=30.0)
acks = bus.subscribe("ack")
pub = bus.publisher()
encoder = _wire.new_encoder()
prefix = b"churn/x\0"
rng = random.Random(20261201)
steady = rng.randbytes(_wire.SENDER_SIZE)  # one sender with consecutive seqs
steady_seq = 0
acked = -1
started = time.monotonic()
for i in range(TOTAL):
    if i % BLOCK == 0 and i >= 2 * BLOCK:
        # Flow control: at most two blocks in flight, so the subscriber loses nothing and
        # every message reaches its state.
        while acked < i - BLOCK - 1:
            try:
                acked = acks.recv(timeout=20.0).data
            except TimeoutError:
                fail(f"no ack for message {i - BLOCK - 1} (last ack {acked})")
    payload = _wire.encode_payload(i, encoder)
    if CONTROL or i < BLOCK or i % 1000 == 0:
        steady_seq += 1
        sender, seq = steady, steady_seq
    else:
        sender, seq = rng.randbytes(_wire.SENDER_SIZE), 1
    frame, external = _wire.build_frames(prefix, 0, sender, seq, time.time(), payload)
    pub._publish_frames(frame, external)
print(f"SENT {TOTAL} in {time.monotonic() - started:.1f} s; stats {pub.stats()}", flush=True)
pub.publish("churn/end", "after the churn")  # a real publisher: the subscriber still works
bus.close()
print("DONE", flush=True)
"""


@pytest.mark.timeout(150)
def test_sender_churn_keeps_subscriber_memory_bounded(tmp_path: os.PathLike[str]) -> None:
    block = 10_000
    address = f"ipc://{tmp_path}/churn"
    results: dict[str, Child] = {}

    def run(name: str, code: str) -> None:
        results[name] = run_child(code, timeout=110.0,
                                  args=(address, str(CHURN), str(block), CHURN_CONTROL))

    subscriber = threading.Thread(target=run, args=("subscriber", CHURN_SUBSCRIBER))
    subscriber.start()
    # The subscriber's process binds the address; the sender's connect() waits for the broker
    # there and then for the subscriber's retained "ready" (readiness, not a sleep).
    sender = threading.Thread(target=run, args=("sender", CHURN_SENDER))
    sender.start()
    sender.join(120.0)
    subscriber.join(120.0)
    sub, snd = results["subscriber"], results["sender"]
    growth = int(sub.value("GROWTH")) if sub.values("GROWTH") else -1
    print(f"\nchurn of {CHURN} messages: sender {snd.how()} {snd.values('SENT')}, subscriber "
          f"{sub.how()} {sub.values('RECEIVED')}; RSS growth {_mib(growth)} (peak "
          f"{[_mib(int(v)) for v in sub.values('PEAKGROWTH')]})")
    snd.check("DONE")
    sub.check("DONE")
    assert growth < CHURN_GROWTH, f"subscriber RSS grew by {_mib(growth)} over {CHURN} senders"
    assert sub.value("END").endswith("after the churn"), sub.report()

