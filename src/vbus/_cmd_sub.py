"""``vbus sub``: print the messages that match a pattern."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ._cmd_common import (
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    non_negative_int,
    positive_float,
    say,
)
from ._cmd_render import human_line, json_line
from ._topics import compile_pattern


def register(commands: Any) -> None:
    p = add_parser(
        commands, "sub",
        help="print the messages whose topic matches a pattern",
        description=(
            "Subscribe to PATTERN ('*' is one level, '**' any number: stage/*, camera/**, **) "
            "at the broker at ADDRESS and print one line per message on stdout: the "
            "publisher's time, the topic and the value (numpy arrays as shape and dtype, bytes "
            "as their length). Once the subscription is active it says so on stderr "
            "('vbus sub: subscribed to PATTERN at ADDRESS'). Ctrl-C stops it (exit 0).\n\n"
            "--json prints one JSON object a line instead: topic, data, sender, seq, time, "
            "retained. Numpy arrays become {\"$ndarray\": {\"dtype\": \"<u2\", \"shape\": "
            "[480, 640]}}, bytes {\"$bytes\": {\"length\": N}}, NaN and infinities null "
            "(see docs/cli.md)."
        ),
        example=(
            "examples:\n"
            "  vbus sub tcp://127.0.0.1:5555 'stage/*'\n"
            "    12:00:01.250  stage/x  1.25\n"
            "    12:00:01.251  stage/y  -0.5\n"
            "  vbus sub tcp://127.0.0.1:5555 'camera/**' --json --count 1\n"
            "    {\"topic\":\"camera/frame\",\"data\":{\"$ndarray\":{\"dtype\":\"<u2\","
            "\"shape\":[256,256]}},\"sender\":\"5f0c...\",\"seq\":7,\"time\":1700000000.5,"
            "\"retained\":false}"
        ),
    )
    p.add_argument("address", metavar="ADDRESS", help="the broker, as 'vbus broker' prints it")
    p.add_argument("pattern", metavar="PATTERN", help="e.g. stage/x, stage/*, camera/**, **")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="exit after N messages (default: 0 = until Ctrl-C)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="exit after S seconds; with --count, fail (exit 1) if fewer than N "
                        "messages came")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    add_timeout(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pattern = compile_pattern(args.pattern).text
    render = json_line if args.json else human_line
    count: int = args.count
    out = sys.stdout
    with connect_to(args.address, args.timeout, args) as bus, bus.subscribe(pattern) as sub:
        end = None if args.duration is None else time.monotonic() + args.duration
        n = 0
        interrupted = False
        try:
            say(f"vbus sub: subscribed to {pattern} at {args.address}")
            while count == 0 or n < count:
                try:
                    msg = sub.recv(timeout=0)
                except TimeoutError:
                    out.flush()  # flush when the queue is empty, not after every line
                    remaining = None if end is None else max(end - time.monotonic(), 0.0)
                    try:
                        msg = sub.recv(timeout=remaining)
                    except TimeoutError:
                        break
                out.write(render(msg) + "\n")
                n += 1
        except KeyboardInterrupt:
            interrupted = True
        finally:
            out.flush()
    if count and n < count and not interrupted:
        raise UserError(f"received {n} of {count} message(s) within {args.duration:g} s")
    return 0
