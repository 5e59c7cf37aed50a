"""Addresses, sans-io: one address string names a broker's two endpoints.

A broker listens with two sockets: publishers connect to the address itself, subscribers to
its twin: the next port for tcp (``tcp://host:5555`` -> ``tcp://host:5556``), the path plus
``.sub`` for ipc and inproc.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .._errors import AddressError as AddressError  # raised here; re-exported

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


HOSTS_FILE = "/etc/hosts"


def is_exposed(address: str, hosts_file: str = HOSTS_FILE) -> bool:
    """The one rule (API and CLI alike) for whether binding ``address`` opens the bus to
    other machines: every tcp address is exposed unless its host is a literal loopback
    address (127.0.0.0/8, ::1, ::ffff:127.x.y.z) or a name that resolves only to loopback.

    Names are resolved without the network, so the answer is the same offline and cannot be
    steered by a DNS server: ``localhost`` and ``*.localhost`` (RFC 6761 reserves them for
    loopback), or a name the hosts file maps to loopback addresses only. Any other name
    (``localhost.example.com``, ``127.attacker.example``), a wildcard (``*``, ``0.0.0.0``,
    ``::``) and an interface name (``lo``, ``eth0``: which addresses ZeroMQ binds depends on
    the machine) count as exposed. ipc:// and inproc:// stay on this machine."""
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") : address.rindex(":")] if ":" in address[6:] else address[6:]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    literal = _literal_ip(host)
    if literal is not None:
        return not literal
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return False
    addresses = _hosts_entries(hosts_file).get(name)
    return not addresses or not all(_literal_ip(a) for a in addresses)


def is_loopback(endpoints: Endpoints) -> bool:
    """True unless the address is exposed to other machines (see ``is_exposed``)."""
    return not is_exposed(endpoints.address)


def _literal_ip(host: str) -> bool | None:
    """None if ``host`` is not an IP address literal, else whether it is loopback."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # a v6 zone id names an interface
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _hosts_entries(path: str) -> dict[str, list[str]]:
    """name -> addresses from a hosts file (empty if it cannot be read)."""
    entries: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return entries
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        for name in fields[1:]:
            entries.setdefault(name.lower().rstrip("."), []).append(fields[0])
    return entries
