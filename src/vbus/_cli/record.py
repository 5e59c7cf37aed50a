"""``vbus record``: the messages matching a pattern to an MCAP file (format: mcap.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

from .._errors import EncodeError
from .._message import Message
from .._proto.topics import compile_pattern
from .common import (
    PROGRESS_TICK,
    Progress,
    RateMeter,
    UserError,
    add_parser,
    add_timeout,
    connect_to,
    human_bytes,
    non_negative_int,
    positive_float,
    positive_int,
    say,
    split_address,
)
from .mcap import need_mcap

log = logging.getLogger("vbus.record")

def register(commands: Any) -> None:
    p = add_parser(
        commands, "record",
        help="record the messages matching a pattern to an MCAP file",
        usage="vbus record [-h] [ADDRESS] PATTERN -o FILE.mcap [options]",
        description=(
            "Subscribe to PATTERN at the broker at ADDRESS and write every message to FILE in "
            "MCAP, one MCAP message per bus message, as JSON with a jsonschema per channel "
            "(2-D and 3-D arrays as foxglove.RawImage), so Foxglove and the MCAP tools read "
            "it; see docs/cli.md. It goes on until --count messages, --duration seconds, or "
            "Ctrl-C / SIGTERM (the file is completed either way). Once subscribed it says so "
            "on stderr; on a terminal it shows counts, losses and rates as it goes.\n\n"
            "Losses: a message missing from a publisher's sequence numbers (counted from the "
            "first one recorded of each publisher and topic) is counted, written to the "
            "recording (channel $vbus/loss, and per topic in the vbus.summary metadata; "
            "'vbus info' shows them) and reported at exit per topic; the exit status is 1 "
            "when anything was lost."
        ),
        example=(
            "examples:\n"
            "  vbus record 'stage/*' -o stage.mcap --duration 60     # the default broker\n"
            "  vbus record tcp://127.0.0.1:5555 '**' -o run1.mcap --exclude 'camera/**'\n"
            "  vbus info run1.mcap\n"
            "  mcap info run1.mcap        # other MCAP tools read it too"
        ),
    )
    p.add_argument("positionals", nargs="+", metavar="[ADDRESS] PATTERN",
                   help="the broker (default: $VBUS_ADDRESS, else tcp://127.0.0.1:5555) and "
                        "the pattern: stage/*, camera/**, **")
    p.add_argument("-o", "--output", required=True, metavar="FILE.mcap",
                   help="the file to write (replaced if it exists, once the recording is "
                        "complete; until then it is FILE.mcap.part)")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="stop after N messages (default: 0 = no limit)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="do not record topics matching PATTERN (repeatable)")
    p.add_argument("--hwm", type=positive_int, default=None, metavar="N",
                   help="this recorder's queue, in messages (default: the bus's)")
    p.add_argument("--quiet", action="store_true", help="no status or progress on stderr "
                                                        "(losses are still reported)")
    add_timeout(p)
    p.set_defaults(run=run_record)


class LossCounter:
    """Every gap the subscriber finds, per topic, written to the recording as it is found.

    The subscriber calls ``found`` inside recv(), before it returns the message after the
    gap; the loss is committed (counted, written) when that message is recorded, so the
    counts match the gaps in the file even when Ctrl-C falls in between."""

    def __init__(self, writer: Any, excluded: list[Any] | None = None) -> None:
        self.writer = writer  # set once the recording has begun
        self._excluded = excluded or []
        self._pending: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], int] = {}  # last seq recorded per (sender, topic)
        self.lost: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.total_lost = 0

    def found(self, topic: str, sender: str, lost: int) -> None:
        if self._excluded and any(p.match(topic) for p in self._excluded):
            return  # not recorded: neither its messages nor its losses
        with self._lock:  # the hook runs in the receiving thread today; any thread is safe
            self._pending.append((topic, sender, lost))

    def recorded(self, msg: Message) -> None:
        topic = msg.topic
        if self._pending:
            with self._lock:
                pending, self._pending = self._pending, []
            for t, sender, lost in pending:
                self.lost[t] = self.lost.get(t, 0) + lost
                self.total_lost += lost
                if self.writer is not None:
                    self.writer.add_loss(t, sender, lost, self._last.get((sender, t)))
        if not msg.retained:
            self._last[(msg.sender, topic)] = msg.seq
        self.received[topic] = self.received.get(topic, 0) + 1

    def summary(self) -> dict[str, str]:
        topics = {t: {"received": self.received.get(t, 0), "lost": self.lost.get(t, 0)}
                  for t in sorted(set(self.received) | set(self.lost))}
        return {"received": str(sum(self.received.values())), "lost": str(self.total_lost),
                "topics": json.dumps(topics, separators=(",", ":"))}

    def report(self, command: str, quiet: bool) -> None:
        """The per-topic table at exit: always when something was lost."""
        if quiet and not self.total_lost:
            return
        topics = sorted(set(self.received) | set(self.lost))
        if not topics:
            return
        width = max(len("topic"), *(len(t) for t in topics))
        say(f"  {'topic':<{width}}  {'received':>10}  {'lost':>10}")
        for t in topics:
            say(f"  {t:<{width}}  {self.received.get(t, 0):>10,}  {self.lost.get(t, 0):>10,}")
        if self.total_lost:
            say(f"vbus {command}: LOST {self.total_lost:,} message(s) (gaps in the publishers' "
                "sequence numbers): exit status 1")


def run_record(args: argparse.Namespace) -> int:
    """Writes FILE.part, renamed to FILE once complete: a mistake (no broker at that address)
    leaves an earlier FILE as it was."""
    need_mcap("record")
    from .mcap import RecordingWriter

    address, rest = split_address(args.positionals, "PATTERN", 1)
    args.address = address
    pattern = compile_pattern(rest[0]).text
    excluded = [compile_pattern(p) for p in args.exclude]
    path: str = args.output
    if os.path.isdir(path):
        raise UserError(f"-o {path}: is a directory; name the file to write")
    partial = path + ".part"
    stream = open(partial, "wb")  # noqa: SIM115 - a file we cannot write is one line, up front
    writer: RecordingWriter | None = None
    losses = LossCounter(None, excluded)
    began = time.monotonic()
    try:
        with connect_to(address, args.timeout, args) as bus, bus.subscribe(
            pattern, hwm=args.hwm, on_loss=lambda t, s, n: losses.found(t, s, n)
        ) as sub:
            writer = RecordingWriter(stream, {"address": address, "pattern": pattern,
                                              "exclude": " ".join(p.text for p in excluded)})
            losses.writer = writer
            began = time.monotonic()
            try:
                _record(sub, writer, losses, excluded, args)
            finally:
                writer.finish(losses.summary())
                errors = sub.stats().errors
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
        say(f"vbus record: {writer.messages} message(s) on {writer.topics} topic(s), "
            f"{human_bytes(writer.bytes)} in {elapsed:.1f} s -> {path}")
    losses.report("record", args.quiet)
    if errors:
        say(f"vbus record: {errors} message(s) could not be decoded and are not in the "
            "recording (see the warnings above)")
    return 1 if losses.total_lost or errors else 0


def _record(sub: Any, writer: Any, losses: LossCounter, excluded: list[Any],
            args: argparse.Namespace) -> None:
    """Record until done."""
    progress = Progress(args.quiet)
    meter = RateMeter()
    end = None if args.duration is None else time.monotonic() + args.duration
    count: int = args.count

    def status() -> str:
        lost = f", LOST {losses.total_lost:,}" if losses.total_lost else ""
        return (f"recorded {writer.messages:,} message(s){lost}, {writer.topics} topic(s), "
                f"{human_bytes(writer.bytes)}, {meter.observe(writer.messages):,.0f} msg/s")

    try:
        if not args.quiet:
            say(f"vbus record: recording {sub.pattern} at {args.address} to {args.output} "
                "(Ctrl-C to stop)")
        while not count or writer.messages < count:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            wait = PROGRESS_TICK if remaining is None else min(PROGRESS_TICK, remaining)
            try:
                msg = sub.recv(wait if progress.enabled else remaining)
            except TimeoutError:
                progress.update(status)
                continue
            if excluded and any(p.match(msg.topic) for p in excluded):
                continue
            try:
                writer.add(msg)
            except EncodeError as exc:
                log.warning("not recorded: %s", exc)
                continue
            losses.recorded(msg)
            progress.update(status)
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: the normal way to stop; the file gets completed
    finally:
        progress.update(status, force=True)
        progress.done()
