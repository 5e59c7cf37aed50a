"""The vbus wire format, sans-io: frame layout and payload encoding. See docs/protocol.md.

A message is one ZeroMQ message of one or more frames::

    frame 1:  topic (ASCII) | 0x00 | header (28 bytes) | inline payload
    frame 2:  external payload (only when FLAG_EXTERNAL is set)
    frame 3…: more external payload (only for KIND_TREE: one frame per nested array)

The topic comes first so ZeroMQ's prefix filtering works on it; the terminator makes the
filter exact. Small payloads ride inline in the single frame (one frame is about 4x faster
than two for 64-byte messages). Bytes payloads of EXTERNAL_THRESHOLD bytes or more, and the
data of every numpy array (its dtype and shape stay inline), travel as a frame of their own,
sent and received without copies. Arrays nested in a value (dict values, list items, struct
fields) make it a KIND_TREE payload: the value as msgpack with an extension placeholder
(EXT_ARRAY) per array, and one external frame per array, in placeholder order.
"""

from __future__ import annotations

import struct
import sys
import threading
from typing import Any

import msgspec

from .._errors import DecodeError, EncodeError

VERSION = 1
HEADER = struct.Struct("<BBBx8sQd")  # version, flags, kind, pad, sender, seq, time
HEADER_SIZE = HEADER.size
SENDER_SIZE = 8

FLAG_RETAINED = 0x01  # a retained value (live copies never carry it; replays do)
FLAG_EXTERNAL = 0x02  # the payload is in the next frame
FLAG_CLEAR = 0x04  # on $vbus/retain/<topic>: clear the topic's retained value
FLAG_REPLAY = 0x08  # on $vbus/ready/<token>: the next frames are a retained message
KNOWN_FLAGS = FLAG_RETAINED | FLAG_EXTERNAL | FLAG_CLEAR | FLAG_REPLAY

KIND_MSGPACK = 0
KIND_BYTES = 1
KIND_NDARRAY = 2
KIND_BATCH = 3  # several messages of one publisher and topic; see _proto/batch.py
KIND_TREE = 4  # msgpack with EXT_ARRAY placeholders, one external frame per nested array
KIND_CHUNK = 5  # one piece of a large message that crosses a network; see _proto/chunk.py
KIND_SHM = 6  # shm: a frame in a publisher's shared pool, by descriptor; see _proto/shm.py
KINDS = (KIND_MSGPACK, KIND_BYTES, KIND_NDARRAY, KIND_BATCH, KIND_TREE, KIND_CHUNK, KIND_SHM)

EXT_ARRAY = 1
"""msgpack extension type of a nested array's placeholder: ``[index, descr, shape]``."""
MAX_TREE_ARRAYS = 4096
"""A tree payload may hold at most this many arrays (each one is a frame)."""

EXTERNAL_THRESHOLD = 64 * 1024
"""Bytes payloads this large or larger travel in a frame of their own, without copies."""

_BYTES_TYPES = (bytes, bytearray, memoryview)


class NestedArray(TypeError):
    """An encoder saw a numpy array inside a value outside ``encode_payload``: such a value
    needs a frame per array, so it cannot be batched. A publisher's fast path catches it and
    sends the value on its own, through ``encode_payload``."""


class _Collector(threading.local):
    # The external buffers of the tree payload being encoded on this thread, or None when
    # no encode_payload is under way (arrays then raise NestedArray).
    buffers: list[Any] | None = None


_collector = _Collector()
_PLAIN_ENCODER = msgspec.msgpack.Encoder()


def _enc_hook(obj: Any) -> Any:
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray):
        buffers = _collector.buffers
        if buffers is None:
            raise NestedArray("a numpy array inside a value is sent as a frame of its own")
        if len(buffers) >= MAX_TREE_ARRAYS:
            raise ValueError(f"more than {MAX_TREE_ARRAYS} numpy arrays in one payload")
        descr, shape, data = _array_parts(obj, numpy)
        placeholder = _PLAIN_ENCODER.encode((len(buffers), descr, shape))
        buffers.append(data)
        return msgspec.msgpack.Ext(EXT_ARRAY, placeholder)
    # numpy scalars are common in instrument code; send them as plain numbers.
    item = getattr(obj, "item", None)
    if item is not None and getattr(obj, "ndim", None) == 0:
        return item()
    raise TypeError(f"cannot encode objects of type {type(obj).__name__}")


def new_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook)


