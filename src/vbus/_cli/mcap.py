"""vbus recordings in MCAP (https://mcap.dev): the file format of ``vbus record``/``replay``.

One MCAP message per bus message, message encoding ``json``, each channel with a
``jsonschema`` schema, so that Foxglove and the MCAP tools read a recording without vbus.
A topic gets one channel per kind of payload it carried:

``vbus.Value`` (any msgpack value)::

    {"value": <the value as JSON>, "vbus": ENVELOPE}
    # when JSON cannot carry the value exactly (bytes inside it, NaN, map keys that are not
    # strings, msgpack extensions, datetimes), "value" is a summary (docs/cli.md) and
    # "msgpack" holds the exact msgpack bytes (base64), which replay sends

``vbus.Bytes`` (a bytes payload)::

    {"data": <base64>, "vbus": ENVELOPE}

``foxglove.RawImage`` (2-D and 3-D numeric arrays of 1 to 4 channels in little-endian or
one-byte types): Foxglove's fields (timestamp = the publisher's clock, frame_id = the topic,
width, height, encoding, step, data in base64) and in ``vbus`` the ENVELOPE with ``dtype``
(numpy's ``.npy`` description) and ``shape``: the array comes back exactly. Encodings are
Foxglove's where it has one (``mono8``, ``rgb8``, ``rgba8``, ``mono16``, ``32FC1``), otherwise
OpenCV's names (``16SC1``, ``64FC1``, ``8UC2``: Foxglove decodes the message but may not
display it).

``vbus.Array`` (every other numpy array)::

    {"dtype": <.npy description>, "shape": [...], "data": <base64, C order>, "vbus": ENVELOPE}

``ENVELOPE`` is ``{"sender": <16 hex digits>, "seq": n, "time": <publisher's clock, s>,
"retained": bool}``: with the payload, what replay needs to rebuild the message as published.
MCAP ``log_time`` is when the recorder received the message (ns since the epoch, strictly
increasing in a recording: file order is log-time order), ``publish_time`` the publisher's
clock, ``sequence`` the vbus seq modulo 2**32.

Losses: every gap the recorder found in a publisher's sequence numbers is a message on the
channel ``$vbus/loss`` (schema ``vbus.Loss``: topic, sender, lost = messages missing just
before the next recorded one, after_seq = the last seq recorded before the gap), logged
just before the message after the gap; and once the recording ends, a metadata record
``vbus.summary`` holds ``received``, ``lost`` and ``topics`` (JSON:
``{topic: {"received": n, "lost": m}}``). The metadata record ``vbus`` says where and what
was recorded, ``vbus.recording_format`` = ``2``. Chunks are LZ4-compressed (uncompressed when
lz4 is not installed) and carry CRCs, which replay and info check.
"""

from __future__ import annotations

import array
import base64
import datetime
import io
import json
import logging
import math
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec

from .._errors import DecodeError, EncodeError, RecordingError, UserError
from .._message import Message
from .._proto import wire as _wire
from .._proto.topics import topic_prefix

RECORDING_FORMAT = "2"
FORMAT_KEY = "vbus.recording_format"
WIRE_KEY = "vbus.wire_version"
MESSAGE_ENCODING = "json"
SCHEMA_ENCODING = "jsonschema"
METADATA_NAME = "vbus"
SUMMARY_NAME = "vbus.summary"
LOSS_TOPIC = "$vbus/loss"
VALUE, BYTES, IMAGE, ARRAY, LOSS = (
    "vbus.Value", "vbus.Bytes", "foxglove.RawImage", "vbus.Array", "vbus.Loss")
_U64 = 2**64 - 1
_MAGIC = b"\x89MCAP0\r\n"
log = logging.getLogger("vbus.mcap")



def need_mcap(command: str) -> None:
    """UserError naming the package if the mcap library is missing (vbus depends on it; a
    broken environment can still lack it)."""
    try:
        import mcap  # noqa: F401
    except ImportError:
        raise UserError(f"vbus {command} needs the mcap package: pip install mcap "
                        "(or install vbus with its cli extra)") from None


# -- schemas ----------------------------------------------------------------------------------
_ENVELOPE_PROPERTIES: dict[str, Any] = {
    "sender": {"type": "string", "description": "the publisher's id (16 hex digits)"},
    "seq": {"type": "integer", "description": "the publisher's sequence number on this topic"},
    "time": {"type": ["number", "null"], "description": "publisher's clock, s since the epoch"},
    "retained": {"type": "boolean", "description": "a retained value the broker replayed"},
}
_ENVELOPE = {"type": "object", "properties": _ENVELOPE_PROPERTIES,
             "required": ["sender", "seq", "time", "retained"]}
