"""Order across topics (issue 10, defect 7): the messages of one publisher arrive in publish
order across all of its topics, in a burst, with batching on (the default), on every transport.

A bluesky-like document stream (RE0/start, RE0/descriptor, RE0/event x N with RE0/resource and
RE0/datum among them, RE0/stop), then a stretch of randomly interleaved topics, in one burst
from one publisher; payloads of every kind (dicts, ints, small and large bytes, numpy arrays,
a retained value) each carry a counter. A subscriber of ``RE0/**`` must see the counters in
order, none lost (the high-water marks are big enough for the whole burst).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import vbus
from tests._support import LeakCheck

HWM = 200_000
RUNS = 20
EVENTS = 450
INTERLEAVED = 1_000


def _documents(rng: random.Random) -> list[tuple[str, str]]:
    """(topic, payload kind) in publish order."""
    docs: list[tuple[str, str]] = []
    for _ in range(RUNS):
        docs += [("RE0/start", "dict"), ("RE0/descriptor", "dict")]
        for i in range(EVENTS):
            if i % 50 == 10:
                docs += [("RE0/resource", "dict"), ("RE0/datum", "int")]
            if i % 97 == 5:
                docs.append(("RE0/descriptor", "dict"))  # a second stream starts mid-run
            docs.append(("RE0/event", rng.choice(["dict", "dict", "dict", "int", "bytes"])))
            if i % 149 == 7:
                docs.append(("RE0/event", rng.choice(["big_bytes", "array"])))
            if i % 211 == 3:
                docs.append(("RE0/state", "retained"))
        docs.append(("RE0/stop", "dict"))
    topics = ["RE0/event", "RE0/datum", "RE0/a/b", "RE0/descriptor", "RE0/x.y"]
    kinds = ["dict", "int", "bytes", "dict", "int"]
    for _ in range(INTERLEAVED):
        docs.append((rng.choice(topics), rng.choice(kinds)))
    return docs


def _payload(kind: str, n: int) -> Any:
    if kind == "dict":
        return {"seq_num": n, "uid": f"{n:08x}", "data": {"x": n * 0.5, "det": [n, n]}}
    if kind == "int":
        return n
    if kind == "bytes":
        return n.to_bytes(8, "little") + b"e" * 24
    if kind == "big_bytes":
        return n.to_bytes(8, "little") + b"B" * 100_000
    if kind == "array":
        return np.full((64, 64), n, dtype=np.int64)
    return {"retained": n}


def _counter(data: Any) -> int:
    if isinstance(data, dict):
        return int(data["seq_num"] if "seq_num" in data else data["retained"])
    if isinstance(data, int):
        return data
    if isinstance(data, np.ndarray):
        return int(data.flat[0])
    return int.from_bytes(bytes(data[:8]), "little")


@pytest.fixture(params=["inproc", "ipc", "tcp"])
def burst_bus(request: pytest.FixtureRequest, leakcheck: LeakCheck,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[vbus.Bus]:
    """A bus with queues big enough for the whole burst, reached over each transport."""
    if request.param == "inproc":
        owner = vbus.Bus(hwm=HWM)
        client = owner
    elif request.param == "ipc":
        path = tmp_path_factory.mktemp("ipc") / "bus"
        owner = vbus.Bus(bind=f"ipc://{path}", hwm=HWM)
        client = vbus.connect(owner.address, hwm=HWM)
    else:
        owner = vbus.Bus(bind="tcp://127.0.0.1:0", hwm=HWM)
        client = vbus.connect(owner.address, hwm=HWM)
    yield client
    client.close()
    owner.close()


@pytest.mark.timeout(60)
def test_one_publishers_burst_arrives_in_publish_order_across_topics(
    burst_bus: vbus.Bus,
) -> None:
    docs = _documents(random.Random(20261201))
    total = len(docs)
    assert total >= 10_000 and len({t for t, _ in docs}) >= 3
    sub = burst_bus.subscribe("RE0/**", hwm=HWM)
    pub = burst_bus.publisher()
    for n, (topic, kind) in enumerate(docs):
        pub.publish(topic, _payload(kind, n), retain=kind == "retained")
    received: list[tuple[int, str]] = []
    senders = set()
    last_seq: dict[str, int] = {}
    seq_errors: list[tuple[str, int, int]] = []
    try:
        while len(received) < total:
            msg = sub.recv(timeout=10.0)
            received.append((_counter(msg.data), msg.topic))
            senders.add(msg.sender)
            if msg.seq != last_seq.get(msg.topic, 0) + 1 and len(seq_errors) < 5:
                seq_errors.append((msg.topic, last_seq.get(msg.topic, 0), msg.seq))
            last_seq[msg.topic] = msg.seq
    except TimeoutError:
        pass
    counters = [c for c, _ in received]
    lost = total - len(received)
    moved = next((i for i, c in enumerate(counters) if c != i), None)
    stops = [i for i, (c, t) in enumerate(received) if t == "RE0/stop"]
    late_events = 0
    if stops:  # events of a run that arrived after its stop
        first_stop = counters[stops[0]]
        late_events = sum(1 for c, t in received[stops[0]:] if t == "RE0/event" and c < first_stop)
    print(f"\n{total} messages on {len({t for t, _ in docs})} topics: received {len(received)}, "
          f"lost {lost}, first out of order at {moved}, events after the first stop: "
          f"{late_events}, pub stats {pub.stats()}, sub stats {sub.stats()}")
    assert lost == 0, f"{lost} of {total} lost (sub stats {sub.stats()})"
    assert moved is None, (
        f"order broken at position {moved}: got #{counters[moved]} ({received[moved][1]}) "
        f"where #{moved} ({docs[moved][0]}) was due; {late_events} events of the first run "
        f"arrived after its RE0/stop"
    )
    assert senders == {pub.id}
    assert not seq_errors, f"per-topic seq not consecutive: {seq_errors}"
    sub.close()
    pub.close()