class Payload(msgspec.Struct, frozen=True, gc=False):
    """An encoded payload: its kind, the inline bytes and the external part.

    ``external`` is None (no frame after frame 1), one buffer (one frame: KIND_BYTES,
    KIND_NDARRAY, or a KIND_TREE holding one array), or a tuple of two or more buffers
    (KIND_TREE only: one frame each, in that order). Buffers are bytes-like objects that
    share the caller's memory: send them with ``copy=False``.
    """

    kind: int
    inline: bytes
    external: Any = None


def encode_payload(data: Any, encoder: msgspec.msgpack.Encoder) -> Payload:
    """Encode ``data``; raise EncodeError (nothing sent) if it cannot be."""
    if isinstance(data, _BYTES_TYPES):
        view = memoryview(data)
        if not view.contiguous:
            raise EncodeError("memoryview payload is not contiguous")
        if view.nbytes >= EXTERNAL_THRESHOLD:
            return Payload(KIND_BYTES, b"", view)
        return Payload(KIND_BYTES, bytes(view))
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(data, numpy.ndarray):
        return _encode_ndarray(data, encoder, numpy)
    buffers: list[Any] = []
    outer, _collector.buffers = _collector.buffers, buffers
    try:
        inline = encoder.encode(data)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise EncodeError(f"cannot encode payload of type {type(data).__name__}: {exc!r}") from None
    finally:
        _collector.buffers = outer
    if not buffers:
        return Payload(KIND_MSGPACK, inline)
    return Payload(KIND_TREE, inline, buffers[0] if len(buffers) == 1 else tuple(buffers))


def _array_parts(array: Any, numpy: Any) -> tuple[Any, tuple[int, ...], Any]:
    """An array's ``.npy`` description, shape, and its data as a flat byte view (no copy
    unless it is not C-contiguous)."""
    if array.dtype.hasobject:
        raise EncodeError(f"numpy arrays of dtype {array.dtype} (Python objects) cannot be sent")
    if not array.flags.c_contiguous:
        array = numpy.ascontiguousarray(array)
    # The .npy format's description keeps padding, offsets, nesting and titles.
    descr = numpy.lib.format.dtype_to_descr(array.dtype)
    # reshape(-1) of a C-contiguous array is a view: the frame shares the array's memory.
    return descr, array.shape, array.reshape(-1).view(numpy.uint8).data


def _encode_ndarray(array: Any, encoder: msgspec.msgpack.Encoder, numpy: Any) -> Payload:
    descr, shape, data = _array_parts(array, numpy)
    return Payload(KIND_NDARRAY, encoder.encode((descr, shape)), data)


def build_frames(
    prefix: bytes, flags: int, sender: bytes, seq: int, time: float, payload: Payload
) -> tuple[bytes, Any]:
    """Frame 1 and the external buffer (or None) for a message."""
    external = payload.external
    if external is not None:
        flags |= FLAG_EXTERNAL
    header = HEADER.pack(VERSION, flags, payload.kind, sender, seq, time)
    return prefix + header + payload.inline, external


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """Frame 1 of a message, parsed: everything but the decoded payload."""

    topic: str
    flags: int
    kind: int
    sender: bytes
    seq: int
    time: float
    offset: int  # where the inline payload starts in frame 1


def parse_envelope(frame: bytes) -> Envelope:
    """Parse frame 1; raise DecodeError for anything that is not a vbus v1 message."""
    end = frame.find(b"\0")
    if end <= 0:
        raise DecodeError("no topic terminator in the first frame")
    offset = end + 1 + HEADER_SIZE
    if len(frame) < offset:
        raise DecodeError(f"header truncated: frame has {len(frame)} bytes, needs {offset}")
    version, flags, kind, sender, seq, time = HEADER.unpack_from(frame, end + 1)
    if version != VERSION:
        raise DecodeError(f"unsupported wire version {version} (this side speaks {VERSION})")
    if kind not in KINDS:
        raise DecodeError(f"unknown payload kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise DecodeError(f"unknown flags 0x{flags:02x}")
    try:
        topic = frame[:end].decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("topic is not ASCII") from None
    return Envelope(topic, flags, kind, sender, seq, time, offset)


def decode_payload(
    kind: int,
    inline: memoryview,
    external: memoryview | list[memoryview] | None,
    decoder: msgspec.msgpack.Decoder[Any],
) -> Any:
    """Decode a payload. ``decoder`` decodes (and validates) msgpack payloads.

    ``external`` is what followed frame 1: None, one frame, or a list of frames (a list of
    one is the same as one frame). Only KIND_TREE payloads may have more than one.
    """
    if external is None:
        frames: list[memoryview] = []
    elif isinstance(external, list):
        frames = [frame.toreadonly() for frame in external]
    else:
        frames = [external.toreadonly()]  # frames may share memory with the publisher's data
    try:
        if kind == KIND_TREE:
            return _decode_tree(inline, frames, decoder)
        if len(frames) > 1:
            raise DecodeError(f"{len(frames)} external frames for a payload of kind {kind}")
        single = frames[0] if frames else None
        if kind == KIND_MSGPACK:
            return decoder.decode(inline)
        if kind == KIND_BYTES:
            return single if single is not None else inline.toreadonly()
        if kind == KIND_BATCH:
            raise DecodeError("a batch holds several messages: decode it with _batch")
        if kind == KIND_CHUNK:
            raise DecodeError("a chunk is a piece of a message: reassemble it with _chunk")
        if kind == KIND_SHM:  # shm
            raise DecodeError("a shared-memory frame, and no way here to map it")
        return _decode_ndarray(inline, single)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"payload does not match the requested type: {exc}") from None
    except DecodeError:
        raise
    except Exception as exc:  # hostile input must not escape as anything but DecodeError
        raise DecodeError(f"malformed payload: {exc!r}") from None


