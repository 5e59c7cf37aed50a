"""The recording format on its own (no sockets): every kind of payload goes into an MCAP body
and comes back as the very frames a Python publisher sends, byte for byte; the writer's
files pass the mcap reader's checks; old and foreign files are refused by name."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from tests._support import run
from vbus._cli import mcap as _mcap
from vbus._message import Message
from vbus._proto import wire as _wire
from vbus._proto.topics import topic_prefix

SENDER = "0123456789abcdef"
VALUES: list[Any] = [
    0, -1, 2**63, 1.5, -0.0, 1e300, float("nan"), float("inf"), True, None, "text", "é€",
    [1, [2, [3]]], {"a": {"b": [1.5, None]}}, {1: "int key"}, {"raw": b"\x00\xff"}, b"",
    b"short", bytes(70_000), msgspec.msgpack.Ext(5, b"ext"),
    np.zeros((3, 4), "u1"), np.arange(24, dtype="u1").reshape(2, 4, 3),
    np.arange(32, dtype="u1").reshape(2, 4, 4), np.arange(6, dtype="<u2").reshape(2, 3),
    np.arange(6, dtype="<i2").reshape(2, 3), np.arange(6, dtype="<i4").reshape(2, 3),
    np.arange(6, dtype="<f4").reshape(2, 3), np.arange(6, dtype="<f8").reshape(3, 2),
    np.arange(6, dtype="i1").reshape(2, 3), np.arange(12, dtype="u1").reshape(2, 3, 2),
    np.arange(6, dtype=">u2").reshape(2, 3), np.arange(6, dtype="<f2").reshape(2, 3),
    np.arange(6, dtype="<u8").reshape(2, 3), np.array([[True, False]]),
    np.arange(4, dtype="<c8").reshape(2, 2), np.arange(5, dtype="<f8"), np.float64(3.0),
    np.zeros((2, 3, 5), "u1"), np.zeros((2, 2, 2, 2), "u1"), np.zeros((0, 4), "<u2"),
    np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    np.zeros(2, dtype=[("nested", [("x", "u1", (2,))])]),
]
EXPECTED_ENCODINGS = {
    "|u1(3, 4)": "mono8", "|u1(2, 4, 3)": "rgb8", "|u1(2, 4, 4)": "rgba8",
    "<u2(2, 3)": "mono16", "<i2(2, 3)": "16SC1", "<i4(2, 3)": "32SC1", "<f4(2, 3)": "32FC1",
    "<f8(3, 2)": "64FC1", "|i1(2, 3)": "8SC1", "|u1(2, 3, 2)": "8UC2", "<u2(0, 4)": "mono16",
}


def _published_frames(topic: str, value: Any, seq: int, when: float,
                      retained: bool) -> tuple[bytes, bytes | None]:
    """What a Python publisher sends for ``value``."""
    payload = _wire.encode_payload(value, _wire.new_encoder())
    first, external = _wire.build_frames(topic_prefix(topic),
                                         _wire.FLAG_RETAINED if retained else 0,
                                         bytes.fromhex(SENDER), seq, when, payload)
    return first, None if external is None else bytes(external)


def _received(first: bytes, external: bytes | None) -> Message:
    """What a subscriber makes of those frames."""
    env = _wire.parse_envelope(first)
    data = _wire.decode_payload(env.kind, memoryview(first)[env.offset:],
                                None if external is None else memoryview(external),
                                msgspec.msgpack.Decoder())
    return Message(env.topic, data, env.sender.hex(), env.seq, env.time,
                   bool(env.flags & _wire.FLAG_RETAINED))


@pytest.mark.parametrize("retained", [False, True])
@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_every_payload_comes_back_as_the_frames_its_publisher_sent(value: Any,
                                                                   retained: bool) -> None:
    sent = _published_frames("fmt/x", value, 7, 1.7e9 + 0.125, retained)
    msg = _received(*sent)
    schema, body, _ = _mcap.encode_message(msg)
    json.loads(body)  # valid JSON
    decoded = _mcap.decode_body(schema, body)
    assert _mcap.frames_of("fmt/x", schema, decoded) == sent  # byte for byte
    if isinstance(value, np.ndarray) and value.ndim:
        key = f"{value.dtype.str}{value.shape}"
        expected = EXPECTED_ENCODINGS.get(key)
        if expected is None:
            assert schema == _mcap.ARRAY, key
        else:
            assert (schema, json.loads(body)["encoding"]) == (_mcap.IMAGE, expected)
    elif isinstance(value, (bytes, bytearray)):
        assert schema == _mcap.BYTES
    else:
        assert schema == _mcap.VALUE


def test_the_writers_files_pass_the_mcap_readers_checks(tmp_path: Path) -> None:
    from mcap.reader import NonSeekingReader, make_reader

    buffer = io.BytesIO()
    writer = _mcap.RecordingWriter(buffer, {"pattern": "**"})
    rng = np.random.default_rng(1)
    sent = []
    for i in range(400):  # random frames: several chunks
        msg = _received(*_published_frames("fmt/frame", rng.integers(0, 255, (64, 64, 3),
                                                                     dtype="u1"), i + 1,
                                           1.7e9 + i, False))
        writer.add(msg)
        sent.append(msg)
        writer.add(_received(*_published_frames("fmt/value", {"i": i}, i + 1, 1.7e9 + i,
                                                False)))
    writer.add_loss("fmt/value", SENDER, 3, 10)
    writer.finish({"received": "800", "lost": "3", "topics": "{}"})
    buffer.seek(0)
    reader = make_reader(buffer, validate_crcs=True)
    summary = reader.get_summary()
    assert summary is not None and summary.statistics is not None
    assert summary.statistics.message_count == 801
    assert len(summary.chunk_indexes) > 2
    assert sorted(summary.statistics.channel_message_counts.values()) == [1, 400, 400]
    rows = list(reader.iter_messages(log_time_order=True))
    assert len(rows) == 801
    frames = [json.loads(m.data) for s, _, m in rows if s is not None and s.name == _mcap.IMAGE]
    assert [f["vbus"]["seq"] for f in frames] == list(range(1, 401))
    by_topic = list(reader.iter_messages(topics=["fmt/value"]))  # the message indexes
    assert len(by_topic) == 400
    buffer.seek(0)
    assert sum(1 for _ in NonSeekingReader(buffer, validate_crcs=True).iter_messages()) == 801
    names = {m.name for m in make_reader(io.BytesIO(buffer.getvalue())).iter_metadata()}
    assert names == {"vbus", "vbus.summary"}


def test_old_and_foreign_recordings_are_refused_by_name(tmp_path: Path) -> None:
    from mcap.writer import Writer

    old = tmp_path / "old.mcap"
    with open(old, "wb") as f:
        writer = Writer(f)
        writer.start()
        channel = writer.register_channel("a/b", "msgpack", 0, {"vbus.recording_format": "1"})
        writer.add_message(channel, 1, b"\x80", 1)
        writer.finish()
    done = run("replay", str(old), "--to", "tcp://127.0.0.1:1")
    assert done.returncode == 1 and "made by an older vbus" in done.stderr, done.stderr
    foreign = tmp_path / "foreign.mcap"
    with open(foreign, "wb") as f:
        writer = Writer(f)
        writer.start()
        schema = writer.register_schema("pkg/Msg", "ros2msg", b"int32 x")
        channel = writer.register_channel("/x", "cdr", schema)
        writer.add_message(channel, 1, b"\x00\x01\x00\x00\x05\x00\x00\x00", 1)
        writer.finish()
    done = run("replay", str(foreign), "--to", "tcp://127.0.0.1:1")
    assert done.returncode == 1 and "is not a vbus recording" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    info = run("info", str(foreign))  # info shows any MCAP file
    assert info.returncode == 0 and "/x" in info.stdout and "pkg/Msg" in info.stdout