_BASE64 = {"type": "string", "contentEncoding": "base64"}
_DTYPE = {"description": "numpy .npy dtype description: a type string such as '<u2', or a "
                         "list of [name, type(, shape)] for structured types"}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_ARRAY_ENVELOPE = {"type": "object",
                   "properties": {**_ENVELOPE_PROPERTIES, "dtype": _DTYPE, "shape": _SHAPE},
                   "required": ["sender", "seq", "time", "retained", "dtype", "shape"]}


def _schema(title: str, description: str, properties: dict[str, Any],
            required: list[str]) -> bytes:
    return json.dumps({"title": title, "description": description, "type": "object",
                       "properties": properties, "required": required}).encode()


SCHEMAS: dict[str, bytes] = {
    VALUE: _schema(VALUE, "a vbus message carrying a value", {
        "value": {"description": "the value; a summary when 'msgpack' is present"},
        "msgpack": {**_BASE64, "description": "the exact msgpack bytes, when JSON cannot "
                                              "carry the value"},
        "vbus": _ENVELOPE}, ["value", "vbus"]),
    BYTES: _schema(BYTES, "a vbus message carrying bytes",
                   {"data": _BASE64, "vbus": _ENVELOPE}, ["data", "vbus"]),
    IMAGE: _schema(IMAGE, "A raw image (a vbus message carrying a 2-D or 3-D numpy array)", {
        "timestamp": {"type": "object", "title": "time", "properties": {
            "sec": {"type": "integer", "minimum": 0},
            "nsec": {"type": "integer", "minimum": 0, "maximum": 999999999}}},
        "frame_id": {"type": "string"},
        "width": {"type": "integer", "minimum": 0},
        "height": {"type": "integer", "minimum": 0},
        "encoding": {"type": "string"},
        "step": {"type": "integer", "minimum": 0},
        "data": _BASE64,
        "vbus": _ARRAY_ENVELOPE,
    }, ["timestamp", "frame_id", "width", "height", "encoding", "step", "data", "vbus"]),
    ARRAY: _schema(ARRAY, "a vbus message carrying a numpy array (data in C order)", {
        "dtype": _DTYPE, "shape": _SHAPE, "data": _BASE64, "vbus": _ENVELOPE,
    }, ["dtype", "shape", "data", "vbus"]),
    LOSS: _schema(LOSS, "messages the recorder never received (a gap in the sequence numbers)", {
        "topic": {"type": "string"}, "sender": {"type": "string"},
        "lost": {"type": "integer", "minimum": 1},
        "after_seq": {"type": ["integer", "null"],
                      "description": "the last seq recorded before the gap"},
    }, ["topic", "sender", "lost"]),
}


# -- message bodies ---------------------------------------------------------------------------
class Envelope(msgspec.Struct, frozen=True):
    sender: str
    seq: int
    time: float | None
    retained: bool


class ArrayEnvelope(msgspec.Struct, frozen=True):
    sender: str
    seq: int
    time: float | None
    retained: bool
    dtype: Any
    shape: list[int]


class ValueBody(msgspec.Struct, frozen=True, omit_defaults=True):
    value: Any
    vbus: Envelope
    msgpack: bytes | None = None


class BytesBody(msgspec.Struct, frozen=True):
    data: bytes
    vbus: Envelope


class Time(msgspec.Struct, frozen=True):
    sec: int
    nsec: int


class ImageBody(msgspec.Struct, frozen=True):
    timestamp: Time
    frame_id: str
    width: int
    height: int
    encoding: str
    step: int
    data: bytes
    vbus: ArrayEnvelope


class ArrayBody(msgspec.Struct, frozen=True):
    dtype: Any
    shape: list[int]
    data: bytes
    vbus: Envelope


class LossBody(msgspec.Struct, frozen=True):
    topic: str
    sender: str
    lost: int
    after_seq: int | None = None


_JSON = msgspec.json.Encoder()
_JSON_ANY = msgspec.json.Decoder()
_MSGPACK = _wire.new_encoder()
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    VALUE: msgspec.json.Decoder(ValueBody), BYTES: msgspec.json.Decoder(BytesBody),
    IMAGE: msgspec.json.Decoder(ImageBody), ARRAY: msgspec.json.Decoder(ArrayBody),
    LOSS: msgspec.json.Decoder(LossBody),
}
# Foxglove's own encodings first; OpenCV's names for the rest (kind, itemsize) -> prefix
_FOXGLOVE = {("u", 1, 1): "mono8", ("u", 1, 3): "rgb8", ("u", 1, 4): "rgba8",
             ("u", 2, 1): "mono16", ("f", 4, 1): "32FC1"}
