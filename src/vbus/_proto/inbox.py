"""The subscriber's inbox, sans-io: parsing, the handshake and retained seam, chunk reassembly,
loss accounting and bounded per-sender state.

Fed the frames of each ZeroMQ message (``feed``), an Inbox appends the Messages they hold to
``messages``, the losses it found to ``losses``, and counts the rest. It never raises on
input: whatever does not parse (foreign or hostile senders, wrong version, garbage) is counted
in ``invalid`` or ``errors`` and dropped.

The handshake (see _handshake in _subscriber.py for the socket side): until the broker's
confirmation on our ready token arrives, the broker may replay retained values to us (a head
on our token with FLAG_REPLAY, then the original frames). They are delivered first, marked
retained; live messages that came meanwhile wait and follow them. After the confirmation no
replay is believed. A live message the replay already delivered (the same publisher and
topic, a seq at or just below the replayed one) is a duplicate: dropped and counted. The seam
is bounded: a seq far below the replayed one, or above it, ends it, so no replay can make a
subscriber discard later messages.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Any

import msgspec

from .._errors import DecodeError
from .._message import Message
from . import batch as _batch
from . import chunk as _chunk
from . import control as _control
from . import wire as _wire
from .limits import DEFAULT_MAX_QUEUE_BYTES
from .seq import MAX_STREAMS, BurstLog, SequenceTracker
from .topics import Pattern

log = logging.getLogger("vbus.subscriber")

SEAM_WINDOW = 1 << 20
"""A live message counts as a duplicate of a replayed one only within this many seqs below."""
MAX_SENDER_NAMES = 4096
"""Hex names of sender ids kept for reuse (a cache: a churn of senders costs recomputation)."""
MAX_EARLY = 100_000
"""Live messages held back during the handshake at most (more are lost, and counted)."""
_UNDECODABLE = object()  # a batch entry that failed validation (counted, not delivered)
_VIEW_ENTRIES = msgspec.msgpack.Decoder(list[tuple[float, memoryview]])
_BIN_HEADS = frozenset((0xC4, 0xC5, 0xC6))  # msgpack bin 8/16/32


def _first_entry_is_bin(payload: memoryview) -> bool:
    """Whether a batch's first entry holds bytes: the array head (1, 3 or 5 bytes), then
    the entry's fixarray(2) and float64 time (10 bytes), then the payload's own head."""
    if not payload:
        return False
    head = payload[0]
    at = 11 if 0x90 <= head <= 0x9F else 13 if head == 0xDC else 15 if head == 0xDD else -1
    return 0 <= at < len(payload) and payload[at] in _BIN_HEADS


class Inbox:
    def __init__(
        self,
        pattern: Pattern,
        ready: bytes,
        type: Any = None,
        *,
        max_streams: int = MAX_STREAMS,
        max_assembly_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.pattern = pattern
        self._match = pattern.matches
        self._ready = ready  # READY + token + b"\0"
        self._type = type
        self._decoder: msgspec.msgpack.Decoder[Any] = (
            msgspec.msgpack.Decoder() if type is None else msgspec.msgpack.Decoder(type)
        )
        self._batch_decoder = _batch.entries_decoder(type)
        self.messages: deque[Message] = deque()
        self.losses: list[tuple[str, str, int]] = []  # (topic, sender, count), for the shell
        self.confirmed = False  # the broker confirmed our subscription
        self._early: list[tuple[bytes, list[memoryview]]] | None = []
        self._replayed: dict[tuple[bytes, str], int] = {}
        self._seqs = SequenceTracker(max_streams)
        self._senders: dict[bytes, str] = {}
        self._max_streams = max_streams
        self._assemblies: dict[bytes, _chunk.Assembly] = {}
        self._assembly_bytes = 0
        self._max_assembly_bytes = max_assembly_bytes
        # shm: the shell's resolver of shared-memory frames (_shm.Resolver), or None
        self.shm: Any = None
        self.received = 0
        self.errors = 0
        self.invalid = 0
        self.duplicates = 0
        now = time.monotonic if clock is None else clock
        self.loss_log = BurstLog(log, f"subscriber {pattern.text!r} lost messages", clock=now)
        self.error_log = BurstLog(log, f"subscriber {pattern.text!r} skipped a message",
                                  clock=now)

    # -- counters ---------------------------------------------------------------------------
    @property
    def lost(self) -> int:
        return self._seqs.lost

    @property
    def evicted(self) -> int:
        return self._seqs.evicted

    @property
    def streams(self) -> int:
        return len(self._seqs)

    # -- input ------------------------------------------------------------------------------
    def feed(self, first: bytes, rest: list[memoryview]) -> None:
        """Take one ZeroMQ message (its first frame and the others as buffers)."""
        if first[:1] == b"\xff":
            self._control_frame(first, rest)
            return
        if self._early is not None:
            if len(self._early) < MAX_EARLY:
                self._early.append((first, rest))
            # else: lost; the sequence gap counts it once live traffic flows
            return
        self._live(first, rest, False)

    def _control_frame(self, first: bytes, rest: list[memoryview]) -> None:
        if not first.startswith(self._ready):
            return  # another subscriber's confirmation (prefix-matched by ZeroMQ)
        head = len(self._ready)
        if len(first) < head + _wire.HEADER_SIZE or first[head] != _wire.VERSION:
            self._invalid("a malformed confirmation")
            return
        if first[head + 1] & _wire.FLAG_REPLAY:  # the header's flags byte
            if self.confirmed or not rest:
                # Replays come only during the handshake; anything else is not our broker's.
                self._invalid("a replay outside the handshake")
                return
            self._live(bytes(rest[0]), rest[1:], True)
            return
        if not self.confirmed:
            self.confirmed = True
            early, self._early = self._early or [], None
            for f, r in early:
                self._live(f, r, False)
        # a confirmation after a reconnect: nothing to do

    def _invalid(self, why: str) -> None:
        self.invalid += 1
        self.error_log.event(1, f"not a vbus message ({why})")

    def _live(self, first: bytes, rest: list[memoryview], replay: bool) -> None:
        try:
            env = _wire.parse_envelope(first)
            external = bool(env.flags & _wire.FLAG_EXTERNAL)
            if external != bool(rest):
                raise DecodeError(f"{len(rest) + 1} frames do not match the header's flags")
        except DecodeError as exc:
            self._invalid(str(exc))
            return
        topic = env.topic
        if topic[:1] == "$" and self.shm is not None:  # shm: a bytes twin (ours or not)
            twin = self.shm.twin(env)
            if twin is None:
                return
            env, topic = twin, twin.topic
        if self._match is not None and not self._match(topic):
            return
        sender = self._sender(env.sender)
        kind = env.kind
        if kind == _wire.KIND_SHM and self.shm is not None and self.shm.skip(  # shm
                env.sender, memoryview(first)[env.offset :]):
            return  # we take this publisher's twins: they carry the same seqs
        if kind == _wire.KIND_CHUNK:
            self._chunk(env, first, rest, sender)
            return
        if self._assemblies:
            self._abandon(env.sender)
        if kind == _wire.KIND_BATCH:
            if not replay:
                self._batch(env, first, sender)
            return
        if replay:
            self._replayed[(env.sender, topic)] = env.seq
        elif not self._sequence(env.sender, topic, env.seq, 1, sender):
            return
        external_buffers: Any = None
        if rest:
            external_buffers = rest[0] if len(rest) == 1 else list(rest)
        self._deliver(env, sender, memoryview(first)[env.offset :], external_buffers)

    def _deliver(self, env: _wire.Envelope, sender: str, inline: memoryview,
                 external: Any) -> None:
        try:
            if env.kind == _wire.KIND_SHM and self.shm is not None:  # shm: map, or lost
                data = self.shm.resolve(inline)
                if data is None:
                    self._seqs.lost += 1
                    self.losses.append((env.topic, sender, 1))
                    self.loss_log.event(1, f"a shared-memory frame on {env.topic!r} from "
                                           f"{sender}: {self.shm.why}")
                    return
            else:
                data = _wire.decode_payload(env.kind, inline, external, self._decoder)
            if self._type is not None and env.kind not in (_wire.KIND_MSGPACK, _wire.KIND_TREE):
                data = self._convert(data)
        except DecodeError as exc:
            self.errors += 1
            self.error_log.event(1, f"{env.topic!r} from {sender}: {exc}")
            return
        self.received += 1
        self.messages.append(Message(env.topic, data, sender, env.seq, env.time,
                                     bool(env.flags & _wire.FLAG_RETAINED)))

    def _sequence(self, sender_id: bytes, topic: str, seq: int, count: int,
                  sender: str) -> bool:
        """Account for ``count`` live messages from ``seq``; False if they are duplicates of
        what the replay delivered."""
        if self._replayed:
            replayed = self._replayed.get((sender_id, topic))
            if replayed is not None:
                if replayed - SEAM_WINDOW < seq + count - 1 <= replayed:
                    self.duplicates += count
                    return False
                del self._replayed[(sender_id, topic)]  # past the seam
        lost = self._seqs.observe(sender_id, topic, seq, count)
        if lost:
            self.loss_log.event(lost, f"{lost} message(s) on {topic!r} from {sender}")
            self.losses.append((topic, sender, lost))
        return True

    def _sender(self, sender_id: bytes) -> str:
        sender = self._senders.get(sender_id)
        if sender is None:
            if len(self._senders) >= MAX_SENDER_NAMES:
                self._senders.clear()
            sender = self._senders[sender_id] = sender_id.hex()
        return sender

    # -- batches ----------------------------------------------------------------------------
    def _batch(self, env: _wire.Envelope, first: bytes, sender: str) -> None:
        topic = env.topic
        payload = memoryview(first)[env.offset :]
        plain = self._type is None
        entries: list[tuple[float, Any]]
        views = False  # every data is already a read-only memoryview into the frame
        checked = False  # entries were validated one by one: some may be _UNDECODABLE
        try:
            try:
                if plain and _first_entry_is_bin(payload):
                    # A batch of bytes payloads (the usual flood): msgspec makes the
                    # memoryviews itself, zero-copy, as a lone bytes message would be.
                    try:
                        entries = _VIEW_ENTRIES.decode(payload)
                        views = True
                    except msgspec.ValidationError:
                        entries = self._batch_decoder.decode(payload)  # mixed: bytes and others
                else:
                    entries = self._batch_decoder.decode(payload)
            except msgspec.ValidationError:
                entries = self._entries_one_by_one(payload, topic, sender)
                checked = True
        except Exception as exc:  # hostile input: anything but a clean batch is counted
            self.errors += 1
            self.error_log.event(1, f"{topic!r} from {sender}: malformed batch ({exc!r})")
            # Its messages were received, not lost: keep the sequence count in step.
            self._seqs.observe(env.sender, topic, env.seq, max(_batch.count(payload), 1))
            return
        seq = env.seq
        if self._replayed:
            replayed = self._replayed.get((env.sender, topic))
            if replayed is not None and replayed - SEAM_WINDOW < seq <= replayed:
                skip = min(replayed - seq + 1, len(entries))  # delivered as retained values
                self.duplicates += skip
                entries, seq = entries[skip:], seq + skip
        count = len(entries)
        if not count or not self._sequence(env.sender, topic, seq, count, sender):
            return
        if not checked and (views or not plain):
            # The hot path: one Message per entry, made by map() without a Python loop.
            times, datas = zip(*entries, strict=True)
            self.messages.extend(map(Message, repeat(topic, count), datas,
                                     repeat(sender, count), range(seq, seq + count), times))
            self.received += count
            return
        messages = [
            Message(topic, memoryview(data) if plain and type(data) is bytes else data,
                    sender, seq + i, when, False)
            for i, (when, data) in enumerate(entries)
            if data is not _UNDECODABLE
        ]
        self.received += len(messages)
        self.messages.extend(messages)

    def _entries_one_by_one(
        self, payload: memoryview, topic: str, sender: str
    ) -> list[tuple[float, Any]]:
        # One entry failed validation: find it, count it, keep the others (and their seqs).
        entries: list[tuple[float, Any]] = []
        for when, raw in _batch.RAW_ENTRIES.decode(payload):
            try:
                entries.append((when, self._decoder.decode(raw)))
            except msgspec.ValidationError as exc:
                self.errors += 1
                self.error_log.event(1, f"{topic!r} from {sender}: payload does not match "
                                        f"the requested type: {exc}")
                entries.append((when, _UNDECODABLE))
        return entries

    # -- chunks -----------------------------------------------------------------------------
    def _chunk(self, env: _wire.Envelope, first: bytes, rest: list[memoryview],
               sender: str) -> None:
        meta = memoryview(first)[env.offset :]
        assembly = self._assemblies.get(env.sender)
        try:
            index, count, first_meta = _chunk.parse_meta(meta)
            if first_meta is not None:
                if assembly is not None:
                    self._abandon(env.sender)
                kind, inline, sizes = first_meta
                total = sum(sizes)
                if count < 1 or any(n < 0 for n in sizes) or kind in (
                    _wire.KIND_BATCH, _wire.KIND_CHUNK
                ):
                    raise DecodeError(f"bad chunk header: {count} chunks, sizes {sizes[:4]}")
                if self._assembly_bytes + total > self._max_assembly_bytes:
                    raise DecodeError(f"a message of {total} bytes exceeds the room for "
                                      f"reassembly ({self._max_assembly_bytes} bytes)")
                assembly = _chunk.Assembly(env, kind, inline, sizes, count)
                self._assemblies[env.sender] = assembly
                self._assembly_bytes += total
                while len(self._assemblies) > self._max_streams:
                    self._abandon(next(iter(self._assemblies)))
            elif assembly is None:
                return  # its first chunk was lost: the sequence gap counts the message
            elif (index != assembly.next_index or count != assembly.count
                  or env.seq != assembly.seq or env.topic != assembly.topic):
                self._abandon(env.sender)
                return
            if not assembly.add(rest[0]):
                return
        except DecodeError as exc:
            if env.sender in self._assemblies:
                self._abandon(env.sender)
            self.errors += 1
            self.error_log.event(1, f"{env.topic!r} from {sender}: {exc}")
            return
        self._abandon(env.sender)  # whole: it leaves the assemblies
        if not self._sequence(env.sender, assembly.topic, assembly.seq, 1, sender):
            return
        whole = _wire.Envelope(assembly.topic, assembly.flags, assembly.kind, env.sender,
                               assembly.seq, assembly.time, 0)
        self._deliver(whole, sender, memoryview(assembly.inline), assembly.externals())

    def _abandon(self, sender_id: bytes) -> None:
        # An assembly ends when anything else comes from its sender: its pieces come back to
        # back, so a gap means a piece was lost (and the sequence gap will count the message).
        assembly = self._assemblies.pop(sender_id, None)
        if assembly is not None:
            self._assembly_bytes -= assembly.nbytes

    # -- types ------------------------------------------------------------------------------
    def _convert(self, data: Any) -> Any:
        wanted = self._type
        if wanted is bytes and isinstance(data, memoryview):
            return bytes(data)
        if isinstance(wanted, type) and isinstance(data, wanted):
            return data
        raise DecodeError(f"payload of type {type(data).__name__} is not a {wanted!r}")

    def report(self) -> _control.Report:
        return _control.Report("subscriber", received=self.received, dropped=self._seqs.lost)
