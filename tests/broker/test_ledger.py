"""Unit tests of the broker's bookkeeping (vbus._broker.ledger) and the control frames it reads
(vbus._proto.control), on bytes alone."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbus._broker import ledger as _ledger
from vbus._broker.ledger import Ledger, RetainedStore
from vbus._proto import control as _control
from vbus._proto import wire as _wire
from vbus._proto.control import REPORT_DECODER, Report, parse_want, want_subscription
from vbus._proto.stats import BrokerStats, ForwarderStats, TopicStats, stats_payload
from vbus._proto.topics import compile_pattern, topic_prefix

ENC = _wire.new_encoder()
SENDER = bytes.fromhex("0123456789abcdef")
MAX_COUNT = 2**63 - 1
STATS_DECODER = msgspec.msgpack.Decoder()


def sender(i: int) -> bytes:
    return i.to_bytes(8, "big")


def retain_frame(topic: str, value: Any = 1, seq: int = 1, flags: int = _wire.FLAG_RETAINED,
                 external: bool = False) -> tuple[bytes, list[bytes]]:
    payload = _wire.Payload(_wire.KIND_BYTES, b"", b"\x00" * 10) if external else (
        _wire.encode_payload(value, ENC))
    frame, ext = _wire.build_frames(topic_prefix(topic), flags, SENDER, seq, 1.0, payload)
    return _control.RETAIN + frame, [] if ext is None else [bytes(ext)]


def clear_frame(topic: str) -> bytes:
    return _control.control_frame(_control.RETAIN + topic.encode(), SENDER, _wire.FLAG_CLEAR)


# -- RetainedStore -----------------------------------------------------------------------------
def test_take_keeps_the_original_frames() -> None:
    store = RetainedStore()
    first, rest = retain_frame("stage/state", {"pos": 2}, seq=3)
    assert store.take(first, rest) is True
    assert len(store) == 1
    [frames] = store.matching(compile_pattern("stage/state"))
    assert frames == [first[len(_control.RETAIN) :]]
    env = _wire.parse_envelope(frames[0])
    assert (env.topic, env.seq, env.flags) == ("stage/state", 3, _wire.FLAG_RETAINED)


def test_take_keeps_the_external_frame() -> None:
    store = RetainedStore()
    first, rest = retain_frame("cam/frame", external=True)
    assert rest == [b"\x00" * 10]
    assert store.take(first, rest)
    assert store.matching(compile_pattern("cam/*")) == [[first[len(_control.RETAIN) :], *rest]]


def test_a_later_value_replaces_the_earlier() -> None:
    store = RetainedStore()
    store.take(*retain_frame("a", 1, seq=1))
    second = retain_frame("a", 2, seq=2)
    store.take(*second)
    assert len(store) == 1
    assert store.matching(compile_pattern("a")) == [[second[0][len(_control.RETAIN) :]]]


def test_clear_forgets_the_topic() -> None:
    store = RetainedStore()
    store.take(*retain_frame("a"))
    store.take(*retain_frame("b"))
    assert store.take(clear_frame("a"), []) is True
    assert [_wire.parse_envelope(f[0]).topic for f in store.matching(compile_pattern("*"))] == [
        "b"
    ]
    assert store.take(clear_frame("never"), []) is True  # clearing nothing is fine
    assert len(store) == 1


@pytest.mark.parametrize("bad", [
    b"", b"garbage", b"stage/x\0short", b"stage/x\0" + b"\x02" + b"\0" * 27,  # version 2
    b"\0" + b"\x01" + b"\0" * 27,  # empty topic
])
def test_take_refuses_what_does_not_parse(bad: bytes) -> None:
    store = RetainedStore()
    assert store.take(_control.RETAIN + bad, []) is False
    assert len(store) == 0
    assert store.refused == 0  # invalid is not refused: refused counts the limit only


def test_limit_refuses_new_topics_but_replaces_old_ones() -> None:
    store = RetainedStore(limit=3)
    for t in ("a", "b", "c"):
        assert store.take(*retain_frame(t))
    assert store.take(*retain_frame("d")) is False
    assert store.take(*retain_frame("e")) is False
    assert store.refused == 2
    assert len(store) == 3
    assert store.take(*retain_frame("b", 2, seq=2)) is True  # replacing works when full
    assert store.refused == 2
    assert store.take(clear_frame("a"), []) is True
    assert store.take(*retain_frame("d")) is True  # room again
    topics = [_wire.parse_envelope(f[0]).topic for f in store.matching(compile_pattern("**"))]
    assert topics == ["b", "c", "d"]


def test_default_limit() -> None:
    assert _ledger.MAX_RETAINED_TOPICS == 100_000
    assert RetainedStore()._limit == 100_000


@given(st.lists(st.sampled_from(["z", "a/b", "a", "a/c/d", "b/a", "a/a", "A", "_x", "a.b"]),
                unique=True))
def test_matching_is_in_topic_order(topics: list[str]) -> None:
    store = RetainedStore()
    for t in topics:
        store.take(*retain_frame(t))
    found = [_wire.parse_envelope(f[0]).topic for f in store.matching(compile_pattern("**"))]
    assert found == sorted(topics)
    under_a = [_wire.parse_envelope(f[0]).topic for f in store.matching(compile_pattern("a/**"))]
    assert under_a == sorted(t for t in topics if t == "a" or t.startswith("a/"))
    one = [_wire.parse_envelope(f[0]).topic for f in store.matching(compile_pattern("*/a"))]
    assert one == sorted(t for t in topics if t.count("/") == 1 and t.endswith("/a"))


def test_leading_wildcards_do_not_match_reserved_topics() -> None:
    store = RetainedStore()
    store.take(*retain_frame("$vbus/x"))  # a foreign publisher may send it; the store keeps it
    store.take(*retain_frame("a"))
    assert len(store) == 2
    assert len(store.matching(compile_pattern("**"))) == 1
    assert len(store.matching(compile_pattern("$vbus/**"))) == 1


# -- Ledger ------------------------------------------------------------------------------------
def pub_report(topics: dict[str, tuple[int, int]], dropped: int = 0, closed: bool = False
               ) -> Report:
    return Report("publisher", topics=topics, dropped=dropped, closed=closed)


def sub_report(received: int, dropped: int) -> Report:
    return Report("subscriber", received=received, dropped=dropped)


FORWARDER = ForwarderStats(messages_in=5, bytes_in=50, messages_out=6, bytes_out=60)
NO_FORWARDER = ForwarderStats()


def snapshot(ledger: Ledger, now: float, forwarder: ForwarderStats = NO_FORWARDER,
             subscribers: int = 0) -> dict[str, Any]:
    """The ledger's snapshot as the plain data a subscriber of ``$vbus/stats`` decodes."""
    data: dict[str, Any] = msgspec.to_builtins(ledger.snapshot(now, forwarder, subscribers))
    return data


