"""The flusher thread (src/vbus/_flusher.py) in a real bus: it sends the last batch of every
burst without a close or a later publish, and it does not wake once per batch while its
publisher floods (its wake-ups are counted, not timed)."""

from __future__ import annotations

from typing import Any

import pytest

import vbus
from tests._support import LeakCheck
from vbus._flusher import Flusher
from vbus._proto.batch import MAX_MESSAGES

PAYLOAD = b"\x07" * 64
HWM = 100_000


def _flusher(bus: vbus.Bus) -> Flusher:
    flusher: Flusher | None = bus._core.flusher
    assert flusher is not None, "batching is on by default: the bus has a flusher"
    return flusher


def _flood(pub: vbus.Publisher, sub: vbus.Subscriber[Any], topic: str, total: int) -> None:
    for _ in range(total):
        pub.publish(topic, PAYLOAD)
    # Nothing is left behind: the last batch goes out by the flusher (no close, no later
    # publish), every message in order, none lost.
    seqs = [sub.recv(timeout=10.0).seq for _ in range(total)]
    assert seqs == list(range(1, total + 1))
    assert sub.stats().dropped == 0


@pytest.mark.timeout(60)
def test_flusher_does_not_wake_per_batch_during_a_flood(leakcheck: LeakCheck) -> None:
    # A delay of 1 s (the largest allowed) makes every batch of the flood full (256
    # messages) long before it is due, so publish() sends them all itself. The flusher
    # sleeps until the first one's deadline and must stay asleep however many batches its
    # publisher opens meanwhile: at most one wake-up a second of flood, not one per batch.
    batches = 100
    with vbus.Bus(hwm=HWM, batch_delay=1.0) as bus:
        flusher = _flusher(bus)
        sub = bus.subscribe("flood/x", hwm=HWM)
        pub = bus.publisher()
        requests, wakeups = flusher.requests, flusher.wakeups
        _flood(pub, sub, "flood/x", 1 + batches * MAX_MESSAGES)
        requests = flusher.requests - requests
        wakeups = flusher.wakeups - wakeups
        assert requests >= 1, "the flood was not batched"
        assert wakeups <= batches // 10, (
            f"the flusher woke {wakeups} times during a flood of {batches} batches")


@pytest.mark.timeout(60)
def test_the_last_batch_of_every_burst_goes_out_without_close(leakcheck: LeakCheck) -> None:
    # Bursts separated by quiet periods (each ends with the subscriber having everything):
    # the flusher must send each burst's last batch, i.e. watch the publisher again after it
    # went quiet, however many bursts.
    with vbus.Bus(hwm=HWM) as bus:
        flusher = _flusher(bus)
        sub = bus.subscribe("burst/*", hwm=HWM)
        pub = bus.publisher()
        expected: dict[str, int] = {}
        for burst in range(6):
            topics = ["burst/a", "burst/b"] if burst % 2 else ["burst/a"]
            sent = []
            for i in range(3 * MAX_MESSAGES // 2 + burst):  # full batches, then a part
                topic = topics[(i // 100) % len(topics)]
                pub.publish(topic, i)
                expected[topic] = expected.get(topic, 0) + 1
                sent.append((topic, expected[topic], i))
            got = []
            for _ in sent:
                msg = sub.recv(timeout=10.0)
                got.append((msg.topic, msg.seq, msg.data))
            assert got == sent, f"burst {burst}: order or content differs"
        # The flusher did the tails: each burst's last batch came without a later publish.
        assert flusher.wakeups >= 1
