"""``vbus broker``: a standalone broker until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from .._broker.forwarder import MAX_MESSAGE_SIZE
from .._bus import Bus
from .._proto import limits as _limits
from .._proto.endpoints import is_exposed, parse_address
from .._security import load_keypair
from .common import UserError, add_parser, say

log = logging.getLogger("vbus.broker")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_CLOSE_TIMEOUT = 0.8  # the broker exits within 1 s of the signal


def register(commands: Any) -> None:
    p = add_parser(
        commands, "broker",
        help="run a standalone broker for other processes and hosts",
        description=(
            "Run a broker that clients in other processes (ipc://) or on other hosts (tcp://) "
            "reach with vbus.connect(ADDRESS). Its first line on stdout is ADDRESS (with port "
            "0, the port it picked); each further --bind address follows on its own line. It "
            "runs until SIGINT (Ctrl-C) or SIGTERM, then closes and exits 0.\n\n"
            "A tcp address binds two ports: PORT for publishers and PORT+1 for subscribers. "
            "Binding tcp to anything but a loopback address (127.0.0.1, ::1, localhost, or a "
            "name the hosts file maps to loopback only) opens the bus to the network: vbus "
            "refuses unless it has keys (--keys and --authorized: CURVE encryption, only "
            "authorized clients get in) or you pass --insecure.\n\n"
            "--hwm, --max-queue-bytes and --max-message-size bound what the broker holds: a "
            "stalled subscriber costs it at most about --max-queue-bytes."
        ),
        example=(
            "examples:\n"
            "  vbus broker --bind tcp://127.0.0.1:5555 --bind ipc:///tmp/vbus\n"
            "  vbus broker --bind tcp://127.0.0.1:0        # any free port, printed first\n"
            "  vbus broker --bind tcp://0.0.0.0:5555 --keys server.key --authorized clients/\n"
            "  vbus broker --bind tcp://0.0.0.0:5555 --insecure"
        ),
    )
    p.add_argument("--bind", action="append", metavar="ADDR",
                   help=f"tcp://HOST:PORT or ipc://PATH; repeat for several "
                        f"(default: {DEFAULT_BIND})")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback tcp address without encryption")
    p.add_argument("--keys", metavar="FILE",
                   help="the broker's CURVE key file (NAME.key from 'vbus keygen'): every "
                        "tcp and ipc endpoint then encrypts and admits only --authorized keys")
    p.add_argument("--authorized", metavar="DIR",
                   help="directory of client public keys (*.pub), re-read when it changes")
    p.add_argument("--hwm", type=_positive("--hwm"), metavar="N",
                   help=f"queue bound in ZeroMQ messages, of the intake and of each "
                        f"subscriber (default: {_limits.DEFAULT_HWM}, lowered to fit "
                        f"--max-queue-bytes; given alone, taken as it is)")
    p.add_argument("--max-queue-bytes", type=_positive("--max-queue-bytes"), metavar="BYTES",
                   help=f"bytes of queued data a stalled subscriber may cost the broker "
                        f"(default: {_limits.DEFAULT_MAX_QUEUE_BYTES}; at least "
                        f"{_limits.CHUNK_SIZE + _limits.MESSAGE_OVERHEAD})")
    p.add_argument("--max-message-size", type=_positive("--max-message-size"),
                   default=MAX_MESSAGE_SIZE, metavar="BYTES",
                   help=f"largest frame a network publisher may send; one that sends more "
                        f"is disconnected (default: {MAX_MESSAGE_SIZE})")
    p.set_defaults(run=run)


def _positive(option: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes a whole number, not {text!r}"
                                             ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be at least 1, not {value}")
        return value

    return parse


def network_exposed(address: str) -> bool:
    """True for an address other hosts can reach: ``_endpoints.is_exposed``, the one rule."""
    return is_exposed(address)


def _bus_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        _limits.effective_hwm(args.hwm, args.max_queue_bytes, queues=2)
    except ValueError as exc:
        raise UserError(f"--max-queue-bytes: {exc}") from None
    return {"hwm": args.hwm, "max_queue_bytes": args.max_queue_bytes,
            "max_message_size": args.max_message_size}


def run(args: argparse.Namespace) -> int:
    binds: list[str] = args.bind or [DEFAULT_BIND]
    for b in binds:
        parse_address(b)  # a bad address is one line, before anything starts
    options = _bus_options(args)
    if (args.keys is None) != (args.authorized is None):
        raise UserError("--keys and --authorized go together")
    keypair = load_keypair(args.keys) if args.keys is not None else None
    exposed = [b for b in binds if network_exposed(b)] if keypair is None else []
    if exposed and not args.insecure:
        raise UserError(
            f"{exposed[0]} is reachable from the network and the bus would be unencrypted; "
            "bind tcp://127.0.0.1:PORT, or pass --insecure to open it anyway"
        )
    # The stop signals are taken with sigwait: blocked here, before the broker's threads
    # start (they inherit the mask), so no thread but this one ever handles them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        bus = Bus(bind=binds, keypair=keypair, authorized=args.authorized,
                  **options)
        try:
            return _serve(bus, exposed)
        finally:
            bus.close(timeout=_CLOSE_TIMEOUT)
    finally:
        _unblock_discarding_pending()


def _unblock_discarding_pending() -> None:
    """Unblock the stop signals; a repeated one still pending (``timeout`` and shells may
    signal twice) is discarded, so it cannot turn a clean exit into an interrupted one."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _serve(bus: Bus, exposed: list[str]) -> int:
    # Bus.addresses: every bound address, then the in-process one (not for other processes).
    addresses = [a for a in bus.addresses if not a.startswith("inproc://")] or [bus.address]
    print("\n".join(addresses), flush=True)
    for address in exposed:
        log.warning("%s is open to the network: anyone who reaches it can read and publish "
                    "every message, unencrypted (--insecure)", address)
    say(f"vbus broker: serving {', '.join(addresses)}; Ctrl-C or SIGTERM stops it")
    received = signal.sigwait(_STOP_SIGNALS)
    say(f"vbus broker: {signal.Signals(received).name}, stopping")
    sys.stdout.flush()
    return 0
