"""Unit tests of batching, sans-io: vbus._proto.batch, and how the outbox makes batches and the
inbox takes them apart, on bytes and an explicit clock alone (no sockets, no threads)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbus._errors import DecodeError, EncodeError
from vbus._proto import batch as _batch
from vbus._proto import control as _control
from vbus._proto import wire as _wire
from vbus._proto.batch import MAX_BYTES, MAX_MESSAGES, Batch, count, entries_decoder
from vbus._proto.inbox import Inbox
from vbus._proto.outbox import BATCHABLE, BURST_GAP, Outbox, Send
from vbus._proto.topics import compile_pattern, topic_prefix

ENC = _wire.new_encoder()
SENDER = bytes.fromhex("0123456789abcdef")
T0 = 1700000000.5

# msgpack values that come back equal after a round trip (no NaN: it is not equal to itself;
# bytes come back as bytes, tuples as lists, so neither is generated here).
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
VALUES = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=10,
)
TIMES = st.floats(allow_nan=False, allow_infinity=False)


def make_batch(values: list[Any], topic: str = "stage/x", seq: int = 1,
               times: list[float] | None = None) -> Batch:
    times = times if times is not None else [T0 + i for i in range(len(values))]
    batch = Batch(topic_prefix(topic), seq, times[0], ENC.encode(values[0]))
    for when, value in zip(times[1:], values[1:], strict=True):
        batch.add(when, ENC.encode(value))
    return batch


def payload_of(frame: bytes) -> memoryview:
    return memoryview(frame)[_wire.parse_envelope(frame).offset :]


# -- Batch -------------------------------------------------------------------------------------
def test_new_batch_holds_its_first_message() -> None:
    batch = Batch(topic_prefix("a/b"), 41, 12.5, b"\x07")
    assert len(batch) == 1
    assert (batch.first_seq, batch.first_time, batch.size) == (41, 12.5, 1)
    assert batch.prefix == b"a/b\0"


def test_add_is_full_at_max_messages_exactly() -> None:
    batch = Batch(b"t\0", 1, 0.0, b"\x01")
    for i in range(MAX_MESSAGES - 2):
        assert batch.add(float(i), b"\x01") is False, f"full after {len(batch)} messages"
    assert len(batch) == MAX_MESSAGES - 1
    assert batch.add(1.0, b"\x01") is True
    assert len(batch) == MAX_MESSAGES == 256


def test_add_is_full_at_max_bytes_exactly() -> None:
    batch = Batch(b"t\0", 1, 0.0, b"\xc4" * 1000)
    assert batch.add(0.0, b"\x00" * (MAX_BYTES - 1000 - 1)) is False
    assert batch.size == MAX_BYTES - 1
    assert batch.add(0.0, b"\x00") is True
    assert batch.size == MAX_BYTES == 64 * 1024


@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40))
def test_add_reports_full_exactly_when_a_limit_is_reached(sizes: list[int]) -> None:
    batch = Batch(b"t\0", 1, 0.0, b"\x00" * sizes[0])
    total = sizes[0]
    for n, size in enumerate(sizes[1:], start=2):
        total += size
        full = batch.add(0.0, b"\x00" * size)
        assert full == (n >= MAX_MESSAGES or total >= MAX_BYTES)
        assert batch.size == total
        assert len(batch) == n


def test_frame_exact_bytes() -> None:
    """The example of docs/protocol.md, byte for byte."""
    batch = make_batch([1.25, 2, b"\x01\x02"], seq=5, times=[T0, T0 + 2**-18, T0 + 2**-17])
    frame = batch.frame(SENDER, ENC)
    assert frame.hex(" ") == (
        "73 74 61 67 65 2f 78 00 01 00 03 00 01 23 45 67 89 ab cd ef "
        "05 00 00 00 00 00 00 00 00 00 20 40 fc 54 d9 41 "
        "93 "
        "92 cb 41 d9 54 fc 40 20 00 00 cb 3f f4 00 00 00 00 00 00 "
        "92 cb 41 d9 54 fc 40 20 00 10 02 "
        "92 cb 41 d9 54 fc 40 20 00 20 c4 02 01 02"
    )
    assert len(frame) == 81


def test_frame_header_is_the_first_message() -> None:
    batch = make_batch(["a", "b", "c"], topic="cam/state", seq=9, times=[3.0, 4.0, 5.0])
    env = _wire.parse_envelope(batch.frame(SENDER, ENC))
    assert env.topic == "cam/state"
    assert env.kind == _wire.KIND_BATCH == 3
    assert env.flags == 0  # never retained, never external
    assert (env.sender, env.seq, env.time) == (SENDER, 9, 3.0)


@given(values=st.lists(VALUES, min_size=1, max_size=20), data=st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_frame_round_trip(values: list[Any], data: st.DataObject) -> None:
    times = data.draw(st.lists(TIMES, min_size=len(values), max_size=len(values)))
    seq = data.draw(st.integers(1, 2**64 - len(values)))
    frame = make_batch(values, seq=seq, times=times).frame(SENDER, ENC)
    env = _wire.parse_envelope(frame)
    assert (env.seq, env.time, env.kind) == (seq, times[0], _wire.KIND_BATCH)
    entries = entries_decoder(None).decode(memoryview(frame)[env.offset :])
    assert entries == list(zip(times, values, strict=True))
    assert count(memoryview(frame)[env.offset :]) == len(values)


def test_bytes_entries_travel_as_msgpack_bin() -> None:
    payload = payload_of(make_batch([b"\x00\xff"]).frame(SENDER, ENC))
    assert bytes(payload[-4:]) == b"\xc4\x02\x00\xff"
    assert entries_decoder(None).decode(payload) == [(T0, b"\x00\xff")]


def test_decode_payload_refuses_a_batch() -> None:
    with pytest.raises(DecodeError, match="batch"):
        _wire.decode_payload(_wire.KIND_BATCH, memoryview(b"\x90"), None,
                             msgspec.msgpack.Decoder())


# -- count -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 15, 16, 255, 65535, 65536, 70000])
def test_count_reads_the_array_header(n: int) -> None:
    encoded = msgspec.msgpack.encode([None] * n)
    head = encoded[0]
    if n < 16:
        assert 0x90 <= head <= 0x9F
    elif n < 65536:
        assert head == 0xDC
    else:
        assert head == 0xDD
    assert count(memoryview(encoded)) == n


@given(st.integers(0, 2**32 - 1))
def test_count_of_array32_header_alone(n: int) -> None:
    assert count(memoryview(b"\xdd" + n.to_bytes(4, "big"))) == n


@given(st.integers(0, 2**16 - 1))
def test_count_of_array16_header_alone(n: int) -> None:
    assert count(memoryview(b"\xdc" + n.to_bytes(2, "big"))) == n


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xc0", b"\x80", b"\x01", b"\xa3abc", b"\xdc", b"\xdc\x01", b"\xdd\x00\x00\x01",
     b"\xde\x00\x01", b"\xff"],
)
def test_count_of_garbage_is_zero(garbage: bytes) -> None:
    assert count(memoryview(garbage)) == 0


@given(st.binary(max_size=8))
def test_count_never_raises(garbage: bytes) -> None:
    n = count(memoryview(garbage))
    assert 0 <= n < 2**32


# -- typed entries decoder ---------------------------------------------------------------------
class State(msgspec.Struct):
    x: float
    name: str


def test_typed_entries_decoder_validates_each_value() -> None:
    payload = msgspec.msgpack.encode([(1.0, {"x": 1, "name": "a"}), (2.0, {"x": 2.5, "name": "b"})])
    assert entries_decoder(State).decode(payload) == [
        (1.0, State(1.0, "a")), (2.0, State(2.5, "b"))
    ]
    assert entries_decoder(int).decode(msgspec.msgpack.encode([(1, 5)])) == [(1.0, 5)]
    with pytest.raises(msgspec.ValidationError, match=r"\$\[1\]\[1\]"):
        entries_decoder(int).decode(msgspec.msgpack.encode([(1.0, 1), (2.0, "two")]))
    with pytest.raises(msgspec.ValidationError):
        entries_decoder(State).decode(msgspec.msgpack.encode([(1.0, {"x": "no", "name": "a"})]))


def test_untyped_entries_decoder_takes_anything_but_checks_the_shape() -> None:
    dec = entries_decoder(None)
    assert dec.decode(msgspec.msgpack.encode([(1, "x"), (2.5, None)])) == [(1.0, "x"), (2.5, None)]
    assert dec.decode(b"\x90") == []
    for bad in ([[1.0, "x", 3]], [["t", "x"]], [1, 2], {"a": 1}):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad))
    with pytest.raises(msgspec.DecodeError):
        dec.decode(b"\x91\x92\xcb\x00")  # truncated


def test_raw_entries_keep_each_value_undecoded() -> None:
    payload = msgspec.msgpack.encode([(1.0, [1, 2]), (2.0, "s")])
    raws = _batch.RAW_ENTRIES.decode(payload)
    assert [(t, bytes(r)) for t, r in raws] == [(1.0, b"\x92\x01\x02"), (2.0, b"\xa1s")]


# -- an outbox making batches (bytes and a clock only) -----------------------------------------
class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def tick(self, dt: float = 1e-6) -> None:
        self.now += dt


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Harness:
    """An outbox and what a socket would have sent; ``full`` makes every send fail."""

    def __init__(self, clock: Clock, delay: float | None) -> None:
        self.clock = clock
        self.outbox = Outbox(SENDER, batch_delay=0.0 if delay is None else delay)
        self.sent: list[bytes] = []
        self.full = False
        self.closed = False

    def _apply(self, sends: Sequence[Send]) -> None:
        skipping = False
        for send in sends:
            if skipping:
                skipping = not send.last
                continue
            if self.full:
                self.outbox.dropped += send.count
                skipping = not send.last
                continue
            self.sent.append(bytes(send.frames[0]))
            if send.last:
                self.outbox.published += send.count

    def publish(self, topic: str, data: Any, retain: bool = False) -> None:
        self._apply(self.outbox.publish(topic, topic_prefix(topic), data, retain,
                                        self.clock.now))

    def flush_due(self, now: float | None = None) -> None:
        self._apply(self.outbox.flush_due(self.clock.now + 10 if now is None else now))

    def relay(self, frame: bytes) -> None:
        self._apply(self.outbox.relay(frame, None, self.clock.now))

    def close(self) -> None:
        sends = self.outbox.flush()
        sends.append(self.outbox.report(self.clock.now, closed=True))
        self._apply(sends)
        self.closed = True

    @property
    def batch_open(self) -> bool:
        return self.outbox.due() is not None

    def stats(self) -> tuple[int, int]:
        return self.outbox.published, self.outbox.dropped


def make_publisher(clock: Clock, delay: float | None = 0.0005) -> Harness:
    return Harness(clock, delay)


def sent_messages(h: Harness) -> list[tuple[str, int, int, Any]]:
    """(topic, kind, seq, data or [entries]) of each data frame sent; reports left out;
    the broker's copies of retained values as topic '$<topic>'."""
    out = []
    for frame in h.sent:
        if frame.startswith(_control.REPORT):
            continue
        mark = ""
        if frame.startswith(_control.RETAIN):
            frame, mark = frame[len(_control.RETAIN) :], "$"
        env = _wire.parse_envelope(frame)
        payload = memoryview(frame)[env.offset :]
        if env.kind == _wire.KIND_BATCH:
            data: Any = [v for _, v in entries_decoder(None).decode(payload)]
        else:
            data = _wire.decode_payload(env.kind, payload, None, msgspec.msgpack.Decoder())
            data = bytes(data) if isinstance(data, memoryview) else data
        out.append((mark + env.topic, env.kind, env.seq, data))
    return out


