"""Addresses, sans-io: one address string names a broker's two endpoints.

A broker listens with two sockets: publishers connect to the address itself, subscribers to
its twin: the next port for tcp (``tcp://host:5555`` -> ``tcp://host:5556``), the path plus
``.sub`` for ipc and inproc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import VbusError


class AddressError(VbusError, ValueError):
    """An address is malformed, or cannot be bound."""


_TCP = re.compile(r"tcp://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d+|\*)")
SUBSCRIBE_SUFFIX = ".sub"


@dataclass(frozen=True)
class Endpoints:
    address: str
    publish: str  # publishers connect here (the broker's XSUB)
    subscribe: str  # subscribers connect here (the broker's XPUB)

    @property
    def is_network(self) -> bool:
        return not self.address.startswith("inproc://")


def parse_address(address: object) -> Endpoints:
    """The two endpoints behind ``address``; AddressError names what is wrong with it."""
    if not isinstance(address, str):
        raise AddressError(f"address must be a str, not {type(address).__name__}")
    if address.startswith("tcp://"):
        m = _TCP.fullmatch(address)
        if m is None:
            raise AddressError(f"bad address {address!r}: expected tcp://HOST:PORT")
        port_text = m.group("port")
        if port_text == "*":
            port_text = "0"
        port = int(port_text)
        if not 0 <= port <= 65534:
            raise AddressError(f"bad address {address!r}: port must be 0..65534 (uses PORT+1 too)")
        host = m.group("host")
        if port == 0:
            return Endpoints(f"tcp://{host}:0", f"tcp://{host}:0", f"tcp://{host}:0")
        return Endpoints(address, f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}")
    for scheme in ("ipc://", "inproc://"):
        if address.startswith(scheme):
            if len(address) == len(scheme):
                raise AddressError(f"bad address {address!r}: empty path")
            return Endpoints(address, address, address + SUBSCRIBE_SUFFIX)
    raise AddressError(
        f"bad address {address!r}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    )


def tcp_with_port(address: str, port: int) -> Endpoints:
    """The endpoints of a tcp address whose port was picked by the system."""
    host = address[len("tcp://") : address.rindex(":")]
    return parse_address(f"tcp://{host}:{port}")


_LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


def is_loopback(endpoints: Endpoints) -> bool:
    """True unless the address is tcp on a host other machines may reach."""
    if not endpoints.address.startswith("tcp://"):
        return True  # ipc and inproc stay on this machine
    host = endpoints.address[len("tcp://") : endpoints.address.rindex(":")]
    return host.startswith(_LOOPBACK_HOSTS)
