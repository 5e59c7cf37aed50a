"""The bytes path for large frames (issue 17): vbus over tcp through a standalone broker,
beside raw pyzmq doing the same work, in the same run.

    python benchmarks/bench_bytes.py [--sizes 1,16] [--duration 1] [--runs 3] [--chunks 0,65536]

    vbus bytes     shm_pool_bytes=0: publisher -> `vbus broker` -> subscriber over tcp
                   (bench_shm.py's implementation, run from here)
    raw direct     PUB -> SUB over tcp, no broker; each frame sent as pieces of --chunks
                   bytes (0: the frame as one ZeroMQ message), one ZeroMQ message a piece
    raw 2 proxies  the same through a process with vbus's broker topology in raw pyzmq:
                   SUB (gate) -> PUB --inproc--> XSUB -> XPUB, two zmq.proxy threads
    raw 1 proxy    the same through one zmq.proxy: XSUB -> XPUB

The raw figures are payload bytes delivered to the subscriber per second (from its first
piece to its last), whatever frames the pieces belong to; the raw sockets use the same
high-water mark as vbus's (1000) and never block, so what does not fit is dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

MIB = 1024 * 1024
HWM = 1000
RAW = ("raw direct", "raw 2 proxies", "raw 1 proxy")


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- raw pyzmq roles (each its own process) ---------------------------------------------------
def raw_publisher(endpoint: str, nbytes: int, chunk: int, duration: float) -> None:
    import numpy as np
    import zmq

    frame = memoryview(np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8))
    size = chunk or nbytes
    pieces = [frame[i : i + size] for i in range(0, nbytes, size)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.sndhwm = HWM
    if sys.argv[2] == "raw direct":
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    say(ready=True)
    sys.stdin.readline()
    sent = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for piece in pieces:
            sock.send(b"cam\x00header", zmq.SNDMORE)
            sock.send(piece, copy=False)
        sent += 1
    for _ in range(200):
        sock.send_multipart([b"end", b"x"])
        time.sleep(0.005)
    say(sent=sent)
    sock.close(0)
    ctx.term()


def raw_subscriber(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.rcvhwm = HWM
    sock.subscribe(b"")
    sock.connect(endpoint)
    say(ready=True)
    got = 0
    first = last = 0.0
    while sock.poll(10_000):
        topic = sock.recv()
        piece = sock.recv(copy=False)
        if topic == b"end":
            break
        last = time.monotonic()
        if first:
            got += len(piece)  # the first piece starts the clock
        else:
            first = last
    say(bytes=got, seconds=last - first)
    sock.close(0)
    ctx.term()


def raw_broker(front_ep: str, back_ep: str, hops: int) -> None:
    """vbus's broker topology in raw pyzmq: a gate (SUB, filtering) and a forwarder."""
    import zmq

    ctx = zmq.Context(io_threads=int(os.environ.get("BENCH_IO_THREADS", "1")))
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    xsub.rcvhwm = xpub.sndhwm = HWM
    xpub.bind(back_ep)
    threads = []
    if hops == 2:
        gate_in, gate_out = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
        gate_in.rcvhwm = HWM
        gate_in.subscribe(b"")
        gate_out.sndhwm = 1
        gate_out.setsockopt(zmq.XPUB_NODROP, 1)
        gate_out.bind("inproc://gate")
        gate_in.bind(front_ep)
        xsub.connect("inproc://gate")
        threads.append(threading.Thread(target=_proxy, args=(gate_in, gate_out), daemon=True))
    else:
        xsub.bind(front_ep)
    xsub.send(b"\x01")
    threads.append(threading.Thread(target=_proxy, args=(xsub, xpub), daemon=True))
    for t in threads:
        t.start()
    say(ready=True)
    sys.stdin.readline()  # the driver ends us by closing stdin; the process exit ends the rest
    os._exit(0)


def _proxy(front: Any, back: Any) -> None:
    import zmq

    try:
        zmq.proxy(front, back)
    except zmq.ZMQError:
        pass