def test_snapshot_totals() -> None:
    ledger = Ledger("a1b2c3d4", started=100.0)
    ledger.take(sender(1), pub_report({"x": (10, 100), "y": (1, 13)}, dropped=2))
    ledger.take(sender(2), pub_report({"x": (5, 60)}, dropped=1))
    ledger.take(sender(3), sub_report(received=12, dropped=4))
    snap = ledger.snapshot(110.0, FORWARDER, subscribers=7)
    assert snap == BrokerStats(
        broker="a1b2c3d4",
        time=110.0,
        uptime=10.0,
        messages_in=5, bytes_in=50, messages_out=6, bytes_out=60,
        subscribers=7,
        publishers=2,
        dropped=2 + 1 + 4,
        topics={"x": TopicStats(15, 160, 0.0, 0.0), "y": TopicStats(1, 13, 0.0, 0.0)},
        topics_total=2,
    )
    assert list(snap.topics) == ["x", "y"]


def test_snapshot_without_forwarder_counts() -> None:
    snap = snapshot(Ledger("b", 0.0), 1.0)
    assert snap["messages_in"] == snap["bytes_out"] == 0
    assert snap["topics"] == {} and snap["publishers"] == 0 and snap["dropped"] == 0


def test_a_later_report_replaces_the_earlier_one() -> None:
    ledger = Ledger("b", 0.0)
    ledger.take(sender(1), pub_report({"x": (10, 100)}))
    ledger.take(sender(1), pub_report({"x": (12, 130)}))
    assert snapshot(ledger, 1.0)["topics"]["x"]["messages"] == 12


def test_rates_from_two_snapshots() -> None:
    ledger = Ledger("b", 0.0)
    ledger.take(sender(1), pub_report({"x": (10, 100)}))
    first = snapshot(ledger, 1000.0)
    assert first["topics"]["x"]["message_rate"] == 0.0
    ledger.take(sender(1), pub_report({"x": (30, 400)}))
    ledger.take(sender(2), pub_report({"y": (7, 70)}))
    second = snapshot(ledger, 1002.0)
    assert second["topics"]["x"] == {
        "messages": 30, "bytes": 400, "message_rate": 10.0, "byte_rate": 150.0
    }
    assert second["topics"]["y"]["message_rate"] == 0.0  # new this time: no rate yet
    third = snapshot(ledger, 1002.5)
    assert third["topics"]["x"]["message_rate"] == 0.0
    assert third["topics"]["y"]["byte_rate"] == 0.0


