"""``vbus replay``: a recording published again, with its timing (format: _mcap.py)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._cmd_common import (
    Progress,
    RateMeter,
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    non_negative_float,
    say,
)
from ._cmd_record import _TICK, FrameSource, need_mcap


def register(commands: Any) -> None:
    p = add_parser(
        commands, "replay",
        help="publish a recording again, with its timing",
        description=(
            "Publish the messages of FILE (made by 'vbus record') to the broker at ADDRESS, "
            "unchanged (same topic, sender, seq, time and payload bytes), keeping the recorded "
            "gaps between them; --speed 2 plays twice as fast, --speed 0 without waiting. It "
            "exits once the broker has forwarded the last message. On a terminal it shows "
            "progress (--quiet: nothing)."
        ),
        example=(
            "examples:\n"
            "  vbus replay run1.mcap --to tcp://127.0.0.1:5555\n"
            "  vbus replay run1.mcap --to tcp://127.0.0.1:5555 --speed 10 --quiet"
        ),
    )
    p.add_argument("file", metavar="FILE.mcap", help="a recording made by 'vbus record'")
    p.add_argument("--to", required=True, metavar="ADDRESS", dest="address",
                   help="the broker, as 'vbus broker' prints it")
    p.add_argument("--speed", type=non_negative_float, default=1.0, metavar="X",
                   help="time factor (default: 1; 2 = twice as fast; 0 = no waiting)")
    p.add_argument("--quiet", action="store_true", help="no status or progress on stderr")
    add_timeout(p)
    p.set_defaults(run=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    need_mcap("replay")
    from ._mcap import RecordingReader

    with RecordingReader(args.file) as reader:
        first = next(iter(reader), None)  # the file is checked before we connect
        if first is None:
            raise UserError(f"{args.file}: the recording holds no messages")
        with connect_to(args.address, args.timeout, args) as bus:
            pub = bus.publisher()
            sent = _replay(bus, pub, reader, args)
            dropped = pub.stats().dropped
    if not args.quiet:
        note = f", {dropped} dropped (the queue to the broker was full)" if dropped else ""
        say(f"vbus replay: {sent} message(s) from {args.file} to {args.address}{note}")
    return 1 if dropped else 0


def _replay(bus: Any, pub: Any, reader: Any, args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    meter = RateMeter()
    total = reader.message_count  # MCAP messages: a batch is one
    speed: float = args.speed
    sent = frames = 0
    start = time.monotonic()
    origin: int | None = None
    position = 0.0  # seconds into the recording

    def status() -> str:
        done = f" ({100 * frames // total}%)" if total else ""
        return (f"replayed {sent:,} message(s){done}, {meter.observe(sent):,.0f} msg/s, "
                f"{position:.1f} s into the recording")

    messages = iter(reader)
    pending = next(messages, None)
    try:
        while pending is not None:
            current, pending = pending, next(messages, None)
            if origin is None:
                origin = current.log_time
            position = (current.log_time - origin) / 1e9
            if speed:
                due = start + position / speed
                while (wait := due - time.monotonic()) > 0:
                    time.sleep(min(wait, _TICK))  # keeping the recorded timing, not waiting
                    progress.update(status)        # for a message
            if pending is None:
                _send_confirmed(bus, pub, current, args.timeout)
            else:
                pub._publish_frames(current.first, current.external)
            frames += 1
            sent += current.messages
            progress.update(status)
    finally:
        progress.update(status, force=True)
        progress.done()
    return sent


def _send_confirmed(bus: Any, pub: Any, message: Any, timeout: float) -> None:
    """Send the last message and wait until the broker forwards it back: then it and every
    message before it (in order, through the same publisher) reached the broker."""
    with bus._subscribe_recorder(message.topic) as echo:
        pub._publish_frames(message.first, message.external)
        source = FrameSource(echo)
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames = source.recv(max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise UserError(
                    f"the broker did not forward the last message within {timeout:g} s"
                ) from None
            if frames is not None and frames[0] == message.first:
                return
