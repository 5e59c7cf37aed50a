"""The publisher's outbox, sans-io: sequence numbers, batching, chunking, byte budget, reports.

Fed ``(topic, data, now)``, an Outbox returns the ZeroMQ messages to send, in order, as
``Send`` objects; the socket class only sends them and says which did not fit (``Send.count``
goes to ``published`` or ``dropped``). Everything a publisher decides lives here:

- **Order.** Messages leave in publish order, across all topics. A burst of small messages
  travels in batches, and a batch is a *run* of one topic: at most one batch is open, and a
  message on another topic (or one that cannot be batched) sends it first.
- **Bounded bytes.** With ``chunk`` set (a network transport may be on the way) an external
  payload larger than CHUNK_SIZE goes as a run of chunks (see _proto/chunk.py), so every ZeroMQ
  message is small and a message-count high-water mark bounds bytes. Without it (in process,
  zero-copy), the outbox keeps the bytes it has handed to ZeroMQ and not yet seen released
  (``track``) within ``inflight_limit``: past that, a large message is dropped and counted,
  and publish still never blocks.
- **Whole messages or none.** A chunked message goes only if all its chunks fit in the
  socket's queue (``chunk_window``, the socket's high-water mark, minus the chunks of earlier
  messages ZeroMQ still holds: the last chunk of each is tracked). Without this a full queue
  took the first chunks of almost every large message and refused the rest, and the link
  carried pieces the receiver could only throw away (0.13 GB/s delivered at 16 MiB).
- **Loss accounting.** Every message spends its sequence number, sent or not, so a
  subscriber sees the gap.
"""

from __future__ import annotations

import time as _time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from .._errors import DecodeError, EncodeError
from . import batch as _batch
from . import chunk as _chunk
from . import control as _control
from . import wire as _wire
from .batch import Batch
from .limits import CHUNK_SIZE

BURST_GAP = 10e-6
"""A message this soon after the previous one starts a batch: a burst is under way."""
REPORT_PERIOD = 1.0
OVERHEAD = 12  # bytes per message besides its payload, for the broker's byte counts
_PLAIN = frozenset({float, int, str, bool, type(None), dict, list, tuple})
BATCHABLE = _batch.MAX_BYTES // 16  # larger payloads are sent on their own
_NOTHING: tuple[()] = ()  # what most publishes in a burst send: nothing yet
_RAW = msgspec.Raw
_BATCHABLE_BYTES = BATCHABLE - 3  # a bytes payload's bin head is 2 or 3 bytes up to there
_BATCH_MESSAGES = _batch.MAX_MESSAGES
_BATCH_BYTES = _batch.MAX_BYTES
_EARLY = 1e-6  # the burst path looks at deadlines this early: float rounding is never late


class Tracker(Protocol):
    """What ZeroMQ gives back for a zero-copy send: done once it let go of the buffer."""

    @property
    def done(self) -> bool: ...


class Send:
    """One ZeroMQ message to send: ``frames``; ``count`` bus messages it completes (0 for
    control messages); ``last`` is False for all but the final chunk of a message (if one
    of them cannot be sent, the rest of that message must not be); ``tracked`` > 0 asks
    the sender to track the zero-copy last frame and hand the tracker to ``Outbox.track``;
    ``window`` > 0 (the last chunk of a message: its chunk count) asks the same for
    ``Outbox.track_chunks``."""

    __slots__ = ("frames", "count", "last", "tracked", "window")

    def __init__(self, frames: list[Any], count: int = 1, last: bool = True,
                 tracked: int = 0, window: int = 0) -> None:
        self.frames = frames
        self.count = count
        self.last = last
        self.tracked = tracked
        self.window = window


