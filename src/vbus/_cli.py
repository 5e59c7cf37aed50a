"""The ``vbus`` command line. A user's mistake is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ._errors import VbusError

Command = Callable[[argparse.Namespace], int]


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "demo",
        help="an embedded bus with a simulated instrument and live rates",
        description=(
            "Start an embedded bus, a simulated instrument publishing stage positions and "
            "camera frames from its own thread, a sync subscriber and an async callback, and "
            "print live rates once a second. Ctrl-C (or --duration) exits cleanly."
        ),
        epilog="example: vbus demo --duration 5 --rate 2000",
    )
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    p.add_argument("--rate", type=float, default=1000.0, metavar="HZ",
                   help="stage positions per second (default: 1000; 0 = as fast as possible)")
    p.add_argument("--fps", type=float, default=30.0, metavar="HZ",
                   help="camera frames per second (default: 30)")
    p.add_argument("--size", type=int, default=256, metavar="N",
                   help="camera frames are N x N uint16 (default: 256)")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(duration=args.duration, rate=args.rate, fps=args.fps, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vbus",
        description="vbus: a message bus for Python programs, on ZeroMQ.",
        epilog="Run 'vbus COMMAND --help' for the options and an example of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="vbus: %(levelname)s %(name)s: %(message)s",
    )
    run: Command | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (VbusError, TimeoutError, OSError, ValueError) as exc:
        print(f"vbus {args.command}: error: {exc}", file=sys.stderr)
        return 1
