"""The workloads: each starts the processes of every implementation in one topology, then
interleaves their runs (vbus, raw, zenoh, vbus, raw, ...) so that the machine's noise falls
on all of them alike, and returns table rows."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import (
    BenchError,
    Child,
    Summary,
    children,
    cpu_seconds,
    free_port,
    mem_available_kib,
    proc_status_kib,
)

Log = Callable[[str], None]

IMPL_NAMES = {"vbus": "vbus", "raw": "raw pyzmq", "direct": "raw direct", "zenoh": "zenoh"}
ORDER = tuple(IMPL_NAMES)

B64 = {"kind": "bytes", "size": 64}
KIB1 = {"kind": "ndarray", "shape": [16, 32], "dtype": "<u2", "label": "1 KiB ndarray"}
MIB1 = {"kind": "ndarray", "shape": [512, 1024], "dtype": "<u2", "label": "1 MiB ndarray"}
MIB16 = {"kind": "ndarray", "shape": [2048, 4096], "dtype": "<u2", "label": "16 MiB ndarray"}


def payload_label(spec: dict[str, Any]) -> str:
    return str(spec.get("label") or f"{spec['size']} B")


def payload_nbytes(spec: dict[str, Any]) -> int:
    if spec["kind"] == "bytes":
        return int(spec["size"])
    n = 2  # every ndarray here is <u2
    for dim in spec["shape"]:
        n *= int(dim)
    return n


def wire_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "label"}


@dataclass
class Config:
    runs: int = 5
    duration: float = 1.5  # seconds of publishing per run
    frame_cap: int = 2 << 30  # bytes per run at most (large frames pile up in queues)
    messages: int | None = None  # exact message count per run instead of a duration
    pings: int = 5000
    memory_duration: float = 30.0
    memory_cap: int = 3 << 30  # bytes: the memory check stops the publisher past this
    impls: tuple[str, ...] = ("vbus", "raw", "zenoh")
    profile_threads: int = 1  # publisher threads sharing the publisher in --only profile
    tmpdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def impls_for(self, topology: str) -> tuple[str, ...]:
        """In one process raw pyzmq runs twice: through a zmq.proxy thread (the same topology
        as vbus's embedded broker) and direct, PUB to SUB without a broker."""
        if topology == "embedded" and "raw" in self.impls:
            return tuple(i for i in ORDER if i in self.impls or i == "direct")
        return self.impls


@dataclass
class Row:
    """One line of the table: a figure per implementation (median of runs)."""

    workload: str
    topology: str
    what: str
    unit: str  # msg/s, GB/s, us
    higher_is_better: bool
    figures: dict[str, Summary] = field(default_factory=dict)
    losses: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, impl: str) -> float | None:
        s = self.figures.get(impl)
        return s.median if s is not None else None


# -- topologies -------------------------------------------------------------------------------
class ProcessSet:
    """One implementation's broker (if any), subscriber processes and publisher process."""

    def __init__(self, impl: str, topology: str, payload: dict[str, Any], nsubs: int,
                 cfg: Config, kids: list[Child]) -> None:
        self.impl = impl
        self.subs: list[Child] = []
        sub_args: list[dict[str, Any]] = []
        pub_args: dict[str, Any] = {"impl": impl, "payload": wire_spec(payload)}
        if impl == "vbus":
            address = start_vbus_broker(topology, cfg, kids)
            pub_args["address"] = address
            sub_args = [{"address": address} for _ in range(nsubs)]
        elif impl == "raw":
            front, back = start_raw_proxy(topology, cfg, kids)
            pub_args["front"] = front
            sub_args = [{"back": back} for _ in range(nsubs)]
        else:
            eps = [zenoh_endpoint(topology, cfg) for _ in range(nsubs)]
            pub_args["connect"] = eps
            sub_args = [{"listen": [ep]} for ep in eps]
        for i, args in enumerate(sub_args):
            args.update(impl=impl, payload=wire_spec(payload))
            child = Child("sub", args, name=f"{impl}-sub{i}")
            kids.append(child)
            self.subs.append(child)
        for child in self.subs:
            child.expect("READY", 60)
        self.pub = Child("pub", pub_args, name=f"{impl}-pub")
        kids.append(self.pub)
        if impl != "vbus":
            self.pub.expect("WARMING", 60)
            for child in self.subs:
                child.expect("WARMED", 60)
            self.pub.send(cmd="go")
        self.pub.expect("READY", 60)

    def run(self, payload: dict[str, Any], duration: float, max_count: int | None, batch: int,
            threads: int = 1) -> dict[str, Any]:
        spec = wire_spec(payload)
        for child in self.subs:
            child.send(cmd="run", payload=spec, max_wait=duration + 120)
        for child in self.subs:
            child.expect("ARMED", 30)
        self.pub.send(cmd="run", payload=spec, duration=duration, max_count=max_count,
                      batch=batch, threads=threads)
        pub = self.pub.expect("RESULT", duration + 120)
        for child in self.subs:
            child.send(cmd="sent", n=pub["sent"])
        if self.impl == "vbus":
            for child in self.subs:
                child.expect("DRAINED", duration + 180)
            self.pub.send(cmd="fence")
            self.pub.expect("FENCED", 30)
        subs = [child.expect("RESULT", duration + 180) for child in self.subs]
        return {"pub": pub, "subs": subs}


