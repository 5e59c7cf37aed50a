"""Delivery, topics and payloads through a real broker."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest

import vbus


class State(msgspec.Struct, frozen=True):
    x: float
    moving: bool = False


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_publish_then_receive(any_bus: vbus.Bus) -> None:
    pub = any_bus.publisher()
    sub = any_bus.subscribe("stage/*")
    pub.publish("stage/x", 1.25)
    msg = sub.recv(timeout=2.0)
    assert (msg.topic, msg.data, msg.seq, msg.retained) == ("stage/x", 1.25, 1, False)
    assert msg.sender == pub.id
    assert abs(msg.time - __import__("time").time()) < 5.0


def test_exact_topic_never_sees_siblings_or_children(bus: vbus.Bus) -> None:
    pub = bus.publisher()
    exact = bus.subscribe("camera")
    siblings = ("camera2", "camera/x", "camera.raw", "camer", "camera/x/y")
    for value in ("first", "marker"):  # one publisher's messages arrive in publish order
        for topic in siblings:
            pub.publish(topic, value)
        pub.publish("camera", value)
    got = [exact.recv(timeout=2.0) for _ in range(2)]
    # A sibling would have come before either: the marker proves none did.
    assert [(m.topic, m.data) for m in got] == [("camera", "first"), ("camera", "marker")]


@pytest.mark.parametrize(
    ("pattern", "marker", "expected"),
    [
        ("camera/*/frame", "camera/m/frame", ["camera/a/frame", "camera/b/frame"]),
        ("camera/**", "camera/m", ["camera", "camera/a/frame", "camera/b/frame", "camera/a/b/c"]),
        ("**", "m", ["camera", "camera/a/frame", "camera/b/frame", "camera/a/b/c", "camera2",
                     "x"]),
        ("*", "m", ["camera", "camera2", "x"]),
        ("**/frame", "m/frame", ["camera/a/frame", "camera/b/frame"]),
    ],
)
def test_wildcards(bus: vbus.Bus, pattern: str, marker: str, expected: list[str]) -> None:
    topics = ["camera", "camera/a/frame", "camera/b/frame", "camera/a/b/c", "camera2", "x"]
    sub = bus.subscribe(pattern)
    pub = bus.publisher()
    for topic in topics:
        pub.publish(topic, 0)
    pub.publish(marker, "marker")  # last: whatever matched was delivered before it
    got = []
    while (msg := sub.recv(timeout=2.0)).data != "marker":
        got.append(msg.topic)
    assert got == expected  # in publish order, across topics


def test_reserved_topics_only_for_patterns_that_ask(bus: vbus.Bus) -> None:
    everything = bus.subscribe("**")
    reserved = bus.subscribe("$vbus/**")
    pub = bus.publisher()
    with pytest.raises(vbus.TopicError, match="reserved"):
        pub.publish("$vbus/stats", 1)
    pub.publish("a", 1)
    assert everything.recv(timeout=2.0).topic == "a"
    topics = set()
    while "$vbus/stats" not in topics:  # published once a second
        topics.add(reserved.recv(timeout=3.0).topic)
    assert all(t.startswith("$vbus/") for t in topics)
    assert everything.stats().invalid == 0
    # The broker sent that $vbus/stats to every subscriber it matched before `reserved` had
    # it, so to `everything` before this marker: the marker coming next proves it did not.
    pub.publish("b", "marker")
    assert (everything.recv(timeout=2.0).topic, everything.stats().received) == ("b", 2)


@pytest.mark.parametrize("bad", ["", "/a", "a/", "a//b", "a b", "a/*", "caf\u00e9", 3])
def test_bad_topic_raises_before_sending(bus: vbus.Bus, bad: object) -> None:
    pub = bus.publisher()
    sub = bus.subscribe("**")
    with pytest.raises(vbus.TopicError) as info:
        pub.publish(bad, 1)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    pub.publish("ok", 1)
    msg = sub.recv(timeout=2.0)
    assert (msg.topic, msg.seq) == ("ok", 1)  # nothing was sent before, no seq was spent


@pytest.mark.parametrize(("bad", "named"), [
    ("a/b*", "'b*' mixes '*' with text"),
    ("a/**b/c", "'**b' mixes '*' with text"),
    ("**x", "'**x' mixes '*' with text"),
    ("a//b", "empty level at position 2"),
    ("/a", "leading or trailing '/'"),
    ("x y", "level 'x y' contains ' '"),
])
def test_bad_pattern_raises_naming_the_part(bus: vbus.Bus, bad: str, named: str) -> None:
    with pytest.raises(vbus.TopicError) as info:
        bus.subscribe(bad)
    assert str(info.value) == f"pattern {bad!r}: " + named + (
        "; wildcards must be a whole level" if "mixes" in named else
        "; allowed are letters, digits and _ - . :" if "contains" in named else "")


def test_unencodable_payload_raises_and_sends_nothing(bus: vbus.Bus) -> None:
    pub = bus.publisher()
    sub = bus.subscribe("t")
    with pytest.raises(vbus.EncodeError, match="object"):
        pub.publish("t", object())
    pub.publish("t", "fine")
    msg = sub.recv(timeout=2.0)
    assert (msg.data, msg.seq) == ("fine", 1)
    assert pub.stats().published == 1


def test_structs_dataclasses_and_typed_decoding(bus: vbus.Bus) -> None:
    pub = bus.publisher()
    raw = bus.subscribe("stage/state")
    typed = bus.subscribe("stage/state", type=State)
    pub.publish("stage/state", State(1.5, True))
    pub.publish("stage/state", {"x": "not a number"})
    pub.publish("stage/state", Point(1, 2))
    pub.publish("stage/state", State(2.5))
    assert raw.recv(timeout=2.0).data == {"x": 1.5, "moving": True}
    assert typed.recv(timeout=2.0).data == State(1.5, True)
    # the bad one is skipped and counted, iteration goes on; a dataclass with a compatible
    # shape validates (msgspec ignores unknown fields)
    assert typed.recv(timeout=2.0).data == State(1.0)
    assert typed.recv(timeout=2.0).data == State(2.5)
    assert typed.stats().errors == 1
    assert typed.stats().received == 3
    assert [raw.recv(timeout=2.0).data for _ in range(3)] == [
        {"x": "not a number"}, {"x": 1, "y": 2}, {"x": 2.5, "moving": False}
    ]


@pytest.mark.parametrize("size", [16, 1 << 20])
def test_bytes_and_memoryview(bus: vbus.Bus, size: int) -> None:
    pub = bus.publisher()
    sub = bus.subscribe("blob")
    payload = bytes(range(256)) * (size // 256 or 1)
    pub.publish("blob", payload)
    pub.publish("blob", memoryview(bytearray(payload)))
    for _ in range(2):
        data = sub.recv(timeout=2.0).data
        assert isinstance(data, memoryview) and data.readonly
        assert data == payload


def test_numpy_round_trip_and_zero_copy_in_process(bus: vbus.Bus) -> None:
    pub = bus.publisher()
    sub = bus.subscribe("camera/frame")
    big = np.arange(1024 * 1024, dtype=np.uint16).reshape(1024, 1024)
    small = np.array([[1.5, 2.5]], dtype=">f4")
    pub.publish("camera/frame", big)
    pub.publish("camera/frame", small)
    pub.publish("camera/frame", np.float32(3.5))
    got = sub.recv(timeout=2.0).data
    assert got.dtype == big.dtype and got.shape == big.shape
    assert not got.flags.writeable
    assert np.shares_memory(got, big), "in-process frames must arrive without a copy"
    got_small = sub.recv(timeout=2.0).data
    assert got_small.dtype == np.dtype(">f4") and np.array_equal(got_small, small)
    assert sub.recv(timeout=2.0).data == 3.5


def test_numpy_across_processes_keeps_dtype_and_shape(any_bus: vbus.Bus) -> None:
    pub = any_bus.publisher()
    sub = any_bus.subscribe("camera/frame")
    frame = np.random.default_rng(1).integers(0, 4096, size=(480, 640), dtype=np.uint16)
    pub.publish("camera/frame", frame)
    got = sub.recv(timeout=2.0).data
    assert np.array_equal(got, frame) and got.dtype == frame.dtype


def test_order_per_publisher_and_topic(any_bus: vbus.Bus) -> None:
    pub = any_bus.publisher()
    sub = any_bus.subscribe("seq/**", hwm=100_000)
    n = 5000
    for i in range(n):
        pub.publish("seq/a", i)
        pub.publish("seq/b", -i)
    a = [m.data for m in (sub.recv(timeout=2.0) for _ in range(2 * n)) if m.topic == "seq/a"]
    assert a == list(range(n))
    assert sub.stats().dropped == 0


def test_message_is_immutable(bus: vbus.Bus) -> None:
    pub = bus.publisher()
    sub = bus.subscribe("t")
    pub.publish("t", 1)
    msg = sub.recv(timeout=2.0)
    with pytest.raises(AttributeError):
        msg.data = 2  # type: ignore[misc]


def test_async_publisher_and_subscriber(any_bus: vbus.Bus) -> None:
    import asyncio

    async def main() -> list[int]:
        apub = any_bus.async_publisher()
        async with any_bus.async_subscribe("a/b") as asub:
            for i in range(100):
                await apub.publish("a/b", {"k": i})
            got = []
            await apub.publish("a/b", {"k": "marker"})
            async for msg in asub:
                if msg.data["k"] == "marker":
                    break  # published last: nothing after the 100 came before it
                got.append(msg.data["k"])
        assert asub.closed
        apub.close()
        return got

    assert asyncio.run(main()) == list(range(100))