# -- the driver -------------------------------------------------------------------------------
def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _read(child: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    import bench_shm  # the same line protocol: one JSON object a line

    return bench_shm._read(child, timeout)


def raw_run(impl: str, nbytes: int, chunk: int, duration: float) -> dict[str, Any]:
    kids: list[subprocess.Popen[str]] = []
    try:
        port = _free_port()
        if impl == "raw direct":
            pub_ep = sub_ep = f"tcp://127.0.0.1:{port}"
        else:
            port2 = _free_port()
            pub_ep, sub_ep = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port2}"
            broker = _spawn("broker", pub_ep, sub_ep, "2" if impl == "raw 2 proxies" else "1")
            kids.append(broker)
            _read(broker)
        sub = _spawn("sub", impl, sub_ep)
        kids.append(sub)
        _read(sub)
        pub = _spawn("pub", impl, pub_ep, str(nbytes), str(chunk), str(duration))
        kids.append(pub)
        _read(pub)
        time.sleep(0.3)  # raw pyzmq has no readiness: give the slow joiner time
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        sent = _read(pub, duration + 30)
        got = _read(sub, duration + 30)
        gbps = got["bytes"] / got["seconds"] / 1e9 if got["seconds"] else 0.0
        return {"impl": impl, "chunk": chunk, "nbytes": nbytes, "gbps": gbps,
                "sent": sent["sent"], "received": got["bytes"] / nbytes}
    finally:
        for kid in kids:
            if kid.stdin is not None:
                kid.stdin.close()
            try:
                kid.wait(15)
            except subprocess.TimeoutExpired:
                kid.kill()
                kid.wait(5)
            if kid.stdout is not None:
                kid.stdout.close()


def vbus_run(nbytes: int, duration: float) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_shm

    one = bench_shm.one_run("vbus bytes", nbytes, duration, 0, "/tmp")
    one["chunk"] = -1
    return one


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("pub", "sub", "broker"):
        if args[0] == "pub":
            raw_publisher(args[2], int(args[3]), int(args[4]), float(args[5]))
        elif args[0] == "sub":
            raw_subscriber(args[2])
        else:
            raw_broker(args[1], args[2], int(args[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16", help="frame sizes in MiB")
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunks", default="0,65536", help="raw piece sizes (0: whole frame)")
    p.add_argument("--only", default="vbus,raw direct,raw 2 proxies,raw 1 proxy")
    p.add_argument("--json", help="write the results here")
    opts = p.parse_args(args)
    only = opts.only.split(",")
    chunks = [int(c) for c in opts.chunks.split(",")]
    results: list[dict[str, Any]] = []
    for nbytes in [int(s) * MIB for s in opts.sizes.split(",")]:
        for r in range(opts.runs):  # interleaved: the machine's noise falls on all alike
            if "vbus" in only:
                one = vbus_run(nbytes, opts.duration)
                one["run"] = r
                results.append(one)
                print(f"  {nbytes // MIB:>2} MiB  vbus bytes            {one['gbps']:6.2f} GB/s"
                      f"  received {one['received']}/{one['sent']}", flush=True)
            for impl in RAW:
                if impl not in only:
                    continue
                for chunk in chunks:
                    one = raw_run(impl, nbytes, chunk, opts.duration)
                    one["run"] = r
                    results.append(one)
                    print(f"  {nbytes // MIB:>2} MiB  {impl:<13} {chunk // 1024:>5} KiB"
                          f" {one['gbps']:6.2f} GB/s  frames received {one['received']:.0f}"
                          f"/{one['sent']}", flush=True)
    print()
    print(f"medians of {opts.runs}, payload GB/s delivered, {os.cpu_count()} cores")
    keys = sorted({(r["impl"], r["chunk"]) for r in results})
    sizes = sorted({r["nbytes"] for r in results})
    print("| system | piece | " + " | ".join(f"{s // MIB} MiB" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for impl, chunk in keys:
        cells = []
        for s in sizes:
            vals = [r["gbps"] for r in results
                    if r["impl"] == impl and r["chunk"] == chunk and r["nbytes"] == s]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
        piece = "vbus" if chunk < 0 else ("frame" if chunk == 0 else f"{chunk // 1024} KiB")
        print(f"| {impl} | {piece} | " + " | ".join(cells) + " |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
