"""Unit tests of vbus._proto.endpoints: an address names both broker endpoints."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbus._errors import VbusError
from vbus._proto.endpoints import AddressError, Endpoints, parse_address, tcp_with_port


@pytest.mark.parametrize(
    ("address", "publish", "subscribe"),
    [
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"),
        ("tcp://localhost:6000", "tcp://localhost:6000", "tcp://localhost:6001"),
        ("tcp://0.0.0.0:1", "tcp://0.0.0.0:1", "tcp://0.0.0.0:2"),
        ("tcp://*:7000", "tcp://*:7000", "tcp://*:7001"),
        ("tcp://[::1]:5555", "tcp://[::1]:5555", "tcp://[::1]:5556"),
        ("tcp://host.example.org:65534", "tcp://host.example.org:65534",
         "tcp://host.example.org:65535"),
        ("tcp://eth0:9999", "tcp://eth0:9999", "tcp://eth0:10000"),
    ],
)  # fmt: skip
def test_tcp_subscribers_use_the_next_port(address: str, publish: str, subscribe: str) -> None:
    ep = parse_address(address)
    assert ep == Endpoints(address, publish, subscribe)
    assert ep.is_network


@pytest.mark.parametrize(
    ("address", "zero"),
    [
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        ("tcp://127.0.0.1:*", "tcp://127.0.0.1:0"),
        ("tcp://[::1]:0", "tcp://[::1]:0"),
        ("tcp://*:*", "tcp://*:0"),
    ],
)
def test_tcp_port_zero_leaves_both_ports_to_the_system(address: str, zero: str) -> None:
    ep = parse_address(address)
    assert (ep.address, ep.publish, ep.subscribe) == (zero, zero, zero)


@pytest.mark.parametrize(
    "address",
    ["ipc:///tmp/vbus", "ipc://relative/path", "ipc://@abstract", "ipc:///tmp/a b/c.sock"],
)
def test_ipc_subscribers_use_path_dot_sub(address: str) -> None:
    ep = parse_address(address)
    assert ep == Endpoints(address, address, address + ".sub")


@pytest.mark.parametrize("address", ["inproc://vbus", "inproc://bus-1/x", "inproc://a.b"])
def test_inproc_subscribers_use_name_dot_sub(address: str) -> None:
    ep = parse_address(address)
    assert ep == Endpoints(address, address, address + ".sub")
    assert not ep.is_network


@pytest.mark.parametrize(
    "address",
    [
        "",
        "localhost:5555",
        "127.0.0.1",
        "tcp://",
        "tcp://host",
        "tcp://host:",
        "tcp://:5555",
        "tcp://host:port",
        "tcp://host:55x5",
        "tcp://host:-1",
        "tcp://host:+1",
        "tcp://host:5555/path",
        "tcp://host:5555 ",
        " tcp://host:5555",
        "tcp://host:5555:6",
        "tcp://ho/st:5555",
        "tcp://[::1:5555",
        "tcp://::1:5555",
        "tcp://host:65535",  # its subscriber port would be 65536
        "tcp://host:65536",
        "tcp://host:99999999999999999999",
        "ipc://",
        "inproc://",
        "udp://host:5555",
        "pgm://eth0;239.192.1.1:5555",
        "http://host:80",
        "inproc:/x",
    ],
)
def test_bad_addresses_raise_address_error_naming_the_address(address: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(address)
    assert repr(address) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, VbusError)


@pytest.mark.parametrize("value", [None, 5555, b"tcp://127.0.0.1:5555", ["inproc://x"]])
def test_non_str_address_raises_address_error_naming_the_type(value: object) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(value)
    assert type(value).__name__ in str(info.value)


def test_address_error_is_exported() -> None:
    import vbus

    assert vbus.AddressError is AddressError


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        ("tcp://127.0.0.1:0", 40000,
         Endpoints("tcp://127.0.0.1:40000", "tcp://127.0.0.1:40000", "tcp://127.0.0.1:40001")),
        ("tcp://[::1]:0", 5555, Endpoints("tcp://[::1]:5555", "tcp://[::1]:5555", "tcp://[::1]:5556")),
        ("tcp://*:0", 1234, Endpoints("tcp://*:1234", "tcp://*:1234", "tcp://*:1235")),
    ],
)  # fmt: skip
def test_tcp_with_port_fills_in_the_picked_port(
    address: str, port: int, expected: Endpoints
) -> None:
    assert tcp_with_port(address, port) == expected


def test_tcp_with_port_rejects_the_last_port() -> None:
    with pytest.raises(AddressError):
        tcp_with_port("tcp://127.0.0.1:0", 65535)


def test_endpoints_are_immutable() -> None:
    ep = parse_address("inproc://x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ep.publish = "inproc://y"  # type: ignore[misc]


hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "*", "[::1]", "[fe80::1%eth0]", "eth0"]),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
)


@given(hosts, st.integers(1, 65534))
def test_any_tcp_port_maps_to_port_and_port_plus_one(host: str, port: int) -> None:
    address = f"tcp://{host}:{port}"
    ep = parse_address(address)
    assert ep.address == address
    assert ep.publish == address
    assert ep.subscribe == f"tcp://{host}:{port + 1}"


@given(hosts, st.integers(65535, 10**12))
def test_tcp_ports_out_of_range_are_rejected(host: str, port: int) -> None:
    address = f"tcp://{host}:{port}"
    with pytest.raises(AddressError, match="port") as info:
        parse_address(address)
    assert repr(address) in str(info.value)


@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_address_error(text: str) -> None:
    try:
        ep = parse_address(text)
    except AddressError as exc:
        assert repr(text) in str(exc)
        return
    assert ep.publish.startswith(("tcp://", "ipc://", "inproc://"))
    assert ep.subscribe != ep.publish or ep.publish.endswith(":0")


# -- the one exposure rule (API warning and CLI refusal alike) ---------------------------------
EXPOSURE = [
    ("tcp://127.0.0.1:5555", False),
    ("tcp://127.1.2.3:5555", False),  # all of 127.0.0.0/8 is loopback
    ("tcp://[::1]:5555", False),
    ("tcp://[::ffff:127.0.0.1]:5555", False),  # v4-mapped loopback
    ("tcp://localhost:5555", False),
    ("tcp://LOCALHOST:5555", False),
    ("tcp://db.localhost:5555", False),  # RFC 6761: *.localhost is loopback
    ("tcp://localhost.example.com:5555", True),  # a name that merely starts like one
    ("tcp://127.attacker.example:5555", True),  # a name, not a literal address
    ("tcp://0.0.0.0:5555", True),
    ("tcp://*:5555", True),
    ("tcp://[::]:5555", True),
    ("tcp://192.168.1.20:5555", True),
    ("tcp://10.0.0.1:5555", True),
    ("tcp://[fe80::1%eth0]:5555", True),
    ("tcp://lo:5555", True),  # an interface name: what ZeroMQ binds depends on the host
    ("tcp://eth0:5555", True),
    ("tcp://example.org:5555", True),
    ("ipc:///tmp/vbus", False),
    ("inproc://vbus", False),
]


@pytest.mark.parametrize(("address", "exposed"), EXPOSURE)
def test_one_exposure_rule_for_api_and_cli(address: str, exposed: bool) -> None:
    from vbus._cli.broker import network_exposed
    from vbus._proto.endpoints import is_exposed, is_loopback

    assert is_exposed(address) is exposed
    assert is_loopback(parse_address(address)) is not exposed  # what Bus() warns on
    assert network_exposed(address) is exposed  # what `vbus broker` refuses


def test_a_name_is_loopback_only_if_the_hosts_file_maps_it_to_loopback_only(
        tmp_path: pathlib.Path) -> None:
    from vbus._proto.endpoints import is_exposed

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 here  # comment\n::1 here\n127.0.0.1 both\n"
                     "10.1.1.1 both\n10.2.2.2 lan\n# 127.0.0.1 commented\n")
    assert not is_exposed("tcp://here:1", str(hosts))
    assert not is_exposed("tcp://HERE.:1", str(hosts))
    assert is_exposed("tcp://both:1", str(hosts))  # resolves to loopback and beyond
    assert is_exposed("tcp://lan:1", str(hosts))
    assert is_exposed("tcp://commented:1", str(hosts))
    assert is_exposed("tcp://here:1", str(tmp_path / "missing"))
