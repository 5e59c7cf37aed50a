"""The ``vbus`` command line. A user's mistake is one line on stderr and a non-zero exit.

Each command lives in a module of this package (``vbus demo`` in the demo/ package) with a
``register(commands)`` function that adds its parser (with an example in its --help) and sets
``run``; common.py holds what several share, mcap.py the recording format.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .._errors import VbusError
from . import bench as _cmd_bench
from . import broker as _cmd_broker
from . import demo as _cmd_demo
from . import info as _cmd_info
from . import keygen as _cmd_keygen
from . import pub as _cmd_pub
from . import record as _cmd_record
from . import replay as _cmd_replay
from . import req as _cmd_req
from . import stats as _cmd_stats
from . import sub as _cmd_sub
from . import topics as _cmd_topics
from .common import sigterm_interrupts

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vbus",
        description="vbus: a message bus for Python programs, on ZeroMQ.",
        epilog=(
            "Run 'vbus COMMAND --help' for the options and an example of each command.\n\n"
            "ADDRESS may be left out: then $VBUS_ADDRESS, else tcp://127.0.0.1:5555 (where\n"
            "'vbus broker' binds by default).\n\n"
            "example: vbus broker &\n"
            "         vbus sub 'stage/*' &\n"
            "         vbus pub stage/x 1.25\n"
            "         vbus record '**' -o run1.mcap --duration 10 && vbus info run1.mcap"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action="version", version=f"vbus {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _cmd_demo.register(commands)  # the README's first command
    _cmd_broker.register(commands)
    _cmd_pub.register(commands)
    _cmd_sub.register(commands)
    _cmd_req.register(commands)
    _cmd_stats.register(commands)
    _cmd_record.register(commands)
    _cmd_replay.register(commands)
    _cmd_info.register(commands)
    _cmd_topics.register(commands)
    _cmd_keygen.register(commands)
    _cmd_bench.register(commands)
    return parser


def _version() -> str:
    from .. import __version__

    return str(__version__)


def describe(exc: BaseException) -> str:
    """One line for a user's mistake."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="vbus: %(levelname)s %(name)s: %(message)s",
    )
    run: Command | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        with sigterm_interrupts():
            return run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout went away (vbus sub ... | head): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except (VbusError, TimeoutError, OSError, ValueError) as exc:
        print(f"vbus {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 1