class Outbox:
    def __init__(self, sender: bytes, *, batch_delay: float = 0.0, chunk: bool = False,
                 inflight_limit: int = 0, chunk_size: int = CHUNK_SIZE,
                 chunk_window: int = 0) -> None:
        self.sender = sender
        self.batch_delay = batch_delay  # 0: never batch
        self.chunk = chunk
        self.chunk_size = chunk_size
        self.inflight_limit = inflight_limit  # 0: no budget
        self.encoder = _wire.new_encoder()
        self.published = 0
        self.dropped = 0
        self.batch_started = False  # set when a batch opens: the shell arms its flusher
        self._batch: Batch | None = None
        self._batch_topic = ""
        self._last_publish = 0.0
        self._check_at = 0.0  # at or before the open batch's first deadline (due or report)
        # per topic: the last seq, i.e. messages published (the open batch's topic: before it)
        self._seqs: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._relayed: dict[str, int] = {}  # per topic: messages sent as ready-made frames
        self._next_report = 0.0
        self._inflight: deque[tuple[Tracker, int]] = deque()
        self._inflight_bytes = 0
        self.chunk_window = chunk_window  # 0: no window (chunks go as far as the queue takes)
        self._chunks_out: deque[tuple[Tracker, int]] = deque()
        self._chunks_held = 0
        self.shm: Any = None  # shm: the publisher's pool (_shm.Pool), places large frames

    # -- publishing -------------------------------------------------------------------------
    def publish(self, topic: str, prefix: bytes, data: Any, retain: bool = False,
                now: float | None = None) -> Sequence[Send]:
        """The sends for one message. EncodeError (nothing changed) if it cannot be encoded."""
        if now is None:
            now = _time.time()
        batch = self._batch
        if (batch is not None and type(data) is bytes and self._batch_topic == topic
                and not retain and len(data) <= _BATCHABLE_BYTES):
            # The hot path first, inline: a bytes payload joins the open batch of its topic
            # as it is (encoded with the batch, when that leaves). Its seq is the batch's
            # next one (the topic's count catches up when the batch leaves), and one
            # comparison stands for both deadlines.
            self._last_publish = now
            batch.entries.append((now, data))
            n = len(data)
            count = batch.count = batch.count + 1
            size = batch.size = batch.size + n + (2 if n < 0x100 else 3)
            if count >= _BATCH_MESSAGES or size >= _BATCH_BYTES or now >= self._check_at:
                return self._batch_deadlines(batch, now)
            return _NOTHING
        kind = type(data)
        if not retain and self.batch_delay:
            item: bytes | msgspec.Raw | None = None
            if kind is bytes:
                size = len(data)
                if size <= _BATCHABLE_BYTES:
                    item = data  # encoded with its batch, when that leaves
                    size += 2 if size < 0x100 else 3
            elif kind in _PLAIN:
                try:
                    entry = self.encoder.encode(data)
                except _wire.NestedArray:
                    pass  # arrays inside: a frame each, so not batchable
                except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                    raise EncodeError(
                        f"cannot encode payload of type {kind.__name__}: {exc!r}"
                    ) from None
                else:
                    size = len(entry)
                    if size <= BATCHABLE:
                        item = _RAW(entry)
            if item is not None:
                if batch is not None and self._batch_topic == topic:
                    # A small plain value joins the open batch (as the bytes path above).
                    self._last_publish = now
                    batch.entries.append((now, item))
                    count = batch.count = batch.count + 1
                    size = batch.size = batch.size + size
                    if count >= _BATCH_MESSAGES or size >= _BATCH_BYTES or now >= self._check_at:
                        return self._batch_deadlines(batch, now)
                    return _NOTHING
                return self._start_run(topic, prefix, data, kind, item, now)
        placed = None if self.shm is None or retain else self.shm.place(topic, data)  # shm
        payload = _wire.encode_payload(data, self.encoder) if placed is None else placed[1]
        sends = self.flush()  # everything published before goes first
        if placed is not None:  # shm: the descriptor, then its bytes twin if anyone takes it
            self._placed(sends, topic, prefix, placed[0], payload, data.nbytes, now)
        else:
            self._message(sends, topic, prefix, payload, retain, now)
        self._last_publish = now
        self._maybe_report(sends, now)
        return sends

    def _batch_deadlines(self, batch: Batch, now: float) -> Sequence[Send]:
        # The open batch is full, or one of its deadlines may have come (``_check_at`` is a
        # little early, so that rounding never makes it late): decide exactly.
        if (batch.count >= _BATCH_MESSAGES or batch.size >= _BATCH_BYTES
                or now - batch.first_time >= self.batch_delay):
            sends = [self._take_batch()]
            self._maybe_report(sends, now)
            return sends
        if now >= self._next_report:
            return [self.report(now)]
        return _NOTHING

    def _start_run(self, topic: str, prefix: bytes, data: Any, kind: type,
                   item: bytes | msgspec.Raw, now: float) -> Sequence[Send]:
        # A small message that does not join the open batch: that batch (another topic's)
        # goes first; in a burst this one opens a batch, else it goes alone.
        sends = self.flush()
        seq = self._seqs.get(topic, 0) + 1
        self._seqs[topic] = seq
        if now - self._last_publish < BURST_GAP:
            # Encoded here (once a batch): the burst path appends the next ones as they are.
            self._batch = Batch(prefix, seq, now, item if kind is not bytes else
                                self.encoder.encode(data))
            self._batch_topic = topic
            self._check_at = min(now + self.batch_delay, self._next_report) - _EARLY
            self.batch_started = True
        else:
            payload = (
                _wire.Payload(_wire.KIND_BYTES, data)
                if kind is bytes
                else _wire.Payload(_wire.KIND_MSGPACK, bytes(item))
            )
            frame, _ = _wire.build_frames(prefix, 0, self.sender, seq, now, payload)
            sends.append(Send([frame]))
            self._count_bytes(topic, len(payload.inline))
        self._last_publish = now
        self._maybe_report(sends, now)
        return sends

    def _message(self, sends: list[Send], topic: str, prefix: bytes, payload: _wire.Payload,
                 retain: bool, now: float) -> None:
        seq = self._seqs.get(topic, 0) + 1
        self._seqs[topic] = seq
        externals = _externals(payload.external)
        size = len(payload.inline) + sum(b.nbytes for b in externals)
        if retain:
            # The broker's copy goes first: a subscriber joining in between then finds the
            # value either in the broker's store or in its live stream (deduplicated).
            # Retained copies are kept whole by the broker, never chunked.
            copy, _ = _wire.build_frames(prefix, _wire.FLAG_RETAINED, self.sender, seq, now,
                                         payload)
            sends.append(Send([_control.RETAIN + copy, *externals], count=0))
        self._count_bytes(topic, size)
        large = sum(b.nbytes for b in externals)
        if self.chunk and large > self.chunk_size:
            if not self._chunked(sends, prefix, seq, now, payload, externals, 1):
                self.dropped += 1  # whole: the seq is spent, subscribers see the gap
            return
        frame, _ = _wire.build_frames(prefix, 0, self.sender, seq, now, payload)
        tracked = large if self.inflight_limit and large >= _wire.EXTERNAL_THRESHOLD else 0
        if tracked and not self._room_for(tracked):
            self.dropped += 1  # the seq is spent: subscribers see the gap
            return
        sends.append(Send([frame, *externals], tracked=tracked))

    def _placed(self, sends: list[Send], topic: str, prefix: bytes, descriptor: bytes,
                twin: _wire.Payload | None, nbytes: int, now: float) -> None:
        # shm: a frame in the shared pool goes as its descriptor; a twin (its bytes, the same
        # seq, on $vbus/twin/<topic>) follows for the subscribers that take bytes.
        seq = self._seqs.get(topic, 0) + 1
        self._seqs[topic] = seq
        self._count_bytes(topic, nbytes)
        frame, _ = _wire.build_frames(prefix, 0, self.sender, seq, now,
                                      _wire.Payload(_wire.KIND_SHM, descriptor))
        sends.append(Send([frame]))
        if twin is None:
            return
        twin_prefix = _control.TWIN + prefix
        externals = _externals(twin.external)
        if self.chunk and nbytes > self.chunk_size:
            # Refused by the window: the twin's takers see the gap.
            self._chunked(sends, twin_prefix, seq, now, twin, externals, 0)
            return
        first, _ = _wire.build_frames(twin_prefix, 0, self.sender, seq, now, twin)
        sends.append(Send([first, *externals], count=0))

    def _chunked(self, sends: list[Send], prefix: bytes, seq: int, now: float,
                 payload: _wire.Payload, externals: list[memoryview], count: int) -> bool:
        """The message in chunks, whole or not at all (False: the window refused it; its
        chunks were never built, which a flood of refused large frames would pay for)."""
        if not self._window_for(_chunk.count(externals, self.chunk_size)):
            return False
        self._chunk_sends(sends, list(_chunk.chunk_frames(
            prefix, 0, self.sender, seq, now, payload, externals, self.chunk_size)), count)
        return True

    def _chunk_sends(self, sends: list[Send], pieces: list[tuple[bytes, memoryview]],
                     count: int) -> None:
        last = len(pieces) - 1
        # The window's tracker goes on the last full piece: ZeroMQ copies a short one (a
        # buffer's tail) and reports it let go at once.
        full = max(piece.nbytes for _, piece in pieces)
        tracked = max(i for i, (_, piece) in enumerate(pieces) if piece.nbytes == full)
        window = len(pieces) if self.chunk_window else 0
        for i, (first, piece) in enumerate(pieces):
            sends.append(Send([first, piece], count=count, last=i == last,
                              window=window if i == tracked else 0))

    def relay(self, frame: bytes, external: Any = None, now: float | None = None) -> list[Send]:
        """Sends for a message that is already framed (replay keeps its original header)."""
        try:
            env = _wire.parse_envelope(frame)
            topic: str | None = env.topic
            count = 1
            if env.kind == _wire.KIND_BATCH:
                count = _batch.count(memoryview(frame)[env.offset :])
        except DecodeError:
            topic, count = None, 1
        sends = self.flush()
        sends.append(Send([frame] if external is None else [frame, external], count=count))
        if topic is not None:  # the broker's per-topic counts see replayed traffic too
            self._relayed[topic] = self._relayed.get(topic, 0) + count
            size = len(frame) + (0 if external is None else len(external))
            self._bytes[topic] = self._bytes.get(topic, 0) + size
            self._maybe_report(sends, _time.time() if now is None else now)
        return sends

    def clear_retained(self, prefix: bytes) -> list[Send]:
        sends = self.flush()
        frame = _control.control_frame(_control.RETAIN + prefix[:-1], self.sender,
                                       _wire.FLAG_CLEAR)
        sends.append(Send([frame], count=0))
        return sends

    # -- batches ----------------------------------------------------------------------------
    def flush(self) -> list[Send]:
        """The open batch, if any, as a send (a new list either way)."""
        return [self._take_batch()] if self._batch is not None else []

    def due(self) -> float | None:
        """When the open batch must leave (wall clock), or None."""
        batch = self._batch
        return None if batch is None else batch.first_time + self.batch_delay

    def flush_due(self, now: float) -> list[Send]:
        """The open batch if it has waited ``batch_delay``."""
        due = self.due()
        return self.flush() if due is not None and due <= now else []

    def _take_batch(self) -> Send:
        batch = self._batch
        assert batch is not None
        self._batch = None
        topic = self._batch_topic
        self._seqs[topic] = batch.first_seq + batch.count - 1  # the batch's seqs are spent
        self._bytes[topic] = self._bytes.get(topic, 0) + batch.size + OVERHEAD * batch.count
        return Send([batch.frame(self.sender)], count=batch.count)

    # -- the zero-copy byte budget ------------------------------------------------------------
    def track(self, tracker: Tracker, nbytes: int) -> None:
        """ZeroMQ holds ``nbytes`` of ours until ``tracker.done``."""
        self._inflight.append((tracker, nbytes))
        self._inflight_bytes += nbytes

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    def _room_for(self, nbytes: int) -> bool:
        if self._inflight_bytes + nbytes <= self.inflight_limit:
            return True
        # Over budget: forget what ZeroMQ has let go of (in any order), then look again.
        kept: deque[tuple[Tracker, int]] = deque()
        held = 0
        for tracker, n in self._inflight:
            if not tracker.done:
                kept.append((tracker, n))
                held += n
        self._inflight, self._inflight_bytes = kept, held
        return held + nbytes <= self.inflight_limit or not kept  # one may always go alone

    # -- the chunk window ---------------------------------------------------------------------
    def track_chunks(self, tracker: Tracker, chunks: int) -> None:
        """ZeroMQ holds (at most) ``chunks`` chunks of one message until ``tracker.done``
        (the last one's: the queue lets them go in order)."""
        self._chunks_out.append((tracker, chunks))
        self._chunks_held += chunks

    @property
    def chunks_held(self) -> int:
        return self._chunks_held

    def _window_for(self, chunks: int) -> bool:
        if not self.chunk_window:
            return True
        out = self._chunks_out
        while out and out[0][0].done:  # the queue lets go in order: look at the oldest only
            self._chunks_held -= out.popleft()[1]
        if self._chunks_held + chunks <= self.chunk_window:
            return True
        if not out:
            return True  # larger than the whole queue: it may go alone (the queue may drain)
        # A later message's tracker may be done before an earlier one's is looked at.
        kept = deque(item for item in out if not item[0].done)
        self._chunks_out, self._chunks_held = kept, sum(n for _, n in kept)
        return self._chunks_held + chunks <= self.chunk_window or not kept

    # -- counters -----------------------------------------------------------------------------
    def _count_bytes(self, topic: str, size: int) -> None:
        self._bytes[topic] = self._bytes.get(topic, 0) + size + OVERHEAD

    def _maybe_report(self, sends: list[Send], now: float) -> None:
        if now >= self._next_report:
            sends.append(self.report(now))

    def report(self, now: float, closed: bool = False) -> Send:
        """Cumulative counters for the broker's $vbus/stats, at most once a second while
        publishing and once at close."""
        self._next_report = now + REPORT_PERIOD
        counts = dict(self._relayed)
        for t, n in self._seqs.items():
            counts[t] = counts.get(t, 0) + n
        batch = self._batch
        if batch is not None:  # its messages are published, though the topic's count lags
            t = self._batch_topic
            counts[t] = counts.get(t, 0) + batch.first_seq + batch.count - 1 - self._seqs[t]
            self._check_at = min(batch.first_time + self.batch_delay,
                                 self._next_report) - _EARLY
        topics = {t: (n, self._bytes.get(t, 0)) for t, n in counts.items()}
        report = _control.Report("publisher", topics=topics, dropped=self.dropped, closed=closed)
        return Send([_control.report_frame(self.sender, report)], count=0)


def _externals(external: Any) -> list[memoryview]:
    """A payload's external buffers: none, one, or several."""
    if external is None:
        return []
    if isinstance(external, (list, tuple)):
        return [memoryview(b) for b in external]
    return [memoryview(external)]
