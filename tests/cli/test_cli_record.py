"""vbus record / replay / info / sub driven as a user would (subprocesses), the files read back
with the mcap package: losses reported and kept, CRCs checked, Foxglove-decodable messages.
No sleep waits for a message: markers and the tools' own stderr lines say when."""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import numpy as np

import vbus
from tests._support import WAIT, Proc, run, start, timed_recording
from vbus._cli import mcap as _mcap
from vbus._message import Message

PAYLOADS: list[tuple[str, Any]] = [
    ("rec/value", {"k": [1, 2.5], "s": "text", "none": None}),
    ("rec/mono16", np.arange(12, dtype="<u2").reshape(3, 4)),
    ("rec/rgb", np.arange(2 * 3 * 3, dtype="u1").reshape(2, 3, 3)),
    ("rec/f8", np.linspace(0, 1, 6).reshape(2, 3)),  # an image Foxglove may not show: 64FC1
    ("rec/stack", np.arange(3 * 2 * 6, dtype="<f4").reshape(3, 2, 6)),  # 6 "channels": Array
    ("rec/vector", np.arange(5, dtype="<i4")),
    ("rec/big_endian", np.arange(4, dtype=">u2").reshape(2, 2)),
    ("rec/struct", np.array([(1.5, (1, 2))], dtype=[("a", "<f4"), ("b", "u1", (2,))])),
    ("rec/blob", bytes(range(256)) * 400),  # external frame (>= 64 KiB)
    ("rec/small", b"\x00\x01\x02"),
    ("rec/odd", {"raw": b"abc", "nan": float("nan"), 1: "an int key"}),  # JSON cannot
    ("rec/value", 2.5),
    *[("rec/burst", i) for i in range(50)],  # a tight loop: the publisher may batch these
]
EXPECTED_SCHEMAS = {
    "rec/value": "vbus.Value", "rec/mono16": "foxglove.RawImage",
    "rec/rgb": "foxglove.RawImage", "rec/f8": "foxglove.RawImage", "rec/stack": "vbus.Array",
    "rec/vector": "vbus.Array", "rec/big_endian": "vbus.Array", "rec/struct": "vbus.Array",
    "rec/blob": "vbus.Bytes", "rec/small": "vbus.Bytes", "rec/odd": "vbus.Value",
    "rec/burst": "vbus.Value",
}


def _key(msg: Message) -> tuple[Any, ...]:
    """What a message is, exactly: arrays by dtype, shape and bytes, values by msgpack."""
    data = msg.data
    if isinstance(data, np.ndarray):
        exact: Any = (data.dtype.str, data.dtype.descr, data.shape, data.tobytes())
    elif isinstance(data, memoryview):
        exact = ("bytes", bytes(data))
    else:
        exact = msgspec.msgpack.encode(data)
    return (msg.topic, msg.sender, msg.seq, msg.time, msg.retained, exact)


def _receive(sub: vbus.Subscriber, count: int) -> list[Message]:
    return [sub.recv(timeout=WAIT) for _ in range(count)]


def _read(path: Path) -> tuple[Any, list[tuple[Any, Any, Any]], dict[str, dict[str, str]]]:
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        reader = make_reader(f, validate_crcs=True)
        summary = reader.get_summary()
        rows = list(reader.iter_messages(log_time_order=False))
        f.seek(0)
        meta = {m.name: dict(m.metadata) for m in make_reader(f).iter_metadata()}
    return summary, rows, meta


