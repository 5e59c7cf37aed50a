"""Unit tests of vbus._proto.wire: payload encoding, frame layout and parsing, on bytes alone."""

from __future__ import annotations

import array
import dataclasses
import math
import struct
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vbus._errors import DecodeError, EncodeError, VbusError
from vbus._proto.topics import topic_prefix
from vbus._proto.wire import (
    EXTERNAL_THRESHOLD,
    FLAG_EXTERNAL,
    FLAG_RETAINED,
    HEADER_SIZE,
    KIND_BYTES,
    KIND_MSGPACK,
    KIND_NDARRAY,
    KINDS,
    KNOWN_FLAGS,
    SENDER_SIZE,
    VERSION,
    Envelope,
    Payload,
    build_frames,
    decode_payload,
    encode_payload,
    new_encoder,
    parse_envelope,
)

ENC = new_encoder()
DEC = msgspec.msgpack.Decoder()
SENDER = b"\x01\x02\x03\x04\x05\x06\x07\x08"
TOPIC = "camera/frame"


class State(msgspec.Struct):
    x: float
    name: str
    tags: list[str] = []


@dataclasses.dataclass
class Point:
    x: int
    y: float


def send(data: Any, flags: int = 0, topic: str = TOPIC) -> tuple[bytes, Any]:
    return build_frames(topic_prefix(topic), flags, SENDER, 7, 1234.5, encode_payload(data, ENC))


def receive(
    frame: bytes, external: Any, decoder: msgspec.msgpack.Decoder = DEC, copy: bool = True
) -> tuple[Envelope, Any]:
    """Parse and decode as a receiver would; ``copy`` simulates the trip through a socket."""
    env = parse_envelope(frame)
    ext = None
    if external is not None:
        ext = memoryview(bytes(external)) if copy else memoryview(external)
    return env, decode_payload(env.kind, memoryview(frame)[env.offset :], ext, decoder)


def roundtrip(data: Any, decoder: msgspec.msgpack.Decoder = DEC) -> Any:
    return receive(*send(data), decoder=decoder)[1]


def as_u8(buffer: Any) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.uint8)


# -- msgpack payloads ------------------------------------------------------------------------

msgpack_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
msgpack_nested = st.recursive(
    st.one_of(msgpack_leaves, st.binary(max_size=20)),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
# Top-level bytes are a payload kind of their own (tested below); keep them nested here.
msgpack_values = st.one_of(
    msgpack_leaves,
    st.lists(msgpack_nested, max_size=5),
    st.dictionaries(st.text(max_size=8), msgpack_nested, max_size=5),
)


@given(msgpack_values)
@example(0)
@example(2**64 - 1)
@example(-(2**63))
@example("")
@example({"k": [1, 2.5, None, True, b"\x00raw"]})
def test_msgpack_values_round_trip(value: Any) -> None:
    payload = encode_payload(value, ENC)
    assert payload.kind == KIND_MSGPACK
    assert payload.external is None
    assert roundtrip(value) == value


def test_nan_round_trips() -> None:
    assert math.isnan(roundtrip(float("nan")))


def test_tuple_round_trips_as_list() -> None:
    assert roundtrip((1, "a")) == [1, "a"]


def test_struct_round_trip_typed_and_untyped() -> None:
    state = State(x=1.25, name="stage", tags=["a"])
    assert roundtrip(state, msgspec.msgpack.Decoder(State)) == state
    assert roundtrip(state) == {"x": 1.25, "name": "stage", "tags": ["a"]}


def test_dataclass_round_trip_typed_and_untyped() -> None:
    point = Point(3, 4.5)
    assert roundtrip(point, msgspec.msgpack.Decoder(Point)) == point
    assert roundtrip(point) == {"x": 3, "y": 4.5}


def test_nested_structs_in_containers() -> None:
    states = [State(1.0, "a"), State(2.0, "b", ["t"])]
    assert roundtrip(states, msgspec.msgpack.Decoder(list[State])) == states


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [
        (np.int8(-5), -5),
        (np.int64(2**40), 2**40),
        (np.uint8(200), 200),
        (np.uint64(2**64 - 1), 2**64 - 1),
        (np.float32(1.5), 1.5),
        (np.float64(2.25), 2.25),
        (np.bool_(True), True),
        (np.bool_(False), False),
        (np.str_("txt"), "txt"),
    ],
)
def test_numpy_scalars_travel_as_plain_values(scalar: Any, expected: Any) -> None:
    payload = encode_payload(scalar, ENC)
    assert payload.kind == KIND_MSGPACK
    decoded = roundtrip(scalar)
    assert decoded == expected
    assert type(decoded) is type(expected)


def test_numpy_scalars_nested_in_containers() -> None:
    value = {"n": np.int32(3), "xs": [np.float32(0.5), np.uint16(7)], "ok": np.bool_(True)}
    assert roundtrip(value) == {"n": 3, "xs": [0.5, 7], "ok": True}


# -- encode errors ---------------------------------------------------------------------------