@given(m1=st.integers(0, 2**53), dm=st.integers(0, 2**40), dt=st.floats(0.001, 1000.0))
def test_rate_is_the_difference_over_the_interval(m1: int, dm: int, dt: float) -> None:
    ledger = Ledger("b", 0.0)
    ledger.take(sender(1), pub_report({"x": (m1, m1)}))
    snapshot(ledger, 50.0)
    ledger.take(sender(1), pub_report({"x": (m1 + dm, m1)}))
    topic = snapshot(ledger, 50.0 + dt)["topics"]["x"]
    assert topic["message_rate"] == pytest.approx(dm / dt)
    assert topic["byte_rate"] == 0.0


def test_closed_publishers_count_in_totals_not_in_publishers() -> None:
    ledger = Ledger("b", 0.0)
    ledger.take(sender(1), pub_report({"x": (3, 39)}))
    ledger.take(sender(2), pub_report({"x": (4, 52)}))
    assert snapshot(ledger, 1.0)["publishers"] == 2
    ledger.take(sender(2), pub_report({"x": (5, 65)}, dropped=1, closed=True))
    snap = snapshot(ledger, 2.0)
    assert snap["publishers"] == 1
    assert snap["topics"]["x"]["messages"] == 8
    assert snap["dropped"] == 1
    ledger.take(sender(1), pub_report({"x": (3, 39)}, closed=True))
    assert snapshot(ledger, 3.0)["publishers"] == 0


def test_subscriber_reports_do_not_make_topics_or_publishers() -> None:
    ledger = Ledger("b", 0.0)
    ledger.take(sender(1), Report("subscriber", topics={"x": (1, 1)}, dropped=3))
    ledger.take(sender(2), Report("something else", dropped=2))  # not "publisher"
    snap = snapshot(ledger, 1.0)
    assert snap["topics"] == {} and snap["publishers"] == 0 and snap["dropped"] == 5


def huge_ledger() -> Ledger:
    """Totals past int64: every report is valid (≤ 2**53), their sums are not."""
    ledger = Ledger("b", 0.0)
    for i in range(1100):
        ledger.take(sender(i), pub_report({"x": (2**53, 2**53)}, dropped=2**53))
    ledger.take(sender(5000), sub_report(received=2**53, dropped=2**53))
    return ledger


def test_huge_counts_are_clamped_and_stay_encodable() -> None:
    snap = snapshot(huge_ledger(), 1.0, FORWARDER, 1)
    assert snap["topics"]["x"]["messages"] == MAX_COUNT
    assert snap["topics"]["x"]["bytes"] == MAX_COUNT
    assert snap["dropped"] == MAX_COUNT
    decoded = STATS_DECODER.decode(stats_payload(msgspec.convert(snap, BrokerStats)).inline)
    assert decoded == snap


def test_clamped_counts_have_no_negative_rate() -> None:
    ledger = huge_ledger()
    snapshot(ledger, 1.0)
    topic = snapshot(ledger, 2.0)["topics"]["x"]
    assert topic["message_rate"] == 0.0
    assert topic["byte_rate"] == 0.0


def test_reporters_are_capped_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ledger, "MAX_REPORTERS", 3)
    ledger = Ledger("b", 0.0)
    for i in range(3):
        ledger.take(sender(i), pub_report({f"t{i}": (1, 1)}))
        ledger.take(sender(100 + i), sub_report(0, 1))
    ledger.take(sender(1), pub_report({"t1": (2, 2)}))  # an update evicts nobody
    assert sorted(snapshot(ledger, 1.0)["topics"]) == ["t0", "t1", "t2"]
    ledger.take(sender(3), pub_report({"t3": (1, 1)}))  # a new one evicts the first seen
    snap = snapshot(ledger, 2.0)
    assert sorted(snap["topics"]) == ["t1", "t2", "t3"]
    assert snap["publishers"] == 3
    assert snap["dropped"] == 3  # the subscribers' book is full, not touched
    ledger.take(sender(103), sub_report(0, 10))
    assert snapshot(ledger, 3.0)["dropped"] == 1 + 1 + 10