_CV = {"u": "U", "i": "S", "f": "F"}
_CV_DEPTHS = {("u", 1), ("i", 1), ("u", 2), ("i", 2), ("i", 4), ("f", 4), ("f", 8)}


def image_encoding(dtype: Any, shape: tuple[int, ...]) -> str | None:
    """The RawImage encoding of an array, or None if it is not an image (docstring above)."""
    if len(shape) not in (2, 3) or dtype.kind not in _CV or dtype.fields is not None:
        return None
    if dtype.itemsize > 1 and dtype.byteorder not in ("<", "=" if sys.byteorder == "little"
                                                      else "<"):
        return None
    if (dtype.kind, dtype.itemsize) not in _CV_DEPTHS:
        return None  # OpenCV has no such depth (u4, i8, u8, f2)
    channels = shape[2] if len(shape) == 3 else 1
    if not 1 <= channels <= 4:
        return None
    return _FOXGLOVE.get((dtype.kind, dtype.itemsize, channels)) or (
        f"{8 * dtype.itemsize}{_CV[dtype.kind]}C{channels}")


def summarize(value: Any) -> Any:
    """A JSON-safe summary of a value JSON cannot carry (the --json format of vbus sub)."""
    from .render import jsonable

    return jsonable(value)


_EXACT = frozenset({str, int, bool, type(None)})


def _exact_json(data: Any, exact: bytes) -> bytes | None:
    """``data`` as JSON if JSON brings back the same msgpack bytes, else None."""
    try:
        text = _JSON.encode(data)
        if _MSGPACK.encode(_JSON_ANY.decode(text)) == exact:
            return text
    except (TypeError, ValueError, OverflowError, msgspec.DecodeError):
        pass
    return None


def _ns(seconds: float | None) -> int:
    if seconds is None or not math.isfinite(seconds):
        return 0
    return min(max(int(seconds * 1e9), 0), _U64)


def _json_time(seconds: float) -> float | None:
    return seconds if math.isfinite(seconds) else None