def assert_encode_error(data: Any) -> None:
    with pytest.raises(EncodeError) as info:
        encode_payload(data, ENC)
    assert isinstance(info.value, VbusError)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(2**64, id="int-too-large"),
        pytest.param(-(2**63) - 1, id="int-too-small"),
        pytest.param([1, 2**70], id="nested-int-too-large"),
        pytest.param(np.array([object(), 1], dtype=object), id="object-array"),
        pytest.param(np.array([None]), id="object-array-none"),
        pytest.param(np.zeros(2, dtype=[("a", "O"), ("b", "i4")]), id="struct-with-object"),
        pytest.param(memoryview(b"abcdef")[::2], id="non-contiguous-memoryview"),
        pytest.param(object(), id="object"),
        pytest.param(1j, id="complex"),
        pytest.param({"k": object()}, id="nested-object"),
        pytest.param(np.complex128(1j), id="numpy-complex-scalar"),
        pytest.param(State(1.0, "a", [object()]), id="struct-with-object"),  # type: ignore[list-item]
        pytest.param(lambda: None, id="function"),
    ],
)
def test_unencodable_payloads_raise_encode_error(data: Any) -> None:
    assert_encode_error(data)


def test_cyclic_container_raises_encode_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert_encode_error(cyclic)


# -- bytes payloads --------------------------------------------------------------------------

SMALL_SIZES = [0, 1, 100, EXTERNAL_THRESHOLD - 1]
LARGE_SIZES = [EXTERNAL_THRESHOLD, 3 * EXTERNAL_THRESHOLD + 17]


def pattern_bytes(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview], ids=lambda f: f.__name__)
@pytest.mark.parametrize("size", SMALL_SIZES)
def test_small_bytes_ride_inline(make: Any, size: int) -> None:
    raw = pattern_bytes(size)
    payload = encode_payload(make(raw), ENC)
    assert payload.kind == KIND_BYTES
    assert payload.external is None
    assert payload.inline == raw
    frame, external = send(make(raw))
    assert external is None
    env, data = receive(frame, external)
    assert not env.flags & FLAG_EXTERNAL
    assert env.kind == KIND_BYTES
    assert isinstance(data, memoryview)
    assert data.readonly
    assert bytes(data) == raw


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview], ids=lambda f: f.__name__)
@pytest.mark.parametrize("size", LARGE_SIZES)
def test_large_bytes_travel_external(make: Any, size: int) -> None:
    raw = pattern_bytes(size)
    frame, external = send(make(raw))
    assert external is not None
    assert memoryview(external).nbytes == size
    env, data = receive(frame, external)
    assert env.flags & FLAG_EXTERNAL
    assert env.kind == KIND_BYTES
    assert frame[env.offset :] == b""  # nothing inline
    assert data.readonly
    assert bytes(data) == raw


def test_small_bytes_inline_copy_is_independent() -> None:
    source = bytearray(b"abc")
    payload = encode_payload(source, ENC)
    source[0] = ord("z")
    assert payload.inline == b"abc"


def test_large_bytes_external_is_zero_copy() -> None:
    source = bytearray(pattern_bytes(EXTERNAL_THRESHOLD))
    payload = encode_payload(source, ENC)
    assert np.shares_memory(as_u8(payload.external), as_u8(source))
    source[0] ^= 0xFF
    assert memoryview(payload.external)[0] == source[0]
    immutable = bytes(EXTERNAL_THRESHOLD)
    assert np.shares_memory(as_u8(encode_payload(immutable, ENC).external), as_u8(immutable))


def test_large_bytes_decode_is_zero_copy() -> None:
    frame, external = send(bytes(EXTERNAL_THRESHOLD))
    received = bytearray(bytes(external))  # the buffer the socket handed over
    _, data = receive(frame, received, copy=False)
    assert np.shares_memory(as_u8(data), as_u8(received))
    assert data.readonly  # it may share memory with the publisher's data (inproc)


