"""Where the time goes: py-spy on both ends of the vbus 64 B brokered tcp path.

    python benchmarks/run.py --only profile [--duration S]

Starts a standalone vbus broker (tcp), a subscriber process and a publisher process (the same
workers as the throughput workload), has the publisher publish 64 B messages as fast as it can,
and samples both with ``py-spy record --format raw --threads`` meanwhile. Idle samples (a
thread blocked in poll, or waiting for the GIL) are left out, so percentages are shares of
the Python threads' busy time. Also reports the CPU seconds each process used (that includes
ZeroMQ's I/O threads and the broker's C forwarder). Writes benchmarks/profile.md.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_common import BenchError, Child, children, cpu_seconds
from bench_workloads import B64, Config, start_vbus_broker, wire_spec

RATE = 200  # samples per second
TOP = 15


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


def profile(cfg: Config, log: Any, out: Path) -> str:
    py_spy = find_py_spy()
    if py_spy is None:
        raise BenchError("py-spy is not installed (pip install py-spy)")
    duration = max(cfg.duration * 4, 4.0)
    with children() as kids:
        address = start_vbus_broker("tcp", cfg, kids)
        broker_pid = kids[-1].pid
        sub = Child("sub", {"impl": "vbus", "address": address, "payload": wire_spec(B64)},
                    name="vbus-sub")
        kids.append(sub)
        sub.expect("READY", 60)
        pub = Child("pub", {"impl": "vbus", "address": address, "payload": wire_spec(B64)},
                    name="vbus-pub")
        kids.append(pub)
        pub.expect("READY", 60)
        pids = {"publisher": pub.pid, "broker": broker_pid, "subscriber": sub.pid}
        sub.send(cmd="run", payload=wire_spec(B64), max_wait=duration + 120)
        sub.expect("ARMED", 30)
        cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        t0 = time.monotonic()
        threads = cfg.profile_threads
        pub.send(cmd="run", payload=wire_spec(B64), duration=duration, batch=256,
                 threads=threads)
        files = {role: cfg.tmpdir / f"profile-{role}.txt" for role in ("publisher", "subscriber")}
        spies = {
            role: subprocess.Popen(
                [py_spy, "record", "--pid", str(pids[role]), "--duration",
                 str(max(int(duration) - 1, 1)), "--rate", str(RATE), "--format", "raw",
                 "--threads", "--output", str(files[role])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            for role in files
        }
        log(f"  profiling {duration:g} s of 64 B publishing over tcp with py-spy")
        result = pub.expect("RESULT", duration + 60)
        sub.send(cmd="sent", n=result["sent"])
        sub.expect("DRAINED", duration + 120)
        elapsed = time.monotonic() - t0
        cpu1 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        pub.send(cmd="fence")
        pub.expect("FENCED", 30)
        got = sub.expect("RESULT", 60)
        errors = {}
        for role, spy in spies.items():
            try:
                _, err = spy.communicate(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if spy.returncode != 0 or not files[role].exists():
                errors[role] = err.decode(errors="replace").strip().splitlines()[-3:]
    if errors:
        raise BenchError(f"py-spy failed: {errors}")
    cpu = {role: (cpu1[role] or 0.0) - (cpu0[role] or 0.0) for role in pids}
    rate = got["received"] / (got["t_last"] - result["t_start"]) if got["received"] else 0.0
    sections = [
        "# Profile: vbus 64 B through a standalone broker over tcp",
        "",
        f"{threads} publisher thread{'s' if threads > 1 else ''} sharing one publisher "
        f"published {result['sent']} messages in {duration:g} s "
        f"({result['sent'] / (result['t_end'] - result['t_start']) / 1e3:.1f}k/s); the "
        f"subscriber received {got['received']} ({rate / 1e3:.1f}k/s delivered), lost "
        f"{result['sent'] - got['received']} (counted {got.get('counted_lost')}).",
        "",
        f"CPU seconds used during the {elapsed:.1f} s run (all threads, ZeroMQ's included): "
        + ", ".join(f"{role} {sec:.2f} s ({100 * sec / elapsed:.0f}% of a core)"
                    for role, sec in cpu.items()) + ".",
        "",
        f"py-spy at {RATE} Hz, busy samples only (idle = blocked in poll or waiting for the "
        "GIL). 'self' is time in the function itself, including the C calls it makes (a "
        "socket send, a struct unpack) that have no Python frame of their own; 'total' "
        "includes callees.",
    ]
    for role in ("publisher", "subscriber"):
        sections += ["", summarize(role, files[role].read_text(), duration)]
    text = "\n".join(sections) + "\n"
    out.write_text(text)
    return text


def _parse(raw: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _function(frame: str) -> str:
    """``name (file.py:123)`` -> ``name (file.py)``"""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(role: str, raw: str, duration: float) -> str:
    stacks = _parse(raw)
    threads: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    for frames, count in stacks:
        thread, body = frames[0], frames[1:]
        threads[thread.split(": ", 1)[-1]] += count
        if not body:
            continue
        self_fn[_function(body[-1])] += count
        self_line[body[-1]] += count
        for fn in {_function(f) for f in body}:
            total_fn[fn] += count
    busy = sum(threads.values()) or 1
    lines = [f"## {role}", ""]
    lines.append("Busy samples per thread: " + ", ".join(
        f"{name} {n} ({100 * n / (RATE * duration):.0f}% of the run)"
        for name, n in threads.most_common()) + ".")
    lines += ["", "| self % | function (self time) | total % |", "|---:|---|---:|"]
    for fn, n in self_fn.most_common(TOP):
        lines.append(f"| {100 * n / busy:.1f} | `{fn}` | {100 * total_fn[fn] / busy:.1f} |")
    lines += ["", "| self % | hottest lines |", "|---:|---|"]
    for frame, n in self_line.most_common(TOP):
        lines.append(f"| {100 * n / busy:.1f} | `{frame}` |")
    lines += ["", "| total % | function (inclusive) |", "|---:|---|"]
    for fn, n in total_fn.most_common(TOP):
        lines.append(f"| {100 * n / busy:.1f} | `{fn}` |")
    return "\n".join(lines)
