"""Batches, sans-io: consecutive messages of one publisher on one topic in one frame.

Sending a ZeroMQ message costs Python about a microsecond, and receiving one as much again, so
a flood of small messages is carried in batches: a frame of kind KIND_BATCH whose header holds
the first message's seq and time, and whose payload is a msgpack array of ``[time, data]``
pairs, one per message; their seqs follow from the header's. Decoding a batch is one msgspec
call however many messages it holds.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import wire as _wire

MAX_MESSAGES = 256
MAX_BYTES = 64 * 1024  # payload bytes in one batch; larger messages are never batched


# The entries wait as ``(time, item)`` pairs and are encoded together when the batch leaves,
# in one msgspec call: an array of fixarray(2) [float64 time, payload]. An item is either a
# bytes payload itself (msgspec writes it as bin: no copy and no call per message until
# then; the outbox's burst path appends these) or msgpack already encoded, as msgspec.Raw
# (encoded at publish, so that a value that cannot be encoded fails there).
_ENCODER = msgspec.msgpack.Encoder()
Item = bytes | msgspec.Raw


class Batch:
    """Messages waiting to go out together; the caller keeps their seqs consecutive.
    ``payload`` arguments are msgpack, already encoded; ``size`` counts encoded bytes."""

    __slots__ = ("prefix", "first_seq", "first_time", "entries", "count", "size")

    def __init__(self, prefix: bytes, seq: int, when: float,
                 payload: bytes | msgspec.Raw) -> None:
        self.prefix = prefix
        self.first_seq = seq
        self.first_time = when
        raw = payload if type(payload) is msgspec.Raw else msgspec.Raw(payload)
        self.entries: list[tuple[float, Item]] = [(when, raw)]
        self.count = 1
        self.size = len(payload)

    def add(self, when: float, payload: bytes) -> bool:
        """Add one message; True when the batch is full and should go now."""
        self.entries.append((when, msgspec.Raw(payload)))
        self.count += 1
        self.size += len(payload)
        return self.count >= MAX_MESSAGES or self.size >= MAX_BYTES

    def __len__(self) -> int:
        return self.count

    def frame(self, sender: bytes, encoder: msgspec.msgpack.Encoder | None = None) -> bytes:
        entries = (encoder or _ENCODER).encode(self.entries)
        payload = _wire.Payload(_wire.KIND_BATCH, entries)
        frame, _ = _wire.build_frames(
            self.prefix, 0, sender, self.first_seq, self.first_time, payload
        )
        return frame


RAW_ENTRIES = msgspec.msgpack.Decoder(list[tuple[float, msgspec.Raw]])


def entries_decoder(type: Any) -> msgspec.msgpack.Decoder[Any]:
    """Decodes a batch's payload into ``[(time, data), ...]``, ``data`` validated as ``type``."""
    item = Any if type is None else type
    return msgspec.msgpack.Decoder(list[tuple[float, item]])  # type: ignore[valid-type]


def count(payload: memoryview) -> int:
    """How many messages a batch payload holds, from its msgpack array header alone."""
    if not payload:
        return 0
    head = payload[0]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(payload) >= 3:
        return int.from_bytes(payload[1:3], "big")
    if head == 0xDD and len(payload) >= 5:
        return int.from_bytes(payload[1:5], "big")
    return 0