def test_memoryview_with_wide_format_keeps_raw_bytes() -> None:
    small = array.array("d", [1.5, -2.0])
    assert bytes(roundtrip(memoryview(small))) == small.tobytes()
    large = array.array("d", range(EXTERNAL_THRESHOLD // 8 + 1))
    frame, external = send(memoryview(large))
    assert external is not None
    assert bytes(receive(frame, external)[1]) == large.tobytes()


@given(st.binary(max_size=2 * EXTERNAL_THRESHOLD))
def test_bytes_round_trip(raw: bytes) -> None:
    assert bytes(roundtrip(raw)) == raw


# -- numpy payloads ---------------------------------------------------------------------------


def assert_same_array(received: np.ndarray, sent: np.ndarray) -> None:
    assert isinstance(received, np.ndarray)
    assert received.dtype == sent.dtype
    assert received.shape == sent.shape
    assert received.tobytes() == np.ascontiguousarray(sent).tobytes()


PLAIN_DTYPES = [
    "u1", "i1", "<i2", ">i2", "<u4", ">i4", "<i8", "<f2", "<f4", ">f8", "<c8", "<c16",
    "?", "S5", "<U3", "M8[ns]", "<m8[s]", "V4",
]  # fmt: skip

STRUCTURED_DTYPES = {
    "packed": np.dtype([("a", "<i4"), ("b", "<f8"), ("c", "S2")]),
    "big-endian-fields": np.dtype([("a", ">i4"), ("b", ">f4")]),
    "subarray-field": np.dtype([("a", "<f4", (3,)), ("b", "u1")]),
    "2d-subarray-field": np.dtype([("m", "<i2", (2, 2))]),
}


@pytest.mark.parametrize("dtype", PLAIN_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 1, 1, 2)])
def test_arrays_round_trip_with_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    sent = np.zeros(shape, dtype=dtype)
    if sent.size:
        sent.reshape(-1).view(np.uint8)[:] = as_u8(pattern_bytes(sent.nbytes))
    payload = encode_payload(sent, ENC)
    assert payload.kind == KIND_NDARRAY
    assert_same_array(roundtrip(sent), sent)


@pytest.mark.parametrize("dtype", STRUCTURED_DTYPES.values(), ids=STRUCTURED_DTYPES.keys())
def test_structured_arrays_round_trip(dtype: np.dtype) -> None:
    sent = np.zeros(4, dtype=dtype)
    sent.view(np.uint8)[:] = as_u8(pattern_bytes(sent.nbytes))
    received = roundtrip(sent)
    assert_same_array(received, sent)
    assert received.dtype.names == sent.dtype.names


STRUCTURED_DTYPES = {
    "aligned-with-padding": np.dtype([("a", "u1"), ("b", "<f8")], align=True),
    "explicit-offsets": np.dtype(
        {"names": ["a", "b"], "formats": ["u1", "<i4"], "offsets": [0, 8], "itemsize": 16}
    ),
    "nested-struct": np.dtype([("pos", [("x", "<f4"), ("y", "<f4")]), ("id", "u1")]),
    "field-titles": np.dtype([(("Title", "a"), "<i4")]),
}


@pytest.mark.parametrize(
    "dtype", STRUCTURED_DTYPES.values(), ids=STRUCTURED_DTYPES.keys()
)
def test_structured_arrays_with_padding_nesting_or_titles_round_trip(dtype: np.dtype) -> None:
    sent = np.zeros(3, dtype=dtype)
    received = roundtrip(sent)
    assert received.dtype == sent.dtype
    assert received.shape == sent.shape


def test_zero_itemsize_array_round_trips() -> None:
    sent = np.zeros(3, dtype=[])
    assert_same_array(roundtrip(sent), sent)


def test_zero_d_array_stays_zero_d() -> None:
    sent = np.array(3.5)
    received = roundtrip(sent)
    assert isinstance(received, np.ndarray)
    assert received.shape == ()
    assert received.dtype == np.float64
    assert received[()] == 3.5


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a[:, ::2], id="strided-columns"),
        pytest.param(lambda a: a[::-1], id="negative-stride"),
        pytest.param(lambda a: a.T, id="transposed"),
        pytest.param(np.asfortranarray, id="fortran-order"),
        pytest.param(lambda a: a[1:3, 2:5], id="sub-block"),
    ],
)
def test_non_contiguous_arrays_round_trip(make: Any) -> None:
    base = np.arange(48, dtype="<i4").reshape(6, 8)
    sent = make(base)
    received = roundtrip(sent)
    assert received.shape == sent.shape
    assert received.dtype == sent.dtype
    np.testing.assert_array_equal(received, sent)
    assert received.flags.c_contiguous