class EmbeddedSet:
    """Publisher thread and subscriber in one process (in-process transport)."""

    def __init__(self, impl: str, payload: dict[str, Any], kids: list[Child]) -> None:
        self.impl = impl
        self.child = Child("embedded", {"impl": impl, "payload": wire_spec(payload)},
                           name=f"{impl}-embedded")
        kids.append(self.child)
        self.child.expect("READY", 60)

    def run(self, payload: dict[str, Any], duration: float, max_count: int | None, batch: int,
            threads: int = 1) -> dict[str, Any]:
        self.child.send(cmd="run", payload=wire_spec(payload), duration=duration,
                        max_count=max_count, batch=batch, threads=threads)
        result = self.child.expect("RESULT", duration + 180)
        return {"pub": result["pub"], "subs": [result["sub"]]}


def start_vbus_broker(topology: str, cfg: Config, kids: list[Child], hwm: int | None = None,
                      ) -> str:
    if topology == "tcp":
        bind = "tcp://127.0.0.1:0"
    else:
        bind = f"ipc://{tempfile.mkdtemp(dir=cfg.tmpdir, prefix='vbus-bench-')}/bus"
    broker = Child("broker", {"bind": bind, "hwm": hwm}, name="vbus-broker")
    kids.append(broker)
    return str(broker.expect("READY", 60)["address"])


def start_raw_proxy(topology: str, cfg: Config, kids: list[Child]) -> tuple[str, str]:
    path = f"{tempfile.mkdtemp(dir=cfg.tmpdir, prefix='raw-bench-')}/proxy"
    proxy = Child("proxy", {"transport": topology, "path": path}, name="raw-proxy")
    kids.append(proxy)
    ready = proxy.expect("READY", 60)
    return ready["front"], ready["back"]


def zenoh_endpoint(topology: str, cfg: Config) -> str:
    if topology == "tcp":
        return f"tcp/127.0.0.1:{free_port()}"
    return f"unixsock-stream/{tempfile.mkdtemp(dir=cfg.tmpdir, prefix='zenoh-bench-')}/sock"


# -- throughput -------------------------------------------------------------------------------
def _one_run(result: dict[str, Any], nbytes: int, nsubs: int) -> dict[str, Any]:
    pub, subs = result["pub"], result["subs"]
    sent = int(pub["sent"])
    received = sum(int(s["received"]) for s in subs)
    t_last = max((s["t_last"] for s in subs if s["received"]), default=None)
    elapsed = (t_last - pub["t_start"]) if t_last is not None else None
    rate = received / elapsed if elapsed and elapsed > 0 else None
    counted = [s.get("counted_lost") for s in subs]
    expected = sent * nsubs
    return {
        "sent": sent,
        "received": received,
        "lost": expected - received,
        "lost_frac": (expected - received) / expected if expected else 0.0,
        "counted": None if any(c is None for c in counted) else sum(counted),
        "pub_dropped": pub.get("dropped"),
        "rate": rate,
        "gbps": rate * nbytes / 1e9 if rate is not None else None,
        "pub_rate": sent / (pub["t_end"] - pub["t_start"]) if pub["t_end"] > pub["t_start"]
        else None,
        "zero_copy": subs[0].get("zero_copy"),
    }


