"""Differential check of two vbus versions' sans-io hot paths: the same random publishes.

    PYTHONPATH=/tmp/old/src python benchmarks/diff_hotpath.py SEED > old.txt
    PYTHONPATH=src python benchmarks/diff_hotpath.py SEED > new.txt && diff old.txt new.txt

An Outbox (fake clock, batching on, chunking at random) is fed 20 000 random publishes of
mixed payloads (bytes small and large, ints, strings, dicts, retained values, relays,
flush_due, reports) and everything it sends goes into an Inbox. Every send (the wall-clock
time of report frames zeroed), every delivered Message (type, value, read-only-ness of
memoryviews, seq, time) and the counters of both are printed: a leaner hot path must print
the same lines.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from vbus._proto import outbox as _outbox
from vbus._proto import topics as _topics
from vbus._proto.inbox import Inbox

REPORT = b"$vbus/report"
TIME_AT = 20  # the header's time field, after the topic's terminator


def main(seed: int) -> None:
    rng = random.Random(seed)
    box = _outbox.Outbox(b"abcdefgh", batch_delay=0.0005, chunk=rng.random() < 0.5)
    topics = ["a", "b/c", "d"]
    now = 1764600000.0 + rng.random()
    inbox = Inbox(_topics.compile_pattern("**"), b"\xffready\0")
    inbox.confirmed, inbox._early = True, None

    def take(sends: Any) -> None:
        for s in sends:
            first = bytes(s.frames[0])
            shown = first
            if first.startswith(REPORT):  # its time is the wall clock's: zeroed
                at = first.index(b"\0") + 1 + TIME_AT
                shown = first[:at] + bytes(8) + first[at + 8 :]
            print(repr((s.count, s.last, s.tracked, [shown, *map(bytes, s.frames[1:])])))
            if first[:1] != b"\xff":
                inbox.feed(first, [memoryview(f) for f in s.frames[1:]])

    for i in range(20000):
        r = rng.random()
        now += rng.choice([1e-7, 2e-6, 5e-6, 9e-6, 2e-5, 3e-4, 6e-4, 1.1, 1e-6])
        t = rng.choice(topics) if rng.random() < 0.1 else topics[i // 700 % 3]
        data = rng.choice([b"x" * rng.randint(0, 300), rng.randint(-5, 10**6), "s", None,
                           {"k": [1, 2]}, b"y" * 70000, 1.5])
        if r < 0.01:
            take(box.flush_due(now))
        elif r < 0.012:
            take([box.report(now)])
        elif r < 0.014:
            take(box.relay(b"a\0" + bytes(32) + b"zz"))
        else:
            take(box.publish(t, _topics.topic_prefix(t), data, rng.random() < 0.01, now))
    take(box.flush())
    take([box.report(now, closed=True)])
    print(repr((box.published, box.dropped, sorted(box._seqs.items()))))
    for m in inbox.messages:
        d = m.data
        view = isinstance(d, memoryview)
        print(repr((m.topic, type(d).__name__, bytes(d) if view else d, m.sender, m.seq,
                    m.time, m.retained, d.readonly if view else None)))
    print(repr((inbox.received, inbox.lost, inbox.errors, inbox.invalid)))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
