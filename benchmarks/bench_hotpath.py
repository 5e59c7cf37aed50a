"""Manual timing of vbus's per-message hot paths, one at a time, in one process.

    python benchmarks/bench_hotpath.py [--n N] [--repeat R]

No profiler (cProfile's per-call cost distorts a path that spends ~1 us a message): each
figure is the best of R timed loops of N messages, in ns per message.

- outbox-burst: Outbox.publish of a 64 B payload that joins the open batch (sans-io).
- publish-shell: Publisher.publish on an embedded bus (lock, flags, outbox, sends).
- inbox-batch: Inbox.feed of full 64 B batch frames, per message delivered.
- recv-fast: Subscriber.recv() of messages already in the inbox.
- recv-socket: Subscriber.recv() of batches waiting in the socket (drain + decode + pop).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import vbus
from vbus._proto import outbox as _outbox
from vbus._proto import topics as _topics
from vbus._proto.inbox import Inbox

PAYLOAD = bytes(range(64))
TOPIC = "bench/hot"


def best(fn: Callable[[int], None], n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t0)
    return min(times) / n * 1e9


def outbox_burst(n: int) -> None:
    box = _outbox.Outbox(b"12345678", batch_delay=0.0005)
    prefix = _topics.topic_prefix(TOPIC)
    publish = box.publish
    now = time.time()
    for i in range(n):
        publish(TOPIC, prefix, PAYLOAD, False, now + i * 1e-7)


def batch_frames(count: int) -> list[bytes]:
    box = _outbox.Outbox(b"12345678", batch_delay=10.0)
    prefix = _topics.topic_prefix(TOPIC)
    frames: list[bytes] = []
    now = time.time()
    i = 0
    while len(frames) < count:
        for send in box.publish(TOPIC, prefix, PAYLOAD, False, now + i * 1e-7):
            if send.count > 1:
                frames.append(send.frames[0])
        i += 1
    return frames


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    n, r = args.n, args.repeat
    print(f"outbox-burst   {best(outbox_burst, n, r):7.0f} ns/msg")

    with vbus.Bus() as bus:
        pub = bus.publisher()

        def shell(k: int) -> None:
            publish = pub.publish
            for _ in range(k):
                publish(TOPIC, PAYLOAD)

        print(f"publish-shell  {best(shell, n, r):7.0f} ns/msg")

    frames = batch_frames(max(n // 256, 1) + 2)[1:]  # the first batch was started apart
    pattern = _topics.compile_pattern(TOPIC)

    def inbox(k: int) -> None:
        box = Inbox(pattern, b"\xffready\0")
        box.confirmed, box._early = True, None
        for frame in frames:
            box.feed(frame, [])
        box.messages.clear()

    per_frame = sum(1 for _ in frames) * 256
    print(f"inbox-batch    {best(lambda _k: inbox(0), per_frame, r) :7.0f} ns/msg")

    with vbus.Bus() as bus:
        sub = bus.subscribe(TOPIC)
        box = sub._inbox
        msg = vbus.Message(TOPIC, PAYLOAD, "s", 1, 0.0)

        def fast(k: int) -> None:
            box.messages.extend([msg] * k)
            recv = sub.recv
            for _ in range(k):
                recv(1.0)

        print(f"recv-fast      {best(fast, n, r):7.0f} ns/msg")

        pub = bus.publisher()
        hwm_safe = 200  # batches: stay under the socket's high-water mark

        def from_socket(k: int) -> None:
            for frame in frames[:hwm_safe]:
                pub._publish_frames(frame)
            got = 0
            recv = sub.recv
            want = min(len(frames), hwm_safe) * 256
            while got < want:
                recv(5.0)
                got += 1

        m = min(len(frames), hwm_safe) * 256
        from_socket(0)  # warm
        print(f"recv-socket    {best(from_socket, m, r):7.0f} ns/msg  (includes relay sends)")


if __name__ == "__main__":
    main()