def encode_message(msg: Message) -> tuple[str, bytes, int]:
    """(schema name, MCAP message body, payload bytes) of a received message. Raises
    EncodeError for a value no recording can keep (an array inside a value, today)."""
    data = msg.data
    env = Envelope(msg.sender, msg.seq, _json_time(msg.time), msg.retained)
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        return BYTES, _JSON.encode(BytesBody(view, env)), view.nbytes  # type: ignore[arg-type]
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(data, numpy.ndarray):
        return _encode_array(msg, data, numpy)
    kind = type(data)
    if kind in _EXACT or (kind is float and math.isfinite(data)):
        # JSON carries these exactly (finite floats: shortest round-trip repr): no check
        text = _JSON.encode(data)
        return VALUE, _JSON.encode(ValueBody(msgspec.Raw(text), env)), len(text)
    try:
        exact = _MSGPACK.encode(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(
            f"{msg.topic!r} seq {msg.seq}: cannot record a {type(data).__name__}: {exc}"
        ) from None
    as_json = _exact_json(data, exact)
    if as_json is not None:
        body = ValueBody(msgspec.Raw(as_json), env)
    else:
        body = ValueBody(summarize(data), env, exact)
    return VALUE, _JSON.encode(body), len(exact)


def _encode_array(msg: Message, array: Any, numpy: Any) -> tuple[str, bytes, int]:
    dtype = array.dtype
    descr = numpy.lib.format.dtype_to_descr(dtype)
    array = numpy.ascontiguousarray(array)
    raw = memoryview(array.reshape(-1).view(numpy.uint8)) if dtype.itemsize else memoryview(b"")
    shape = list(array.shape)
    encoding = image_encoding(dtype, array.shape)
    if encoding is None:
        env = Envelope(msg.sender, msg.seq, _json_time(msg.time), msg.retained)
        return ARRAY, _JSON.encode(ArrayBody(descr, shape, raw, env)), raw.nbytes  # type: ignore[arg-type]
    height, width = shape[0], shape[1]
    channels = shape[2] if len(shape) == 3 else 1
    ns = _ns(msg.time)
    body = ImageBody(
        Time(ns // 10**9, ns % 10**9), msg.topic, width, height, encoding,
        width * channels * dtype.itemsize, raw,  # type: ignore[arg-type]
        ArrayEnvelope(msg.sender, msg.seq, _json_time(msg.time), msg.retained, descr, shape),
    )
    return IMAGE, _JSON.encode(body), raw.nbytes


def decode_body(schema: str, body: bytes) -> Any:
    """The body of a recorded message as its Struct; DecodeError if it does not fit."""
    decoder = _DECODERS.get(schema)
    if decoder is None:
        raise DecodeError(f"unknown schema {schema!r}")
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"not a {schema} message: {exc}") from None


def frames_of(topic: str, schema: str, body: Any) -> tuple[bytes, bytes | None]:
    """The vbus frames of a recorded message, as its publisher sent them (frame 1 and the
    external frame or None). No numpy needed."""
    if isinstance(body, ValueBody):
        inline = body.msgpack if body.msgpack is not None else _MSGPACK.encode(body.value)
        payload = _wire.Payload(_wire.KIND_MSGPACK, inline)
    elif isinstance(body, BytesBody):
        payload = _wire.encode_payload(body.data, _MSGPACK)
    elif isinstance(body, (ImageBody, ArrayBody)):
        dtype, shape = ((body.vbus.dtype, body.vbus.shape) if isinstance(body, ImageBody)
                        else (body.dtype, body.shape))
        payload = _wire.Payload(_wire.KIND_NDARRAY, _MSGPACK.encode((dtype, shape)), body.data)
    else:
        raise DecodeError(f"a {schema} message is not a bus message")
    env = body.vbus
    try:
        sender = bytes.fromhex(env.sender)
        if len(sender) != _wire.SENDER_SIZE:
            raise ValueError(f"{len(sender)} bytes")
    except ValueError as exc:
        raise DecodeError(f"bad sender {env.sender!r}: {exc}") from None
    flags = _wire.FLAG_RETAINED if env.retained else 0
    when = env.time if env.time is not None else float("nan")
    first, external = _wire.build_frames(topic_prefix(topic), flags, sender, env.seq, when,
                                         payload)
    return first, None if external is None else bytes(external)


# -- writing ----------------------------------------------------------------------------------
_MESSAGE_HEAD = struct.Struct("<BQHIQQ")  # opcode, length, channel, sequence, log, publish time
_INDEX_HEAD = struct.Struct("<BQHI")  # opcode, length, channel, byte length of the entries
_CHUNK_SIZE = 1 << 20


class McapWriter:
    """An MCAP writer whose per-message path is a struct.pack and a list append (the mcap
    package's Writer makes several objects per message: 13 us, most of a recorder's time).
    The rare records (header, schemas, channels, chunks, indexes, summary) are the mcap
    package's own record classes. Chunked, with message indexes, chunk CRCs, statistics,
    summary offsets and a summary CRC, as the mcap package writes them."""

    def __init__(self, stream: IO[bytes], *, library: str, compress: bool) -> None:
        from mcap.data_stream import RecordBuilder
        from mcap.records import Header

        self._stream = stream
        self._compress: Any = None
        if compress:
            try:
                import lz4.frame  # type: ignore[import-untyped]

                self._compress = lz4.frame.compress
            except ImportError:
                pass
        self._builder = RecordBuilder()
        stream.write(_MAGIC)
        Header("", library).write(self._builder)
        self._flush()
        self._parts: list[bytes] = []
        self._size = 0
        self._index: dict[int, array.array[int]] = {}
        self._first = self._last = 0
        self._in_chunk = 0
        self._schemas: list[Any] = []
        self._channels: list[Any] = []
        self._counts: dict[int, int] = {}
        self._chunk_indexes: list[Any] = []
        self._metadata_indexes: list[Any] = []
        self.message_count = 0
        self._start = self._end = 0

    def _flush(self) -> None:
        self._stream.write(self._builder.end())  # type: ignore[no-untyped-call]

    def _record(self, record: Any) -> None:
        """A schema or channel record, into the current chunk."""
        from mcap.data_stream import RecordBuilder

        builder = RecordBuilder()
        record.write(builder)
        data: bytes = builder.end()  # type: ignore[no-untyped-call]
        self._parts.append(data)
        self._size += len(data)

    def register_schema(self, name: str, encoding: str, data: bytes) -> int:
        from mcap.records import Schema

        schema = Schema(id=len(self._schemas) + 1, name=name, encoding=encoding, data=data)
        self._schemas.append(schema)
        self._record(schema)
        return int(schema.id)

    def register_channel(self, topic: str, message_encoding: str, schema_id: int,
                         metadata: dict[str, str]) -> int:
        from mcap.records import Channel

        channel = Channel(id=len(self._channels) + 1, schema_id=schema_id, topic=topic,
                          message_encoding=message_encoding, metadata=metadata)
        self._channels.append(channel)
        self._record(channel)
        return int(channel.id)

    def add_message(self, channel: int, log_time: int, publish_time: int, sequence: int,
                    data: bytes) -> None:
        # log times only grow (the recorder makes them so): no min/max per message
        offset = self._size
        self._parts.append(_MESSAGE_HEAD.pack(5, 22 + len(data), channel, sequence, log_time,
                                              publish_time))
        self._parts.append(data)
        self._size = offset + 31 + len(data)
        index = self._index.get(channel)
        if index is None:
            index = self._index[channel] = array.array("Q")
        index.append(log_time)
        index.append(offset)
        if not self._in_chunk:
            self._first = log_time
            if not self.message_count:
                self._start = log_time
        self._last = self._end = log_time
        self._in_chunk += 1
        self.message_count += 1
        self._counts[channel] = self._counts.get(channel, 0) + 1
        if self._size >= _CHUNK_SIZE:
            self._finish_chunk()

    def _finish_chunk(self) -> None:
        from mcap.records import Chunk as McapChunk
        from mcap.records import ChunkIndex

        if not self._in_chunk:
            return  # schemas and channels wait for the chunk of their first message
        data = b"".join(self._parts)
        packed = self._compress(data) if self._compress is not None else data
        compression = "lz4" if self._compress is not None else ""
        chunk = McapChunk(compression=compression, data=packed, message_start_time=self._first,
                          message_end_time=self._last, uncompressed_crc=zlib.crc32(data),
                          uncompressed_size=len(data))
        start = self._stream.tell()
        chunk.write(self._builder)
        length = self._builder.count
        self._flush()
        index_start = self._stream.tell()
        offsets: dict[int, int] = {}
        parts = []
        position = 0
        for channel, records in self._index.items():
            offsets[channel] = index_start + position
            if sys.byteorder != "little":
                records.byteswap()
            entries = records.tobytes()  # (log_time, offset) pairs, u64 each
            parts.append(_INDEX_HEAD.pack(7, 6 + len(entries), channel, len(entries)))
            parts.append(entries)
            position += 15 + len(entries)
        self._stream.write(b"".join(parts))
        index_length = position
        self._chunk_indexes.append(ChunkIndex(
            message_start_time=self._first, message_end_time=self._last,
            chunk_start_offset=start, chunk_length=length, message_index_offsets=offsets,
            message_index_length=index_length, compression=compression,
            compressed_size=len(packed), uncompressed_size=len(data)))
        self._parts, self._size, self._index, self._in_chunk = [], 0, {}, 0

    def add_metadata(self, name: str, data: dict[str, str]) -> None:
        from mcap.records import Metadata, MetadataIndex

        offset = self._stream.tell()
        Metadata(name=name, metadata=data).write(self._builder)
        self._metadata_indexes.append(MetadataIndex(offset=offset, length=self._builder.count,
                                                    name=name))
        self._flush()

    def finish(self) -> None:
        from mcap.data_stream import RecordBuilder
        from mcap.opcode import Opcode
        from mcap.records import DataEnd, Footer, Statistics, SummaryOffset

        self._finish_chunk()
        if self._parts:  # schemas or channels of no message: a chunk would need messages
            self._stream.write(b"".join(self._parts))
            self._parts, self._size = [], 0
        DataEnd(0).write(self._builder)
        self._flush()
        summary_start = self._stream.tell()
        summary = RecordBuilder()
        offsets = []
        stats = Statistics(
            message_count=self.message_count, schema_count=len(self._schemas),
            channel_count=len(self._channels), attachment_count=0,
            metadata_count=len(self._metadata_indexes), chunk_count=len(self._chunk_indexes),
            message_start_time=self._start, message_end_time=self._end,
            channel_message_counts=dict(self._counts))
        for opcode, group in ((Opcode.SCHEMA, self._schemas), (Opcode.CHANNEL, self._channels),
                              (Opcode.STATISTICS, [stats]),
                              (Opcode.CHUNK_INDEX, self._chunk_indexes),
                              (Opcode.METADATA_INDEX, self._metadata_indexes)):
            begin = summary.count
            for record in group:
                record.write(summary)
            offsets.append(SummaryOffset(group_opcode=opcode, group_start=summary_start + begin,
                                         group_length=summary.count - begin))
        offset_start = summary_start + summary.count
        for offset in offsets:
            offset.write(summary)
        data = summary.end()  # type: ignore[no-untyped-call]
        crc = zlib.crc32(struct.pack("<BQQQ", Opcode.FOOTER, 20, summary_start, offset_start),
                         zlib.crc32(data))
        self._stream.write(data)
        Footer(summary_start=summary_start, summary_offset_start=offset_start,
               summary_crc=crc).write(self._builder)
        self._flush()
        self._stream.write(_MAGIC)


class RecordingWriter:
    """Writes received messages to an MCAP stream; ``finish()`` writes the summary."""

    def __init__(self, stream: IO[bytes], metadata: dict[str, str]) -> None:
        from .. import __version__

        self._writer = McapWriter(stream, library=f"vbus {__version__}", compress=True)
        self._writer.add_metadata(METADATA_NAME, {
            FORMAT_KEY: RECORDING_FORMAT, WIRE_KEY: str(_wire.VERSION),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(), **metadata,
        })
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str], int] = {}
        self._topics: set[str] = set()
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()
        self._last_log = 0
        self.messages = 0
        self.bytes = 0  # payload bytes recorded

    @property
    def topics(self) -> int:
        return len(self._topics)

    def _channel(self, topic: str, schema: str) -> int:
        key = (topic, schema)
        channel = self._channels.get(key)
        if channel is None:
            schema_id = self._schemas.get(schema)
            if schema_id is None:
                schema_id = self._schemas[schema] = self._writer.register_schema(
                    schema, SCHEMA_ENCODING, SCHEMAS[schema])
            channel = self._channels[key] = self._writer.register_channel(
                topic=topic, message_encoding=MESSAGE_ENCODING, schema_id=schema_id,
                metadata={FORMAT_KEY: RECORDING_FORMAT},
            )
        return channel

    def _log_time(self) -> int:
        now = max(self._wall0 + time.monotonic_ns() - self._mono0, self._last_log + 1)
        self._last_log = now
        return now

    def add(self, msg: Message) -> None:
        schema, body, size = encode_message(msg)
        topic = msg.topic
        channel = self._channels.get((topic, schema))
        if channel is None:
            channel = self._channel(topic, schema)
            self._topics.add(topic)
        now = self._wall0 + time.monotonic_ns() - self._mono0
        if now <= self._last_log:
            now = self._last_log + 1
        self._last_log = now
        when = msg.time
        publish = int(when * 1e9) if 0 <= when < 1.8e10 else _ns(when)
        self._writer.add_message(channel, now, publish, msg.seq & 0xFFFFFFFF, body)
        self.messages += 1
        self.bytes += size

    def add_loss(self, topic: str, sender: str, lost: int, after_seq: int | None) -> None:
        now = self._log_time()
        self._writer.add_message(self._channel(LOSS_TOPIC, LOSS), now, now, 0,
                                 _JSON.encode(LossBody(topic, sender, lost, after_seq)))

    def finish(self, summary: dict[str, str] | None = None) -> None:
        if summary is not None:
            self._writer.add_metadata(SUMMARY_NAME, summary)
        self._writer.finish()