_META_DECODER = msgspec.msgpack.Decoder(tuple[Any, tuple[int, ...]])
_PLACEHOLDER_DECODER = msgspec.msgpack.Decoder(tuple[int, Any, tuple[int, ...]])


class _Frames(threading.local):
    # The external frames of the tree payload being decoded on this thread, and which of
    # them a placeholder has taken.
    frames: list[memoryview] | None = None
    taken: set[int] | None = None


_frames = _Frames()


def _ext_hook(code: int, data: memoryview) -> Any:
    frames, taken = _frames.frames, _frames.taken
    if code != EXT_ARRAY or frames is None or taken is None:
        raise DecodeError(f"unknown msgpack extension type {code}")
    try:
        index, descr, shape = _PLACEHOLDER_DECODER.decode(data)
    except msgspec.MsgspecError as exc:
        raise DecodeError(f"bad array placeholder: {exc}") from None
    if not 0 <= index < len(frames):
        raise DecodeError(f"array placeholder {index} but {len(frames)} external frame(s)")
    if index in taken:
        raise DecodeError(f"array placeholder {index} appears twice")
    taken.add(index)
    return _array(descr, shape, frames[index])


_TREE_DECODER = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def _decode_tree(
    inline: memoryview, frames: list[memoryview], decoder: msgspec.msgpack.Decoder[Any]
) -> Any:
    if not frames:
        raise DecodeError("tree payload without its array frames")
    outer = _frames.frames, _frames.taken
    taken: set[int] = set()
    _frames.frames, _frames.taken = frames, taken
    try:
        value = _TREE_DECODER.decode(inline)
    finally:
        _frames.frames, _frames.taken = outer
    if len(taken) != len(frames):
        raise DecodeError(f"{len(frames)} array frames but {len(taken)} placeholder(s)")
    wanted = decoder.type
    if wanted is Any:
        return value
    # A typed subscriber: validate the decoded tree into its type. Array-typed fields
    # (``numpy.ndarray``) take the arrays as they are.
    return msgspec.convert(value, wanted)


def _decode_ndarray(meta: memoryview, data: memoryview | None) -> Any:
    if data is None:
        raise DecodeError("array message without its data frame")
    descr, shape = _META_DECODER.decode(meta)
    return _array(descr, shape, data)


def _array(descr: Any, shape: tuple[int, ...], data: memoryview) -> Any:
    """The array that ``data`` holds, without a copy (read-only if ``data`` is)."""
    try:
        import numpy
    except ImportError:
        raise DecodeError("received a numpy array but numpy is not installed") from None
    try:
        dtype = numpy.lib.format.descr_to_dtype(_tuples(descr))
        if dtype.itemsize == 0:  # numpy cannot count zero-size items in a buffer
            if data.nbytes:
                raise ValueError(f"{data.nbytes} bytes of data for items of size 0")
            return numpy.empty(shape, dtype=dtype)
        return numpy.frombuffer(data, dtype=dtype).reshape(shape)
    except Exception as exc:  # numpy raises SyntaxError, among others, for hostile dtypes
        raise DecodeError(f"bad array metadata {descr!r} {shape!r}: {exc!r}") from None


def _tuples(descr: Any) -> Any:
    # msgpack turns the description's tuples into lists; descr_to_dtype wants them back.
    if not isinstance(descr, list):
        return descr  # a type string, or the dict form of aligned and offset dtypes
    fields = []
    for name, fmt, *shape in descr:
        fields.append((
            tuple(name) if isinstance(name, list) else name,
            _tuples(fmt),
            *(tuple(s) if isinstance(s, list) else s for s in shape),
        ))
    return fields