def test_default_reporter_cap() -> None:
    assert _ledger.MAX_REPORTERS == 100_000


# -- _control: want subscriptions --------------------------------------------------------------
def test_want_subscription_layout() -> None:
    assert want_subscription(b"5f3a", "stage/*") == b"\xfevbus/want/5f3a\0stage/*"


@given(token=st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b),
       pattern=st.text(st.characters(max_codepoint=127), max_size=40))
def test_want_round_trip(token: bytes, pattern: str) -> None:
    assert parse_want(want_subscription(token, pattern)) == (token, pattern)


@pytest.mark.parametrize("body", [
    _control.WANT,  # nothing
    _control.WANT + b"token",  # no separator
    _control.WANT + b"\0pattern",  # empty token
    _control.WANT + b"tok\0caf\xc3\xa9",  # non-ASCII pattern
])
def test_parse_want_rejects_malformed(body: bytes) -> None:
    assert parse_want(body) is None


def test_parse_want_splits_at_the_first_nul() -> None:
    assert parse_want(_control.WANT + b"t\0a\0b") == (b"t", "a\0b")
    assert parse_want(_control.WANT + b"t\0") == (b"t", "")


# -- _control: reports -------------------------------------------------------------------------
def test_report_encoding_matches_the_protocol_doc() -> None:
    encoded = msgspec.msgpack.encode(Report("subscriber", received=10, dropped=2))
    doc = "83 a4 6b696e64 aa 73756273637269626572 a8 7265636569766564 0a a7 64726f70706564 02"
    assert encoded.hex() == doc.replace(" ", "")


def test_report_frame_round_trip() -> None:
    report = Report("publisher", topics={"a/b": (3, 45)}, dropped=1, closed=True)
    frame = _control.report_frame(SENDER, report)
    env = _wire.parse_envelope(frame)
    assert env.topic == "$vbus/report/" + SENDER.hex()
    assert (env.sender, env.seq, env.kind, env.flags) == (SENDER, 0, _wire.KIND_MSGPACK, 0)
    assert REPORT_DECODER.decode(memoryview(frame)[env.offset :]) == report


@pytest.mark.parametrize("field", ["received", "dropped"])
@pytest.mark.parametrize("value", [-1, 2**53 + 1, 2**63])
def test_report_rejects_counts_out_of_range(field: str, value: int) -> None:
    with pytest.raises(msgspec.ValidationError):
        REPORT_DECODER.decode(msgspec.msgpack.encode({"kind": "subscriber", field: value}))


@pytest.mark.parametrize("pair", [(-1, 0), (0, -1), (2**53 + 1, 0), (0, 2**53 + 1)])
def test_report_rejects_topic_counts_out_of_range(pair: tuple[int, int]) -> None:
    with pytest.raises(msgspec.ValidationError):
        REPORT_DECODER.decode(msgspec.msgpack.encode({"kind": "publisher", "topics": {"x": pair}}))


def test_report_accepts_the_edges() -> None:
    raw = {"kind": "publisher", "topics": {"x": [0, 2**53]}, "received": 2**53, "dropped": 0}
    report = REPORT_DECODER.decode(msgspec.msgpack.encode(raw))
    assert report.topics == {"x": (0, 2**53)} and report.received == 2**53


@pytest.mark.parametrize("raw", [
    {"received": 1},  # no kind
    {"kind": "publisher", "topics": {"x": [1]}},  # not a pair
    {"kind": "publisher", "topics": {"x": [1.5, 2]}},  # not an int
    {"kind": "publisher", "closed": "yes"},
    ["publisher"],
])
def test_report_rejects_malformed(raw: Any) -> None:
    with pytest.raises(msgspec.ValidationError):
        REPORT_DECODER.decode(msgspec.msgpack.encode(raw))


def test_control_frame_has_seq_0_and_nil_payload() -> None:
    frame = _control.control_frame(_control.RETAIN + b"a/b", SENDER, _wire.FLAG_CLEAR)
    env = _wire.parse_envelope(frame)
    assert env.topic == "$vbus/retain/a/b"
    assert (env.seq, env.flags, env.kind) == (0, _wire.FLAG_CLEAR, _wire.KIND_MSGPACK)
    assert frame[env.offset :] == b"\xc0"
    ready = _control.control_frame(_control.READY + b"tok", SENDER, _wire.FLAG_REPLAY)
    # the ready topic is not ASCII on purpose: parse_envelope refuses it, so check by hand
    assert ready[:16] == b"\xffvbus/ready/tok\0"
    assert ready[16:20] == bytes([_wire.VERSION, _wire.FLAG_REPLAY, _wire.KIND_MSGPACK, 0])
    assert ready[20:36] == SENDER + bytes(8) and ready[44:] == b"\xc0"


