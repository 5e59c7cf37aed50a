"""``vbus record`` and ``vbus replay``: traffic to an MCAP file and back (format: _mcap.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from ._cmd_common import (
    Progress,
    RateMeter,
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    human_bytes,
    non_negative_float,
    non_negative_int,
    positive_float,
    say,
)
from ._topics import compile_pattern

_TICK = 0.25  # progress refresh while waiting


def register(commands: Any) -> None:
    p = add_parser(
        commands, "record",
        help="record the messages matching a pattern to an MCAP file",
        description=(
            "Subscribe to PATTERN at the broker at ADDRESS and write every message to FILE in "
            "MCAP (one channel per topic; each message keeps its vbus frames byte for byte, "
            "see docs/cli.md), until --count messages, --duration seconds, or Ctrl-C / SIGTERM "
            "(the file is completed either way). Once subscribed it says so on stderr; on a "
            "terminal it shows counts and rates as it goes (--quiet: nothing)."
        ),
        example=(
            "examples:\n"
            "  vbus record tcp://127.0.0.1:5555 '**' -o run1.mcap\n"
            "  vbus record tcp://127.0.0.1:5555 'stage/*' -o stage.mcap --duration 60\n"
            "  mcap info run1.mcap        # other MCAP tools read it too"
        ),
    )
    p.add_argument("address", metavar="ADDRESS", help="the broker, as 'vbus broker' prints it")
    p.add_argument("pattern", metavar="PATTERN", help="e.g. stage/*, camera/**, **")
    p.add_argument("-o", "--output", required=True, metavar="FILE.mcap",
                   help="the file to write (replaced if it exists)")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="stop after N messages (default: 0 = no limit)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds")
    p.add_argument("--quiet", action="store_true", help="no status or progress on stderr")
    add_timeout(p)
    p.set_defaults(run=run_record)

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


def _need_mcap(command: str) -> None:
    try:
        import mcap  # noqa: F401
    except ImportError:
        raise UserError(f"vbus {command} needs the mcap package: pip install 'vbus[cli]'") from None


# -- record -----------------------------------------------------------------------------------
def run_record(args: argparse.Namespace) -> int:
    _need_mcap("record")
    from ._mcap import RecordingWriter

    pattern = compile_pattern(args.pattern).text
    path: str = args.output
    stream = open(path, "wb")  # noqa: SIM115 - a file we cannot write is one line, up front
    try:
        with connect_to(args.address, args.timeout) as bus, bus.subscribe(pattern) as sub:
            writer = RecordingWriter(stream, {"address": args.address, "pattern": pattern})
            if not args.quiet:
                say(f"vbus record: recording {pattern} at {args.address} to {path} "
                    "(Ctrl-C to stop)")
            began = time.monotonic()
            try:
                _record(sub, writer, args)
            finally:
                writer.finish()
    except BaseException:
        stream.close()
        if os.path.getsize(path) == 0:
            with contextlib.suppress(OSError):
                os.remove(path)  # nothing recorded: no empty file left behind
        raise
    stream.close()
    if not args.quiet:
        elapsed = time.monotonic() - began
        say(f"vbus record: {writer.messages} message(s) on {writer.topics} topic(s), "
            f"{human_bytes(writer.bytes)} in {elapsed:.1f} s -> {path}")
    return 0


def _record(sub: Any, writer: Any, args: argparse.Namespace) -> None:
    progress = Progress(args.quiet)
    meter = RateMeter()
    end = None if args.duration is None else time.monotonic() + args.duration

    def status() -> str:
        return (f"recorded {writer.messages:,} message(s), {writer.topics} topic(s), "
                f"{human_bytes(writer.bytes)}, {meter.observe(writer.messages):,.0f} msg/s")

    try:
        while not args.count or writer.messages < args.count:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            wait = _TICK if remaining is None else min(_TICK, remaining)
            try:
                _msg, first, external = sub._recv_frames(wait if progress.enabled else remaining)
            except TimeoutError:
                progress.update(status)
                continue
            writer.add(first, external)
            progress.update(status)
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: the normal way to stop; the file gets completed
    finally:
        progress.update(status, force=True)
        progress.done()


# -- replay -----------------------------------------------------------------------------------
def run_replay(args: argparse.Namespace) -> int:
    _need_mcap("replay")
    from ._mcap import RecordingReader

    with RecordingReader(args.file) as reader:
        first = next(iter(reader), None)  # the file is checked before we connect
        if first is None:
            raise UserError(f"{args.file}: the recording holds no messages")
        with connect_to(args.address, args.timeout) as bus:
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
    total = reader.message_count
    speed: float = args.speed
    sent = 0

    def status() -> str:
        of = f"/{total:,}" if total else ""
        return f"replayed {sent:,}{of} message(s), {meter.observe(sent):,.0f} msg/s"

    start = time.monotonic()
    origin: int | None = None
    messages = iter(reader)
    pending = next(messages, None)
    try:
        while pending is not None:
            current, pending = pending, next(messages, None)
            if origin is None:
                origin = current.log_time
            if speed:
                due = start + (current.log_time - origin) / 1e9 / speed
                while (wait := due - time.monotonic()) > 0:
                    time.sleep(min(wait, _TICK))  # keeping the recorded timing, not waiting
                    progress.update(status)        # for a message
            if pending is None:
                _send_confirmed(bus, pub, current, args.timeout)
            else:
                pub._publish_frames(current.first, current.external)
            sent += 1
            progress.update(status)
    finally:
        progress.update(status, force=True)
        progress.done()
    return sent


def _send_confirmed(bus: Any, pub: Any, message: Any, timeout: float) -> None:
    """Send the last message and wait until the broker forwards it back: then it and every
    message before it (in order, through the same publisher) reached the broker."""
    with bus.subscribe(message.topic) as echo:
        pub._publish_frames(message.first, message.external)
        deadline = time.monotonic() + timeout
        while True:
            try:
                _msg, first, _external = echo._recv_frames(max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise UserError(
                    f"the broker did not forward the last message within {timeout:g} s"
                ) from None
            if first == message.first:
                return
