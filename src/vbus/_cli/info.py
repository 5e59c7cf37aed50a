"""``vbus info``: what a recording holds (like ``ros2 bag info``), every chunk checked."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from .common import add_parser, human_bytes, human_duration
from .mcap import need_mcap


def register(commands: Any) -> None:
    p = add_parser(
        commands, "info",
        help="show what a recording holds: duration, topics, counts, losses, size",
        description=(
            "Read FILE (a recording made by 'vbus record', or any MCAP file) and show its "
            "size, time span, message count, the losses the recorder found, and per topic "
            "the messages, losses and schema. Every chunk is read and its CRC checked: a "
            "damaged file is said so, with its bad chunks, and the exit status is 1. --json "
            "prints the same as one JSON object."
        ),
        example=(
            "example:\n"
            "  vbus info run1.mcap\n"
            "    file       run1.mcap (3.4 MB, 4 chunks, CRCs valid)\n"
            "    recorded   tcp://127.0.0.1:5555, pattern **\n"
            "    duration   12.3 s (2026-01-05 12:00:01.000 to 12:00:13.300)\n"
            "    messages   5,262\n"
            "    lost       120 (gaps the recorder found in the publishers' seqs)\n"
            "    topic        messages  lost  schema\n"
            "    stage/x         5,000   120  vbus.Value\n"
            "    camera/frame      262     0  foxglove.RawImage"
        ),
    )
    p.add_argument("file", metavar="FILE.mcap", help="an MCAP file")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=run)


def _when(ns: int) -> str:
    try:
        stamp = datetime.datetime.fromtimestamp(ns / 1e9)
    except (ValueError, OverflowError, OSError):
        return str(ns)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


def inspect(path: str) -> dict[str, Any]:
    """Everything info shows, as a dict."""
    from mcap.records import Channel, Message, Schema

    from .mcap import LOSS_TOPIC, METADATA_NAME, SUMMARY_NAME, RecordingReader, loss_summary

    with RecordingReader(path) as reader:
        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, int]] = {}
        if reader.summary is not None:
            schemas.update({i: s.name for i, s in reader.summary.schemas.items()})
            channels.update({i: (c.topic, c.schema_id)
                             for i, c in reader.summary.channels.items()})
        counts: dict[str, int] = {}
        topic_schemas: dict[str, set[str]] = {}
        lost_found: dict[str, int] = {}
        first = last = None
        total = 0
        bad: list[str] = []
        chunks = 0
        unfinished_at: str | None = None
        for chunk in reader.chunks():
            chunks += 1
            if chunk.truncated:
                chunks -= 1
                unfinished_at = chunk.error
            elif chunk.error is not None:
                bad.append(f"{chunk.describe()}: {chunk.error}")
                continue
            for record in chunk.records:  # a truncated end: what could be read of it
                if isinstance(record, Schema):
                    schemas[record.id] = record.name
                elif isinstance(record, Channel):
                    channels[record.id] = (record.topic, record.schema_id)
                elif isinstance(record, Message):
                    topic, schema_id = channels.get(record.channel_id, ("?", 0))
                    if topic == LOSS_TOPIC:
                        try:
                            loss = json.loads(record.data)
                            lost_found[loss["topic"]] = (lost_found.get(loss["topic"], 0)
                                                         + int(loss["lost"]))
                        except (ValueError, KeyError, TypeError):
                            pass
                        continue
                    total += 1
                    counts[topic] = counts.get(topic, 0) + 1
                    topic_schemas.setdefault(topic, set()).add(schemas.get(schema_id, ""))
                    t = record.log_time
                    first = t if first is None or t < first else first
                    last = t if last is None or t > last else last
        metadata = reader.metadata()
        size = reader.size
        damaged = reader.damaged
        reader_unfinished = reader.summary is None
    recorded = metadata.get(METADATA_NAME, {})
    summary = metadata.get(SUMMARY_NAME)
    per_topic = loss_summary(summary.get("topics")) if summary else {}
    lost = {t: int(v.get("lost", 0)) for t, v in per_topic.items()} if summary else lost_found
    return {
        "file": path, "size": size, "chunks": chunks, "bad_chunks": bad,
        "unfinished": unfinished_at or (damaged if reader_unfinished else None),
        "recorded": recorded,
        "start": first, "end": last, "messages": total,
        "lost": sum(lost.values()),
        "topics": {t: {"messages": counts.get(t, 0), "lost": lost.get(t, 0),
                       "schema": ", ".join(sorted(s for s in topic_schemas.get(t, ()) if s))}
                   for t in sorted(set(counts) | set(lost))},
    }


def run(args: argparse.Namespace) -> int:
    need_mcap("info")
    facts = inspect(args.file)
    if args.json:
        print(json.dumps(facts))
        return 1 if facts["bad_chunks"] else 0
    out = sys.stdout
    check = (f"{len(facts['bad_chunks'])} DAMAGED" if facts["bad_chunks"] else "CRCs valid")
    out.write(f"file       {facts['file']} ({human_bytes(facts['size'])}, "
              f"{facts['chunks']} chunk(s), {check})\n")
    if facts["unfinished"]:
        out.write(f"unfinished the recorder did not finish ({facts['unfinished']}); what "
                  "could be read is shown\n")
    recorded = facts["recorded"]
    if recorded:
        what = f"{recorded.get('address', '?')}, pattern {recorded.get('pattern', '?')}"
        if recorded.get("exclude"):
            what += f", excluding {recorded['exclude']}"
        out.write(f"recorded   {what} (vbus recording format "
                  f"{recorded.get('vbus.recording_format', '?')})\n")
    if facts["start"] is not None:
        span = (facts["end"] - facts["start"]) / 1e9
        out.write(f"duration   {human_duration(span)} ({_when(facts['start'])} to "
                  f"{_when(facts['end'])})\n")
    out.write(f"messages   {facts['messages']:,}\n")
    out.write(f"lost       {facts['lost']:,}"
              + (" (gaps the recorder found in the publishers' seqs)" if facts["lost"] else "")
              + "\n")
    topics = facts["topics"]
    if topics:
        width = max(len("topic"), *(len(t) for t in topics))
        out.write(f"{'topic':<{width}}  {'messages':>10}  {'lost':>8}  schema\n")
        for topic, t in topics.items():
            out.write(f"{topic:<{width}}  {t['messages']:>10,}  {t['lost']:>8,}  "
                      f"{t['schema']}\n")
    for line in facts["bad_chunks"]:
        out.write(f"damaged    {line}\n")
    return 1 if facts["bad_chunks"] else 0