def loss_text(runs: list[dict[str, Any]], impl: str) -> str:
    sent = sum(r["sent"] for r in runs) * runs[0].get("nsubs", 1)
    lost = sum(r["lost"] for r in runs)
    if not sent:
        return "n/a"
    text = f"{100.0 * lost / sent:.1f}%"
    if impl == "vbus":
        counted = sum(r["counted"] or 0 for r in runs)
        pub_dropped = sum(r["pub_dropped"] or 0 for r in runs)
        text += f" (counted {100.0 * counted / sent:.1f}%"
        if pub_dropped:
            text += f", pub {100.0 * pub_dropped / sent:.1f}%"
        text += ")"
    return text


def throughput(name: str, topology: str, payloads: list[dict[str, Any]], cfg: Config,
               log: Log, *, nsubs: int = 1, threads: tuple[int, ...] = (1,)) -> list[Row]:
    """Publish for ``cfg.duration`` s (or ``cfg.messages``); what the subscribers received
    and decoded, per second of the publisher's start to the last message's arrival."""
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    impls = cfg.impls_for(topology)
    with children() as kids:
        sets: dict[str, Any] = {}
        for impl in impls:
            subs = f", {nsubs} subscribers" if nsubs > 1 else ""
            log(f"  starting {impl} ({topology}{subs})")
            if topology == "embedded":
                sets[impl] = EmbeddedSet(impl, payloads[0], kids)
            else:
                sets[impl] = ProcessSet(impl, topology, payloads[0], nsubs, cfg, kids)
        for run in range(cfg.runs):
            for p, payload in enumerate(payloads):
                nbytes = payload_nbytes(payload)
                small = nbytes <= 4096
                if cfg.messages:
                    duration, max_count = 60.0, cfg.messages
                else:
                    duration = cfg.duration
                    max_count = None if small else max(cfg.frame_cap // nbytes, 4)
                batch = 256 if nbytes <= 256 else 16 if small else 1
                for t in threads:
                    for impl in impls:
                        result = sets[impl].run(payload, duration, max_count, batch, t)
                        one = _one_run(result, nbytes, nsubs)
                        one["nsubs"] = nsubs
                        runs.setdefault((impl, p, t), []).append(one)
                        log(f"  run {run + 1}/{cfg.runs} {payload_label(payload):>15} "
                            f"{impl:5} x{t}: {_rate_text(one, small)}")
    rows: list[Row] = []
    for p, payload in enumerate(payloads):
        small = payload_nbytes(payload) <= 4096
        for t in threads:
            what = payload_label(payload)
            if nsubs > 1:
                what += f", {nsubs} subscribers (aggregate)"
            if len(threads) > 1:
                what += f", {t} publisher thread{'s' if t > 1 else ''}"
            row = Row(name, topology, what, "msg/s" if small else "GB/s", True)
            for impl in impls:
                rs = runs[(impl, p, t)]
                row.figures[impl] = Summary([r["rate"] if small else r["gbps"] for r in rs])
                row.losses[impl] = loss_text(rs, impl)
                row.extra[impl] = {
                    "msg_per_s": Summary([r["rate"] for r in rs]).to_json(),
                    "publish_per_s": Summary([r["pub_rate"] for r in rs]).to_json(),
                    "runs": rs,
                }
            row.extra["threads"] = t
            row.extra["nbytes"] = payload_nbytes(payload)
            rows.append(row)
    return rows


def _rate_text(one: dict[str, Any], small: bool) -> str:
    if one["rate"] is None:
        return f"nothing received (sent {one['sent']})"
    fig = f"{one['rate'] / 1e3:8.1f}k msg/s" if small else f"{one['gbps']:6.2f} GB/s"
    return (f"{fig}  sent {one['sent']} received {one['received']} "
            f"lost {100 * one['lost_frac']:.1f}%")


# -- latency ----------------------------------------------------------------------------------
def latency(name: str, topology: str, cfg: Config, log: Log) -> list[Row]:
    """64 B ping-pong; one-way latency = round trip / 2, in microseconds."""
    impls = cfg.impls_for(topology)
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    with children() as kids:
        pingers: dict[str, Child] = {}
        for impl in impls:
            log(f"  starting {impl} ({topology})")
            if topology == "embedded":
                pinger = Child("latency-embedded", {"impl": impl}, name=f"{impl}-latency")
                kids.append(pinger)
            else:
                echo_args: dict[str, Any] = {"impl": impl}
                ping_args: dict[str, Any] = {"impl": impl}
                if impl == "vbus":
                    address = start_vbus_broker(topology, cfg, kids)
                    echo_args["address"] = ping_args["address"] = address
                elif impl == "raw":
                    front, back = start_raw_proxy(topology, cfg, kids)
                    for a in (echo_args, ping_args):
                        a.update(front=front, back=back)
                else:
                    ep = zenoh_endpoint(topology, cfg)
                    echo_args["listen"] = [ep]
                    ping_args["connect"] = [ep]
                echo = Child("echo", echo_args, name=f"{impl}-echo")
                kids.append(echo)
                echo.expect("READY", 60)
                pinger = Child("ping", ping_args, name=f"{impl}-ping")
                kids.append(pinger)
            pinger.expect("READY", 60)
            pingers[impl] = pinger
        count = cfg.messages or cfg.pings
        for run in range(cfg.runs):
            for impl in impls:
                pingers[impl].send(cmd="run", count=count)
                r = pingers[impl].expect("RESULT", 60 + count * 0.01)
                results[impl].append(r)
                log(f"  run {run + 1}/{cfg.runs} {impl:5}: p50 {r['p50']:.1f} us  "
                    f"p99 {r['p99']:.1f} us  lost {r['lost']}")
    rows = []
    for key in ("p50", "p99"):
        row = Row(name, topology, f"64 B one-way latency {key}", "us", False)
        for impl in impls:
            rs = results[impl]
            row.figures[impl] = Summary([r[key] for r in rs])
            lost = sum(r["lost"] for r in rs)
            row.losses[impl] = f"{lost} lost" if lost else "0"
            row.extra[impl] = rs
        rows.append(row)
    return rows


# -- memory (target 5) ------------------------------------------------------------------------
def memory(cfg: Config, log: Log) -> list[dict[str, Any]]:
    """A stalled subscriber, a publisher sending fresh 16 MiB frames; max RSS of each process.

    Run twice: with vbus's default high-water marks, and with hwm=4 everywhere. The publisher
    is stopped early if the processes together exceed ``cfg.memory_cap`` (or half the memory
    available), so that an unbounded queue cannot take the machine down.
    """
    available = mem_available_kib()
    cap = cfg.memory_cap
    if available:
        cap = min(cap, available * 1024 // 2)
    outcomes = []
    for label, hwm in (("default hwm", None), ("hwm=4", 4)):
        log(f"  memory: {label}, {cfg.memory_duration:g} s of 16 MiB frames, cap "
            f"{cap / 2**30:.1f} GiB")
        with children() as kids:
            address = start_vbus_broker("tcp", cfg, kids, hwm=hwm)
            broker_pid = kids[-1].pid
            sub = Child("stalled-sub", {"address": address, "hwm": hwm}, name="stalled-sub")
            kids.append(sub)
            sub.expect("READY", 60)
            pub = Child("flood", {"address": address, "hwm": hwm,
                                  "payload": wire_spec(MIB16)}, name="flood-pub")
            kids.append(pub)
            pub.expect("READY", 60)
            pids = {"publisher": pub.pid, "broker": broker_pid, "subscriber": sub.pid}
            peak = dict.fromkeys(pids, 0)
            start = {role: proc_status_kib(pid) or 0 for role, pid in pids.items()}
            pub.send(cmd="run", duration=cfg.memory_duration)
            t0 = time.monotonic()
            capped_at = None
            result = None
            deadline = t0 + cfg.memory_duration + 60
            while time.monotonic() < deadline:
                found, value = pub.poll("RESULT", 0.1)
                total = 0
                for role, pid in pids.items():
                    rss = proc_status_kib(pid) or 0
                    peak[role] = max(peak[role], rss, proc_status_kib(pid, "VmHWM") or 0)
                    total += rss * 1024
                if found:
                    result = value
                    break
                if total > cap and capped_at is None:
                    capped_at = time.monotonic() - t0
                    log(f"  memory: {total / 2**30:.1f} GiB after {capped_at:.1f} s: stopping")
                    pub.send(cmd="stop")
            if result is None:
                raise BenchError("the flooding publisher did not finish")
            for role, pid in pids.items():
                peak[role] = max(peak[role], proc_status_kib(pid, "VmHWM") or 0)
            if hwm is None:
                label = f"default hwm ({result['hwm']})"
            outcome = {
                "label": label,
                "hwm": hwm,
                "peak_rss_mib": {role: kib / 1024 for role, kib in peak.items()},
                "start_rss_mib": {role: kib / 1024 for role, kib in start.items()},
                "capped_after_s": capped_at,
                "cap_gib": cap / 2**30,
                **result,
            }
            log(f"  memory: {label}: peak RSS " + ", ".join(
                f"{role} {mib:.0f} MiB" for role, mib in outcome["peak_rss_mib"].items()
            ) + f"; sent {result['sent']} in {result['elapsed']:.1f} s, publisher dropped "
                f"{result['dropped']}")
            outcomes.append(outcome)
    return outcomes


# -- the guarantees (issue 14, target 4) ------------------------------------------------------
def guarantees(cfg: Config, log: Log, count: int = 120_000) -> list[dict[str, Any]]:
    """Order across topics and exact loss accounting under loss, over tcp through a standalone
    broker: a flood of counters over three topics (runs of random length) from 1 and from 4
    threads sharing one publisher, at a subscriber with a small queue that pauses now and
    then. Fence rounds (a message on each topic, then a marker) end each run: once a round
    has come whole, every message before it was received or counted lost."""
    outcomes = []
    with children() as kids:
        # Small queues everywhere (batches count one each): the pauses overflow them.
        address = start_vbus_broker("tcp", cfg, kids, hwm=16)
        sub = Child("guard-sub", {"address": address, "hwm": 16}, name="guard-sub")
        kids.append(sub)
        sub.expect("READY", 60)
        pub = Child("guard-pub", {"address": address}, name="guard-pub")
        kids.append(pub)
        pub.expect("READY", 60)
        for threads in (1, 4):
            pub.send(cmd="run", threads=threads, count=count // threads)
            sent = pub.expect("RESULT", 120)["sent"]
            for _ in range(10):
                pub.send(cmd="fence", threads=threads)
                fenced = pub.expect("FENCED", 30)
                sub.send(cmd="check", round=fenced["round"], fencers=threads)
                checked = sub.expect("CHECKED", 30)
                if checked["complete"]:
                    break
            attempted = int(fenced["attempted"])
            accounted = (int(checked["received"]) + int(checked["dropped"])
                         + int(checked["before_first"]))
            outcome = {
                "threads": threads, "sent": sent, "attempted": attempted,
                "received": checked["received"], "dropped": checked["dropped"],
                "pub_dropped": fenced["pub_dropped"], "disorder": checked["disorder"],
                "lanes": fenced["lanes"], "before_first": checked["before_first"],
                "fenced": bool(checked["complete"]), "exact": attempted == accounted,
            }
            log(f"  guarantees x{threads}: {attempted} published in all (cumulative), "
                f"{checked['received']} received + {checked['dropped']} counted lost + "
                f"{checked['before_first']} lost before a stream's first message = "
                f"{accounted}; out of order {checked['disorder']}")
            outcomes.append(outcome)
    return outcomes


# -- cpu use of a brokered run (for the profile) ----------------------------------------------
def cpu_of(pids: dict[str, int]) -> dict[str, float | None]:
    return {role: cpu_seconds(pid) for role, pid in pids.items()}
