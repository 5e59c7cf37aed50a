"""``vbus pub``: publish a JSON value, once, at a rate, or one per line of stdin."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._bus import Bus
from .._proto import control as _control
from .._proto import wire as _wire
from .._proto.topics import topic_prefix, validate_topic
from .._publisher import Publisher
from .common import (
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    non_negative_int,
    positive_float,
    say,
    split_address,
)

_ROOM_WAIT = (0.0005, 0.05)  # backoff while the queue to the broker is full


def register(commands: Any) -> None:
    p = add_parser(
        commands, "pub",
        help="publish a JSON value on a topic",
        usage="vbus pub [-h] [ADDRESS] TOPIC VALUE|- [options]\n"
              "       vbus pub [ADDRESS] TOPIC --clear-retained",
        description=(
            "Publish VALUE (JSON: 1.25, true, '\"text\"', '{\"k\": [1, 2]}'; NaN and "
            "infinities are refused: JSON has none) on TOPIC through the broker at ADDRESS. "
            "VALUE '-' reads one JSON value a line from stdin and publishes each. It never "
            "drops a message of its own: while the queue to the broker is full it waits, like "
            "mosquitto_pub. It exits once the broker has forwarded the last message (vbus pub "
            "subscribes to TOPIC itself to see it come back), so nothing is lost when it "
            "exits, and says how many it published (also after Ctrl-C).\n\n"
            "--clear-retained removes TOPIC's retained value from the broker."
        ),
        example=(
            "examples:\n"
            "  vbus pub stage/x 1.25                               # the default broker\n"
            "  vbus pub tcp://127.0.0.1:5555 stage/state '{\"moving\": false}' --retain\n"
            "  vbus pub 127.0.0.1:5555 heartbeat null --count 0 --rate 1   # until Ctrl-C\n"
            "  seq 10 | vbus pub stage/x -\n"
            "  vbus pub stage/state --clear-retained"
        ),
    )
    p.add_argument("positionals", nargs="+", metavar="[ADDRESS] TOPIC VALUE",
                   help="the broker (default: $VBUS_ADDRESS, else tcp://127.0.0.1:5555), the "
                        "topic (e.g. stage/x) and a JSON value (strings need quotes; '-': "
                        "one value a line from stdin)")
    p.add_argument("--retain", action="store_true",
                   help="the broker keeps it as the topic's last value for later subscribers")
    p.add_argument("--clear-retained", action="store_true",
                   help="remove the topic's retained value (no VALUE)")
    p.add_argument("--count", type=non_negative_int, default=1, metavar="N",
                   help="publish N times (default: 1; 0 = until Ctrl-C)")
    p.add_argument("--rate", type=positive_float, default=None, metavar="HZ",
                   help="messages per second when N > 1 (default: as fast as the broker "
                        "takes them)")
    add_timeout(p)
    p.set_defaults(run=run)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_value(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        hint = ""
        if text.strip() in ("NaN", "Infinity", "-Infinity"):
            hint = "; JSON has no NaN or infinity: use null or a number"
        elif text[:1].isalpha() and text not in ("true", "false", "null"):
            hint = f"; a string needs JSON quotes: '\"{text}\"'"
        raise UserError(f"VALUE {text!r} is not valid JSON ({exc}){hint}") from None


class FramedPublisher:
    """Publishes through a Publisher with seqs of its own, so that a message the queue to
    the broker refused is sent again (same seq, no gap) instead of lost."""

    def __init__(self, pub: Publisher, topic: str, retain: bool) -> None:
        self._pub = pub
        self._sender = bytes.fromhex(pub.id)
        self._prefix = topic_prefix(topic)
        self._retain = retain
        self._encoder = _wire.new_encoder()
        self.seq = 0
        self.sent = 0  # messages handed to the socket, counted once they are
        self.retained_copy: bytes | None = None  # the last copy sent to the broker's store
        self.deferral = SignalDeferral()  # installed by run() around the publishing

    def publish(self, value: Any) -> None:
        """Send one message whole: a Ctrl-C that comes meanwhile waits until it is sent, so
        ``sent`` counts exactly what went out."""
        payload = _wire.encode_payload(value, self._encoder)
        self.deferral.inside = True
        try:
            self.seq += 1
            now = time.time()
            if self._retain:  # the broker's copy first, as Publisher does (not counted as
                copy, _ = _wire.build_frames(self._prefix, _wire.FLAG_RETAINED,  # published)
                                             self._sender, self.seq, now, payload)
                self.retained_copy = _control.RETAIN + copy
                self.send_copy()
            frame, _ = _wire.build_frames(self._prefix, 0, self._sender, self.seq, now, payload)
            self._send(frame)
            self.sent = self.seq
        finally:
            self.deferral.inside = False
        self.deferral.check()

    def send_copy(self) -> None:
        """The broker's copy of a retained value: a control message (the publisher does not
        count it as published, so the stats show no $vbus/retain/... topic)."""
        assert self.retained_copy is not None
        self._pub._send_control(self.retained_copy)

    def _send(self, frame: bytes) -> None:
        wait = _ROOM_WAIT[0]
        while True:
            dropped = self._pub.stats().dropped
            self._pub._publish_frames(frame, None)
            if self._pub.stats().dropped == dropped:
                return
            time.sleep(wait)  # the queue to the broker is full: wait for room
            wait = min(wait * 2, _ROOM_WAIT[1])


class SignalDeferral:
    """While installed (``with``), SIGINT and SIGTERM that come while ``inside`` is set take
    effect once it is cleared (``check()``); at other times they interrupt at once."""

    def __init__(self) -> None:
        self.inside = False
        self._caught: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.inside:
            self._caught.append(signum)
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def check(self) -> None:
        if self._caught:
            signum = self._caught[0]
            self._caught.clear()
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> SignalDeferral:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle)
                              for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    if args.clear_retained:
        address, rest = split_address(args.positionals, "TOPIC", 1)
        topic = validate_topic(rest[0])
        with connect_to(address, args.timeout, args) as bus:
            bus.publisher().clear_retained(topic)
            _confirm_cleared(bus, topic, args.timeout)
        say(f"vbus pub: cleared the retained value of {topic}")
        return 0
    address, rest = split_address(args.positionals, "TOPIC VALUE", 2)
    topic = validate_topic(rest[0])
    values: Iterator[Any]
    if rest[1] == "-":
        values = _stdin_values()
    else:
        value = parse_value(rest[1])
        values = _repeat(value, args.count)
    with connect_to(address, args.timeout, args) as bus:
        pub = bus.publisher()
        framed = FramedPublisher(pub, topic, args.retain)
        interrupted = False
        try:
            with framed.deferral:
                _publish(bus, framed, values, args, topic)
        except KeyboardInterrupt:
            interrupted = True
        say(f"vbus pub: published {framed.sent} message(s) on {topic} at {address}")
    if interrupted and (args.count or rest[1] == "-"):
        return 130  # stopped before it was done
    return 0


def _repeat(value: Any, count: int) -> Iterator[Any]:
    n = 0
    while count == 0 or n < count:
        yield value
        n += 1


def _stdin_values() -> Iterator[Any]:
    for number, line in enumerate(sys.stdin, 1):
        if line.strip():
            try:
                yield parse_value(line.strip())
            except UserError as exc:
                raise UserError(f"stdin line {number}: {exc}") from None


def _publish(bus: Bus, framed: FramedPublisher, values: Iterator[Any],
             args: argparse.Namespace, topic: str) -> None:
    period = 1.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    pending = next(values, None)
    sentinel = pending is None
    n = 0
    while not sentinel:
        value = pending
        pending = next(values, _END)
        if n and period:
            time.sleep(max(start + n * period - time.monotonic(), 0.0))
        if pending is _END:
            _publish_confirmed(bus, framed, topic, value, timeout=args.timeout)
            if framed.retained_copy is not None:
                _confirm_retained(bus, framed, topic, args.timeout)
            return
        framed.publish(value)
        n += 1


_END: Any = object()


def _publish_confirmed(bus: Bus, framed: FramedPublisher, topic: str, value: Any,
                       *, timeout: float) -> None:
    """Publish the last message and wait until the broker forwards it back to us: then it
    (and, in order, every message before it) has left this process and reached the broker."""
    with bus.subscribe(topic) as echo:
        framed.publish(value)
        seq = framed.seq
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = echo.recv(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise UserError(
                    f"the broker did not forward the last message within {timeout:g} s"
                ) from None
            if msg.sender == framed._pub.id and msg.seq == seq and not msg.retained:
                return


def _confirm_retained(bus: Bus, framed: FramedPublisher, topic: str, timeout: float) -> None:
    """The broker keeps our last value: a new subscriber gets it first. The copy is sent
    again if the queue to the broker had no room for it."""
    deadline = time.monotonic() + timeout
    while True:
        with bus.subscribe(topic) as check:
            try:
                while True:
                    msg = check.recv(timeout=0)
                    if msg.retained and msg.sender == framed._pub.id and msg.seq == framed.seq:
                        return
            except TimeoutError:
                pass
        if time.monotonic() > deadline:
            raise UserError(f"the broker did not keep {topic}'s retained value within "
                            f"{timeout:g} s")
        framed.send_copy()


def _confirm_cleared(bus: Bus, topic: str, timeout: float) -> None:
    """A new subscriber gets the topic's retained value before its subscription is active:
    once one finds none queued, the broker has cleared it."""
    deadline = time.monotonic() + timeout
    while True:
        with bus.subscribe(topic) as check:
            try:
                while not check.recv(timeout=0).retained:
                    pass
            except TimeoutError:
                return
        if time.monotonic() > deadline:
            raise UserError(f"the broker did not clear {topic}'s retained value within "
                            f"{timeout:g} s")
