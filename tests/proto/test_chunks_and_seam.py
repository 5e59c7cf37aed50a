"""Sans-io tests of the core rebuild: chunked large messages, the zero-copy byte budget, the
handshake and retained seam, bounded per-sender state. Outbox and Inbox on bytes alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest

from vbus._proto import chunk as _chunk
from vbus._proto import control as _control
from vbus._proto import wire as _wire
from vbus._proto.chunk import UNINITIALIZED_FROM
from vbus._proto.inbox import SEAM_WINDOW, Inbox
from vbus._proto.limits import (
    CHUNK_SIZE,
    DEFAULT_MAX_QUEUE_BYTES,
    MESSAGE_OVERHEAD,
    effective_hwm,
    socket_hwm,
)
from vbus._proto.outbox import Outbox, Send
from vbus._proto.seq import SequenceTracker
from vbus._proto.topics import compile_pattern, topic_prefix

SENDER = bytes.fromhex("0123456789abcdef")
OTHER = bytes.fromhex("fedcba9876543210")
READY = _control.READY + b"tok\0"
T0 = 1700000000.0


def inbox(**kw: Any) -> Inbox:
    box = Inbox(compile_pattern("**"), READY, **kw)
    confirm(box)
    return box


def confirm(box: Inbox) -> None:
    box.feed(_control.control_frame(READY[:-1], OTHER), [])


def feed_sends(box: Inbox, sends: Sequence[Send]) -> None:
    for send in sends:
        first, *rest = send.frames
        box.feed(bytes(first), [memoryview(r).cast("B") for r in rest])


def single(topic: str, seq: int, value: Any, flags: int = 0, sender: bytes = SENDER) -> bytes:
    frame, _ = _wire.build_frames(topic_prefix(topic), flags, sender, seq, T0,
                                  _wire.encode_payload(value, _wire.new_encoder()))
    return frame


def replay(frame: bytes) -> tuple[bytes, list[memoryview]]:
    return _control.control_frame(READY[:-1], OTHER, _wire.FLAG_REPLAY), [memoryview(frame)]


# -- chunks ----------
@pytest.mark.parametrize("shape,dtype", [((1000, 1000), "u2"), ((3, 70000), "f8"),
                                         ((CHUNK_SIZE,), "u1"), ((CHUNK_SIZE + 1,), "u1")])
def test_a_large_array_travels_in_chunks_and_comes_back_whole(shape: tuple[int, ...],
                                                              dtype: str) -> None:
    out = Outbox(SENDER, chunk=True)
    frame = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    sends = out.publish("cam/frame", topic_prefix("cam/frame"), frame, now=T0)
    data = [s for s in sends if not s.frames[0].startswith(_control.REPORT)]
    expected = -(-frame.nbytes // CHUNK_SIZE)
    assert len(data) == (expected if frame.nbytes > CHUNK_SIZE else 1)
    assert all(len(s.frames) == 2 and memoryview(s.frames[1]).nbytes <= CHUNK_SIZE
               for s in data)
    assert [s.last for s in data] == [False] * (len(data) - 1) + [True]
    box = inbox()
    feed_sends(box, data)
    (msg,) = box.messages
    assert msg.seq == 1 and msg.topic == "cam/frame" and not msg.data.flags.writeable
    assert msg.data.dtype == frame.dtype and (msg.data == frame).all()


def test_without_chunking_a_large_array_is_one_zero_copy_send() -> None:
    out = Outbox(SENDER, chunk=False)
    frame = np.zeros((1024, 1024), "u2")
    (send, *_) = out.publish("cam", topic_prefix("cam"), frame, now=T0)
    assert len(send.frames) == 2
    assert memoryview(send.frames[1]).obj is not None  # a view, not a copy
    assert np.shares_memory(np.frombuffer(send.frames[1], "u2"), frame)


def test_a_lost_chunk_loses_the_message_and_the_gap_counts_it() -> None:
    out = Outbox(SENDER, chunk=True)
    pre = topic_prefix("cam")
    before = out.publish("cam", pre, np.full(10, 7, "u1"), now=T0)
    big = out.publish("cam", pre, np.ones(200_000, "u1"), now=T0 + 1)
    after = out.publish("cam", pre, np.full(10, 7, "u1"), now=T0 + 2)
    box = inbox()
    feed_sends(box, before)
    feed_sends(box, [s for i, s in enumerate(big) if i != 1])  # a piece lost mid-message
    feed_sends(box, after)
    assert [m.seq for m in box.messages] == [1, 3]
    assert box.lost == 1 and box.errors == 0


def test_anything_else_from_the_sender_ends_an_assembly() -> None:
    out = Outbox(SENDER, chunk=True)
    box = inbox()
    box.feed(single("cam", 1, "first"), [])
    pieces = out.publish("cam", topic_prefix("cam"), np.ones(200_000, "u1"), now=T0)
    feed_sends(box, pieces[:2])
    box.feed(single("cam", 2, "small"), [])  # (a forger's, or a restarted publisher's)
    feed_sends(box, pieces[2:])  # the rest of the abandoned message: ignored
    assert [(m.seq, m.data) for m in box.messages] == [(1, "first"), (2, "small")]
    assert box.errors == 0


def test_a_first_chunk_announcing_too_much_is_refused() -> None:
    out = Outbox(SENDER, chunk=True)
    pieces = out.publish("cam", topic_prefix("cam"), np.ones(300_000, "u1"), now=T0)
    box = inbox(max_assembly_bytes=100_000)
    feed_sends(box, pieces)
    assert not box.messages and box.errors == 1


@pytest.mark.parametrize("meta", [b"\x95\x00\x00\x02\xc4\x00\x91\xce\xff\xff\xff\xff",
                                  b"\xc1", b"\x92\x05\x03", b""])
def test_hostile_chunks_never_raise(meta: bytes) -> None:
    header = _wire.HEADER.pack(_wire.VERSION, _wire.FLAG_EXTERNAL, _wire.KIND_CHUNK, SENDER,
                               1, T0)
    box = inbox(max_assembly_bytes=1 << 20)
    box.feed(topic_prefix("cam") + header + meta, [memoryview(b"x" * 10)])
    box.feed(single("cam", 2, 1), [])
    assert [m.seq for m in box.messages] == [2]


def test_large_buffers_reassembled_without_zero_filling_come_back_exact() -> None:
    # Buffers of UNINITIALIZED_FROM bytes and more are not zero-filled (numpy.empty):
    # every byte must still be the sender's, in each buffer of a many-buffer payload.
    rng = np.random.default_rng(7)
    big = rng.integers(0, 255, UNINITIALIZED_FROM + 12345, dtype=np.uint8)
    wide = rng.random((512, 300))  # 1.2 MB of float64: a second large buffer
    small = np.arange(70_000, dtype="u1")
    out = Outbox(SENDER, chunk=True)
    sends = out.publish("cam", topic_prefix("cam"), {"big": big, "wide": wide, "s": small},
                        now=T0)
    box = inbox()
    feed_sends(box, [s for s in sends if not s.frames[0].startswith(_control.REPORT)])
    (msg,) = box.messages
    assert (msg.data["big"] == big).all() and (msg.data["wide"] == wide).all()
    assert (msg.data["s"] == small).all() and not msg.data["big"].flags.writeable


def test_a_large_buffer_left_part_empty_is_never_delivered() -> None:
    # A hostile sender announces a 2-chunk message of one UNINITIALIZED_FROM-byte buffer and
    # sends two small pieces: the unwritten (uninitialized) rest must never reach anyone.
    header = _wire.HEADER.pack(_wire.VERSION, _wire.FLAG_EXTERNAL, _wire.KIND_CHUNK, SENDER,
                               1, T0)
    encode = msgspec.msgpack.encode
    first = encode((0, 2, _wire.KIND_BYTES, b"", [UNINITIALIZED_FROM]))
    box = inbox()
    box.feed(topic_prefix("cam") + header + first, [memoryview(b"x" * 1000)])
    box.feed(topic_prefix("cam") + header + encode((1, 2)), [memoryview(b"y" * 1000)])
    box.feed(single("cam", 2, 1), [])
    assert [m.seq for m in box.messages] == [2] and box.errors == 1


# -- the zero-copy budget ----------
class Held:
    def __init__(self) -> None:
        self.done = False


def test_the_inflight_budget_drops_and_counts_past_the_limit() -> None:
    out = Outbox(SENDER, chunk=False, inflight_limit=3 * 1_000_000)
    trackers = []
    for i in range(5):
        sends = out.publish("cam", topic_prefix("cam"), np.zeros(1_000_000, "u1"), now=T0 + i)
        for s in sends:
            if s.tracked:
                tracker = Held()
                trackers.append(tracker)
                out.track(tracker, s.tracked)
    assert len(trackers) == 3 and out.dropped == 2 and out.inflight_bytes == 3_000_000
    trackers[0].done = True  # a subscriber let go of the first frame
    sends = out.publish("cam", topic_prefix("cam"), np.zeros(1_000_000, "u1"), now=T0 + 9)
    assert any(s.tracked for s in sends) and out.dropped == 2


def chunk_sends(sends: Sequence[Send]) -> list[Send]:
    return [s for s in sends if len(s.frames) == 2]


def test_a_chunked_message_goes_whole_or_not_at_all() -> None:
    # A queue (window) of 150 chunks and messages of 100 (plus a short tail piece): the
    # second one does not fit beside the first, so none of its chunks may go (they did: a
    # full queue took the first pieces of each message and the receiver threw them away).
    out = Outbox(SENDER, chunk=True, chunk_window=150)
    frame = np.zeros(100 * CHUNK_SIZE + 10, "u1")
    first = chunk_sends(out.publish("cam", topic_prefix("cam"), frame, now=T0))
    assert len(first) == 101 and out.dropped == 0
    (windowed,) = [s for s in first if s.window]
    assert windowed is first[-2] and windowed.window == 101  # the last full piece
    assert memoryview(windowed.frames[1]).nbytes == CHUNK_SIZE  # zero-copy: trackable
    held = Held()
    out.track_chunks(held, windowed.window)
    assert out.chunks_held == 101
    second = chunk_sends(out.publish("cam", topic_prefix("cam"), frame, now=T0 + 1))
    assert second == [] and out.dropped == 1  # counted, its seq spent: the gap shows it
    held.done = True  # ZeroMQ has let go of the first message's chunks
    third = chunk_sends(out.publish("cam", topic_prefix("cam"), frame, now=T0 + 2))
    assert len(third) == 101 and out.dropped == 1 and out.chunks_held == 0
    box = inbox()
    feed_sends(box, first + third)
    assert [m.seq for m in box.messages] == [1, 3]


def test_a_full_chunk_is_sent_zero_copy_so_its_tracker_means_something() -> None:
    # pyzmq copies a frame below COPY_THRESHOLD and hands back a tracker that is done at
    # once: the window would then never see a chunk held.
    import zmq

    ctx = zmq.Context()
    try:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        pull.bind("inproc://window-tracker")
        push.connect("inproc://window-tracker")
        piece = bytearray(CHUNK_SIZE)
        tracker = push.send(piece, copy=False, track=True)
        assert tracker is not zmq._FINISHED_TRACKER and not tracker.done  # held in the queue
        pull.recv()
        tracker.wait(5)
        assert tracker.done
        push.close(0)
        pull.close(0)
    finally:
        ctx.term()


def test_a_message_larger_than_the_window_may_go_alone() -> None:
    out = Outbox(SENDER, chunk=True, chunk_window=4)
    sends = chunk_sends(out.publish("cam", topic_prefix("cam"), np.zeros(8 * CHUNK_SIZE, "u1"),
                                    now=T0))
    assert len(sends) == 8 and out.dropped == 0  # nothing else in flight: it may try
    out.track_chunks(Held(), 8)
    again = chunk_sends(out.publish("cam", topic_prefix("cam"), np.zeros(8 * CHUNK_SIZE, "u1"),
                                    now=T0 + 1))
    assert again == [] and out.dropped == 1


def test_a_twin_that_does_not_fit_the_window_is_not_sent_in_part() -> None:
    class Placer:
        def place(self, topic: str, data: Any) -> tuple[bytes, _wire.Payload]:
            return b"descriptor", _wire.encode_payload(data, _wire.new_encoder())

    out = Outbox(SENDER, chunk=True, chunk_window=10)
    out.shm = Placer()
    frame = np.zeros(8 * CHUNK_SIZE, "u1")
    first = out.publish("cam", topic_prefix("cam"), frame, now=T0)
    assert len(chunk_sends(first)) == 8
    out.track_chunks(Held(), 8)
    second = out.publish("cam", topic_prefix("cam"), frame, now=T0 + 1)
    assert chunk_sends(second) == [] and out.dropped == 0  # the descriptor went
    assert [s for s in second if not s.frames[0].startswith(_control.REPORT)]


def test_byte_limits_turn_into_message_counts() -> None:
    per = CHUNK_SIZE + MESSAGE_OVERHEAD
    assert effective_hwm(None, None) == min(1000, DEFAULT_MAX_QUEUE_BYTES // (4 * per))
    assert effective_hwm(10_000, None) == 10_000  # a count alone is taken as it is
    assert effective_hwm(10_000, 32 << 20) == (32 << 20) // (4 * per)
    assert socket_hwm(5, 1 << 30) == 5
    with pytest.raises(ValueError, match="max_queue_bytes"):
        effective_hwm(None, 100)
    with pytest.raises(ValueError, match="hwm"):
        effective_hwm(0, None)


# -- handshake and seam ----------
def test_replays_come_first_then_the_live_messages_held_back() -> None:
    box = Inbox(compile_pattern("**"), READY)
    box.feed(single("a", 7, "live-early"), [])
    box.feed(*replay(single("a", 6, "R", _wire.FLAG_RETAINED)))
    assert [m.data for m in box.messages] == ["R"]  # the live one waits for the confirmation
    confirm(box)
    assert [(m.data, m.retained) for m in box.messages] == [("R", True), ("live-early", False)]


def test_a_replay_after_the_handshake_is_not_believed() -> None:
    box = inbox()
    box.feed(*replay(single("a", 2**64 - 1, "forged", _wire.FLAG_RETAINED)))
    for seq in range(1, 4):
        box.feed(single("a", seq, seq), [])
    assert [m.data for m in box.messages] == [1, 2, 3]
    assert box.invalid == 1 and box.duplicates == 0


def test_a_replay_with_a_huge_seq_cannot_blackhole_later_messages() -> None:
    box = Inbox(compile_pattern("**"), READY)
    box.feed(*replay(single("a", 2**64 - 1, "R", _wire.FLAG_RETAINED)))
    confirm(box)
    for seq in range(1, 1001):
        box.feed(single("a", seq, seq), [])
    assert len(box.messages) == 1 + 1000 and box.duplicates == 0


def test_the_seam_drops_only_live_copies_just_below_the_replay() -> None:
    box = Inbox(compile_pattern("**"), READY)
    box.feed(*replay(single("a", 10, "R", _wire.FLAG_RETAINED)))
    confirm(box)
    box.feed(single("a", 9, "older"), [])
    box.feed(single("a", 10, "same"), [])
    box.feed(single("a", 11, "next"), [])
    assert [m.data for m in box.messages] == ["R", "next"] and box.duplicates == 2
    assert SEAM_WINDOW >= 1024


# -- bounded state ----------
def test_the_tracker_forgets_the_least_recently_heard_stream() -> None:
    seqs = SequenceTracker(limit=3)
    for sender in (b"a", b"b", b"c"):
        seqs.observe(sender, "t", 1)
    seqs.observe(b"a", "t", 2)  # a is heard again: b is now the oldest
    seqs.observe(b"d", "t", 1)
    assert len(seqs) == 3 and seqs.evicted == 1
    assert seqs.last(b"b", "t") is None and seqs.last(b"a", "t") == 2
    assert seqs.observe(b"b", "t", 9) == 0  # a new baseline, not a false loss


def test_sender_churn_keeps_an_inbox_bounded() -> None:
    box = inbox(max_streams=100)
    for i in range(5000):
        box.feed(single("a", 1, i, sender=i.to_bytes(8, "big")), [])
    assert box.streams == 100 and box.evicted == 4900 and box.received == 5000


@pytest.mark.parametrize("sizes", [[0], [1], [CHUNK_SIZE], [CHUNK_SIZE + 1], [3 * CHUNK_SIZE],
                                   [10, 0, 5 * CHUNK_SIZE - 1, CHUNK_SIZE]])
def test_the_chunk_count_is_the_number_of_pieces(sizes: list[int]) -> None:
    bufs = [memoryview(bytearray(n)) for n in sizes]
    shaped = np.zeros((3, CHUNK_SIZE // 2 + 1), "u2").data  # cast to bytes first
    for views in (bufs, [*bufs, shaped]):
        for size in (CHUNK_SIZE, 1000):
            assert _chunk.count(views, size) == len(_chunk.pieces(views, size))


def test_a_message_the_window_refuses_builds_no_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a flood, most 16 MiB frames are refused by the window: building their 256 chunk
    # headers first (as before) took CPU from the broker on the same cores.
    out = Outbox(SENDER, chunk=True, chunk_window=10)
    frame = np.zeros(8 * CHUNK_SIZE, "u1")
    out.publish("cam", topic_prefix("cam"), frame, now=T0)
    out.track_chunks(Held(), 8)

    def refuse(*args: Any) -> Any:
        raise AssertionError("chunks built for a message the window refused")

    monkeypatch.setattr(_chunk, "chunk_frames", refuse)
    sends = out.publish("cam", topic_prefix("cam"), frame, now=T0 + 1)
    assert chunk_sends(sends) == [] and out.dropped == 1
