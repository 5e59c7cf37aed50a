"""vbus recordings in MCAP (https://mcap.dev): the file format of ``vbus record``/``replay``.

One MCAP channel per vbus topic, message encoding ``msgpack`` (a self-describing encoding of
the MCAP registry, so no schema: schema id 0). Each MCAP message is a msgpack map::

    topic     str     the vbus topic (also the channel's topic)
    sender    str     publisher id, 16 hex digits
    seq       int     the publisher's sequence number on this topic
    time      float   publisher's clock, seconds since the epoch
    retained  bool    the retained flag
    kind      str     "msgpack", "bytes", "ndarray" or "batch"
    data      any     msgpack: the value itself; ndarray: [dtype descr, shape];
                      bytes: the bytes if they rode inline, else nil; batch: the messages
                      as [[time, value], ...] (their seqs follow ``seq``)
    frames    [bin]   the message's ZeroMQ frames exactly as received: frame 1 (topic, header,
                      inline payload) and, if present, frame 2 (external payload)

One MCAP message holds one ZeroMQ message: a batch (several messages of one publisher and
topic that travelled in one frame) stays one MCAP message. ``frames`` is what replay sends,
byte for byte; the other keys repeat it for tools that read msgpack but not the vbus wire
format (docs/protocol.md). MCAP ``log_time`` is when the
recorder received the message (ns since the epoch, monotonic during a recording),
``publish_time`` the publisher's clock, ``sequence`` the vbus seq modulo 2**32. Channel
metadata ``vbus.recording_format`` = ``1`` marks vbus channels; a metadata record named
``vbus`` says where and what was recorded. Chunks are LZ4-compressed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import msgspec

from . import _wire
from ._errors import DecodeError, VbusError

RECORDING_FORMAT = "1"
FORMAT_KEY = "vbus.recording_format"
WIRE_KEY = "vbus.wire_version"
MESSAGE_ENCODING = "msgpack"
METADATA_NAME = "vbus"
_KINDS = {_wire.KIND_MSGPACK: "msgpack", _wire.KIND_BYTES: "bytes",
          _wire.KIND_NDARRAY: "ndarray", _wire.KIND_BATCH: "batch"}
_U64 = 2**64 - 1
_MAGIC = b"\x89MCAP0\r\n"
log = logging.getLogger("vbus.mcap")


class RecordingError(VbusError, ValueError):
    """A file is not a readable vbus recording; the message names the file and the problem."""


class _Body(msgspec.Struct, frozen=True):
    topic: str
    sender: str
    seq: int
    time: float
    retained: bool
    kind: str
    data: Any
    frames: list[bytes]


class _Frames(msgspec.Struct, frozen=True):
    frames: list[bytes]


_ENCODER = msgspec.msgpack.Encoder()
_FRAMES_DECODER = msgspec.msgpack.Decoder(_Frames)


def encode_message(first: bytes, external: bytes | None) -> tuple[_wire.Envelope, bytes]:
    """The envelope of a received vbus message and its MCAP message body."""
    env = _wire.parse_envelope(first)
    inline = first[env.offset:]
    data: Any = None
    if env.kind == _wire.KIND_BYTES:
        data = None if external is not None else inline
    elif env.kind in _KINDS:  # msgpack: the value, ndarray: [descr, shape], batch: [[t, v]...]
        data = msgspec.Raw(inline)
    body = _Body(
        env.topic, env.sender.hex(), env.seq, env.time, bool(env.flags & _wire.FLAG_RETAINED),
        _KINDS.get(env.kind, str(env.kind)), data,
        [first] if external is None else [first, external],
    )
    return env, _ENCODER.encode(body)


def decode_frames(body: bytes) -> tuple[_wire.Envelope, bytes, bytes | None]:
    """The vbus frames stored in an MCAP message body; DecodeError if they are not vbus."""
    try:
        frames = _FRAMES_DECODER.decode(body).frames
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"not a vbus message body: {exc}") from None
    if not 1 <= len(frames) <= 2:
        raise DecodeError(f"{len(frames)} frames, expected 1 or 2")
    env = _wire.parse_envelope(frames[0])
    if bool(env.flags & _wire.FLAG_EXTERNAL) != (len(frames) == 2):
        raise DecodeError(f"{len(frames)} frame(s) do not match the header's flags")
    return env, frames[0], frames[1] if len(frames) == 2 else None


def _nanoseconds(seconds: float) -> int:
    if not math.isfinite(seconds):
        return 0
    return min(max(int(seconds * 1e9), 0), _U64)


class RecordingWriter:
    """Writes received messages to an MCAP stream; ``finish()`` writes the index."""

    def __init__(self, stream: IO[bytes], metadata: dict[str, str]) -> None:
        from mcap.writer import CompressionType, Writer

        from . import __version__

        self._writer = Writer(stream, compression=CompressionType.LZ4)
        self._writer.start(profile="", library=f"vbus {__version__}")
        self._writer.add_metadata(METADATA_NAME, {
            FORMAT_KEY: RECORDING_FORMAT, WIRE_KEY: str(_wire.VERSION), **metadata,
        })
        self._channels: dict[str, int] = {}
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()
        self.messages = 0
        self.bytes = 0  # vbus frame bytes recorded

    @property
    def topics(self) -> int:
        return len(self._channels)

    def add(self, first: bytes, external: bytes | None) -> None:
        env, body = encode_message(first, external)
        channel = self._channels.get(env.topic)
        if channel is None:
            channel = self._channels[env.topic] = self._writer.register_channel(
                topic=env.topic, message_encoding=MESSAGE_ENCODING, schema_id=0,
                metadata={FORMAT_KEY: RECORDING_FORMAT, WIRE_KEY: str(_wire.VERSION)},
            )
        self._writer.add_message(
            channel_id=channel,
            log_time=self._wall0 + time.monotonic_ns() - self._mono0,
            data=body,
            publish_time=_nanoseconds(env.time),
            sequence=env.seq & 0xFFFFFFFF,
        )
        self.messages += 1
        self.bytes += len(first) + (len(external) if external is not None else 0)

    def finish(self) -> None:
        self._writer.finish()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Recorded:
    """One recorded message: its topic, MCAP log time (ns) and the vbus frames to send."""

    topic: str
    log_time: int
    first: bytes
    external: bytes | None
    messages: int = 1  # a batch holds several


class RecordingReader:
    """Reads a vbus recording. Errors name the file; OSError for a file that cannot be read."""

    def __init__(self, path: str) -> None:
        from mcap.reader import SeekingReader

        self.path = path
        self.message_count: int | None = None
        self.damaged: str | None = None  # why the index could not be read, if it could not
        self._stream: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            if self._stream.read(len(_MAGIC)) != _MAGIC:
                raise RecordingError(f"{path}: not an MCAP file (no MCAP magic at its start)")
            self._stream.seek(0)
            self._reader = SeekingReader(self._stream)
            try:
                summary = self._reader.get_summary()
            except Exception as exc:  # no footer: the recorder did not finish (killed?)
                self.damaged = _describe(exc)
                return
        except BaseException:
            self.close()
            raise
        stats = summary.statistics if summary is not None else None
        if stats is not None:
            self.message_count = stats.message_count

    def __iter__(self) -> Iterator[Recorded]:
        """The messages in log-time order; RecordingError at the first that is not vbus. A
        file without its index (the recorder was killed) is read from the start, in file
        order (which is log-time order for vbus recordings), up to where it breaks off."""
        vbus_channels: set[int] = set()
        index = 0
        try:
            for channel, message in self._messages():
                index += 1
                if channel.id not in vbus_channels:
                    _check_channel(self.path, channel)
                    vbus_channels.add(channel.id)
                try:
                    env, first, external = decode_frames(message.data)
                except DecodeError as exc:
                    raise RecordingError(
                        f"{self.path}: message {index} on {channel.topic!r}: {exc}"
                    ) from None
                if env.topic != channel.topic:
                    raise RecordingError(
                        f"{self.path}: message {index} on channel {channel.topic!r} "
                        f"carries topic {env.topic!r}"
                    )
                yield Recorded(channel.topic, message.log_time, first, external,
                               _count(env, first))
        except RecordingError:
            raise
        except Exception as exc:
            if self.damaged is None or index == 0:
                raise RecordingError(
                    f"{self.path}: damaged after {index} message(s) ({_describe(exc)})"
                ) from None
            log.warning("%s ends early after %d message(s): the recording was not finished "
                        "(%s)", self.path, index, _describe(exc))

    def _messages(self) -> Iterator[tuple[Any, Any]]:
        if self.damaged is None:
            for _schema, channel, message in self._reader.iter_messages(log_time_order=True):
                yield channel, message
            return
        from mcap.reader import NonSeekingReader

        self._stream.seek(0)
        for _schema, channel, message in NonSeekingReader(self._stream).iter_messages(
            log_time_order=False
        ):
            yield channel, message

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BATCH_ENTRIES = msgspec.msgpack.Decoder(list[msgspec.Raw])


def _count(env: _wire.Envelope, first: bytes) -> int:
    """The vbus messages in one recorded ZeroMQ message."""
    if env.kind != _wire.KIND_BATCH:
        return 1
    try:
        return len(_BATCH_ENTRIES.decode(memoryview(first)[env.offset:]))
    except msgspec.DecodeError:
        return 1


def _check_channel(path: str, channel: Any) -> None:
    if channel.metadata.get(FORMAT_KEY) != RECORDING_FORMAT or (
        channel.message_encoding != MESSAGE_ENCODING
    ):
        raise RecordingError(
            f"{path}: channel {channel.topic!r} is not a vbus recording (message encoding "
            f"{channel.message_encoding!r}, {FORMAT_KEY}={channel.metadata.get(FORMAT_KEY)!r})"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