# -- reading ----------------------------------------------------------------------------------
@dataclass
class Chunk:
    """One chunk of a recording: its records, or why they could not be read."""

    number: int  # from 1, in file order
    offset: int | None  # byte offset in the file, when known
    start: int  # log times (ns) of its first and last message
    end: int
    records: list[Any] = field(default_factory=list)
    error: str | None = None
    truncated: bool = False  # the file breaks off here: an unfinished recording's end

    def describe(self) -> str:
        where = f" at byte {self.offset}" if self.offset is not None else ""
        span = ""
        if self.start or self.end:
            span = f", messages logged {_clock(self.start)} to {_clock(self.end)}"
        return f"chunk {self.number}{where}{span}"


def _clock(ns: int) -> str:
    try:
        stamp = datetime.datetime.fromtimestamp(ns / 1e9)
    except (ValueError, OverflowError, OSError):
        return str(ns)
    return stamp.strftime("%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


_RECORD_HEAD = struct.Struct("<BQ")
_MESSAGE_FIELDS = struct.Struct("<HIQQ")  # channel, sequence, log time, publish time


def open_chunk(chunk: Any, parse: bool = True) -> list[Any]:
    """The records of an MCAP chunk, its CRC checked (CRCValidationError, or the
    decompressor's error); schemas and channels as mcap records, messages as mcap Message
    records (parsed here with one struct call each: mcap's own parser reads field by field,
    most of a replay's time). ``parse=False``: the check alone."""
    from mcap.data_stream import ReadDataStream
    from mcap.records import Channel, Schema
    from mcap.records import Message as McapMessage
    from mcap.stream_reader import CRCValidationError

    if chunk.compression == "lz4":
        import lz4.frame

        data = lz4.frame.decompress(chunk.data)
    elif chunk.compression == "zstd":
        import zstandard

        data = zstandard.decompress(chunk.data, chunk.uncompressed_size)
    elif chunk.compression == "":
        data = chunk.data
    else:
        raise ValueError(f"unknown compression {chunk.compression!r}")
    if chunk.uncompressed_crc != 0:
        crc = zlib.crc32(data)
        if crc != chunk.uncompressed_crc:
            raise CRCValidationError(expected=chunk.uncompressed_crc, actual=crc, record=chunk)
    if not parse:
        return []
    records: list[Any] = []
    view = memoryview(data)
    position, end = 0, len(data)
    while position < end:
        if end - position < 9:
            raise ValueError(f"a record header cut short at byte {position} of the chunk")
        opcode, length = _RECORD_HEAD.unpack_from(data, position)
        start = position + 9
        position = start + length
        if position > end:
            raise ValueError(f"a record of {length} bytes past the chunk's end")
        if opcode == 5:
            channel, sequence, log_time, publish_time = _MESSAGE_FIELDS.unpack_from(data, start)
            records.append(McapMessage(channel_id=channel, sequence=sequence, log_time=log_time,
                                       publish_time=publish_time,
                                       data=bytes(view[start + 22:position])))
        elif opcode in (3, 4):
            stream = ReadDataStream(io.BytesIO(view[start:position]))
            records.append(Schema.read(stream) if opcode == 3 else Channel.read(stream))
    return records


@dataclass(frozen=True)
class Recorded:
    """One recorded message: topic, schema name, log time (ns) and decoded body."""

    topic: str
    schema: str
    log_time: int
    body: Any


class RecordingReader:
    """Reads a recording chunk by chunk, checking each chunk's CRC. Errors name the file;
    OSError for a file that cannot be read."""

    def __init__(self, path: str) -> None:
        from mcap.reader import SeekingReader

        self.path = path
        self.summary: Any = None
        self.damaged: str | None = None  # why the summary could not be read, if it could not
        self.size = 0
        self._stream: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            if self._stream.read(len(_MAGIC)) != _MAGIC:
                raise RecordingError(f"{path}: not an MCAP file (no MCAP magic at its start)")
            self._stream.seek(0, io.SEEK_END)
            self.size = self._stream.tell()
            self._stream.seek(0)
            try:
                self.summary = SeekingReader(self._stream).get_summary()
                if self.summary is None:
                    self.damaged = "no summary"
            except Exception as exc:  # no footer: the recorder did not finish (killed?)
                self.damaged = _describe(exc)
        except BaseException:
            self.close()
            raise

    @property
    def message_count(self) -> int | None:
        stats = self.summary.statistics if self.summary is not None else None
        return None if stats is None else int(stats.message_count)

    def metadata(self) -> dict[str, dict[str, str]]:
        """The metadata records by name (an unfinished file: those that can be read)."""
        from mcap.reader import make_reader

        self._stream.seek(0)
        try:
            return {m.name: dict(m.metadata) for m in make_reader(self._stream).iter_metadata()}
        except Exception:
            return self._scan_metadata()

    def _scan_metadata(self) -> dict[str, dict[str, str]]:
        from mcap.records import Metadata
        from mcap.stream_reader import StreamReader

        found: dict[str, dict[str, str]] = {}
        self._stream.seek(0)
        try:
            for record in StreamReader(self._stream, emit_chunks=True).records:
                if isinstance(record, Metadata):
                    found[record.name] = dict(record.metadata)
        except Exception:
            pass
        return found

    def chunks(self, parse: bool = True) -> Iterator[Chunk]:
        """Every chunk in file order, each read and CRC-checked: ``error`` says why one is
        bad. A file without its summary (the recorder was killed) is read from the start,
        up to where it breaks off (then a last Chunk with the error)."""
        if self.summary is not None and self.summary.chunk_indexes:
            yield from self._indexed_chunks(parse)
        else:
            yield from self._scanned_chunks(parse)

    def _indexed_chunks(self, parse: bool) -> Iterator[Chunk]:
        from mcap.data_stream import ReadDataStream
        from mcap.opcode import Opcode
        from mcap.records import Chunk as McapChunk
        indexes = sorted(self.summary.chunk_indexes, key=lambda c: c.chunk_start_offset)
        for number, index in enumerate(indexes, 1):
            chunk = Chunk(number, index.chunk_start_offset, index.message_start_time,
                          index.message_end_time)
            try:
                self._stream.seek(index.chunk_start_offset)
                raw = self._stream.read(index.chunk_length)
                if len(raw) != index.chunk_length:
                    raise ValueError(f"the file ends {index.chunk_length - len(raw)} bytes "
                                     "into it")
                stream = ReadDataStream(io.BytesIO(raw))
                if stream.read1() != Opcode.CHUNK:
                    raise ValueError("no chunk record at its offset")
                stream.read8()
                chunk.records = open_chunk(McapChunk.read(stream), parse)
            except Exception as exc:
                chunk.error = _describe(exc)
                chunk.records = []
            yield chunk

    def _scanned_chunks(self, parse: bool) -> Iterator[Chunk]:
        from mcap.records import Channel, Message, Schema
        from mcap.records import Chunk as McapChunk
        from mcap.stream_reader import StreamReader

        self._stream.seek(0)
        number = 0
        loose: list[Any] = []  # records outside chunks
        reader = StreamReader(self._stream, emit_chunks=True)
        try:
            for record in reader.records:
                if isinstance(record, McapChunk):
                    number += 1
                    end = self._stream.tell()
                    chunk = Chunk(number, None, record.message_start_time,
                                  record.message_end_time)
                    chunk.offset = end - (9 + 8 * 4 + 4 + 4 + len(record.compression)
                                          + len(record.data))
                    try:
                        chunk.records = loose + open_chunk(record, parse)
                    except Exception as exc:
                        chunk.error = _describe(exc)
                    loose = []
                    yield chunk
                elif isinstance(record, (Schema, Channel, Message)):
                    loose.append(record)
        except Exception as exc:
            number += 1
            yield Chunk(number, None, 0, 0, loose,
                        f"the file breaks off here ({_describe(exc)}); nothing after it "
                        "can be read", truncated=True)
            return
        if loose:
            yield Chunk(number + 1, None, 0, 0, loose)

    def bad_chunks(self) -> tuple[list[Chunk], int]:
        """The chunks that fail their check, and how many chunks there are."""
        bad, total = [], 0
        for chunk in self.chunks(parse=False):
            total += 1
            if chunk.truncated:
                log.warning("%s ends early (%s): the recording was not finished; what "
                            "precedes is read", self.path, chunk.error)
                continue
            if chunk.error is not None:
                chunk.records = []
                bad.append(chunk)
        return bad, total

    def messages(self, skip_bad: bool = False, include_bus: bool = False) -> Iterator[Recorded]:
        """The recorded bus messages in log-time order; RecordingError at a bad chunk unless
        ``skip_bad``, and at the first message that is not vbus. ``include_bus`` adds the
        ``$vbus/...`` channels (losses)."""
        from mcap.records import Channel, Message, Schema

        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str]] = {}
        if self.summary is not None:
            schemas.update({i: s.name for i, s in self.summary.schemas.items()})
            for i, c in self.summary.channels.items():
                channels[i] = (c.topic, self._check_channel(c, schemas))
        index = 0
        for chunk in self.chunks():
            if chunk.error is not None:
                if skip_bad or chunk.truncated:
                    continue  # the end of an unfinished recording: said by bad_chunks
                raise RecordingError(f"{self.path}: {chunk.describe()} is damaged "
                                     f"({chunk.error})")
            for record in chunk.records:
                if isinstance(record, Schema):
                    schemas[record.id] = record.name
                elif isinstance(record, Channel):
                    channels[record.id] = (record.topic, self._check_channel(record, schemas))
                elif isinstance(record, Message):
                    index += 1
                    known = channels.get(record.channel_id)
                    if known is None:
                        raise RecordingError(f"{self.path}: message {index} is on an "
                                             f"unknown channel {record.channel_id}")
                    topic, schema = known
                    if topic.startswith("$") and not include_bus:
                        continue
                    try:
                        body = decode_body(schema, record.data)
                    except DecodeError as exc:
                        raise RecordingError(
                            f"{self.path}: message {index} on {topic!r}: {exc}") from None
                    yield Recorded(topic, schema, record.log_time, body)

    def _check_channel(self, channel: Any, schemas: dict[int, str]) -> str:
        schema = schemas.get(channel.schema_id, "")
        if channel.metadata.get(FORMAT_KEY) != RECORDING_FORMAT or (
            channel.message_encoding != MESSAGE_ENCODING or schema not in _DECODERS
        ):
            found = channel.metadata.get(FORMAT_KEY)
            hint = " (made by an older vbus: record it again)" if found == "1" else ""
            raise RecordingError(
                f"{self.path}: channel {channel.topic!r} is not a vbus recording "
                f"(message encoding {channel.message_encoding!r}, schema {schema!r}, "
                f"{FORMAT_KEY}={found!r}){hint}"
            )
        return schema

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def loss_summary(text: str | None) -> dict[str, dict[str, int]]:
    """The ``topics`` entry of a ``vbus.summary`` record."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
