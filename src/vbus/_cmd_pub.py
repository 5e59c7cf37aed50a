"""``vbus pub``: publish a JSON value, once or at a rate."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ._bus import Bus
from ._cmd_common import (
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    non_negative_int,
    positive_float,
    say,
)
from ._publisher import Publisher
from ._topics import validate_topic


def register(commands: Any) -> None:
    p = add_parser(
        commands, "pub",
        help="publish a JSON value on a topic",
        description=(
            "Publish VALUE (JSON: 1.25, true, '\"text\"', '{\"k\": [1, 2]}') on TOPIC through "
            "the broker at ADDRESS. It exits once the broker has forwarded the last message "
            "(vbus pub subscribes to TOPIC itself to see it come back), so nothing is lost "
            "when it exits. Ctrl-C stops it."
        ),
        example=(
            "examples:\n"
            "  vbus pub tcp://127.0.0.1:5555 stage/x 1.25\n"
            "  vbus pub tcp://127.0.0.1:5555 stage/state '{\"moving\": false}' --retain\n"
            "  vbus pub tcp://127.0.0.1:5555 heartbeat null --count 0 --rate 1   # until Ctrl-C"
        ),
    )
    p.add_argument("address", metavar="ADDRESS", help="the broker, as 'vbus broker' prints it")
    p.add_argument("topic", metavar="TOPIC", help="e.g. stage/x")
    p.add_argument("value", metavar="VALUE", help="a JSON value; strings need quotes")
    p.add_argument("--retain", action="store_true",
                   help="the broker keeps it as the topic's last value for later subscribers")
    p.add_argument("--count", type=non_negative_int, default=1, metavar="N",
                   help="publish N times (default: 1; 0 = until Ctrl-C)")
    p.add_argument("--rate", type=positive_float, default=None, metavar="HZ",
                   help="messages per second when N > 1 (default: as fast as possible)")
    add_timeout(p)
    p.set_defaults(run=run)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        hint = ""
        if text[:1].isalpha() and text not in ("true", "false", "null"):
            hint = f"; a string needs JSON quotes: '\"{text}\"'"
        raise UserError(f"VALUE {text!r} is not valid JSON ({exc}){hint}") from None


def run(args: argparse.Namespace) -> int:
    topic = validate_topic(args.topic)
    value = parse_value(args.value)
    with connect_to(args.address, args.timeout, args) as bus:
        pub = bus.publisher()
        sent = 0
        try:
            sent = _publish(bus, pub, args, topic, value)
        except KeyboardInterrupt:
            if args.count:
                raise
        dropped = pub.stats().dropped
        note = f", {dropped} dropped (the queue to the broker was full)" if dropped else ""
        say(f"vbus pub: published {sent} message(s) on {topic}{note}")
        return 1 if dropped else 0


def _publish(bus: Bus, pub: Publisher, args: argparse.Namespace, topic: str,
             value: Any) -> int:
    count: int = args.count
    period = 1.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    n = 0
    while count == 0 or n < count:
        if n and period:
            time.sleep(max(start + n * period - time.monotonic(), 0.0))
        if n + 1 == count:
            _publish_confirmed(bus, pub, topic, value, args.retain, seq=n + 1,
                               timeout=args.timeout)
        else:
            pub.publish(topic, value, retain=args.retain)
        n += 1
    return n


def _publish_confirmed(bus: Bus, pub: Publisher, topic: str, value: Any, retain: bool,
                       *, seq: int, timeout: float) -> None:
    """Publish the last message and wait until the broker forwards it back to us: then it
    (and, in order, every message before it) has left this process and reached the broker."""
    with bus.subscribe(topic) as echo:
        pub.publish(topic, value, retain=retain)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = echo.recv(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise UserError(
                    f"the broker did not forward the last message within {timeout:g} s"
                ) from None
            if msg.sender == pub.id and msg.seq == seq:
                return
