"""``vbus stats``: the broker's ``$vbus/stats`` as a table, once or live."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .._proto import stats as _stats
from .._proto.stats import STATS_TOPIC, BrokerStats
from .._subscriber import Subscriber
from .common import (
    UserError,
    add_address,
    add_parser,
    add_timeout,
    connect_to,
    human_bytes,
    human_duration,
    normalize_address,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

STALE_AFTER = 3.0  # the broker publishes once a second


def register(commands: Any) -> None:
    p = add_parser(
        commands, "stats",
        help="show the broker's statistics: per-topic rates, subscribers, drops",
        description=(
            "Show what the broker at ADDRESS publishes on $vbus/stats once a second: messages "
            "and bytes in and out, subscribers, messages dropped anywhere on the bus, and per "
            "topic the totals and the message and byte rates. Prints one table and exits, or "
            "with --watch keeps it up to date until Ctrl-C."
        ),
        example=(
            "examples:\n"
            "  vbus stats tcp://127.0.0.1:5555\n"
            "  vbus stats tcp://127.0.0.1:5555 --watch"
        ),
    )
    add_address(p)
    p.add_argument("--watch", action="store_true", help="a live table, until Ctrl-C")
    add_timeout(p)
    p.set_defaults(run=run)


def decode(data: Any) -> BrokerStats:
    try:
        return _stats.decode(data)
    except msgspec.ValidationError as exc:
        raise UserError(f"unexpected {STATS_TOPIC} message: {exc}") from None


def table(stats: BrokerStats, address: str, *, stale: float = 0.0) -> RenderableType:
    from rich.console import Group
    from rich.table import Table

    title = f"vbus broker {stats.broker} at {address}, up {human_duration(stats.uptime)}"
    if stale:
        title += f"  (no statistics for {stale:.0f} s)"
    totals = Table(title=title, show_header=True, title_justify="left")
    for column in ("in (ZeroMQ)", "out (ZeroMQ)", "subscribers", "publishers", "dropped"):
        totals.add_column(column, justify="right")
    totals.add_row(
        f"{stats.messages_in:,} msg / {human_bytes(stats.bytes_in)}",
        f"{stats.messages_out:,} msg / {human_bytes(stats.bytes_out)}",
        str(stats.subscribers),
        "-" if stats.publishers is None else str(stats.publishers),
        str(stats.dropped),
    )
    topics = Table(show_header=True)
    topics.add_column("topic")
    for column in ("messages", "bytes", "msg/s", "bytes/s"):
        topics.add_column(column, justify="right")
    topics.caption = "(per topic: the publishers' own counts)"
    ordered = sorted(stats.topics.items(), key=lambda kv: (-kv[1].message_rate, kv[0]))
    for topic, t in ordered:
        topics.add_row(topic, f"{t.messages:,}", human_bytes(t.bytes),
                       f"{t.message_rate:,.1f}", f"{human_bytes(t.byte_rate)}/s")
    if not ordered:
        topics.add_row("(no topics yet)", "", "", "", "")
    return Group(totals, topics)


def _next_stats(sub: Subscriber, timeout: float) -> BrokerStats:
    return decode(sub.recv(timeout=timeout).data)


def plain_table(stats: BrokerStats, address: str, *, stale: float = 0.0) -> str:
    """The table without rich: plain text."""
    lines = [f"vbus broker {stats.broker} at {address}, up {human_duration(stats.uptime)}"
             + (f"  (no statistics for {stale:.0f} s)" if stale else "")]
    publishers = "-" if stats.publishers is None else str(stats.publishers)
    lines.append(f"in (ZeroMQ) {stats.messages_in:,} msg / {human_bytes(stats.bytes_in)}   "
                 f"out (ZeroMQ) {stats.messages_out:,} msg / {human_bytes(stats.bytes_out)}   "
                 f"subscribers {stats.subscribers}   publishers {publishers}   "
                 f"dropped {stats.dropped}")
    ordered = sorted(stats.topics.items(), key=lambda kv: (-kv[1].message_rate, kv[0]))
    width = max([len("topic"), *(len(t) for t, _ in ordered)])
    lines.append(f"{'topic':<{width}}  {'messages':>12}  {'bytes':>10}  {'msg/s':>10}  "
                 f"{'bytes/s':>12}")
    for topic, t in ordered:
        lines.append(f"{topic:<{width}}  {t.messages:>12,}  {human_bytes(t.bytes):>10}  "
                     f"{t.message_rate:>10,.1f}  {human_bytes(t.byte_rate) + '/s':>12}")
    if not ordered:
        lines.append("(no topics yet)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    args.address = normalize_address(args.address)
    try:
        from rich.console import Console  # noqa: F401
    except ImportError:
        return _run_plain(args)
    return _run_rich(args)


def _first_stats(sub: Subscriber, args: argparse.Namespace) -> BrokerStats:
    wait = max(args.timeout, STALE_AFTER)
    try:
        return _next_stats(sub, wait)
    except TimeoutError:
        raise UserError(
            f"the broker at {args.address} published no {STATS_TOPIC} within {wait:g} s"
        ) from None


def _run_plain(args: argparse.Namespace) -> int:
    with connect_to(args.address, args.timeout, args) as bus, bus.subscribe(STATS_TOPIC) as sub:
        try:
            stats = _first_stats(sub, args)
            print(plain_table(stats, args.address), flush=True)
            while args.watch:
                stats = _next_stats(sub, STALE_AFTER * 10)
                print("\n" + plain_table(stats, args.address), flush=True)
        except KeyboardInterrupt:
            return 0
        except TimeoutError:
            raise UserError(f"the broker at {args.address} published no {STATS_TOPIC} "
                            f"for {STALE_AFTER * 10:g} s") from None
    return 0


def _run_rich(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError  # stats --watch | head: exit 0, like vbus sub

    console = _Console()
    with connect_to(args.address, args.timeout, args) as bus, bus.subscribe(STATS_TOPIC) as sub:
        try:
            stats = _first_stats(sub, args)
        except KeyboardInterrupt:
            return 0
        if not args.watch:
            console.print(table(stats, args.address))
            return 0
        if not console.is_terminal:  # a pipe or a file: one table after the other
            try:
                while True:
                    console.print(table(stats, args.address), "")
                    console.file.flush()
                    stats = _next_stats(sub, STALE_AFTER * 10)
            except KeyboardInterrupt:
                return 0
            except TimeoutError:
                raise UserError(f"the broker at {args.address} published no {STATS_TOPIC} "
                                f"for {STALE_AFTER * 10:g} s") from None
        last = time.monotonic()
        try:
            with Live(table(stats, args.address), console=console, auto_refresh=False) as live:
                while True:
                    try:
                        stats = _next_stats(sub, STALE_AFTER)
                        last = time.monotonic()
                        live.update(table(stats, args.address), refresh=True)
                    except TimeoutError:
                        stale = time.monotonic() - last
                        live.update(table(stats, args.address, stale=stale), refresh=True)
        except KeyboardInterrupt:
            return 0
