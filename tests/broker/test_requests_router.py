"""The broker's request router and the request/reply frames, on bytes alone."""

from __future__ import annotations

import inspect
import pickle

import msgspec
import pytest

import vbus
from vbus._broker import requests as router_mod
from vbus._proto import requests as proto
from vbus._proto import wire as _wire
from vbus._proto.stats import RouterStats

BROKER = bytes.fromhex("a1b2c3d4") * 2
REQUESTER = "0123456789abcdef"
S1, S2, S3 = "1" * 16, "2" * 16, "3" * 16


def _request(topic: str, rid: int, data: object = 1.25, requester: str = REQUESTER) -> bytes:
    payload = _wire.encode_payload(data, _wire.new_encoder())
    frame, _ = _wire.build_frames(proto.request_prefix(topic), 0, bytes.fromhex(requester),
                                  rid, 1700000000.5, payload)
    return frame


def _router(*servers: tuple[str, str]) -> router_mod.RequestRouter:
    router = router_mod.RequestRouter(BROKER)
    for topic, server in servers:
        assert router.subscription(True, proto.marker(topic, server))
    return router


def _routed_to(router: router_mod.RequestRouter) -> list[str]:
    out = []
    for frames in router.take():
        env = _wire.parse_envelope(bytes(frames[0]))
        assert env.topic.startswith("$vbus/serve/")
        out.append(env.topic.removeprefix("$vbus/serve/"))
    return out


def test_requests_go_round_robin_to_the_servers_of_their_topic() -> None:
    router = _router(("stage/move", S1), ("stage/move", S2), ("other", S3))
    for rid in range(1, 7):
        router.request(_request("stage/move", rid), [])
    assert _routed_to(router) == [S1, S2, S1, S2, S1, S2]
    assert router.stats().routed == 6


def test_the_forwarded_request_keeps_header_and_payload_byte_for_byte() -> None:
    router = _router(("stage/move", S1))
    request = _request("stage/move", 7, {"x": 1.0})
    external = memoryview(b"\0" * 100_000)
    router.request(request, [external])
    (frames,) = router.take()
    assert frames[0] == proto.serve_prefix(S1) + request[len(proto.request_prefix("stage/move")):]
    assert frames[1] is external  # the data frame travels as it came
    env = _wire.parse_envelope(bytes(frames[0]))
    assert (env.sender.hex(), env.seq) == (REQUESTER, 7)


def test_nobody_serving_is_answered_at_once_on_the_requesters_reply_topic() -> None:
    router = _router(("stage/move", S1))
    router.request(_request("stage/stop", 3), [])
    (frames,) = router.take()
    assert len(frames) == 1
    env = _wire.parse_envelope(frames[0])
    assert env.topic == f"$vbus/reply/{REQUESTER}/none"
    assert env.seq == 3 and env.sender == BROKER
    assert router.stats().no_responder == 1


def test_a_server_that_goes_is_no_longer_picked_and_the_rotation_goes_on() -> None:
    router = _router(("t", S1), ("t", S2), ("t", S3))
    router.request(_request("t", 1), [])
    router.request(_request("t", 2), [])  # S1, S2: S3 is next
    router.subscription(False, proto.marker("t", S1))
    router.request(_request("t", 3), [])
    router.request(_request("t", 4), [])
    assert _routed_to(router) == [S1, S2, S3, S2]
    router.subscription(False, proto.marker("t", S2))
    router.subscription(False, proto.marker("t", S3))
    router.request(_request("t", 5), [])
    assert _wire.parse_envelope(router.take()[0][0]).topic.endswith("/none")
    assert router.stats().servers == 0


def test_a_subscription_sent_again_after_a_reconnect_does_not_double_a_server() -> None:
    router = _router(("t", S1), ("t", S1), ("t", S2))
    for rid in range(1, 5):
        router.request(_request("t", rid), [])
    assert _routed_to(router) == [S1, S2, S1, S2]


def test_other_subscriptions_are_left_to_the_service() -> None:
    router = router_mod.RequestRouter(BROKER)
    assert not router.subscription(True, b"\xffvbus/ready/0123456789abcdef\0")
    assert not router.subscription(True, b"stage/x\0")


