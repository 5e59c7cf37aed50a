"""``vbus sub``: print the messages that match one or more patterns."""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._message import Message
from .._proto.stats import STATS_TOPIC
from .._proto.topics import compile_pattern
from .common import (
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    non_negative_int,
    positive_float,
    positive_int,
    say,
    split_address,
)
from .record import LossCounter
from .render import human_line, json_line, jsonable

_LOSS_NOTE_EVERY = 1.0  # seconds between running loss counts on stderr
_SILENT_AFTER = 3.5  # the broker publishes $vbus/stats once a second
_TICK = 0.5  # how often an idle sub looks at the link
_MERGE_QUEUE = 10_000  # messages of several patterns waiting for stdout


def register(commands: Any) -> None:
    p = add_parser(
        commands, "sub",
        help="print the messages whose topic matches one or more patterns",
        usage="vbus sub [-h] [ADDRESS] PATTERN [PATTERN ...] [options]",
        description=(
            "Subscribe to each PATTERN ('*' is one level, '**' any number: stage/*, "
            "camera/**, **) at the broker at ADDRESS and print one line per message on "
            "stdout: the publisher's time, the topic and the value (numpy arrays as shape and "
            "dtype, bytes as their length). Once subscribed it says so on stderr ('vbus sub: "
            "subscribed to PATTERN at ADDRESS'). Ctrl-C stops it.\n\n"
            "--json prints one JSON object a line instead: topic, data, sender, seq, time, "
            "retained. Numpy arrays become {\"$ndarray\": {\"dtype\": \"<u2\", \"shape\": "
            "[480, 640]}}, bytes {\"$bytes\": {\"length\": N}}, NaN and infinities null "
            "(see docs/cli.md). --data prints the value alone, as JSON, one a line.\n\n"
            "Losses: a gap in a publisher's sequence numbers (counted from the first message "
            "seen of each publisher and topic) is said on stderr as it happens (a running "
            "count, at most once a second) and per topic at exit; the exit status is then 1."
        ),
        example=(
            "examples:\n"
            "  vbus sub 'stage/*'                       # the default broker\n"
            "    12:00:01.250  stage/x  1.25\n"
            "    12:00:01.251  stage/y  -0.5\n"
            "  vbus sub 127.0.0.1:5555 'stage/*' 'camera/**' --json --count 1\n"
            "    {\"topic\":\"camera/frame\",\"data\":{\"$ndarray\":{\"dtype\":\"<u2\","
            "\"shape\":[256,256]}},\"sender\":\"5f0c...\",\"seq\":7,\"time\":1700000000.5,"
            "\"retained\":false}\n"
            "  vbus sub stage/x --data --count 3\n"
            "    1.25\n    1.5\n    1.75"
        ),
    )
    p.add_argument("positionals", nargs="+", metavar="[ADDRESS] PATTERN",
                   help="the broker (default: $VBUS_ADDRESS, else tcp://127.0.0.1:5555; given "
                        "when the first argument looks like one: scheme://... or host:port) "
                        "and one or more patterns")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="exit after N messages (default: 0 = until Ctrl-C)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="exit after S seconds; with --count, fail (exit 1) if fewer than N "
                        "messages came")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object a line")
    output.add_argument("--data", action="store_true", help="the value alone, JSON, a line")
    p.add_argument("--hwm", type=positive_int, default=None, metavar="N",
                   help="this subscriber's queue, in messages (default: the bus's)")
    add_timeout(p)
    p.set_defaults(run=run)


