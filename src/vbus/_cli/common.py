"""What the command-line tools share: connecting, user errors, progress lines, signals."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from .._bus import Bus, connect
from .._errors import UserError as UserError  # every command raises it from here
from .._errors import VbusError
from .._proto.endpoints import parse_address
from .._security import check_key, load_keypair, load_public_key
from .._threads import DEFAULT_TIMEOUT

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_VARIABLE = "VBUS_ADDRESS"
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d+$")



def add_parser(commands: Any, name: str, *, help: str, description: str,
               example: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with an example, its layout kept."""
    paragraphs = (textwrap.fill(p, 79) for p in description.split("\n\n"))
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description="\n\n".join(paragraphs), epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs,
    )
    return parser


def add_timeout(parser: argparse.ArgumentParser) -> None:
    """The options of every command that connects to a broker."""
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"give up if no broker answers within S seconds "
                             f"(default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--keys", metavar="FILE",
                        help="this client's CURVE key file (NAME.key from 'vbus keygen'), "
                             "for a broker that uses keys")
    parser.add_argument("--server-key", metavar="FILE|KEY",
                        help="the broker's public key: its NAME.key.pub file or the key text")


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {name}, not {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return float(value)


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, not {text}")
    return float(value)


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, not {text}")
    return int(value)


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return int(value)


def looks_like_address(text: str) -> bool:
    """An ADDRESS rather than a topic or pattern: ``scheme://...`` or ``host:port``."""
    return "://" in text or bool(_HOST_PORT.match(text))


def default_address() -> str:
    return os.environ.get(ADDRESS_VARIABLE) or DEFAULT_ADDRESS


def normalize_address(text: str | None) -> str:
    """``host:port`` means ``tcp://host:port``; None means $VBUS_ADDRESS or the default."""
    if text is None:
        text = default_address()
    if "://" not in text and _HOST_PORT.match(text):
        return "tcp://" + text
    return text


def split_address(values: list[str], names: str, fixed: int | None) -> tuple[str, list[str]]:
    """``[ADDRESS] ARG...``: the address (given or the default) and the other positionals.
    With ``fixed`` arguments after the address, one more means the first is the address;
    with a variable number (``fixed`` None), the first is the address if it looks like one
    (``scheme://...`` or ``host:port``) and others follow."""
    if fixed is not None:
        if len(values) == fixed + 1:
            return normalize_address(values[0]), values[1:]
        if len(values) == fixed:
            return normalize_address(None), values
        raise UserError(f"expected [ADDRESS] {names}, got {len(values)} argument(s): "
                        f"{' '.join(repr(v) for v in values)}")
    if len(values) >= 2 and looks_like_address(values[0]):
        return normalize_address(values[0]), values[1:]
    if not values:
        raise UserError(f"expected [ADDRESS] {names}")
    return normalize_address(None), values


def add_address(parser: argparse.ArgumentParser) -> None:
    """An optional leading ADDRESS (the broker), like every command that connects."""
    parser.add_argument(
        "address", metavar="ADDRESS", nargs="?", default=None, type=normalize_address,
        help=f"the broker, as 'vbus broker' prints it (default: ${ADDRESS_VARIABLE}, else "
             f"{DEFAULT_ADDRESS}; host:port means tcp://host:port)")


def _check_resolves(address: str) -> None:
    """A host name that does not resolve is said at once, not as a 5 s timeout."""
    if not address.startswith("tcp://"):
        return
    rest = address[len("tcp://"):]
    host = rest.rsplit(":", 1)[0].strip("[]")
    if not host or host == "*":
        return
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"{address}: the host {host!r} does not resolve ({reason})") from None


def connect_to(address: str | None, timeout: float,
               options: argparse.Namespace | None = None) -> Bus:
    """A client of the broker at ``address``; a user's mistake raises a one-line error.
    ``options`` brings --keys and --server-key."""
    address = normalize_address(address)
    endpoints = parse_address(address)  # AddressError names what is wrong
    if endpoints.address.startswith("inproc://"):
        raise UserError(
            f"{address}: inproc:// addresses exist only inside one process; "
            "use the tcp:// or ipc:// address that 'vbus broker' prints"
        )
    keys = getattr(options, "keys", None)
    server_key = getattr(options, "server_key", None)
    if (keys is None) != (server_key is None):
        raise UserError("--keys and --server-key go together")
    _check_resolves(endpoints.address)
    keypair = load_keypair(keys) if keys is not None else None
    if server_key is not None and not _looks_like_key(server_key):
        server_key = load_public_key(server_key)
    return connect(address, timeout=timeout, keypair=keypair, server_key=server_key)


def _looks_like_key(text: str) -> bool:
    try:
        check_key(text)
    except VbusError:
        return False
    return not os.path.exists(text)


def say(text: str) -> None:
    """A status line on stderr (stdout is for data)."""
    print(text, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s"


PROGRESS_TICK = 0.25
"""How often a progress line is refreshed: a command that waits wakes this often for it."""


class Progress:
    """A status line rewritten in place on stderr, at most every ``interval`` seconds; silent
    unless stderr is a terminal (and the user did not ask for --quiet)."""

    def __init__(self, quiet: bool, stream: TextIO | None = None,
                 interval: float = PROGRESS_TICK) -> None:
        self._stream = stream or sys.stderr
        self.enabled = not quiet and self._stream.isatty()
        self._interval = interval
        self._next = 0.0
        self._shown = False

    def update(self, text: Callable[[], str], *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next and not force:
            return
        self._next = now + self._interval
        self._stream.write("\r" + text() + "\x1b[K")
        self._stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False


class RateMeter:
    """Messages per second over the last second or so."""

    def __init__(self) -> None:
        self._mark = time.monotonic()
        self._count = 0
        self.rate = 0.0

    def observe(self, count: int) -> float:
        now = time.monotonic()
        if now - self._mark >= 0.5:
            self.rate = (count - self._count) / (now - self._mark)
            self._mark, self._count = now, count
        return self.rate


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C, so that commands
    clean up (finish a recording, close the bus) either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
