"""Request/reply round trips: vbus beside raw pyzmq doing the same work in the same run.

One requester (this process) asks a server in a child process, one request at a time; the
same small payload, decoded and answered by the same handler, over the same transport:

- vbus: the server's process holds the broker (``Bus(bind=...)``) and serves; the requester
  is a client (``vbus.connect``). Each round trip crosses the broker's forwarder twice and
  its service once (the service picks the server).
- raw: a pyzmq DEALER connected straight to the server's ROUTER (no broker).
- raw-proxy: the same through a broker: ``zmq.proxy`` between a ROUTER (requesters) and a
  DEALER (servers) in the server's process, the server a DEALER; the closest raw analogue.

    python benchmarks/bench_reqrep.py [--count N] [--transport ipc|tcp] [--runs R]

Prints round trips per second and p50/p99 latency per implementation, then the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import zmq

REQUEST = {"x": 1.0, "axis": "stage/x"}
ENCODER = msgspec.msgpack.Encoder()
DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


def handler(data: Any) -> Any:
    return {"moved_to": data["x"], "ok": True}


# -- servers (child processes) -----------------------------------------------------------------
def serve_vbus(address: str) -> None:
    import vbus

    with vbus.Bus(bind=address) as bus:
        bus.serve("bench/move", lambda msg: handler(msg.data))
        print(f"ready {bus.address}", flush=True)
        sys.stdin.read()


def _raw_loop(sock: zmq.Socket[bytes], stop: zmq.Socket[bytes]) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(stop, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if stop in events:
            return
        while True:
            try:
                *route, body = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            sock.send_multipart([*route, ENCODER.encode(handler(DECODER.decode(body)))])


def serve_raw(address: str, proxy: bool) -> None:
    ctx = zmq.Context()
    stop_send, stop_recv = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    stop_recv.bind("inproc://stop")
    stop_send.connect("inproc://stop")
    sockets = [stop_send, stop_recv]
    threads: list[threading.Thread] = []
    if proxy:
        front, back, control = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.PAIR)
        front.bind(address)
        back.bind("inproc://workers")
        control.bind("inproc://control")
        killer = ctx.socket(zmq.PAIR)
        killer.connect("inproc://control")
        threads.append(threading.Thread(target=zmq.proxy_steerable,
                                        args=(front, back, None, control)))
        server = ctx.socket(zmq.DEALER)
        server.connect("inproc://workers")
        sockets += [killer]
    else:
        server = ctx.socket(zmq.ROUTER)
        server.bind(address)
    threads.append(threading.Thread(target=_raw_loop, args=(server, stop_recv)))
    for t in threads:
        t.start()
    print(f"ready {address}", flush=True)
    sys.stdin.read()
    stop_send.send(b"")
    if proxy:
        killer.send(b"TERMINATE")
    for t in threads:
        t.join(5.0)
    for sock in [server, *sockets, *( [front, back, control] if proxy else [])]:
        sock.close(0)
    ctx.term()


# -- the requester -----------------------------------------------------------------------------
@contextlib.contextmanager
def child(kind: str, address: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, address],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"{kind} server did not start")
        yield line[1]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
        if proc.stdout is not None:
            proc.stdout.close()


def measure(ask: Callable[[], Any], count: int) -> list[float]:
    for _ in range(min(200, count)):  # warm up
        ask()
    took = []
    clock = time.perf_counter
    for _ in range(count):
        started = clock()
        ask()
        took.append(clock() - started)
    return took


def run_vbus(address: str, count: int) -> list[float]:
    import vbus

    with child("vbus", address) as where, vbus.connect(where) as bus:
        return measure(lambda: bus.request("bench/move", REQUEST, timeout=5.0).data, count)


def run_raw(address: str, count: int, proxy: bool) -> list[float]:
    with child("raw-proxy" if proxy else "raw", address) as where:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(where)

        def ask() -> Any:
            sock.send_multipart([b"", ENCODER.encode(REQUEST)])
            if not sock.poll(5000):
                raise TimeoutError("raw server did not answer")
            return DECODER.decode(sock.recv_multipart()[-1])

        try:
            return measure(ask, count)
        finally:
            sock.close(0)
            ctx.term()


def summary(took: list[float]) -> dict[str, float]:
    ordered = sorted(took)
    return {
        "rt_per_s": len(took) / sum(took),
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(0.99 * (len(ordered) - 1))] * 1e6,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=5000, help="round trips per run")
    p.add_argument("--runs", type=int, default=3, help="runs per implementation (median kept)")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument("--serve", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        kind, address = args.serve
        if kind == "vbus":
            serve_vbus(address)
        else:
            serve_raw(address, proxy=kind == "raw-proxy")
        return 0

    tmp = tempfile.mkdtemp(prefix="vbus-bench-reqrep-")
    names = ("vbus", "raw", "raw-proxy")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(args.runs):  # interleaved: a busy machine slows every side alike
        for name in names:
            if args.transport == "ipc":
                address = f"ipc://{tmp}/{name}-{i}"
            else:
                address = "tcp://127.0.0.1:0" if name == "vbus" else _free_tcp()
            took = (run_vbus(address, args.count) if name == "vbus"
                    else run_raw(address, args.count, proxy=name == "raw-proxy"))
            runs[name].append(summary(took))
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
    with contextlib.suppress(OSError):
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)

    print(f"request/reply, one at a time, {args.count} round trips x {args.runs} runs, "
          f"{args.transport}, server in another process (median of runs)")
    print(f"{'':10} {'round trips/s':>14} {'p50 us':>9} {'p99 us':>9}")
    for name, r in results.items():
        print(f"{name:10} {r['rt_per_s']:14.0f} {r['p50_us']:9.1f} {r['p99_us']:9.1f}")
    v = results["vbus"]
    for other in ("raw", "raw-proxy"):
        o = results[other]
        print(f"ratio vbus/{other}: throughput {v['rt_per_s'] / o['rt_per_s']:.2f}x, "
              f"p50 {v['p50_us'] / o['p50_us']:.2f}x, p99 {v['p99_us'] / o['p99_us']:.2f}x")
    return 0


def _free_tcp() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


if __name__ == "__main__":
    sys.exit(main())
