"""``vbus topics`` (what is on the bus) and ``vbus hz`` (rates measured at a subscriber)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from .._proto.stats import STATS_TOPIC
from .._proto.topics import compile_pattern
from .common import (
    UserError,
    add_address,
    add_parser,
    add_timeout,
    connect_to,
    normalize_address,
    positive_float,
    say,
    split_address,
)

_STATS_PERIOD = 1.0


def register(commands: Any) -> None:
    p = add_parser(
        commands, "topics",
        help="list the topics on the bus: rates, publishers, retained values",
        description=(
            "Listen to every topic ('**') at the broker at ADDRESS for --duration seconds "
            "and list the topics seen, with the message rate and the publishers measured "
            "here, whether the broker keeps a retained value, and the publishers' own "
            "message counts from $vbus/stats (topics that were quiet meanwhile included). "
            "--json prints one JSON object."
        ),
        example=(
            "example:\n"
            "  vbus topics\n"
            "    topic          msg/s  publishers  retained  messages (claimed)\n"
            "    camera/frame    30.0           1  no                     1,204\n"
            "    stage/state      0.0           1  yes                        3"
        ),
    )
    add_address(p)
    p.add_argument("--duration", type=positive_float, default=1.0, metavar="S",
                   help="listen for S seconds (default: 1)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    add_timeout(p)
    p.set_defaults(run=run_topics)

    h = add_parser(
        commands, "hz",
        help="measure message rates at a subscriber, like 'ros2 topic hz'",
        usage="vbus hz [-h] [ADDRESS] PATTERN [options]",
        description=(
            "Subscribe to PATTERN at the broker at ADDRESS and print, every --interval "
            "seconds and per topic, the rate and the intervals between arrivals measured "
            "here (mean, min, max, standard deviation: the jitter) over the last --window "
            "messages, until --duration seconds or Ctrl-C. Small messages sent in a burst "
            "travel in batches and arrive together: their intervals show it. Losses are "
            "counted and shown."
        ),
        example=(
            "example:\n"
            "  vbus hz 'stage/*' --duration 3\n"
            "    stage/x  rate 1000.2 Hz  mean 1.000 ms  min 0.012 ms  max 3.1 ms  "
            "std 0.41 ms  n 1000  lost 0"
        ),
    )
    h.add_argument("positionals", nargs="+", metavar="[ADDRESS] PATTERN",
                   help="the broker (default: $VBUS_ADDRESS, else tcp://127.0.0.1:5555) "
                        "and the pattern")
    h.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C)")
    h.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                   help="print every S seconds (default: 1)")
    h.add_argument("--window", type=int, default=10_000, metavar="N",
                   help="statistics over the last N arrivals per topic (default: 10000)")
    add_timeout(h)
    h.set_defaults(run=run_hz)


class _Seen:
    __slots__ = ("count", "senders", "retained", "first", "last")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.senders: set[str] = set()
        self.retained = False
        self.first = now
        self.last = now


def run_topics(args: argparse.Namespace) -> int:
    args.address = normalize_address(args.address)
    seen: dict[str, _Seen] = {}
    claimed: dict[str, int] = {}
    with connect_to(args.address, args.timeout, args) as bus, bus.subscribe(STATS_TOPIC) as stats:
        with bus.subscribe("**") as sub:
            began = time.monotonic()
            end = began + args.duration
            try:
                while (remaining := end - time.monotonic()) > 0:
                    try:
                        msg = sub.recv(timeout=remaining)
                    except TimeoutError:
                        break
                    now = time.monotonic()
                    s = seen.get(msg.topic)
                    if s is None:
                        s = seen[msg.topic] = _Seen(now)
                    s.senders.add(msg.sender)
                    if msg.retained:
                        s.retained = True  # the broker's replay to a new subscriber
                    else:
                        s.count += 1
                        s.last = now
            except KeyboardInterrupt:
                pass
            elapsed = max(time.monotonic() - began, 1e-9)
        try:
            # the broker publishes them once a second: a short listen may need to wait
            latest = stats.recv(timeout=max(_STATS_PERIOD * 1.5 - elapsed, 0.0))
            while True:
                try:
                    latest = stats.recv(timeout=0)
                except TimeoutError:
                    break
            topics = latest.data.get("topics", {}) if isinstance(latest.data, dict) else {}
            claimed = {t: int(v.get("messages", 0)) for t, v in topics.items()
                       if isinstance(v, dict)}
        except (TimeoutError, ValueError, TypeError, AttributeError):
            pass
    rows = {t: {"rate": (seen[t].count / elapsed) if t in seen else 0.0,
                "publishers": len(seen[t].senders) if t in seen else None,
                "retained": seen[t].retained if t in seen else False,
                "messages_claimed": claimed.get(t)}
            for t in sorted(set(seen) | set(claimed))}
    if args.json:
        print(json.dumps({"address": args.address, "duration": elapsed, "topics": rows}))
        return 0
    if not rows:
        say(f"vbus topics: no topics at {args.address} within {args.duration:g} s")
        return 0
    width = max(len("topic"), *(len(t) for t in rows))
    out = sys.stdout
    out.write(f"{'topic':<{width}}  {'msg/s':>10}  {'publishers':>10}  {'retained':>8}  "
              f"{'messages (claimed)':>18}\n")
    for topic, r in rows.items():
        publishers = "-" if r["publishers"] is None else str(r["publishers"])
        messages = "-" if r["messages_claimed"] is None else f"{r['messages_claimed']:,}"
        out.write(f"{topic:<{width}}  {r['rate']:>10,.1f}  {publishers:>10}  "
                  f"{'yes' if r['retained'] else 'no':>8}  {messages:>18}\n")
    return 0


class _Rate:
    """Arrival intervals of one topic over a window."""

    __slots__ = ("intervals", "last", "window", "total")

    def __init__(self, window: int) -> None:
        from collections import deque

        self.intervals: Any = deque(maxlen=window)
        self.last: float | None = None
        self.window = window
        self.total = 0

    def arrived(self, now: float) -> None:
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now
        self.total += 1

    def line(self, topic: str, lost: int) -> str:
        values = list(self.intervals)
        if not values:
            return f"{topic}  {self.total} message(s): no interval yet  lost {lost}"
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        rate = 1.0 / mean if mean > 0 else float("inf")
        return (f"{topic}  rate {rate:,.1f} Hz  mean {mean * 1e3:.3f} ms  "
                f"min {min(values) * 1e3:.3f} ms  max {max(values) * 1e3:.3f} ms  "
                f"std {std * 1e3:.3f} ms  n {len(values) + 1}  lost {lost}")


def run_hz(args: argparse.Namespace) -> int:
    address, rest = split_address(args.positionals, "PATTERN", 1)
    args.address = address
    if args.window < 2:
        raise UserError(f"--window must be at least 2, not {args.window}")
    pattern = compile_pattern(rest[0]).text
    rates: dict[str, _Rate] = {}
    lost: dict[str, int] = {}

    def found(topic: str, sender: str, count: int) -> None:
        lost[topic] = lost.get(topic, 0) + count

    out = sys.stdout
    with connect_to(address, args.timeout, args) as bus, bus.subscribe(
        pattern, on_loss=found
    ) as sub:
        say(f"vbus hz: subscribed to {pattern} at {address}")
        began = time.monotonic()
        end = None if args.duration is None else began + args.duration
        next_report = began + args.interval
        try:
            while True:
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                if now >= next_report:
                    for topic in sorted(rates):
                        out.write(rates[topic].line(topic, lost.get(topic, 0)) + "\n")
                    out.flush()
                    next_report = now + args.interval
                wait = next_report - now if end is None else min(next_report, end) - now
                try:
                    msg = sub.recv(timeout=max(wait, 0.0))
                except TimeoutError:
                    continue
                if msg.retained:
                    continue  # the broker's replay: not a rate
                rate = rates.get(msg.topic)
                if rate is None:
                    rate = rates[msg.topic] = _Rate(args.window)
                rate.arrived(time.monotonic())
        except KeyboardInterrupt:
            pass
    if not rates:
        say(f"vbus hz: no messages on {pattern}")
    else:
        say("vbus hz: the last window of each topic:")
        for topic in sorted(rates):
            say("  " + rates[topic].line(topic, lost.get(topic, 0)))
    return 1 if sum(lost.values()) else 0