# -- one MCAP message per bus message, and back --------------------------------------------
def test_record_writes_one_message_per_bus_message_and_replay_rebuilds_them_exactly(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "run.mcap"
    total = len(PAYLOADS)
    rec = start(procs, "record", broker, "rec/**", "-o", str(path), "--count", str(total))
    rec.wait_for("vbus record: recording rec/** at")
    with vbus.connect(broker, timeout=5.0) as bus:
        wire = bus.subscribe("rec/**")
        pub = bus.publisher()
        for topic, value in PAYLOADS:
            pub.publish(topic, value)
        live = _receive(wire, total)
        assert rec.finish() == 0, "\n".join(rec.rest("err"))
        assert f"{total} message(s) on {len(EXPECTED_SCHEMAS)} topic(s)" in rec.wait_for(
            "message(s) on")

        summary, rows, meta = _read(path)
        assert summary.statistics.message_count == total  # one MCAP message per bus message
        assert meta["vbus"]["vbus.recording_format"] == "2"
        assert meta["vbus"]["pattern"] == "rec/**"
        assert meta["vbus.summary"]["lost"] == "0"
        assert meta["vbus.summary"]["received"] == str(total)
        log_times = [m.log_time for _, _, m in rows]
        assert log_times == sorted(set(log_times))  # file order, strictly increasing
        for (schema, channel, message), msg in zip(rows, live, strict=True):
            assert channel.topic == msg.topic
            assert channel.message_encoding == "json" and schema.encoding == "jsonschema"
            assert schema.name == EXPECTED_SCHEMAS[msg.topic], msg.topic
            assert message.publish_time == int(msg.time * 1e9)
            assert message.sequence == msg.seq
            envelope = json.loads(message.data)["vbus"]
            assert (envelope["sender"], envelope["seq"], envelope["time"]) == (
                msg.sender, msg.seq, msg.time)

        # and back: replay rebuilds each message as published, in the same order
        done = run("replay", str(path), "--to", broker, "--speed", "0")
        assert done.returncode == 0, done.stderr
        assert f"vbus replay: {total} message(s) from {path}" in done.stderr
        again = _receive(wire, total)
    assert [_key(m) for m in again] == [_key(m) for m in live]


_FOXGLOVE_ENCODINGS = {"mono8": ("u1", 1), "8UC1": ("u1", 1), "rgb8": ("u1", 3),
                       "8UC3": ("u1", 3), "rgba8": ("u1", 4), "mono16": ("<u2", 1),
                       "16UC1": ("<u2", 1), "32FC1": ("<f4", 1)}


def _decode_by_schema(schema: dict[str, Any], value: Any) -> Any:
    """A JSON value decoded by its jsonschema alone: base64 strings become bytes."""
    if schema.get("contentEncoding") == "base64" and isinstance(value, str):
        return base64.b64decode(value)
    if isinstance(value, dict) and "properties" in schema:
        return {k: _decode_by_schema(schema["properties"].get(k, {}), v)
                for k, v in value.items()}
    return value


def _image(body: dict[str, Any]) -> np.ndarray:
    """A foxglove.RawImage as a viewer reads it: from width, height, encoding, step, data."""
    encoding = body["encoding"]
    if encoding in _FOXGLOVE_ENCODINGS:
        dtype, channels = _FOXGLOVE_ENCODINGS[encoding]
    else:  # OpenCV names: <bits><U|S|F>C<channels>, little-endian
        m = re.fullmatch(r"(\d+)([USF])C(\d)", encoding)
        assert m is not None, encoding
        kind = {"U": "u", "S": "i", "F": "f"}[m.group(2)]
        dtype, channels = f"<{kind}{int(m.group(1)) // 8}", int(m.group(3))
    rows = np.frombuffer(body["data"], "u1").reshape(body["height"], body["step"])
    width_bytes = body["width"] * channels * np.dtype(dtype).itemsize
    pixels = np.ascontiguousarray(rows[:, :width_bytes]).view(dtype)
    return pixels.reshape(body["height"], body["width"], channels)


def _record_payloads(procs: list[Proc], broker: str, path: Path) -> list[Message]:
    """Record PAYLOADS to ``path`` with vbus record; the messages as a subscriber saw them."""
    total = len(PAYLOADS)
    rec = start(procs, "record", broker, "rec/**", "-o", str(path), "--count", str(total))
    rec.wait_for("vbus record: recording rec/** at")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("rec/**") as wire:
        pub = bus.publisher()
        for topic, value in PAYLOADS:
            pub.publish(topic, value)
        live = _receive(wire, total)
    assert rec.finish() == 0, "\n".join(rec.rest("err"))
    return live


def test_every_recorded_message_decodes_with_the_files_own_schemas(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    """What Foxglove does: json messages, understood through their channel's jsonschema."""
    path = tmp_path / "foxglove.mcap"
    live = _record_payloads(procs, broker, path)
    _, rows, _ = _read(path)
    assert len(rows) == len(live)
    for (schema, channel, message), msg in zip(rows, live, strict=True):
        assert (schema.encoding, channel.message_encoding) == ("jsonschema", "json")
        own = json.loads(schema.data)
        body = json.loads(message.data)
        jsonschema.validate(body, own)
        decoded = _decode_by_schema(own, body)
        sent = msg.data
        if schema.name == "foxglove.RawImage":
            assert own["title"] == "foxglove.RawImage"
            assert decoded["frame_id"] == msg.topic
            stamp = decoded["timestamp"]
            assert stamp["sec"] * 10**9 + stamp["nsec"] == int(msg.time * 1e9)
            image = _image(decoded)
            assert np.array_equal(image.reshape(sent.shape), sent)
            assert image.dtype == sent.dtype
            assert (decoded["vbus"]["dtype"], decoded["vbus"]["shape"]) == (
                sent.dtype.str, list(sent.shape))
        elif schema.name == "vbus.Array":
            shape = tuple(decoded["shape"])
            descr = decoded["dtype"]
            dtype = np.dtype(descr if isinstance(descr, str)
                             else [tuple(f[:2]) + tuple(tuple(x) for x in f[2:]) for f in descr])
            assert np.array_equal(np.frombuffer(decoded["data"], dtype).reshape(shape), sent)
        elif schema.name == "vbus.Bytes":
            assert decoded["data"] == bytes(sent)
        else:
            assert schema.name == "vbus.Value"
            if "msgpack" in decoded:  # JSON could not carry it: the exact bytes are there
                assert msgspec.msgpack.decode(decoded["msgpack"], strict=False) is not None
                assert decoded["msgpack"] == msgspec.msgpack.encode(sent)
                assert msg.topic == "rec/odd"
            else:
                assert decoded["value"] == sent
    image_topics = {c.topic for s, c, _ in rows if s.name == "foxglove.RawImage"}
    assert image_topics == {"rec/mono16", "rec/rgb", "rec/f8"}
    encodings = {c.topic: json.loads(m.data)["encoding"] for s, c, m in rows
                 if s.name == "foxglove.RawImage"}
    assert encodings == {"rec/mono16": "mono16", "rec/rgb": "rgb8", "rec/f8": "64FC1"}


def test_a_retained_value_is_recorded_as_retained_and_replayed_so(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    frame = np.arange(6, dtype="<f4").reshape(2, 3)
    path = tmp_path / "retained.mcap"
    with vbus.connect(broker, timeout=5.0) as bus:
        pub = bus.publisher()
        pub.publish("ret/frame", frame, retain=True)
        with bus.subscribe("ret/**") as check:  # the broker keeps it: a late joiner gets it
            assert check.recv(timeout=5.0).retained
        done = run("record", broker, "ret/**", "-o", str(path), "--count", "1", "--quiet")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        [(schema, channel, message)] = _read(path)[1]
        body = json.loads(message.data)
        assert (schema.name, channel.topic) == ("foxglove.RawImage", "ret/frame")
        assert body["vbus"]["retained"] is True and body["vbus"]["sender"] == pub.id
    fresh = start(procs, "broker", "--bind", "tcp://127.0.0.1:0").line("out")  # no copy kept
    with vbus.connect(fresh, timeout=5.0) as bus, bus.subscribe("ret/frame") as sub:
        done = run("replay", str(path), "--to", fresh, "--speed", "0", "--quiet")
        assert done.returncode == 0, done.stderr
        again = sub.recv(timeout=WAIT)
    assert (again.sender, again.seq, again.retained) == (pub.id, 1, True)
    assert np.array_equal(again.data, frame) and again.data.dtype == frame.dtype


def test_replay_keeps_the_recorded_timing_scaled_by_speed(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    offsets = [0.0, 0.4, 0.8, 1.2]
    path = tmp_path / "timed.mcap"
    timed_recording(path, offsets)
    with vbus.connect(broker, timeout=5.0) as bus:
        sub = bus.subscribe("timed/x")
        replay = start(procs, "replay", str(path), "--to", broker, "--speed", "3")
        arrivals = []
        received = []
        for _ in offsets:
            msg = sub.recv(timeout=WAIT)
            arrivals.append(time.monotonic())
            received.append((msg.data, msg.seq, msg.sender, msg.time))
        assert replay.finish() == 0
    assert received == [(i, i + 1, "72657061796572ab", 1.7e9 + o) for i, o in enumerate(offsets)]
    since_first = [t - arrivals[0] for t in arrivals]
    # never early (the schedule starts when the first goes out; it may arrive a little late)
    assert all(t >= offset / 3 - 0.05 for t, offset in zip(since_first, offsets, strict=True)), (
        since_first)
    assert since_first[-1] < 1.2 * 0.75, since_first  # faster than recorded: --speed 3


def test_replay_topics_and_start_select_what_is_sent(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "timed.mcap"
    timed_recording(path, [0.0, 0.1, 0.2, 0.3])
    with vbus.connect(broker, timeout=5.0) as bus:
        sub = bus.subscribe("timed/**")
        done = run("replay", str(path), "--to", broker, "--speed", "0", "--start", "0.15")
        assert done.returncode == 0, done.stderr
        assert [sub.recv(timeout=WAIT).data for _ in range(2)] == [2, 3]
        nothing = run("replay", str(path), "--to", broker, "--topics", "other/**")
        assert nothing.returncode == 1 and "no messages to replay on other/**" in nothing.stderr


# -- losses -----------------------------------------------------------------------------------
def _flood(broker: str, topic: str, count: int, value: Any, marker: str,
           seen: Any = None) -> None:
    """``count`` messages as fast as a publisher goes, then ``marker`` until ``seen()`` (or
    a subscriber of ours) says it went through."""
    with vbus.connect(broker, timeout=5.0) as bus:
        done = bus.subscribe(marker)
        pub = bus.publisher()
        for _ in range(count):
            pub.publish(topic, value)
        deadline = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < deadline, "the marker never went through"
            pub.publish(marker, 0)
            try:
                done.recv(timeout=0.2)
            except TimeoutError:
                continue
            if seen is None or seen():
                return


def _gaps(seqs: dict[tuple[str, str], list[int]]) -> dict[str, int]:
    """Per topic, the messages missing between the first and the last seq of each sender."""
    lost: dict[str, int] = {}
    for (topic, _sender), values in seqs.items():
        assert values == sorted(values)
        pairs = zip(values, values[1:], strict=False)
        lost[topic] = lost.get(topic, 0) + sum(b - a - 1 for a, b in pairs)
    return lost


def _reported(lines: list[str], topic: str) -> tuple[int, int]:
    """(received, lost) of ``topic`` in a recorder's or subscriber's summary table."""
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == topic:
            return int(parts[1].replace(",", "")), int(parts[2].replace(",", ""))
    raise AssertionError(f"no summary line for {topic}: {lines}")


def test_record_reports_every_loss_and_the_file_shows_the_same_gaps(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "flood.mcap"
    rec = start(procs, "record", broker, "fl/**", "-o", str(path), "--hwm", "20",
                "--duration", "6")
    rec.wait_for("vbus record: recording fl/** at")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("fl/paced") as paced:
        pub = bus.publisher()
        for _ in range(50_000):
            pub.publish("fl/x", "x" * 1000)
        # Then one message at a time on the same topic until the recorder stops (--duration):
        # those it records after a gap make the gap visible (a loss at the very end is not).
        deadline = time.monotonic() + WAIT
        while rec.popen.poll() is None:
            assert time.monotonic() < deadline, "the recorder did not stop"
            pub.publish("fl/x", "paced")
            pub.publish("fl/paced", 0)
            with contextlib.suppress(TimeoutError):
                paced.recv(timeout=0.2)  # a round trip: the broker forwarded both
    assert rec.finish() == 1  # something was lost
    err = rec.err_lines + rec.rest("err")

    summary, rows, meta = _read(path)
    seqs: dict[tuple[str, str], list[int]] = {}
    loss_records: dict[str, int] = {}
    for _, channel, message in rows:
        body = json.loads(message.data)
        if channel.topic == "$vbus/loss":
            loss_records[body["topic"]] = loss_records.get(body["topic"], 0) + body["lost"]
        else:
            seqs.setdefault((channel.topic, body["vbus"]["sender"]), []).append(
                body["vbus"]["seq"])
    found = _gaps(seqs)
    assert found["fl/x"] > 0, "the flood lost nothing: the test proves nothing"
    topics = json.loads(meta["vbus.summary"]["topics"])
    info = run("info", str(path))
    assert info.returncode == 0, info.stderr
    for topic in ("fl/x", "fl/paced"):
        received, lost = _reported(err, topic)  # the summary at exit
        # reported at exit = gaps in the file = its $vbus/loss records = its summary record
        assert lost == found[topic] == loss_records.get(topic, 0), topic
        assert received == sum(len(v) for k, v in seqs.items() if k[0] == topic)
        assert topics[topic] == {"received": received, "lost": lost}
        assert re.search(rf"^{topic}\s+{received:,}\s+{lost:,}\s+vbus.Value$", info.stdout,
                         re.M), info.stdout
    total = sum(found.values())
    assert any(f"LOST {total:,} message(s)" in line for line in err), err
    assert meta["vbus.summary"]["lost"] == str(total)
    assert f"lost       {total:,}" in info.stdout


class HeldProc(Proc):
    """A vbus subprocess whose stdout is not read until ``release()``: once the pipe is full
    it blocks on its writes, as behind a slow terminal."""

    def __init__(self, *args: str) -> None:
        self._release = threading.Event()
        super().__init__(*args)

    def _pump(self, stream: Any, into: Any) -> None:  # type: ignore[override]
        if stream is self.popen.stdout:
            self._release.wait(WAIT * 3)
        Proc._pump(stream, into)

    def release(self) -> None:
        self._release.set()


def test_sub_reports_every_loss_and_its_output_shows_the_same_gaps(
    procs: list[Proc], broker: str
) -> None:
    sub = HeldProc("sub", broker, "fl/**", "--json", "--hwm", "20")
    procs.append(sub)
    sub.wait_for(f"subscribed to fl/** at {broker}")
    # stdout is not read: the pipe fills, vbus sub blocks printing, its queues overflow
    with vbus.connect(broker, timeout=5.0) as bus:
        pub = bus.publisher()
        for _ in range(20_000):
            pub.publish("fl/x", "y" * 5000)  # unbatched: each one a ZeroMQ message
        sub.release()
        lines: list[str] = []
        deadline = time.monotonic() + WAIT
        # the marker rides on the same topic: a gap before it is a gap vbus sub can see
        while not any('"data":"marker"' in line for line in lines[-50:]):
            assert time.monotonic() < deadline, "vbus sub never printed the marker"
            pub.publish("fl/x", "marker")
            try:
                while True:
                    line = sub.out.get(timeout=0.1)
                    assert line is not None, "vbus sub ended"
                    lines.append(line)
            except queue.Empty:
                pass
    sub.popen.send_signal(signal.SIGINT)
    rc = sub.finish()
    lines += sub.rest("out")
    err = sub.err_lines + sub.rest("err")
    assert rc == 1, (err, len(lines))
    seqs: dict[tuple[str, str], list[int]] = {}
    for line in lines:
        m = json.loads(line)
        seqs.setdefault((m["topic"], m["sender"]), []).append(m["seq"])
    found = _gaps(seqs)
    assert found["fl/x"] > 0, "the flood lost nothing: the test proves nothing"
    received, lost = _reported(err, "fl/x")
    assert (received, lost) == (sum(len(v) for k, v in seqs.items() if k[0] == "fl/x"),
                                found["fl/x"])
    total = sum(found.values())
    assert any(f"vbus sub: LOST {total:,} message(s)" in line for line in err), err
    assert any("so far" in line for line in err), err  # the running count


# -- CRCs -------------------------------------------------------------------------------------
def _chunked_recording(procs: list[Proc], broker: str, path: Path) -> list[Message]:
    """Frames of random data (they do not compress): a recording of several chunks."""
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 65535, (64, 64), dtype="<u2") for _ in range(300)]
    rec = start(procs, "record", broker, "crc/**", "-o", str(path), "--count", "300")
    rec.wait_for("vbus record: recording")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("crc/**") as wire:
        pub = bus.publisher()
        for frame in frames:
            pub.publish("crc/frame", frame)
        live = _receive(wire, len(frames))
    assert rec.finish() == 0, rec.rest("err")
    return live


def _messages_per_chunk(path: Path) -> list[int]:
    from mcap.records import Message as McapMessage

    with _mcap.RecordingReader(str(path)) as reader:
        return [sum(isinstance(r, McapMessage) for r in c.records) for c in reader.chunks()]


def test_replay_checks_every_crc_names_the_bad_chunk_and_sends_nothing(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "crc.mcap"
    live = _chunked_recording(procs, broker, path)
    per_chunk = _messages_per_chunk(path)
    assert len(per_chunk) >= 3 and sum(per_chunk) == len(live)
    summary = _read(path)[0]
    chunk = sorted(summary.chunk_indexes, key=lambda c: c.chunk_start_offset)[1]
    damage_at = chunk.chunk_start_offset + chunk.chunk_length // 2
    data = bytearray(path.read_bytes())
    data[damage_at:damage_at + 5000] = b"\x55" * 5000
    path.write_bytes(bytes(data))

    with vbus.connect(broker, timeout=5.0) as bus:
        sub = bus.subscribe("crc/**")
        done = run("replay", str(path), "--to", broker, "--speed", "0")
        assert done.returncode == 1
        [line] = done.stderr.splitlines()
        assert line.startswith("vbus replay: error: ") and "1 of" in line, line
        assert f"chunk 2 at byte {chunk.chunk_start_offset}" in line, line
        assert "nothing sent" in line and "--skip-bad-chunks" in line
        bus.publisher().publish("crc/marker", "after")
        first = sub.recv(timeout=WAIT)
        assert (first.topic, first.data) == ("crc/marker", "after")  # nothing came before

        info = run("info", str(path))
        assert info.returncode == 1 and "1 DAMAGED" in info.stdout
        assert f"chunk 2 at byte {chunk.chunk_start_offset}" in info.stdout

        done = run("replay", str(path), "--to", broker, "--speed", "0", "--skip-bad-chunks")
        assert done.returncode == 1, done.stderr
        assert "skipped chunk 2" in done.stderr and "1 of" in done.stderr
        kept = len(live) - per_chunk[1]
        assert f"vbus replay: {kept} message(s)" in done.stderr
        again = _receive(sub, kept)
    expected = live[:per_chunk[0]] + live[per_chunk[0] + per_chunk[1]:]
    assert [_key(m) for m in again] == [_key(m) for m in expected]


def test_a_killed_recorders_file_is_shown_and_replayed_up_to_where_it_breaks_off(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "killed.mcap"
    rng = np.random.default_rng(3)
    rec = start(procs, "record", broker, "kill/**", "-o", str(path))
    rec.wait_for("vbus record: recording")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("kill/**") as wire:
        pub = bus.publisher()
        for _ in range(300):  # about 3 MB of JSON: the first chunks are written
            pub.publish("kill/frame", rng.integers(0, 65535, (64, 64), dtype="<u2"))
        _receive(wire, 300)
        partial = tmp_path / "killed.mcap.part"
        deadline = time.monotonic() + WAIT
        while partial.stat().st_size < 2 * 1024 * 1024:  # written as chunks fill up
            assert time.monotonic() < deadline, "the recorder wrote no chunks"
            pub.publish("kill/frame", rng.integers(0, 65535, (64, 64), dtype="<u2"))
            wire.recv(timeout=WAIT)
        rec.popen.kill()
        rec.finish()
        info = run("info", str(partial))
        assert info.returncode == 0, info.stdout
        assert "unfinished the recorder did not finish" in info.stdout
        found = re.search(r"^messages\s+([\d,]+)$", info.stdout, re.M)
        assert found, info.stdout
        count = int(found[1].replace(",", ""))
        assert count > 0
        done = run("replay", str(partial), "--to", broker, "--speed", "0")
        assert done.returncode == 0, done.stderr
        assert "ends early" in done.stderr and f"{count} message(s)" in done.stderr
        seqs = [wire.recv(timeout=WAIT).seq for _ in range(count)]
    assert seqs == list(range(1, count + 1))


def test_replay_loop_plays_again_until_ctrl_c(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "loop.mcap"
    timed_recording(path, [0.0, 0.01])
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("timed/x") as sub:
        replay = start(procs, "replay", str(path), "--to", broker, "--loop", "--speed", "0")
        got = [sub.recv(timeout=WAIT).data for _ in range(6)]
        replay.popen.send_signal(signal.SIGINT)
        assert replay.finish() == 0
    assert got == [0, 1, 0, 1, 0, 1]


def test_record_exclude_leaves_topics_out(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "exclude.mcap"
    rec = start(procs, "record", broker, "ex/**", "-o", str(path), "--count", "2",
                "--exclude", "ex/skip/**")
    rec.wait_for("vbus record: recording")
    with vbus.connect(broker, timeout=5.0) as bus:
        pub = bus.publisher()
        pub.publish("ex/skip/a", 1)
        pub.publish("ex/keep", 2)
        pub.publish("ex/skip/b", 3)
        pub.publish("ex/keep", 4)
        assert rec.finish() == 0
    _, rows, meta = _read(path)
    assert [(c.topic, json.loads(m.data)["value"]) for _, c, m in rows] == [
        ("ex/keep", 2), ("ex/keep", 4)]
    assert meta["vbus"]["exclude"] == "ex/skip/**"
