"""Chunks, sans-io: a large message that may cross a network travels as a run of pieces.

ZeroMQ bounds its queues in messages; vbus bounds them in bytes by sending nothing larger than
``_limits.CHUNK_SIZE`` (plus a small header) over tcp or ipc (see _proto/limits.py). A message whose
external payload is larger is sent as ``count`` ZeroMQ messages of kind KIND_CHUNK, each::

    frame 1:  topic | 0x00 | header (kind KIND_CHUNK, FLAG_EXTERNAL, the message's sender,
              seq, time and flags) | msgpack [index, count, kind, inline, sizes]
    frame 2:  the piece: bytes of the external buffers, in order, at most CHUNK_SIZE each

``kind``/``inline`` are the message's own payload kind and inline bytes, ``sizes`` the length
of each external buffer; piece ``index`` 0 carries them, later pieces carry ``[index, count]``
only. A piece never spans two buffers. The publisher sends the pieces of one message back to
back, so a receiver sees them consecutively; one lost piece loses the message (the sequence
gap counts it), and the receiver gives up an assembly as soon as anything else comes from the
same sender.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import msgspec

from .._errors import DecodeError
from . import wire as _wire
from .limits import CHUNK_SIZE

_ENCODER = msgspec.msgpack.Encoder()
_FIRST = msgspec.msgpack.Decoder(tuple[int, int, int, bytes, list[int]])
_LATER = msgspec.msgpack.Decoder(tuple[int, int])


def pieces(externals: Sequence[memoryview], size: int = CHUNK_SIZE) -> list[memoryview]:
    """The external buffers cut into pieces of at most ``size`` bytes (views, no copies)."""
    out: list[memoryview] = []
    for buf in externals:
        flat = buf.cast("B") if buf.ndim != 1 or buf.format != "B" else buf
        n = flat.nbytes
        if n == 0:
            out.append(flat)  # every buffer gets a piece, so the receiver can count them
            continue
        out.extend(flat[i : i + size] for i in range(0, n, size))
    return out


def count(externals: Sequence[memoryview], size: int = CHUNK_SIZE) -> int:
    """How many pieces ``pieces(externals, size)`` makes, without making them: a message the
    chunk window refuses must cost nothing (building 256 chunk headers for each refused
    16 MiB frame took a third of a publisher's CPU in a flood, beside the broker's)."""
    return sum(-(-buf.nbytes // size) or 1 for buf in externals)


def chunk_frames(
    prefix: bytes, flags: int, sender: bytes, seq: int, time: float,
    payload: _wire.Payload, externals: Sequence[memoryview], size: int = CHUNK_SIZE,
) -> Iterator[tuple[bytes, memoryview]]:
    """Frame 1 and the piece of every chunk of a message, in order."""
    parts = pieces(externals, size)
    count = len(parts)
    sizes = [b.nbytes for b in externals]
    header = _wire.HEADER.pack(
        _wire.VERSION, flags | _wire.FLAG_EXTERNAL, _wire.KIND_CHUNK, sender, seq, time
    )
    for index, part in enumerate(parts):
        meta = (index, count, payload.kind, payload.inline, sizes) if index == 0 else (
            index, count)
        yield prefix + header + _ENCODER.encode(meta), part


UNINITIALIZED_FROM = 1 << 20
"""Buffers this large are not zero-filled first (numpy.empty, when numpy is there): every byte
is written by a piece before the message is whole, and a 16 MiB ``bytearray`` (zero-filled,
fresh pages) took a third of a subscriber's time at 16 MiB frames (py-spy)."""


def _buffer(n: int) -> Any:
    if n >= UNINITIALIZED_FROM:
        try:
            import numpy
        except ImportError:
            pass
        else:
            return numpy.empty(n, numpy.uint8).data
    return bytearray(n)


class Assembly:
    """A message being put together from its chunks."""

    __slots__ = ("topic", "seq", "time", "flags", "kind", "inline", "buffers", "count",
                 "next_index", "_buffer", "_offset")

    def __init__(self, env: _wire.Envelope, kind: int, inline: bytes, sizes: list[int],
                 count: int) -> None:
        self.topic = env.topic
        self.seq = env.seq
        self.time = env.time
        self.flags = env.flags & ~_wire.FLAG_EXTERNAL
        self.kind = kind
        self.inline = inline
        self.buffers = [_buffer(n) for n in sizes]
        self.count = count
        self.next_index = 0
        self._buffer = 0
        self._offset = 0

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.buffers)

    def add(self, piece: memoryview) -> bool:
        """Copy the next piece in; True once the message is whole. DecodeError if the piece
        does not fit where it must go (a hostile or broken sender)."""
        if self._buffer >= len(self.buffers):
            raise DecodeError("more chunk data than the first chunk announced")
        target = self.buffers[self._buffer]
        n = piece.nbytes
        if self._offset + n > len(target):
            raise DecodeError("a chunk runs past the end of its buffer")
        target[self._offset : self._offset + n] = piece
        self._offset += n
        if self._offset == len(target):
            self._buffer, self._offset = self._buffer + 1, 0
        self.next_index += 1
        if self.next_index < self.count:
            return False
        if self._buffer != len(self.buffers):
            raise DecodeError("the last chunk came before the buffers were full")
        return True

    def externals(self) -> Any:
        """The external payload as decode_payload takes it: one buffer, or a list."""
        views = [memoryview(b).toreadonly() for b in self.buffers]
        return views[0] if len(views) == 1 else views


def parse_meta(meta: memoryview) -> tuple[int, int, tuple[int, bytes, list[int]] | None]:
    """(index, count, first) of any chunk, decoded once; ``first`` is (kind, inline, sizes)
    for the chunk that starts a message (index 0), else None."""
    try:
        if bytes(meta[:1]) == b"\x95":
            index, count, kind, inline, sizes = _FIRST.decode(meta)
            if index != 0:
                raise DecodeError(f"chunk {index} carries a first chunk's metadata")
            return index, count, (kind, inline, sizes)
        index, count = _LATER.decode(meta)
        if index == 0:
            raise DecodeError("a first chunk without its metadata")
        return index, count, None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"malformed chunk: {exc}") from None