class LinkWatch:
    """Says on stderr when the broker falls silent (no $vbus/stats for a few seconds: it
    stopped, or the network went) and when it is heard again (restarted, if its id or
    uptime says so). The client reconnects by itself; this only tells the user."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._lock = threading.Lock()
        self._heard = time.monotonic()
        self._broker: Any = None
        self._uptime = 0.0
        self._silent = False

    def heard(self, msg: Message) -> None:  # on a callback thread of the bus
        data = msg.data if isinstance(msg.data, dict) else {}
        broker, uptime = data.get("broker"), data.get("uptime")
        with self._lock:
            restarted = self._broker is not None and (
                broker != self._broker or (isinstance(uptime, (int, float))
                                           and uptime < self._uptime))
            was_silent, self._silent = self._silent, False
            self._heard = time.monotonic()
            self._broker = broker
            if isinstance(uptime, (int, float)):
                self._uptime = float(uptime)
        if was_silent or restarted:
            what = "restarted, " if restarted else ""
            say(f"vbus sub: the broker at {self._address} answers again ({what}"
                "subscriptions renewed); messages meanwhile are lost")

    def check(self) -> None:
        with self._lock:
            quiet = time.monotonic() - self._heard
            if self._silent or quiet < _SILENT_AFTER:
                return
            self._silent = True
        say(f"vbus sub: no word from the broker at {self._address} for {quiet:.0f} s "
            "(stopped, or the connection is down); waiting for it")


def data_line(msg: Message) -> str:
    return json.dumps(jsonable(msg.data), separators=(",", ":"), allow_nan=False)


def run(args: argparse.Namespace) -> int:
    address, rest = split_address(args.positionals, "PATTERN [PATTERN ...]", None)
    args.address = address
    patterns = list(dict.fromkeys(compile_pattern(p).text for p in rest))
    render = json_line if args.json else data_line if args.data else human_line
    count: int = args.count
    out = sys.stdout
    losses = LossCounter(None)
    n = 0
    interrupted = False
    with connect_to(address, args.timeout, args) as bus, _messages(
        bus, patterns, args.hwm, losses
    ) as recv:
        link = LinkWatch(address)
        bus.on(STATS_TOPIC, link.heard)
        end = None if args.duration is None else time.monotonic() + args.duration
        noted, next_note = 0, 0.0
        try:
            for pattern in patterns:
                say(f"vbus sub: subscribed to {pattern} at {address}")
            while count == 0 or n < count:
                try:
                    msg = recv(0)
                except TimeoutError:
                    out.flush()  # flush when the queue is empty, not after every line
                    msg = _wait(recv, end, link)
                    if msg is _DONE:
                        break
                if msg is None:
                    continue  # a duplicate (it matched two patterns)
                losses.recorded(msg)
                out.write(render(msg) + "\n")
                n += 1
                if losses.total_lost != noted and time.monotonic() >= next_note:
                    out.flush()
                    noted, next_note = losses.total_lost, time.monotonic() + _LOSS_NOTE_EVERY
                    say(f"vbus sub: LOST {noted:,} message(s) so far")
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with contextlib.suppress(BrokenPipeError):
                out.flush()
    losses.report("sub", quiet=True)  # the per-topic table when something was lost
    if count and n < count and not interrupted:
        raise UserError(f"received {n} of {count} message(s) within {args.duration:g} s")
    return 1 if losses.total_lost else 0


_DONE: Any = object()


def _wait(recv: Any, end: float | None, link: LinkWatch) -> Any:
    """The next message (None for a duplicate), or _DONE once ``end`` has passed; the link
    is looked at every _TICK meanwhile."""
    while True:
        link.check()
        remaining = None if end is None else end - time.monotonic()
        if remaining is not None and remaining <= 0:
            return _DONE
        try:
            return recv(_TICK if remaining is None else min(_TICK, remaining))
        except TimeoutError:
            continue


@contextlib.contextmanager
def _messages(bus: Any, patterns: list[str], hwm: int | None,
              losses: LossCounter) -> Iterator[Any]:
    """``recv(timeout)``: the next message of any of the patterns (None for a duplicate),
    TimeoutError after ``timeout``."""

    def found(topic: str, sender: str, lost: int) -> None:
        losses.found(topic, sender, lost)

    if len(patterns) == 1:
        with bus.subscribe(patterns[0], hwm=hwm, on_loss=found) as sub:
            yield sub.recv
        return
    # Several patterns: one subscription each, merged through a bounded queue (a full queue
    # stalls the subscriptions, whose own queues then overflow: counted as losses).
    merged: queue.Queue[Message] = queue.Queue(_MERGE_QUEUE)
    last: dict[tuple[str, str], int] = {}
    for pattern in patterns:
        bus.on(pattern, lambda m: merged.put(m, timeout=5.0), hwm=hwm, on_loss=found)

    def recv(timeout: float | None) -> Message | None:
        try:
            msg = merged.get(timeout=timeout) if timeout != 0 else merged.get_nowait()
        except queue.Empty:
            raise TimeoutError from None
        key = (msg.sender, msg.topic)
        if not msg.retained:
            if msg.seq <= last.get(key, 0):
                return None
            last[key] = msg.seq
        return msg

    yield recv
