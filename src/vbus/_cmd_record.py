"""``vbus record``: the messages matching a pattern to an MCAP file (format: _mcap.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
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
    non_negative_int,
    positive_float,
    say,
)
from ._errors import DecodeError
from ._topics import compile_pattern

log = logging.getLogger("vbus.record")

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
                   help="the file to write (replaced if it exists, once the recording is "
                        "complete; until then it is FILE.mcap.part)")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="stop after N messages (default: 0 = no limit)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds")
    p.add_argument("--quiet", action="store_true", help="no status or progress on stderr")
    add_timeout(p)
    p.set_defaults(run=run_record)


def need_mcap(command: str) -> None:
    try:
        import mcap  # noqa: F401
    except ImportError:
        raise UserError(f"vbus {command} needs the mcap package: pip install 'vbus[cli]'") from None


class FrameSource:
    """The ZeroMQ messages behind a subscriber's messages, each once and as published:
    frame 1 and the external frame (or None). A batch (several messages of one publisher and
    topic in one frame) is one ZeroMQ message for several vbus messages."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    def recv(self, timeout: float | None) -> tuple[bytes, bytes | None] | None:
        """The frames of the next message; None when they came with the one before (a batch).
        TimeoutError after ``timeout``."""
        frames: tuple[bytes, bytes | None] | None = self._sub._recv_frames(timeout)[1]
        return frames


def run_record(args: argparse.Namespace) -> int:
    """Writes FILE.part, renamed to FILE once complete: a mistake (no broker at that address)
    leaves an earlier FILE as it was."""
    need_mcap("record")
    from ._mcap import RecordingWriter

    pattern = compile_pattern(args.pattern).text
    path: str = args.output
    partial = path + ".part"
    stream = open(partial, "wb")  # noqa: SIM115 - a file we cannot write is one line, up front
    writer: RecordingWriter | None = None
    try:
        with connect_to(args.address, args.timeout, args) as bus, \
                bus._subscribe_recorder(pattern) as sub:
            writer = RecordingWriter(stream, {"address": args.address, "pattern": pattern})
            began = time.monotonic()
            try:
                received = _record(sub, writer, args)
            finally:
                writer.finish()
    except BaseException:
        stream.close()
        with contextlib.suppress(OSError):
            if writer is not None and writer.messages:
                os.replace(partial, path)  # what was recorded is kept
            else:
                os.remove(partial)
        raise
    stream.close()
    os.replace(partial, path)
    if not args.quiet:
        elapsed = time.monotonic() - began
        say(f"vbus record: {received} message(s) on {writer.topics} topic(s), "
            f"{human_bytes(writer.bytes)} in {elapsed:.1f} s -> {path}")
    return 0


def _record(sub: Any, writer: Any, args: argparse.Namespace) -> int:
    """Record until done; the number of vbus messages received (a batch counts its messages,
    the file holds it as one MCAP message)."""
    progress = Progress(args.quiet)
    meter = RateMeter()
    end = None if args.duration is None else time.monotonic() + args.duration
    source = FrameSource(sub)
    received = 0

    def status() -> str:
        return (f"recorded {received:,} message(s), {writer.topics} topic(s), "
                f"{human_bytes(writer.bytes)}, {meter.observe(received):,.0f} msg/s")

    try:
        if not args.quiet:
            say(f"vbus record: recording {sub.pattern} at {args.address} to {args.output} "
                "(Ctrl-C to stop)")
        while not args.count or received < args.count:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            wait = _TICK if remaining is None else min(_TICK, remaining)
            try:
                frames = source.recv(wait if progress.enabled else remaining)
            except TimeoutError:
                progress.update(status)
                continue
            received += 1
            if frames is not None:
                try:
                    writer.add(*frames)
                except DecodeError as exc:  # the subscriber decoded it: not expected
                    log.warning("skipped a message that is not a vbus message: %s", exc)
            progress.update(status)
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: the normal way to stop; the file gets completed
    finally:
        progress.update(status, force=True)
        progress.done()
    return received
