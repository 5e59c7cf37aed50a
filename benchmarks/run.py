"""The vbus benchmark suite: vbus beside raw pyzmq and Zenoh, same work, same topology, same run.

    python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--runs N] [--messages N]

Writes benchmarks/results.md (the table, the targets of issue 14 with ratios and verdicts,
the machine) and results.json next to it. ``vbus bench`` loads this file and calls ``main(argv)``.
See docs/performance.md for what each workload measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    BenchError,
    fmt_num,
    fmt_ratio,
    fmt_summary,
    machine,
    ratio,
    use_vbus_from,
    zenoh_available,
)
from bench_workloads import (  # noqa: E402
    B64,
    IMPL_NAMES,
    KIB1,
    MIB1,
    MIB16,
    ORDER,
    Config,
    Row,
    guarantees,
    latency,
    memory,
    throughput,
)

WORKLOADS: dict[str, Any] = {
    "throughput-embedded": lambda c, log: throughput("throughput", "embedded", [B64], c, log),
    "throughput-ipc": lambda c, log: throughput("throughput", "ipc", [B64], c, log),
    "throughput-tcp": lambda c, log: throughput("throughput", "tcp", [B64], c, log),
    "frames-embedded": lambda c, log: throughput(
        "frames", "embedded", [KIB1, MIB1, MIB16], c, log),
    "frames-ipc": lambda c, log: throughput("frames", "ipc", [MIB1, MIB16], c, log),
    "frames-tcp": lambda c, log: throughput("frames", "tcp", [MIB1, MIB16], c, log),
    "latency-embedded": lambda c, log: latency("latency", "embedded", c, log),
    "latency-ipc": lambda c, log: latency("latency", "ipc", c, log),
    "latency-tcp": lambda c, log: latency("latency", "tcp", c, log),
    "fanout-tcp": lambda c, log: throughput("fanout", "tcp", [B64], c, log, nsubs=4),
    "threads-tcp": lambda c, log: throughput("threads", "tcp", [B64], c, log, threads=(1, 4)),
    "guarantees": None,  # special: its own section
    "memory": None,  # special: its own section
    "shm": None,  # special: bench_shm.py (shared memory, issue 17), its own section
}
MEMORY_FLAG_MIB = 1024  # target 5: 64 frames of 16 MiB in all three processes is not bounded
EXTRA = ("profile",)  # on request only: needs py-spy

DESCRIPTIONS = {
    "throughput": "64 B messages, one publisher, one subscriber",
    "frames": "numpy frames, one publisher, one subscriber",
    "latency": "64 B ping-pong, one-way = round trip / 2",
    "fanout": "64 B to 4 subscriber processes",
    "threads": "64 B, 4 threads sharing one publisher vs 1 thread",
    "guarantees": "order across topics and exact loss accounting under loss (1 and 4 threads)",
    "memory": "stalled subscriber, 16 MiB frames: peak RSS (bounded memory)",
    "shm": "1 and 16 MiB frames between processes on one host: vbus shm, raw pyzmq, Zenoh shm",
    "profile": "py-spy profile of the vbus 64 B brokered tcp path",
}


def select(only: list[str] | None) -> list[str]:
    if not only:
        return list(WORKLOADS)
    chosen: list[str] = []
    for item in only:
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            matches = [w for w in [*WORKLOADS, *EXTRA] if w == name or w.startswith(name + "-")]
            if not matches:
                raise SystemExit(
                    f"bench: unknown workload {name!r}; known: {', '.join([*WORKLOADS, *EXTRA])}"
                )
            chosen += [m for m in matches if m not in chosen]
    canonical = [*WORKLOADS, *EXTRA]
    return sorted(chosen, key=canonical.index)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vbus bench",
        description="vbus against raw pyzmq and Zenoh: throughput, frames, latency, fan-out, "
        "threads, memory. Ratios are what matter: every figure of one table comes from the "
        "same run on the same machine.",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter runs (about 2 minutes instead of about 12)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only these workloads (comma-separated; a group name such as "
                   "'latency' selects all its topologies); 'profile' runs the py-spy profile")
    p.add_argument("--runs", type=int, help="runs per figure (median, min, max); default 5, "
                   "quick 3")
    p.add_argument("--messages", type=int, metavar="N",
                   help="send exactly N messages per run (pings for latency) instead of "
                   "publishing for a fixed time")
    p.add_argument("--duration", type=float, metavar="S",
                   help="seconds of publishing per run (default 1.5, quick 0.4)")
    p.add_argument("--memory-duration", type=float, metavar="S",
                   help="seconds of the memory check's flood (default 30, quick 5)")
    p.add_argument("--profile-threads", type=int, default=1, metavar="N",
                   help="with --only profile: N publisher threads share the publisher")
    p.add_argument("--no-zenoh", action="store_true", help="leave Zenoh out")
    p.add_argument("--src", type=Path, metavar="DIR",
                   help="import vbus from DIR (the src/ folder of another checkout, e.g. a "
                   "baseline from 'git archive') instead of the installed one")
    p.add_argument("--output", type=Path, default=HERE / "results.md", metavar="FILE",
                   help="where to write the report (default benchmarks/results.md; the JSON "
                   "goes beside it)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-run progress lines")
    return p


def make_config(args: argparse.Namespace, tmpdir: Path) -> Config:
    cfg = Config(tmpdir=tmpdir)
    if args.quick:
        cfg.runs, cfg.duration, cfg.frame_cap = 3, 0.4, 512 << 20
        cfg.pings, cfg.memory_duration = 1000, 5.0
    if args.runs:
        cfg.runs = args.runs
    if args.duration:
        cfg.duration = args.duration
    if args.memory_duration:
        cfg.memory_duration = args.memory_duration
    cfg.messages = args.messages
    cfg.profile_threads = max(args.profile_threads, 1)
    impls = ["vbus", "raw"]
    if not args.no_zenoh and zenoh_available():
        impls.append("zenoh")
    cfg.impls = tuple(impls)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name in [*WORKLOADS, *EXTRA]:
            print(f"{name:22} {DESCRIPTIONS[name.split('-')[0]]}")
        return 0
    names = select(args.only)
    if args.src is not None:
        if not (args.src / "vbus" / "__init__.py").is_file():
            raise SystemExit(f"bench: --src {args.src}: no vbus package there")
        use_vbus_from(args.src)
    started = time.monotonic()
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    with tempfile.TemporaryDirectory(prefix="vbus-bench-") as tmp:
        cfg = make_config(args, Path(tmp))
        info = machine()
        if "zenoh" not in cfg.impls:
            print("bench: zenoh not measured (" + (
                "--no-zenoh" if args.no_zenoh else "eclipse-zenoh is not installed; "
                "pip install 'vbus[bench]'") + ")")
        rows: list[Row] = []
        mem: list[dict[str, Any]] | None = None
        guard: list[dict[str, Any]] | None = None
        profile_text: str | None = None
        shm_text: str | None = None
        failures: list[str] = []
        for name in names:
            print(f"== {name}: {DESCRIPTIONS[name.split('-')[0]]}", flush=True)
            try:
                if name == "memory":
                    mem = memory(cfg, log)
                elif name == "guarantees":
                    guard = guarantees(cfg, log)
                elif name == "shm":
                    import bench_shm

                    found = bench_shm.run([1 << 20, 16 << 20], max(cfg.duration, 1.0),
                                          cfg.runs, 128 << 20, log)
                    shm_text = (f"medians of {cfg.runs}, payload GB/s delivered, pool 128 MiB"
                                f"\n\n{bench_shm.table(found)}")
                elif name == "profile":
                    from bench_profile import profile

                    profile_text = profile(cfg, log, HERE / "profile.md")
                else:
                    new = WORKLOADS[name](cfg, log)
                    rows += new
                    for row in new:
                        print(ratio_line(row), flush=True)
            except BenchError as exc:
                failures.append(f"{name}: {exc}")
                print(f"bench: {name} failed: {exc}", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
        targets = evaluate(rows, mem, guard)
        report = render(rows, mem, targets, info, cfg, argv, elapsed, failures, guard)
        if rows:
            print()
            print(render_table(rows))
        if targets:
            print()
            print(render_targets(targets))
        if guard:
            print()
            print(render_guarantees(guard))
        if mem:
            print()
            print(render_memory(mem))
        if profile_text:
            print()
            print(profile_text)
        if shm_text:
            print()
            print(shm_text)
            report += f"\n## Large frames through shared memory (issue 17)\n\n{shm_text}\n"

        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        args.output.with_suffix(".json").write_text(json.dumps(
            {"machine": info, "argv": argv, "elapsed_s": elapsed, "rows": [_row_json(r) for r in
             rows], "memory": mem, "guarantees": guard, "targets": targets,
             "failures": failures},
            indent=1, default=str))
        print(f"\nwrote {args.output} and {args.output.with_suffix('.json').name} "
              f"({elapsed:.0f} s)")
    return 1 if failures else 0


# -- report -----------------------------------------------------------------------------------
def ratio_line(row: Row) -> str:
    impls = [i for i in ORDER if i in row.figures]
    parts = [f"ratio {row.workload}-{row.topology} {row.what}:"]
    for other in impls[1:]:
        parts.append(f"vbus/{other} {fmt_ratio(ratio(row.median('vbus'), row.median(other)))}")
    figures = ", ".join(f"{IMPL_NAMES[i]} {fmt_num(row.median(i), row.unit)}" for i in impls)
    return " ".join(parts) + f"  ({figures} {row.unit})"


def render_table(rows: list[Row]) -> str:
    impls = [i for i in ORDER if any(i in row.figures for row in rows)]
    head = ["workload", "topology", "payload / metric", "unit"]
    head += [IMPL_NAMES[i] for i in impls]
    head += [f"vbus/{i}" for i in impls[1:]]
    head += ["lost: " + " / ".join(IMPL_NAMES[i] for i in impls)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.workload, row.topology, row.what, row.unit]
        cells += [fmt_summary(row.figures[i], row.unit) if i in row.figures else "–"
                  for i in impls]
        cells += [fmt_ratio(ratio(row.median("vbus"), row.median(i))) if i in row.figures
                  else "–" for i in impls[1:]]
        cells += [" / ".join(row.losses.get(i, "–") for i in impls)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _find(rows: list[Row], workload: str, topology: str, what: str) -> Row | None:
    for row in rows:
        if row.workload == workload and row.topology == topology and row.what.startswith(what):
            return row
    return None


def _msgs(row: Row | None, impl: str, key: str = "msg_per_s") -> float | None:
    if row is None or impl not in row.extra:
        return None
    value = row.extra[impl][key]["median"]
    return float(value) if value is not None else None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "UNMET"


QUEUE_BOUND_MIB = 256  # DESIGN.md: a stalled subscriber costs each process this much at most
FRAME_MIB = 16


def evaluate(rows: list[Row], mem: list[dict[str, Any]] | None,
             guard: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """Every target of issue 14 that this run measured (then issue 5's frame targets), with
    its ratio and verdict. Ratios are medians of the same run."""
    out: list[dict[str, str]] = []

    def add(target: str, measured: str, ok: bool | None) -> None:
        out.append({"target": target, "measured": measured, "verdict": _verdict(ok)})

    for topo, label in (("tcp", "tcp via a standalone broker"),
                        ("ipc", "ipc via a standalone broker"),
                        ("embedded", "in one process")):
        r = _find(rows, "latency", topo, "64 B one-way latency p50")
        if r:
            vr = ratio(r.median("vbus"), r.median("raw"))
            add(f"14.1 one-way latency p50, {label}: vbus <= 1.2x raw pyzmq",
                f"{fmt_ratio(vr)} ({fmt_num(r.median('vbus'), 'us')} vs "
                f"{fmt_num(r.median('raw'), 'us')} us)", None if vr is None else vr <= 1.2)
    r = _find(rows, "throughput", "tcp", "64 B")
    if r:
        vr = ratio(r.median("vbus"), r.median("raw"))
        add("14.2 64 B delivered, tcp via a standalone broker: vbus >= 1.5x raw via zmq.proxy",
            f"{fmt_ratio(vr)} ({fmt_num(r.median('vbus'), 'msg/s')} vs "
            f"{fmt_num(r.median('raw'), 'msg/s')} msg/s)", None if vr is None else vr >= 1.5)
        if "zenoh" in r.figures:
            vz = ratio(r.median("vbus"), r.median("zenoh"))
            add("14.2 64 B delivered, tcp: vbus >= 1.0x Zenoh peer-to-peer",
                f"{fmt_ratio(vz)} (Zenoh {fmt_num(r.median('zenoh'), 'msg/s')} msg/s)",
                None if vz is None else vz >= 1.0)
    one = _find(rows, "threads", "tcp", "64 B, 1 publisher thread")
    four = _find(rows, "threads", "tcp", "64 B, 4 publisher threads")
    if one and four:
        pub_ratio = ratio(_msgs(four, "vbus", "publish_per_s"), _msgs(one, "vbus",
                                                                      "publish_per_s"))
        got_ratio = ratio(four.median("vbus"), one.median("vbus"))
        add("14.3 4 threads sharing one publisher publish >= 0.8x one thread",
            f"published {fmt_ratio(pub_ratio)}, delivered {fmt_ratio(got_ratio)}",
            None if pub_ratio is None else pub_ratio >= 0.8)
    # 14.4: the guarantees, in the runs themselves
    vbus_runs = [run for row in rows if row.workload in ("throughput", "threads", "fanout",
                                                         "frames")
                 for run in row.extra.get("vbus", {}).get("runs", [])]
    if vbus_runs:
        lost = sum(run["lost"] for run in vbus_runs)
        counted = sum(run["counted"] or 0 for run in vbus_runs)
        exact = all(run["counted"] == run["lost"] for run in vbus_runs)
        add("14.4 exact loss accounting in every vbus throughput run (sent - received = "
            "counted)", f"{len(vbus_runs)} runs: lost {lost}, counted {counted}", exact)
    if guard:
        disorder = sum(g["disorder"] for g in guard)
        add("14.4 order across topics, per publishing thread (1 and 4 threads, with losses)",
            f"{sum(g['received'] for g in guard)} received, {disorder} out of order", disorder == 0)
        exact = all(g["exact"] and g["fenced"] for g in guard)
        add("14.4 exact loss accounting under loss (received + counted + lost before a "
            "stream's first message = published)",
            "; ".join(f"x{g['threads']}: {g['received']} + {g['dropped']} + "
                      f"{g['before_first']} of {g['attempted']}" for g in guard), exact)
    if mem:
        for m in mem:
            growth = {k: m["peak_rss_mib"][k] - m.get("start_rss_mib", {}).get(k, 0.0)
                      for k in m["peak_rss_mib"]}
            worst = max(growth.values())
            limit = QUEUE_BOUND_MIB + 2 * FRAME_MIB  # the bound, and a frame on each side
            text = ", ".join(f"{k} +{v:.0f} MiB" for k, v in growth.items())
            if m["capped_after_s"] is not None:
                text = f"grew past the {m['cap_gib']:.1f} GiB safety cap ({text})"
            add(f"14.4 bounded memory, {m['label']}: each process grows <= {limit} MiB",
                f"{text} after {m['elapsed']:.0f} s", m["capped_after_s"] is None and
                worst <= limit)
    small = _find(rows, "frames", "embedded", "1 KiB")
    big = _find(rows, "frames", "embedded", "16 MiB")
    if small and big:
        cost_small, cost_big = _msgs(small, "vbus"), _msgs(big, "vbus")
        zero_copy = all(run.get("zero_copy") for run in big.extra["vbus"]["runs"])
        rel = ratio(cost_small, cost_big)  # (1/big) / (1/small)
        add("5.3 in one process a numpy frame arrives without a copy",
            "shares the publisher's memory" if zero_copy else "copied", zero_copy)
        raw_rel = ratio(_msgs(small, "raw"), _msgs(big, "raw"))
        add("5.3 in one process a 16 MiB frame costs <= 2x a 1 KiB one",
            f"{fmt_ratio(rel)} ({_us(cost_big)} vs {_us(cost_small)} per message; raw pyzmq "
            f"copy=False: {fmt_ratio(raw_rel)})", None if rel is None else rel <= 2.0)
    for topo in ("ipc", "tcp"):
        for size in ("1 MiB", "16 MiB"):
            r = _find(rows, "frames", topo, size)
            if r:
                vr = ratio(r.median("vbus"), r.median("raw"))
                add(f"5.3 {size} frames across processes, {topo}: vbus >= 0.9x raw copy=False",
                    fmt_ratio(vr), None if vr is None else vr >= 0.9)
    return out


def _us(msg_per_s: float | None) -> str:
    return "n/a" if not msg_per_s else f"{1e6 / msg_per_s:.1f} us"


def render_targets(targets: list[dict[str, str]]) -> str:
    lines = ["| target (issue 14; 5.x: issue 5) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in targets]
    return "\n".join(lines)


def render_guarantees(guard: list[dict[str, Any]]) -> str:
    lines = [
        "| publishing threads (lanes) | published (cumulative) | received | counted lost "
        "(stats().dropped) | lost before a stream's first message | dropped by the publisher "
        "| out of order | all accounted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in guard:
        lines.append(
            f"| {g['threads']} ({g['lanes']}) | {g['attempted']} | {g['received']} | "
            f"{g['dropped']} | {g['before_first']} | {g['pub_dropped']} | {g['disorder']} | "
            f"{'yes' if g['exact'] else 'NO'} |")
    return "\n".join(lines)


def render_memory(mem: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | publisher | broker | subscriber (stalled) | frames sent | publisher dropped "
        "| stopped at the safety cap |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in mem:
        p = m["peak_rss_mib"]
        capped = "no" if m["capped_after_s"] is None else f"after {m['capped_after_s']:.1f} s"
        lines.append(
            f"| {m['label']} | {p['publisher']:.0f} MiB | {p['broker']:.0f} MiB | "
            f"{p['subscriber']:.0f} MiB | {m['sent']} in {m['elapsed']:.1f} s | {m['dropped']} "
            f"| {capped} |"
        )
    return "\n".join(lines)


def render(rows: list[Row], mem: list[dict[str, Any]] | None, targets: list[dict[str, str]],
           info: dict[str, str], cfg: Config, argv: list[str] | None, elapsed: float,
           failures: list[str], guard: list[dict[str, Any]] | None = None) -> str:
    cmd = "python benchmarks/run.py" + ("" if not argv else " " + " ".join(argv))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "# vbus benchmark results",
        "",
        f"`{cmd}` on {when}, {elapsed:.0f} s; {cfg.runs} run(s) per figure, median "
        "[min–max]. Ratios compare medians of the same run.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Results",
        "",
        "Throughput is what the subscriber received and decoded, from the publisher's first "
        "send to the last arrival (GB/s = 1e9 bytes of payload per second). Losses = sent − "
        "received; for vbus, in brackets, how many of them the subscriber counted in "
        "`stats().dropped` from sequence gaps (after each run the publisher sends one more "
        "message, so that losses at the tail show as a gap too) and how many the publisher "
        "dropped itself. Latency is one way (round trip / 2), in microseconds.",
        "",
        "Columns: **vbus** through its broker (embedded: a thread of the process; ipc/tcp: a "
        "standalone `vbus.Bus(bind=...)` process); **raw pyzmq** the same topology with the "
        "fastest honest pyzmq code (PUB/SUB, one frame `topic\\0 + payload`, `[topic, data]` "
        "with `copy=False` for arrays, a `zmq.proxy` XSUB/XPUB broker thread or process, the "
        "same high-water marks as vbus); **raw direct** (in one process only) PUB bound and "
        "SUB connected over inproc, no broker; **zenoh** peer to peer, no router (tcp, "
        "unixsock-stream for ipc, one session in one process), congestion control BLOCK, "
        "callback subscriber.",
        "",
        render_table(rows) if rows else "(no throughput or latency workload run)",
        "",
    ]
    if targets:
        parts += ["## Targets", "", render_targets(targets), ""]
    if guard:
        parts += ["## Guarantees (issue 14, target 4)", "",
                  "A flood of counters over three topics (runs of random length) through a "
                  "standalone broker over tcp, from 1 and then 4 threads sharing one "
                  "publisher, at a subscriber with a small queue that pauses now and then; "
                  "fence rounds end each run. Counts are cumulative over the runs.", "",
                  render_guarantees(guard), ""]
    if mem:
        parts += ["## Memory (bounded)", "",
                  "A publisher floods fresh 16 MiB frames (every page written) at a subscriber "
                  "that never receives, through a standalone broker over tcp. Peak RSS (VmHWM) "
                  "of each process.", "", render_memory(mem), ""]
    if failures:
        parts += ["## Failures", "", *[f"- {f.splitlines()[0]}" for f in failures], ""]
    return "\n".join(parts)


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "workload": row.workload, "topology": row.topology, "what": row.what, "unit": row.unit,
        "figures": {k: v.to_json() for k, v in row.figures.items()}, "losses": row.losses,
        "extra": row.extra,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