# -- 100 000 distinct topics: bounded memory, cheap stats ----------------------------------------
TOPICS = 100_000


def _traced(build: Any) -> tuple[Any, float]:
    """``build()`` and the memory (MiB) it still holds."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = build()
        gc.collect()
        return made, (tracemalloc.get_traced_memory()[0] - before) / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.timeout(120)
def test_100k_topics_cost_the_ledger_bounded_memory_and_stats_stay_small() -> None:
    import time

    def build() -> Ledger:
        ledger = Ledger("b", 0.0)
        for p in range(100):  # 100 publishers with 1000 topics each
            ledger.take(sender(p), pub_report({f"p{p}/t{i}": (i, 10 * i) for i in range(1000)}))
        return ledger

    ledger, mib = _traced(build)
    first = snapshot(ledger, 1.0)
    ledger.take(sender(7), pub_report({f"p7/t{i}": (i + 5, 10 * i) for i in range(1000)}))
    started = time.perf_counter()
    struct = ledger.snapshot(2.0, ForwarderStats(), 0)
    took = time.perf_counter() - started
    size = len(stats_payload(struct).inline)
    snap: dict[str, Any] = msgspec.to_builtins(struct)
    print(f"\nledger, {TOPICS} topics: {mib:.1f} MiB; snapshot {took * 1000:.1f} ms, "
          f"$vbus/stats {size / 1024:.0f} KiB listing {len(snap['topics'])} topics")
    assert mib < 64
    assert first["topics_total"] == snap["topics_total"] == TOPICS
    assert len(snap["topics"]) == _ledger.MAX_STATS_TOPICS
    busy = [t for t, v in snap["topics"].items() if v["message_rate"]]
    assert len(busy) == 1000 and all(t.startswith("p7/") for t in busy)  # the busiest first
    assert snap["topics"]["p7/t3"]["message_rate"] == 5.0
    assert size < 200 * 1024 and took < 0.5


def test_topics_past_the_bound_are_refused_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ledger, "MAX_TOPICS", 10)
    ledger = Ledger("b", 0.0)
    ledger.take(sender(1), pub_report({f"t{i}": (1, 1) for i in range(15)}))
    snap = snapshot(ledger, 1.0)
    assert snap["topics_total"] == 10 and ledger.topics_refused == 5
    ledger.take(sender(1), pub_report({}, closed=True))  # its topics go with its counts
    assert snapshot(ledger, 2.0)["topics_total"] == 0


@pytest.mark.timeout(120)
def test_100k_retained_topics_are_bounded_and_replay_looks_only_where_it_must() -> None:
    import time

    def build() -> RetainedStore:
        store = RetainedStore()
        for i in range(TOPICS + 10):
            store.take(*retain_frame(f"dev{i % 100}/t{i}", i))
        return store

    store, mib = _traced(build)
    assert len(store) == _ledger.MAX_RETAINED_TOPICS and store.refused == 10
    store.matching(compile_pattern("dev1/**"))  # builds the index once
    started = time.perf_counter()
    for _ in range(100):
        exact = store.matching(compile_pattern("dev7/t7"))
        under = store.matching(compile_pattern("dev7/**"))
    took = (time.perf_counter() - started) / 100
    everything = store.matching(compile_pattern("**"), limit=500)
    print(f"\nretained store, {TOPICS} topics: {mib:.1f} MiB; replay lookup "
          f"{took * 1000:.2f} ms (exact + 'dev7/**')")
    assert len(exact) == 1 and len(under) == TOPICS // 100 and len(everything) == 500
    assert mib < 64 and took < 0.05


def test_subscriber_count_is_exact_in_bounded_memory() -> None:
    from vbus._broker.ledger import SubscriberCount

    count = SubscriberCount(limit=3)
    for token in (b"a", b"b", b"c", b"d", b"e", b"a"):  # a repeat counts once
        count.add(token)
    assert len(count) == 5 and len(count._tokens) == 3  # noqa: SLF001 - the bound itself
    for token in (b"d", b"a", b"e", b"zz"):  # "zz" was never there: nothing to take
        count.discard(token)
    assert len(count) == 2
    count.discard(b"b")
    count.discard(b"c")
    assert len(count) == 0
