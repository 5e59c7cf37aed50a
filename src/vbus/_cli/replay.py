"""``vbus replay``: a recording published again, with its timing (format: mcap.py)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .._proto.topics import compile_pattern
from .common import (
    PROGRESS_TICK,
    Progress,
    RateMeter,
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    non_negative_float,
    normalize_address,
    say,
)
from .mcap import need_mcap

_ROOM_WAIT = (0.0005, 0.05)  # backoff while the queue to the broker is full


def register(commands: Any) -> None:
    p = add_parser(
        commands, "replay",
        help="publish a recording again, with its timing",
        description=(
            "Publish the messages of FILE (made by 'vbus record') to the broker at ADDRESS as "
            "they were published (same topic, sender, seq, time, retained flag and payload), "
            "in recorded order and keeping the recorded gaps between them; --speed 2 plays "
            "twice as fast, --speed 0 without waiting. Every chunk's CRC is checked before "
            "anything is sent: a damaged file is named with its bad chunks and nothing is "
            "sent (exit 1), unless --skip-bad-chunks (the skipped chunks are reported, exit "
            "1). It never drops a message of its own (it waits while the queue to the broker "
            "is full) and exits once the broker has forwarded the last one. On a terminal it "
            "shows progress (--quiet: nothing)."
        ),
        example=(
            "examples:\n"
            "  vbus replay run1.mcap --to tcp://127.0.0.1:5555\n"
            "  vbus replay run1.mcap --speed 10 --topics 'stage/**' --start 30 --quiet\n"
            "  vbus replay damaged.mcap --skip-bad-chunks"
        ),
    )
    p.add_argument("file", metavar="FILE.mcap", help="a recording made by 'vbus record'")
    p.add_argument("--to", default=None, metavar="ADDRESS", dest="address",
                   type=normalize_address,
                   help="the broker (default: $VBUS_ADDRESS, else tcp://127.0.0.1:5555)")
    p.add_argument("--speed", type=non_negative_float, default=1.0, metavar="X",
                   help="time factor (default: 1; 2 = twice as fast; 0 = no waiting)")
    p.add_argument("--topics", default=None, metavar="PATTERN",
                   help="only the topics matching PATTERN")
    p.add_argument("--start", type=non_negative_float, default=0.0, metavar="S",
                   help="begin S seconds into the recording")
    p.add_argument("--loop", action="store_true", help="play it again and again, until Ctrl-C")
    p.add_argument("--skip-bad-chunks", action="store_true",
                   help="replay what can be read of a damaged file, and say what was skipped")
    p.add_argument("--quiet", action="store_true", help="no status or progress on stderr")
    add_timeout(p)
    p.set_defaults(run=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    need_mcap("replay")
    from .mcap import RecordingReader

    args.address = normalize_address(args.address)

    only = compile_pattern(args.topics) if args.topics else None
    with RecordingReader(args.file) as reader:
        bad, total = reader.bad_chunks()  # every CRC, before anything is sent
        if bad and not args.skip_bad_chunks:
            names = "; ".join(f"{c.describe()}: {c.error}" for c in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise UserError(
                f"{args.file}: {len(bad)} of {total} chunk(s) damaged, nothing sent: "
                f"{names}{more}; --skip-bad-chunks replays the rest")
        first = next(_selected(reader, args, only), None)  # the file is checked before we
        if first is None:                                 # connect
            raise UserError(f"{args.file}: no messages to replay"
                            + (f" on {only.text}" if only else "")
                            + (f" after {args.start:g} s" if args.start else ""))
        sent = 0
        with connect_to(args.address, args.timeout, args) as bus:
            pub = bus.publisher()
            try:
                while True:
                    sent += _replay(bus, pub, _selected(reader, args, only), args)
                    if not args.loop:
                        break
            except KeyboardInterrupt:
                if not args.loop:
                    raise
    if not args.quiet:
        say(f"vbus replay: {sent} message(s) from {args.file} to {args.address}")
    if bad:
        for chunk in bad:
            say(f"vbus replay: skipped {chunk.describe()}: {chunk.error}")
        say(f"vbus replay: {len(bad)} of {total} chunk(s) damaged and skipped: exit status 1")
        return 1
    return 0


def _selected(reader: Any, args: argparse.Namespace, only: Any) -> Any:
    """The bus messages to replay: (topic, log time, frame 1, external frame)."""
    from .mcap import frames_of

    origin: int | None = None
    start_ns = int(args.start * 1e9)
    for rec in reader.messages(skip_bad=args.skip_bad_chunks):
        if origin is None:
            origin = rec.log_time
        if rec.log_time - origin < start_ns:
            continue
        if only is not None and not only.match(rec.topic):
            continue
        first, external = frames_of(rec.topic, rec.schema, rec.body)
        yield rec, first, external


def _send(pub: Any, first: bytes, external: bytes | None) -> None:
    """Send one message; while the queue to the broker is full, wait and send it again (its
    seq is in its frame, so a retry leaves no gap)."""
    wait = _ROOM_WAIT[0]
    while True:
        dropped = pub.stats().dropped
        pub._publish_frames(first, external)
        if pub.stats().dropped == dropped:
            return
        time.sleep(wait)
        wait = min(wait * 2, _ROOM_WAIT[1])


def _replay(bus: Any, pub: Any, messages: Any, args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    meter = RateMeter()
    speed: float = args.speed
    sent = 0
    start = time.monotonic()
    origin: int | None = None
    position = 0.0  # seconds into the replay

    def status() -> str:
        return (f"replayed {sent:,} message(s), {meter.observe(sent):,.0f} msg/s, "
                f"{position:.1f} s in")

    pending = next(messages, None)
    try:
        while pending is not None:
            current, pending = pending, next(messages, None)
            rec, first, external = current
            if origin is None:
                origin = rec.log_time
            position = (rec.log_time - origin) / 1e9
            if speed:
                due = start + position / speed
                while (wait := due - time.monotonic()) > 0:
                    time.sleep(min(wait, PROGRESS_TICK))  # keeping the recorded timing, not waiting
                    progress.update(status)        # for a message
            if pending is None:
                _send_confirmed(bus, pub, rec, first, external, args.timeout)
            else:
                _send(pub, first, external)
            sent += 1
            progress.update(status)
    finally:
        progress.update(status, force=True)
        progress.done()
    return sent


def _send_confirmed(bus: Any, pub: Any, rec: Any, first: bytes, external: bytes | None,
                    timeout: float) -> None:
    """Send the last message and wait until the broker forwards it back: then it and every
    message before it (in order, through the same publisher) reached the broker."""
    with bus.subscribe(rec.topic) as echo:
        _send(pub, first, external)
        env = rec.body.vbus
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = echo.recv(max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise UserError(
                    f"the broker did not forward the last message within {timeout:g} s"
                ) from None
            if msg.sender == env.sender and msg.seq == env.seq and not (
                msg.retained and not env.retained
            ):
                return