@pytest.mark.parametrize("body", [
    proto.MARKER + b"t\0" + b"1" * 15,  # short id
    proto.MARKER + b"t\0" + b"X" * 16,  # not lowercase hex
    proto.MARKER + b"t" + b"1" * 16,  # no separator
    proto.MARKER + b"$vbus/x\0" + b"1" * 16,  # reserved topic
    proto.MARKER + b"a//b\0" + b"1" * 16,  # bad topic
    proto.MARKER + b"\xff\0" + b"1" * 16,  # not ASCII
])
def test_malformed_markers_are_counted_and_ignored(body: bytes) -> None:
    router = router_mod.RequestRouter(BROKER)
    assert router.subscription(True, body)
    assert router.stats() == RouterStats(0, 0, 0, 1, 0, 0)


@pytest.mark.parametrize("frame", [
    b"$vbus/req/t",  # no terminator
    b"$vbus/req/t\0" + b"\x01" * 5,  # short header
    b"$vbus/req/\0" + _request("t", 1)[len(b"$vbus/req/t\0"):],  # no topic
    _request("t", 0),  # request id 0 is not a request
    b"$vbus/req/t\0\x02" + _request("t", 1)[len(b"$vbus/req/t\0") + 1:],  # version 2
])
def test_garbage_requests_are_counted_and_get_no_answer(frame: bytes) -> None:
    router = _router(("t", S1))
    router.request(frame, [])
    assert router.take() == []
    assert router.stats().invalid == 1


def test_state_is_bounded_in_servers() -> None:
    router = router_mod.RequestRouter(BROKER, max_servers=2)
    for i in range(5):
        router.subscription(True, proto.marker(f"t{i}", f"{i:016x}"))
    stats = router.stats()
    assert (stats.servers, stats.refused) == (2, 3)
    router.subscription(False, proto.marker("t0", f"{0:016x}"))
    router.subscription(True, proto.marker("t9", f"{9:016x}"))
    assert router.servers("t9") == [f"{9:016x}"]


def test_frames_as_documented_in_protocol_md() -> None:
    # docs/protocol.md, "Request and reply", shows these bytes.
    assert proto.marker("stage/move", S1) == b"\xfdvbus/serve/stage/move\x00" + S1.encode()
    request = _request("stage/move", 1, {"x": 1.0})
    assert request.hex(" ") == (
        "24 76 62 75 73 2f 72 65 71 2f 73 74 61 67 65 2f 6d 6f 76 65 00 "
        "01 00 00 00 01 23 45 67 89 ab cd ef 01 00 00 00 00 00 00 00 "
        "00 00 20 40 fc 54 d9 41 81 a1 78 cb 3f f0 00 00 00 00 00 00"
    )
    error = proto.error_payload("ValueError", "bad")
    assert error.inline == msgspec.msgpack.encode({"type": "ValueError", "message": "bad"})
    assert proto.reply_prefix(REQUESTER, "ok") == b"$vbus/reply/0123456789abcdef/ok\0"


def test_remote_error_names_type_and_text_and_survives_pickling() -> None:
    err = vbus.RemoteError("stage/move", "ValueError", "x out of range")
    assert "ValueError" in str(err) and "x out of range" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (again.topic, again.type_name, again.text) == ("stage/move", "ValueError",
                                                          "x out of range")
    assert issubclass(vbus.RemoteError, vbus.VbusError)
    assert issubclass(vbus.NoResponder, vbus.VbusError)


def test_request_and_async_request_are_twins() -> None:
    s = inspect.signature(vbus.Bus.request)
    a = inspect.signature(vbus.Bus.async_request)
    assert s.parameters.keys() == a.parameters.keys()
    assert [p.default for p in s.parameters.values()] == [
        p.default for p in a.parameters.values()]
    assert inspect.iscoroutinefunction(vbus.Bus.async_request)
    assert not inspect.iscoroutinefunction(vbus.Bus.request)


def test_stats_for_the_brokers_stats_topic() -> None:
    router = _router(("t", S1))
    router.request(_request("t", 1), [])
    router.request(_request("u", 2), [])
    assert msgspec.to_builtins(router.stats()) == {
        "servers": 1, "routed": 1, "no_responder": 1, "invalid": 0, "refused": 0, "dropped": 0}
