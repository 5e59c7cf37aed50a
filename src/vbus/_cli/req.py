"""``vbus req``: send one request, print the reply as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import _requests
from .._proto.topics import validate_topic
from .common import add_parser, add_timeout, connect_to
from .pub import parse_value
from .render import jsonable


def register(commands: Any) -> None:
    p = add_parser(
        commands, "req",
        help="send one request, print the reply (JSON)",
        description=(
            "Send VALUE (JSON: 1.25, true, '\"text\"', '{\"x\": 1.0}') as a request on TOPIC "
            "through the broker at ADDRESS; one server of TOPIC handles it. The reply's value "
            "is printed on stdout as JSON (numpy arrays and bytes as the summaries 'vbus sub "
            "--json' prints, see docs/cli.md). Nobody serving TOPIC, no reply within the "
            "timeout, or a handler that raised: one line on stderr, exit 1."
        ),
        example=(
            "examples:\n"
            "  vbus req tcp://127.0.0.1:5555 stage/move '{\"x\": 1.0}'\n"
            "    {\"moved_to\": 1.0}\n"
            "  vbus req tcp://127.0.0.1:5555 camera/exposure null --timeout 0.5"
        ),
    )
    p.add_argument("address", metavar="ADDRESS", help="the broker, as 'vbus broker' prints it")
    p.add_argument("topic", metavar="TOPIC", help="e.g. stage/move")
    p.add_argument("value", metavar="VALUE", help="a JSON value; strings need quotes")
    add_timeout(p)
    for action in p._actions:
        if action.dest == "timeout":
            action.help = ("give up if no broker answers, or no reply comes, within S seconds "
                           "(default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    topic = validate_topic(args.topic)
    value = parse_value(args.value)
    with connect_to(args.address, args.timeout, args) as bus:
        reply = _requests.request(bus, topic, value, timeout=args.timeout)
        json.dump(jsonable(reply.data), sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