def reports(h: Harness) -> list[_control.Report]:
    out = []
    for frame in h.sent:
        if frame.startswith(_control.REPORT):
            env = _wire.parse_envelope(frame)
            out.append(_control.REPORT_DECODER.decode(memoryview(frame)[env.offset :]))
    return out


B, M = _wire.KIND_BATCH, _wire.KIND_MSGPACK


def test_single_messages_are_not_batched(clock: Clock) -> None:
    pub = make_publisher(clock)
    for i in range(3):
        pub.publish("a", i)
        clock.tick(2 * BURST_GAP)  # past the gap: not a burst
    assert sent_messages(pub) == [("a", M, 1, 0), ("a", M, 2, 1), ("a", M, 3, 2)]
    assert not pub.batch_open and not pub.outbox.batch_started


def test_a_burst_starts_a_batch_and_asks_the_flusher(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("a", 2)  # within BURST_GAP: starts a batch
    clock.tick()
    pub.publish("a", 3)
    assert sent_messages(pub) == [("a", M, 1, 1)]
    assert pub.outbox.batch_started  # the shell arms its flusher for this due time:
    assert pub.outbox.due() == pytest.approx(clock.now - 1e-6 + 0.0005)
    pub.flush_due()  # what the flusher thread does when the batch is due
    assert sent_messages(pub)[1:] == [("a", B, 2, [2, 3])]
    assert pub.stats()[0] == 3


def test_burst_gap_is_per_publisher_not_per_topic(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("b", 2)  # soon after a message on another topic: batched
    assert sent_messages(pub) == [("a", M, 1, 1)]
    assert pub.batch_open


def test_a_batch_is_a_run_of_one_topic_so_order_holds_across_topics(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("a", 2)  # batch a
    clock.tick()
    pub.publish("a", 3)
    clock.tick()
    pub.publish("b", 4)  # another topic: a's run goes first, b's starts
    clock.tick()
    pub.publish("b", 5)
    clock.tick()
    pub.publish("a", 6)  # and back
    pub.publish("b", b"\x00" * 5000)  # unbatched: everything before goes first
    pub.close()
    assert sent_messages(pub) == [
        ("a", M, 1, 1), ("a", B, 2, [2, 3]), ("b", B, 1, [4, 5]), ("a", B, 4, [6]),
        ("b", _wire.KIND_BYTES, 3, b"\x00" * 5000),
    ]


@pytest.mark.parametrize("unbatched", [
    pytest.param({"retain": True}, id="retained"),
    pytest.param({"data": b"\x01" * (BATCHABLE + 1)}, id="large-bytes"),
    pytest.param({"data": "s" * BATCHABLE}, id="large-str"),
    pytest.param({"data": bytearray(b"xy")}, id="bytearray"),
    pytest.param({"data": State(1.0, "n")}, id="struct"),
])
def test_unbatched_message_flushes_its_topic_first(clock: Clock, unbatched: dict[str, Any]
                                                   ) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("a", 2)
    clock.tick()
    pub.publish("a", unbatched.get("data", 3), retain=unbatched.get("retain", False))
    live = [m for m in sent_messages(pub) if not m[0].startswith("$")]
    assert [(t, k, s) for t, k, s, _ in live][:2] == [("a", M, 1), ("a", B, 2)]
    assert live[1][3] == [2]
    assert live[2][2] == 3 and live[2][1] != B
    assert not pub.batch_open


def test_batch_goes_out_when_full(clock: Clock) -> None:
    pub = make_publisher(clock)
    for i in range(1 + MAX_MESSAGES + 1):
        pub.publish("a", i)
        clock.tick(1e-9)
    msgs = sent_messages(pub)
    assert msgs == [("a", M, 1, 0), ("a", B, 2, list(range(1, MAX_MESSAGES + 1)))]
    pub.close()
    assert sent_messages(pub)[2][:3] == ("a", B, MAX_MESSAGES + 2)


def test_batch_goes_out_when_full_of_bytes(clock: Clock) -> None:
    pub = make_publisher(clock)
    big = "x" * 4000  # encodes to 4003 bytes: 17 of them pass 64 KiB
    pub.publish("a", 0)
    for _ in range(17):
        clock.tick(1e-9)
        pub.publish("a", big)
    msgs = sent_messages(pub)
    assert [(t, k, s) for t, k, s, _ in msgs] == [("a", M, 1), ("a", B, 2)]
    assert len(msgs[1][3]) == 17


def test_a_later_message_sends_a_batch_older_than_the_delay(clock: Clock) -> None:
    pub = make_publisher(clock, delay=0.001)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("a", 2)
    clock.tick(0.0005)
    pub.publish("a", 3)  # batch 0.5 ms old: kept
    assert len(sent_messages(pub)) == 1
    clock.tick(0.0006)
    pub.publish("a", 4)  # batch 1.1 ms old: goes, with this message in it
    assert sent_messages(pub)[1:] == [("a", B, 2, [2, 3, 4])]
    assert not pub.batch_open


def test_close_flushes_then_reports_closed(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("a", 2)
    pub.close()
    assert sent_messages(pub)[-1] == ("a", B, 2, [2])
    assert pub.sent[-1].startswith(_control.REPORT)
    last = reports(pub)[-1]
    assert last.closed and last.topics == {"a": (2, 26)}
    assert pub.closed
    pub.flush_due()  # nothing left to flush
    assert sent_messages(pub)[-1] == ("a", B, 2, [2])


def test_no_flusher_means_no_batches(clock: Clock) -> None:
    pub = make_publisher(clock, delay=None)
    for i in range(5):
        pub.publish("a", i)
    assert sent_messages(pub) == [("a", M, i + 1, i) for i in range(5)]


def test_a_dropped_batch_spends_all_its_seqs(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    pub.publish("a", 2)
    clock.tick()
    pub.publish("a", 3)
    pub.full = True
    pub.flush_due()
    pub.full = False
    clock.tick(1)
    pub.publish("a", 4)
    assert pub.stats()[1] == 2 and pub.stats()[0] == 2
    assert [s for _, _, s, _ in sent_messages(pub)] == [1, 4]


def test_encode_error_spends_no_seq(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1)
    clock.tick()
    with pytest.raises(EncodeError):
        pub.publish("a", [object()])
    clock.tick()
    pub.publish("a", 2)
    pub.close()
    assert [(s, d) for _, _, s, d in sent_messages(pub)] == [(1, 1), (2, [2])]


def test_report_bytes_are_payload_plus_12_per_message(clock: Clock) -> None:
    pub = make_publisher(clock)
    pub.publish("a", 1.25)  # 9 bytes of msgpack, sent alone
    clock.tick()
    pub.publish("a", 1.25)  # batched
    clock.tick()
    pub.publish("a", "abc")  # 4 bytes
    pub.publish("a", b"\x00" * 5000)  # unbatched bytes: 5000
    pub.close()
    assert reports(pub)[-1].topics == {"a": (4, (9 + 12) * 2 + (4 + 12) + (5000 + 12))}


def test_report_bytes_of_small_bytes_do_not_depend_on_batching(clock: Clock) -> None:
    counted = []
    for delay in (None, 0.0005):
        pub = make_publisher(clock, delay=delay)
        pub.publish("a", b"xy")  # sent alone as kind bytes either way
        pub.close()
        assert sent_messages(pub)[0][1] == _wire.KIND_BYTES
        counted.append(reports(pub)[-1].topics["a"][1])
    assert counted == [2 + 12, 2 + 12]


def test_replayed_batch_counts_its_messages(clock: Clock) -> None:
    frame = make_batch([1, 2, 3], topic="r").frame(SENDER, ENC)
    pub = make_publisher(clock)
    pub.relay(frame)
    assert pub.sent[0] == frame
    assert pub.stats()[0] == 3
    assert reports(pub)[-1].topics == {"r": (3, len(frame))}


@given(script=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                                 st.sampled_from([0.0, 1e-6, 2e-5, 1e-3]),
                                 st.sampled_from(["int", "bytes", "big", "retain", "flush"])),
                       max_size=60))
@settings(max_examples=80)
def test_order_and_seqs_hold_across_topics(script: list[tuple[str, float, str]]) -> None:
    clock = Clock()
    pub = make_publisher(clock)
    expected: list[tuple[str, int, Any]] = []
    seqs = {"a": 0, "b": 0, "c": 0}
    for n, (topic, gap, what) in enumerate(script):
        clock.tick(gap)
        if what == "flush":
            pub.flush_due(clock.now)
            continue
        data: Any = {"int": n, "bytes": n.to_bytes(2, "big"), "big": b"%d" % n * 3000,
                     "retain": n}[what]
        pub.publish(topic, data, retain=what == "retain")
        seqs[topic] += 1
        expected.append((topic, seqs[topic], data))
    pub.close()
    got: list[tuple[str, int, Any]] = []
    for topic, kind, seq, data in sent_messages(pub):
        if topic.startswith("$"):
            continue
        if kind == B:
            got.extend((topic, s, d) for s, d in zip(itertools.count(seq), data))
        else:
            got.append((topic, seq, data))
    assert got == expected  # one publisher's order, across all its topics


# -- an inbox taking batches apart (bytes only) -----------------------------------------------
OTHER = bytes.fromhex("fedcba9876543210")
READY = _control.READY + b"tok\0"


def single(topic: str, seq: int, value: Any, flags: int = 0, sender: bytes = SENDER) -> bytes:
    frame, _ = _wire.build_frames(topic_prefix(topic), flags, sender, seq, 5.0,
                                  _wire.encode_payload(value, ENC))
    return frame


def batch_frame(topic: str, seq: int, values: list[Any], sender: bytes = SENDER) -> bytes:
    return make_batch(values, topic=topic, seq=seq).frame(sender, ENC)


def raw_batch(payload: bytes, seq: int = 2) -> bytes:
    frame, _ = _wire.build_frames(topic_prefix("a"), 0, SENDER, seq, 1.0,
                                  _wire.Payload(_wire.KIND_BATCH, payload))
    return frame


def replay(frame: bytes) -> tuple[bytes, list[Any]]:
    head = _control.control_frame(READY[:-1], OTHER, _wire.FLAG_REPLAY)
    return head, [memoryview(frame)]


def run(*frames: bytes | tuple[bytes, list[Any]], type: Any = None,
        losses: list[tuple[str, str, int]] | None = None) -> tuple[list[Any], Inbox]:
    """Feed the frames to an inbox during its handshake, confirm it, and drain it."""
    inbox = Inbox(compile_pattern("**"), READY, type)
    for f in frames:
        first, rest = f if isinstance(f, tuple) else (f, [])
        inbox.feed(first, rest)
    inbox.feed(_control.control_frame(READY[:-1], OTHER), [])
    assert inbox.confirmed
    if losses is not None:
        losses.extend(inbox.losses)
    out = [(m.topic, m.seq, m.data, m.time, m.retained) for m in inbox.messages]
    return out, inbox


def test_subscriber_delivers_each_message_of_a_batch() -> None:
    msgs, stats = run(batch_frame("a", 3, [1, "s", [1, 2]]))
    assert msgs == [("a", 3, 1, T0, False), ("a", 4, "s", T0 + 1, False),
                    ("a", 5, [1, 2], T0 + 2, False)]
    assert (stats.received, stats.lost, stats.errors) == (3, 0, 0)


def test_subscriber_gives_bytes_of_a_batch_as_readonly_memoryview() -> None:
    msgs, _ = run(batch_frame("a", 1, [b"xy", {"k": b"z"}]))
    data = msgs[0][2]
    assert isinstance(data, memoryview) and data.readonly and bytes(data) == b"xy"
    assert msgs[1][2] == {"k": b"z"}  # nested bytes stay bytes, as in a kind-0 message
    typed, _ = run(batch_frame("a", 1, [b"xy"]), type=bytes)
    assert typed[0][2] == b"xy" and type(typed[0][2]) is bytes


def test_subscriber_counts_losses_around_batches() -> None:
    losses: list[tuple[str, str, int]] = []
    msgs, stats = run(single("a", 1, 0), batch_frame("a", 3, [1, 2, 3]),
                      batch_frame("a", 10, [1, 2]), single("a", 12, 9), losses=losses)
    assert [s for _, s, *_ in msgs] == [1, 3, 4, 5, 10, 11, 12]
    assert stats.lost == 1 + 4
    assert losses == [("a", SENDER.hex(), 1), ("a", SENDER.hex(), 4)]


def test_subscriber_dedups_the_seam_inside_a_batch() -> None:
    msgs, stats = run(replay(single("a", 4, "R", _wire.FLAG_RETAINED)),
                      batch_frame("a", 3, [30, 40, 50, 60]), single("a", 7, 70))
    assert [(s, d, r) for _, s, d, _, r in msgs] == [
        (4, "R", True), (5, 50, False), (6, 60, False), (7, 70, False)
    ]
    assert (stats.received, stats.lost) == (4, 0)


def test_subscriber_drops_a_batch_the_replay_covers_entirely() -> None:
    msgs, stats = run(replay(single("a", 4, "R", _wire.FLAG_RETAINED)),
                      batch_frame("a", 2, [20, 30, 40]), single("a", 4, 40), single("a", 5, 50))
    assert [(s, d) for _, s, d, _, _ in msgs] == [(4, "R"), (5, 50)]
    assert (stats.received, stats.lost) == (2, 0)


def test_subscriber_seam_is_per_sender() -> None:
    msgs, _ = run(replay(single("a", 4, "R", _wire.FLAG_RETAINED)),
                  batch_frame("a", 1, [10, 20], sender=OTHER))
    assert [(s, d) for _, s, d, _, _ in msgs] == [(4, "R"), (1, 10), (2, 20)]


def test_subscriber_counts_each_entry_that_fails_validation() -> None:
    msgs, stats = run(batch_frame("a", 1, [1, "bad", 3, "worse"]), type=int)
    assert [(s, d) for _, s, d, _, _ in msgs] == [(1, 1), (3, 3)]
    assert (stats.received, stats.errors, stats.lost) == (2, 2, 0)


def test_subscriber_ignores_an_empty_batch() -> None:
    msgs, stats = run(raw_batch(b"\x90", seq=1), single("a", 1, 1))
    assert [s for _, s, *_ in msgs] == [1]
    assert (stats.received, stats.errors, stats.invalid) == (1, 0, 0)


def test_subscriber_counts_a_malformed_batch_as_one_error() -> None:
    msgs, stats = run(raw_batch(b"\x93\xc1"), single("a", 5, 9))
    assert [s for _, s, *_ in msgs] == [5]
    assert stats.errors == 1


def test_subscriber_malformed_batch_is_an_error_not_a_loss() -> None:
    bad = bytearray(batch_frame("a", 2, [1, 2, 3]))
    bad[_wire.parse_envelope(bytes(bad)).offset + 1] = 0xC1  # first entry: not msgpack
    msgs, stats = run(single("a", 1, 0), bytes(bad), single("a", 5, 9))
    assert [s for _, s, *_ in msgs] == [1, 5]
    assert (stats.errors, stats.lost) == (1, 0)


@pytest.mark.parametrize("payload", [[[1.0, "x", 3]], [["t", "x"]], [1, 2], {"a": 1}],
                         ids=["triple", "str-time", "not-pairs", "map"])
def test_subscriber_never_raises_on_a_batch_of_the_wrong_shape(payload: Any) -> None:
    msgs, stats = run(raw_batch(msgspec.msgpack.encode(payload), seq=1), single("a", 2, 2))
    assert [s for _, s, *_ in msgs] == [2]
    assert stats.errors == 1


def test_batch_never_has_a_retained_flag_in_messages() -> None:
    msgs, _ = run(batch_frame("a", 1, [1, 2]))
    assert all(not retained for *_, retained in msgs)


def test_batch_entry_times_are_the_publishers() -> None:
    times = [T0, T0 + 2**-18, T0 + 2**-17]
    frame = make_batch([1, 2, 3], topic="a", times=times).frame(SENDER, ENC)
    msgs, _ = run(frame)
    assert [t for *_, t, _ in msgs] == times
    assert struct.unpack_from("<d", frame, 2 + 20)[0] == times[0]  # header time: the first's