@given(
    hnp.arrays(
        dtype=st.one_of(
            hnp.scalar_dtypes(),
            hnp.byte_string_dtypes(),
            hnp.unicode_string_dtypes(),
            hnp.array_dtypes(max_size=3),
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_arbitrary_arrays_round_trip(sent: np.ndarray) -> None:
    assert_same_array(roundtrip(sent), sent)


def large_array() -> np.ndarray:
    return np.arange(EXTERNAL_THRESHOLD // 8 * 2, dtype=np.float64).reshape(-1, 16)


def test_large_array_is_external_and_zero_copy() -> None:
    sent = large_array()
    frame, external = send(sent)
    assert external is not None
    assert memoryview(external).nbytes == sent.nbytes
    assert np.shares_memory(as_u8(external), sent)
    sent[0, 0] = 42.0
    assert bytes(memoryview(external)[:8]) == np.float64(42.0).tobytes()
    env = parse_envelope(frame)
    assert env.flags & FLAG_EXTERNAL
    assert env.kind == KIND_NDARRAY


def test_large_array_decode_is_zero_copy() -> None:
    sent = large_array()
    frame, external = send(sent)
    received_buffer = bytearray(bytes(external))
    _, received = receive(frame, received_buffer, copy=False)
    assert_same_array(received, sent)
    assert np.shares_memory(received, as_u8(received_buffer))
    assert not received.flags.writeable  # it may share memory with the publisher's array


def test_non_contiguous_large_array_is_sent_from_a_copy() -> None:
    base = np.arange(EXTERNAL_THRESHOLD, dtype=np.float64).reshape(-1, 2)
    sent = base[:, 0]
    frame, external = send(sent)
    assert not np.shares_memory(as_u8(external), base)
    np.testing.assert_array_equal(receive(frame, external)[1], sent)


def test_array_without_its_data_frame_is_a_decode_error() -> None:
    payload = encode_payload(np.arange(3), ENC)
    with pytest.raises(DecodeError):
        decode_payload(KIND_NDARRAY, memoryview(payload.inline), None, DEC)


# -- frame layout ------------------------------------------------------------------------------


def test_frame_layout() -> None:
    payload = encode_payload({"k": 1}, ENC)
    frame, external = build_frames(b"a/b\0", FLAG_RETAINED, SENDER, 99, 1.5, payload)
    assert external is None
    assert frame.startswith(b"a/b\0")
    header = frame[4 : 4 + HEADER_SIZE]
    version, flags, kind, pad, sender, seq, time = struct.unpack("<BBBB8sQd", header)
    assert (version, flags, kind, pad) == (VERSION, FLAG_RETAINED, KIND_MSGPACK, 0)
    assert (sender, seq, time) == (SENDER, 99, 1.5)
    assert frame[4 + HEADER_SIZE :] == payload.inline
    assert HEADER_SIZE == 28
    assert len(SENDER) == SENDER_SIZE


@given(
    topic=st.lists(st.text("abcXYZ019_-.:", min_size=1, max_size=8), min_size=1, max_size=5).map(
        "/".join
    ),
    sender=st.binary(min_size=8, max_size=8),
    seq=st.integers(0, 2**64 - 1),
    time=st.floats(allow_nan=False),
    retained=st.booleans(),
    value=msgpack_values,
)
def test_envelope_round_trip(
    topic: str, sender: bytes, seq: int, time: float, retained: bool, value: Any
) -> None:
    flags = FLAG_RETAINED if retained else 0
    payload = encode_payload(value, ENC)
    frame, external = build_frames(topic_prefix(topic), flags, sender, seq, time, payload)
    env = parse_envelope(frame)
    assert env == Envelope(topic, flags, KIND_MSGPACK, sender, seq, time, env.offset)
    assert env.offset == len(topic) + 1 + HEADER_SIZE
    assert decode_payload(env.kind, memoryview(frame)[env.offset :], None, DEC) == value


def test_external_flag_follows_the_payload() -> None:
    small = build_frames(b"t\0", 0, SENDER, 1, 0.0, Payload(KIND_BYTES, b"x"))
    large = build_frames(b"t\0", FLAG_RETAINED, SENDER, 1, 0.0, Payload(KIND_BYTES, b"", b"y"))
    assert parse_envelope(small[0]).flags == 0
    assert parse_envelope(large[0]).flags == FLAG_RETAINED | FLAG_EXTERNAL
    assert large[1] == b"y"


# -- parse_envelope on garbage -------------------------------------------------------------------


def valid_frame(topic: bytes = b"a/b", kind: int = KIND_MSGPACK) -> bytes:
    return build_frames(topic + b"\0", 0, SENDER, 5, 2.0, Payload(kind, b"\x01"))[0]


def parse_or_decode_error(frame: bytes) -> Envelope | None:
    try:
        env = parse_envelope(frame)
    except DecodeError:
        return None
    assert isinstance(env, Envelope)
    return env


@given(st.binary(max_size=100))
@example(b"")
@example(b"\0")
@example(b"topic")
@example(b"topic\0")
@example(b"t\0" + bytes(HEADER_SIZE))
def test_random_bytes_parse_or_raise_decode_error(frame: bytes) -> None:
    env = parse_or_decode_error(frame)
    if env is not None:
        assert env.kind in KINDS
        assert env.flags & ~KNOWN_FLAGS == 0
        assert env.offset <= len(frame)
        assert env.topic.isascii()


@given(st.data())
def test_truncated_frames_raise_decode_error(data: st.DataObject) -> None:
    frame = valid_frame()
    cut = data.draw(st.integers(0, len(b"a/b\0") + HEADER_SIZE - 1))
    with pytest.raises(DecodeError):
        parse_envelope(frame[:cut])


@given(st.data())
def test_modified_frames_parse_or_raise_decode_error(data: st.DataObject) -> None:
    frame = bytearray(valid_frame())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(frame) - 1))
        frame[index] = data.draw(st.integers(0, 255))
    parse_or_decode_error(bytes(frame))


def set_header_byte(frame: bytes, index: int, value: int) -> bytes:
    start = frame.index(b"\0") + 1
    out = bytearray(frame)
    out[start + index] = value
    return bytes(out)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_is_a_decode_error(version: int) -> None:
    with pytest.raises(DecodeError, match="version"):
        parse_envelope(set_header_byte(valid_frame(), 0, version))


UNKNOWN_FLAG_BITS = [1 << i for i in range(8) if not (1 << i) & KNOWN_FLAGS]


def test_some_flag_bits_are_unknown() -> None:
    assert UNKNOWN_FLAG_BITS  # otherwise the test below checks nothing
    assert FLAG_RETAINED & KNOWN_FLAGS
    assert FLAG_EXTERNAL & KNOWN_FLAGS


@pytest.mark.parametrize("flags", [*UNKNOWN_FLAG_BITS, 0xFF, FLAG_RETAINED | UNKNOWN_FLAG_BITS[-1]])
def test_unknown_flags_are_a_decode_error(flags: int) -> None:
    with pytest.raises(DecodeError, match="flags"):
        parse_envelope(set_header_byte(valid_frame(), 1, flags))


@pytest.mark.parametrize("kind", [7, 8, 255])  # 6 is KIND_SHM (shm)
def test_unknown_kind_is_a_decode_error(kind: int) -> None:
    with pytest.raises(DecodeError, match="kind"):
        parse_envelope(set_header_byte(valid_frame(), 2, kind))


@pytest.mark.parametrize("topic", [b"caf\xc3\xa9", b"\xff", b"a/\x80"])
def test_non_ascii_topic_is_a_decode_error(topic: bytes) -> None:
    with pytest.raises(DecodeError, match="ASCII"):
        parse_envelope(valid_frame(topic))


def test_missing_terminator_is_a_decode_error() -> None:
    frame = valid_frame()
    with pytest.raises(DecodeError, match="terminator"):
        parse_envelope(frame.replace(b"\0", b"x"))
    with pytest.raises(DecodeError, match="terminator"):
        parse_envelope(b"a/b")


def test_empty_topic_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        parse_envelope(valid_frame(b""))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flags", [0, FLAG_RETAINED, FLAG_EXTERNAL, KNOWN_FLAGS])
def test_every_known_kind_and_flag_parses(kind: int, flags: int) -> None:
    env = parse_envelope(set_header_byte(valid_frame(kind=kind), 1, flags))
    assert (env.kind, env.flags, env.topic, env.seq, env.time) == (kind, flags, "a/b", 5, 2.0)


# -- decode_payload on garbage ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "inline",
    [b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xdb\x00\x00\x00\x10ab", b"\x81\xa1k"],
)
def test_malformed_msgpack_is_a_decode_error(inline: bytes) -> None:
    with pytest.raises(DecodeError, match="malformed"):
        decode_payload(KIND_MSGPACK, memoryview(inline), None, DEC)


@pytest.mark.parametrize(
    ("value", "decoder"),
    [
        ({"x": "not a float", "name": "a"}, msgspec.msgpack.Decoder(State)),
        ({"x": 1.0}, msgspec.msgpack.Decoder(State)),
        (5, msgspec.msgpack.Decoder(State)),
        ({"x": 1, "y": "no"}, msgspec.msgpack.Decoder(Point)),
        ("text", msgspec.msgpack.Decoder(int)),
        ([1, "a"], msgspec.msgpack.Decoder(list[int])),
    ],
)
def test_type_validation_failure_is_a_decode_error(value: Any, decoder: Any) -> None:
    inline = msgspec.msgpack.encode(value)
    with pytest.raises(DecodeError, match="requested type"):
        decode_payload(KIND_MSGPACK, memoryview(inline), None, decoder)


@pytest.mark.parametrize("inline", [b"\xa1\xff", b"\x81\xa1\xff\x00", b"\x92\x01\xa2\x00\x80"])
def test_invalid_utf8_string_is_a_decode_error(inline: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_payload(KIND_MSGPACK, memoryview(inline), None, DEC)


def test_deeply_nested_msgpack_is_a_decode_error() -> None:
    inline = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(DecodeError):
        decode_payload(KIND_MSGPACK, memoryview(inline), None, DEC)


@given(st.binary(max_size=64))
@example(b"\xc1")
@example(b"\x92\x01")
def test_random_msgpack_bytes_decode_or_raise_decode_error(inline: bytes) -> None:
    decoders = [
        (DEC, object),
        (msgspec.msgpack.Decoder(State), State),
        (msgspec.msgpack.Decoder(list[int]), list),
    ]
    for decoder, expected_type in decoders:
        try:
            value = decode_payload(KIND_MSGPACK, memoryview(inline), None, decoder)
        except DecodeError as exc:
            assert isinstance(exc, VbusError)
        else:
            assert isinstance(value, expected_type)


@pytest.mark.parametrize(
    ("meta", "data"),
    [
        pytest.param(b"\xc1", b"", id="garbage-meta"),
        pytest.param(b"", b"", id="empty-meta"),
        pytest.param(msgspec.msgpack.encode(5), b"", id="meta-not-a-pair"),
        pytest.param(msgspec.msgpack.encode(("<i4", "x")), b"", id="shape-not-ints"),
        pytest.param(msgspec.msgpack.encode(("nope", (1,))), b"\0" * 4, id="unknown-dtype"),
        pytest.param(msgspec.msgpack.encode((5, (1,))), b"\0" * 4, id="dtype-an-int"),
        pytest.param(msgspec.msgpack.encode(([1, 2], (1,))), b"\0" * 4, id="fields-not-lists"),
        pytest.param(msgspec.msgpack.encode((None, (1,))), b"\0" * 4, id="dtype-none"),
        pytest.param(msgspec.msgpack.encode(("<i4", (3,))), b"\0" * 8, id="data-too-short"),
        pytest.param(msgspec.msgpack.encode(("<i4", (2,))), b"\0" * 7, id="data-not-a-multiple"),
        pytest.param(msgspec.msgpack.encode(("<i4", (3, 3))), b"\0" * 12, id="shape-mismatch"),
        pytest.param(msgspec.msgpack.encode(("O", (1,))), b"\0" * 8, id="object-dtype"),
    ],
)
def test_bad_array_metadata_is_a_decode_error(meta: bytes, data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_payload(KIND_NDARRAY, memoryview(meta), memoryview(data), DEC)


@pytest.mark.parametrize(
    "descr",
    ["(,)i4", "(3,,)i4", "(SV,{|3", "01", [["a", ",", "x"]]],
    ids=["empty-shape", "double-comma", "unclosed", "leading-zero", "field-shape"],
)
def test_dtype_strings_numpy_cannot_parse_are_a_decode_error(descr: Any) -> None:
    meta = msgspec.msgpack.encode((descr, (1,)))
    with pytest.raises(DecodeError):
        decode_payload(KIND_NDARRAY, memoryview(meta), memoryview(b"\0" * 4), DEC)


dtype_ish = st.text(alphabet="()<>|=,:0123456789iufcSUVMmObaxy[]{} -", max_size=10)
meta_leaves = st.one_of(dtype_ish, st.integers(-(2**63), 2**63), st.none(), st.booleans())
meta_values = st.recursive(
    meta_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(dtype_ish, children, max_size=3)
    ),
    max_leaves=10,
)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 deprecates some aliases
@given(meta_values, st.one_of(st.lists(st.integers(-(2**63), 2**63), max_size=4), meta_values),
       st.binary(max_size=64))  # fmt: skip
def test_hostile_array_metadata_decodes_or_raises_decode_error(
    descr: Any, shape: Any, data: bytes
) -> None:
    meta = msgspec.msgpack.encode((descr, shape))
    try:
        result = decode_payload(KIND_NDARRAY, memoryview(meta), memoryview(data), DEC)
    except DecodeError:
        return
    assert isinstance(result, np.ndarray)
    assert result.nbytes == len(data)


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_random_array_frames_decode_or_raise_decode_error(meta: bytes, data: bytes) -> None:
    try:
        result = decode_payload(KIND_NDARRAY, memoryview(meta), memoryview(data), DEC)
    except DecodeError as exc:
        assert isinstance(exc, VbusError)
    else:
        assert isinstance(result, np.ndarray)
        assert result.nbytes == len(data)


# -- arrays anywhere in a value: KIND_TREE ------------------------------------------------------

from vbus._proto.wire import EXT_ARRAY, KIND_TREE, MAX_TREE_ARRAYS, NestedArray  # noqa: E402


def frames_of(payload: Payload) -> list[Any]:
    ext = payload.external
    return [] if ext is None else list(ext) if isinstance(ext, tuple) else [ext]


def tree_trip(data: Any, decoder: msgspec.msgpack.Decoder = DEC, copy: bool = True) -> Any:
    """Encode, frame, parse and decode as a socket pair would, with the external frames
    as a list (the subscriber's form); ``copy`` simulates the trip between processes."""
    payload = encode_payload(data, ENC)
    frame, external = build_frames(topic_prefix(TOPIC), 0, SENDER, 7, 1234.5, payload)
    env = parse_envelope(frame)
    assert bool(env.flags & FLAG_EXTERNAL) == (external is not None)
    views = [memoryview(bytes(f)) if copy else memoryview(f) for f in frames_of(payload)]
    return decode_payload(env.kind, memoryview(frame)[env.offset :], views, decoder)


class Event(msgspec.Struct):
    seq_num: int
    data: dict[str, Any]
    image: np.ndarray  # type: ignore[type-arg]


@dataclasses.dataclass
class Shot:
    name: str
    pixels: np.ndarray  # type: ignore[type-arg]


def test_arrays_in_dicts_lists_and_structs_round_trip() -> None:
    image = np.arange(12, dtype="<u2").reshape(3, 4)
    table = np.zeros(2, dtype=[("x", "<f4"), ("n", "u1")])
    flag = np.array(True)
    sent = {"image": image, "items": [1, table, "s", [flag]], "plain": np.float32(1.5)}
    payload = encode_payload(sent, ENC)
    assert payload.kind == KIND_TREE
    assert isinstance(payload.external, tuple) and len(payload.external) == 3
    got = tree_trip(sent)
    assert set(got) == {"image", "items", "plain"}
    assert_same_array(got["image"], image)
    assert got["items"][0] == 1 and got["items"][2] == "s"
    assert_same_array(got["items"][1], table)
    assert_same_array(got["items"][3][0], flag)  # 0-d arrays nested stay arrays
    assert got["plain"] == 1.5  # numpy scalars stay plain numbers


def test_one_nested_array_travels_as_one_buffer() -> None:
    payload = encode_payload([np.ones(3)], ENC)
    assert payload.kind == KIND_TREE
    assert isinstance(payload.external, memoryview)  # not a tuple of one
    got = tree_trip([np.ones(3)])
    assert_same_array(got[0], np.ones(3))
    # a receiver may hand over that one frame as itself, not in a list
    frame, external = build_frames(b"a\0", 0, SENDER, 1, 0.0, payload)
    env = parse_envelope(frame)
    one = decode_payload(env.kind, memoryview(frame)[env.offset :], memoryview(external), DEC)
    assert_same_array(one[0], np.ones(3))


def test_a_top_level_array_stays_kind_ndarray() -> None:
    assert encode_payload(np.ones(3), ENC).kind == KIND_NDARRAY


def test_a_value_without_arrays_stays_kind_msgpack() -> None:
    payload = encode_payload({"x": np.float64(2.0), "l": [1, 2]}, ENC)
    assert payload.kind == KIND_MSGPACK and payload.external is None


def test_nested_arrays_are_zero_copy_both_ways() -> None:
    image = np.arange(1 << 16, dtype=np.uint32).reshape(256, 256)
    payload = encode_payload({"image": image}, ENC)
    assert np.shares_memory(as_u8(payload.external), image)
    got = tree_trip({"image": image}, copy=False)["image"]
    assert np.shares_memory(got, image)
    assert not got.flags.writeable  # received arrays are read-only views


def test_non_contiguous_nested_arrays_round_trip() -> None:
    base = np.arange(40, dtype=np.int16).reshape(5, 8)
    sent = {"t": base.T, "s": base[::2, 1::3], "f": np.asfortranarray(base)}
    got = tree_trip(sent)
    for key, value in sent.items():
        assert_same_array(got[key], value)


def test_struct_and_dataclass_fields_round_trip_untyped() -> None:
    image = np.eye(3, dtype="<f8")
    got = tree_trip(Event(seq_num=1, data={"det": 2.5}, image=image))
    assert got["seq_num"] == 1 and got["data"] == {"det": 2.5}
    assert_same_array(got["image"], image)
    got = tree_trip(Shot("a", image))
    assert got["name"] == "a"
    assert_same_array(got["pixels"], image)


def test_typed_decoder_builds_structs_with_array_fields() -> None:
    image = np.arange(6, dtype=">i4").reshape(2, 3)
    got = tree_trip(Event(7, {"img": image}, image), decoder=msgspec.msgpack.Decoder(Event))
    assert isinstance(got, Event) and got.seq_num == 7
    assert_same_array(got.image, image)
    assert_same_array(got.data["img"], image)
    shot = tree_trip(Shot("b", image), decoder=msgspec.msgpack.Decoder(Shot))
    assert isinstance(shot, Shot)
    assert_same_array(shot.pixels, image)


def test_typed_decoder_refuses_a_tree_that_does_not_match() -> None:
    with pytest.raises(DecodeError, match="requested type"):
        tree_trip({"seq_num": "one", "data": {}, "image": np.ones(1)},
                  decoder=msgspec.msgpack.Decoder(Event))
    with pytest.raises(DecodeError, match="requested type"):
        tree_trip({"name": "x", "pixels": [np.ones(1)]}, decoder=msgspec.msgpack.Decoder(Shot))


def test_object_arrays_nested_raise_encode_error() -> None:
    with pytest.raises(EncodeError, match="object"):
        encode_payload({"a": np.array([object()])}, ENC)


def test_too_many_nested_arrays_raise_encode_error() -> None:
    with pytest.raises(EncodeError, match=str(MAX_TREE_ARRAYS)):
        encode_payload([np.zeros(1)] * (MAX_TREE_ARRAYS + 1), ENC)


def test_plain_encoding_of_a_value_with_arrays_raises_nested_array() -> None:
    """A publisher's batching fast path encodes values directly: it learns from NestedArray
    (a TypeError) that the value must go on its own through encode_payload."""
    with pytest.raises(NestedArray):
        ENC.encode({"a": np.zeros(2)})
    assert issubclass(NestedArray, TypeError)
    # and the encoder is left in its ordinary state by encode_payload
    encode_payload({"a": np.zeros(2)}, ENC)
    with pytest.raises(NestedArray):
        ENC.encode([np.zeros(2)])


def test_tree_frame_layout() -> None:
    """The example of docs/protocol.md, byte for byte."""
    sent = {"n": 1, "img": np.array([[0, 1, 2]], dtype="<u2")}
    payload = encode_payload(sent, ENC)
    frame, external = build_frames(b"cam/frame\0", 0, bytes.fromhex("0123456789abcdef"), 7,
                                   1700000000.5, payload)
    assert frame.hex(" ") == (
        "63 61 6d 2f 66 72 61 6d 65 00 01 02 04 00 01 23 45 67 89 ab cd ef "
        "07 00 00 00 00 00 00 00 00 00 20 40 fc 54 d9 41 "
        "82 a1 6e 01 a3 69 6d 67 c7 09 01 93 00 a3 3c 75 32 92 01 03"
    )
    assert bytes(external).hex(" ") == "00 00 01 00 02 00"
    assert EXT_ARRAY == 1


def placeholder(index: int, descr: Any = "<u1", shape: Any = (1,)) -> bytes:
    meta = msgspec.msgpack.encode([index, descr, shape])
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(EXT_ARRAY, meta))


@pytest.mark.parametrize(
    ("inline", "frames", "match"),
    [
        pytest.param(placeholder(0), [], "without its array frames", id="no-frames"),
        pytest.param(placeholder(1), [b"\0"], "placeholder 1", id="index-out-of-range"),
        pytest.param(placeholder(-1), [b"\0"], "placeholder -1", id="negative-index"),
        pytest.param(b"\x92" + placeholder(0) * 2, [b"\0"], "twice", id="duplicate"),
        pytest.param(placeholder(0), [b"\0", b"\0"], "2 array frames", id="frame-unclaimed"),
        pytest.param(b"\x91\x01", [b"\0"], "1 array frames but 0", id="no-placeholder"),
        pytest.param(placeholder(0, shape=(2,)), [b"\0"], "bad array metadata", id="short-data"),
        pytest.param(placeholder(0, descr="<q9"), [b"\0"], "bad array metadata", id="bad-dtype"),
        pytest.param(b"\xd4\x05\x00", [b"\0"], "extension type 5", id="unknown-ext"),
        pytest.param(b"\xd4\x01\x00", [b"\0"], "bad array placeholder", id="bad-placeholder"),
        pytest.param(b"\xc1", [b"\0"], "malformed", id="garbage"),
    ],
)
def test_hostile_tree_payloads_raise_decode_error(
    inline: bytes, frames: list[bytes], match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_payload(KIND_TREE, memoryview(inline), [memoryview(f) for f in frames], DEC)


def test_array_placeholders_outside_a_tree_are_not_arrays() -> None:
    # kind 0 decodes with the subscriber's own decoder: an extension stays an Ext object
    got = decode_payload(KIND_MSGPACK, memoryview(placeholder(0)), None, DEC)
    assert isinstance(got, msgspec.msgpack.Ext)


@pytest.mark.parametrize("kind", [KIND_MSGPACK, KIND_BYTES, KIND_NDARRAY])
def test_several_external_frames_only_for_trees(kind: int) -> None:
    meta = msgspec.msgpack.encode(["|u1", [1]])
    with pytest.raises(DecodeError, match="2 external frames"):
        decode_payload(kind, memoryview(meta), [memoryview(b"\0"), memoryview(b"\0")], DEC)


def test_a_list_of_one_frame_is_one_frame() -> None:
    frame, external = send(np.arange(3, dtype="u1"))
    env = parse_envelope(frame)
    got = decode_payload(env.kind, memoryview(frame)[env.offset :], [memoryview(external)], DEC)
    assert_same_array(got, np.arange(3, dtype="u1"))


tree_arrays = hnp.arrays(
    dtype=st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)
trees = st.recursive(
    st.one_of(msgpack_leaves, tree_arrays),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _same_tree(got: Any, sent: Any) -> bool:
    if isinstance(sent, np.ndarray):
        return (isinstance(got, np.ndarray) and got.dtype == sent.dtype
                and got.shape == sent.shape and got.tobytes() == sent.tobytes())
    if isinstance(sent, dict):
        return (isinstance(got, dict) and got.keys() == sent.keys()
                and all(_same_tree(got[k], v) for k, v in sent.items()))
    if isinstance(sent, list):
        return (isinstance(got, list) and len(got) == len(sent)
                and all(_same_tree(g, s) for g, s in zip(got, sent, strict=True)))
    return bool(got == sent)


@given(st.lists(trees, max_size=4) | st.dictionaries(st.text(max_size=6), trees, max_size=4))
def test_arbitrary_trees_with_arrays_round_trip(sent: Any) -> None:
    assert _same_tree(tree_trip(sent), sent)


@given(st.binary(max_size=64), st.lists(st.binary(max_size=16), max_size=3))
def test_random_tree_payloads_decode_or_raise_decode_error(
    inline: bytes, frames: list[bytes]
) -> None:
    try:
        decode_payload(KIND_TREE, memoryview(inline), [memoryview(f) for f in frames], DEC)
    except DecodeError:
        pass
