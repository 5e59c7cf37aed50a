"""Large frames between two processes on one host: vbus's shared pool beside raw pyzmq and
Zenoh's shared-memory API, in the same run (issue 17).

    python benchmarks/bench_shm.py [--sizes 1,16] [--duration 2] [--runs 3] [--json FILE]

Each run is two processes (plus a standalone `vbus broker` for vbus): a publisher sending one
numpy frame after another as fast as it can for ``--duration`` seconds, and a subscriber that
takes each as a numpy array (vbus: the read-only view; raw pyzmq: a zero-copy view of the
received frame; Zenoh: ``np.frombuffer(payload.to_bytes())``, since Zenoh's Python API has no
buffer protocol) and touches its first and last byte. The figure is payload GB/s delivered to
the subscriber, from its first frame to its last; frames the subscriber missed (vbus counts
them; raw pyzmq and Zenoh drop or block silently) do not count.

    vbus copy    publish(frame): one copy into the pool, a descriptor through the broker
    vbus loan    loan(), stamp one byte, publish: no copy at all
    vbus bytes   shm_pool_bytes=0: the frame crosses the broker over loopback tcp
    raw pyzmq    PUB -> SUB over loopback tcp, direct (no broker), zero-copy send
    zenoh shm    ShmProvider.alloc, copy the frame in, put; peer to peer over a unix socket
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MIB = 1024 * 1024
IMPLS = ("vbus copy", "vbus loan", "vbus bytes", "raw pyzmq", "zenoh shm")


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- the two sides ----------------------------------------------------------------------------
def publisher(impl: str, endpoint: str, nbytes: int, duration: float, pool: int) -> None:
    import numpy as np

    frame = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    sent = 0
    if impl.startswith("vbus"):
        import vbus

        with vbus.connect(endpoint, shm_pool_bytes=0 if impl == "vbus bytes" else pool) as bus:
            pub = bus.publisher()
            say(ready=True)
            sys.stdin.readline()  # go: the subscriber is subscribed (vbus readiness)
            end = time.monotonic() + duration
            if impl == "vbus loan":
                while time.monotonic() < end:
                    for _ in range(16):
                        loan = pub.loan(nbytes, np.uint8)
                        loan[0] = sent & 0xFF  # the producer writes in place: no copy
                        pub.publish("cam", loan)
                        sent += 1
            else:
                while time.monotonic() < end:
                    for _ in range(16):
                        pub.publish("cam", frame)
                        sent += 1
            stats = pub.stats()
            for _ in range(200):
                pub.publish("end", sent)
                time.sleep(0.005)
            say(sent=sent, stats=str(stats), maxrss=_maxrss())
    elif impl == "raw pyzmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        sock.sndhwm = 2
        sock.bind(endpoint)
        say(ready=True)
        sys.stdin.readline()
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for _ in range(16):
                sock.send(b"cam", zmq.SNDMORE)
                sock.send(frame, copy=False)
                sent += 1
        for _ in range(200):
            sock.send_multipart([b"end", b"x"])
            time.sleep(0.005)
        say(sent=sent, maxrss=_maxrss())
        sock.close(0)
        ctx.term()
    else:
        import zenoh

        session = _zenoh_session(listen=[endpoint])
        provider = zenoh.shm.ShmProvider.default_backend(pool)
        policy = zenoh.shm.BlockOn(zenoh.shm.GarbageCollect())
        pub = session.declare_publisher("cam", congestion_control=zenoh.CongestionControl.BLOCK)
        ender = session.declare_publisher("end")
        data = frame.tobytes()
        say(ready=True)
        sys.stdin.readline()
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for _ in range(16):
                buf = provider.alloc(nbytes, policy)
                buf[:] = data  # Zenoh's Python API writes a ZShmMut from bytes: one copy
                pub.put(zenoh.ZBytes(buf))
                sent += 1
        for _ in range(200):
            ender.put(b"x")
            time.sleep(0.005)
        say(sent=sent, maxrss=_maxrss())
        session.close()


def subscriber(impl: str, endpoint: str, nbytes: int) -> None:
    import numpy as np

    count = 0
    first = last = 0.0
    if impl.startswith("vbus"):
        import vbus

        with vbus.connect(endpoint) as bus:
            sub = bus.subscribe("cam")
            ender = bus.subscribe("end")
            say(ready=True)
            while True:
                try:
                    msg = sub.recv(timeout=0.2)
                except TimeoutError:
                    try:
                        ender.recv(timeout=0)
                        break
                    except TimeoutError:
                        if count and time.monotonic() - last > 5:
                            break
                        continue
                data = msg.data
                _ = data[0], data[-1]
                last = time.monotonic()
                if not count:
                    first = last
                count += 1
                del msg, data
            say(count=count, seconds=last - first, lost=sub.stats().dropped, maxrss=_maxrss())
    elif impl == "raw pyzmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.rcvhwm = 2
        sock.subscribe(b"")
        sock.connect(endpoint)
        say(ready=True)
        while True:
            if not sock.poll(10_000):
                break
            topic = sock.recv()
            frame = sock.recv(copy=False)
            if topic == b"end":
                break
            data = np.frombuffer(frame.buffer, np.uint8)
            _ = data[0], data[-1]
            last = time.monotonic()
            if not count:
                first = last
            count += 1
        say(count=count, seconds=last - first, lost=None, maxrss=_maxrss())
        sock.close(0)
        ctx.term()
    else:
        import threading

        session = _zenoh_session(connect=[endpoint])
        done = threading.Event()
        state = {"count": 0, "first": 0.0, "last": 0.0}

        def on_frame(sample: Any) -> None:
            data = np.frombuffer(sample.payload.to_bytes(), np.uint8)  # no buffer protocol
            _ = data[0], data[-1]
            t = time.monotonic()
            if not state["count"]:
                state["first"] = t
            state["last"] = t
            state["count"] += 1

        sub = session.declare_subscriber("cam", on_frame)
        ender = session.declare_subscriber("end", lambda s: done.set())
        say(ready=True)
        done.wait(60)
        sub.undeclare()
        ender.undeclare()
        say(count=state["count"], seconds=state["last"] - state["first"], lost=None,
            maxrss=_maxrss())
        session.close()


def _zenoh_session(listen: list[str] | None = None, connect: list[str] | None = None) -> Any:
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("scouting/gossip/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "true")
    conf.insert_json5("listen/endpoints", json.dumps(listen or []))
    if connect:
        conf.insert_json5("connect/endpoints", json.dumps(connect))
    return zenoh.open(conf)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the driver -------------------------------------------------------------------------------
def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _read(child: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(timeout)
        raise RuntimeError(f"a benchmark process ended (exit {child.returncode})")
    return json.loads(line)  # type: ignore[no-any-return]


def one_run(impl: str, nbytes: int, duration: float, pool: int, tmp: str) -> dict[str, Any]:
    broker = None
    kids: list[subprocess.Popen[str]] = []
    try:
        if impl.startswith("vbus"):
            broker = subprocess.Popen([sys.executable, "-m", "vbus", "broker", "--bind",
                                       "tcp://127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
            assert broker.stdout is not None
            endpoint = broker.stdout.readline().split()[-1].rstrip(";")
            sub_ep = pub_ep = endpoint
        elif impl == "raw pyzmq":
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            pub_ep = sub_ep = f"tcp://127.0.0.1:{port}"
        else:
            path = tempfile.mkdtemp(dir=tmp, prefix="zenoh-")
            pub_ep = sub_ep = f"unixsock-stream/{path}/sock"
        if impl == "zenoh shm":  # the listener first
            pub = _spawn("pub", impl, pub_ep, str(nbytes), str(duration), str(pool))
            kids.append(pub)
            _read(pub)
            sub = _spawn("sub", impl, sub_ep, str(nbytes))
            kids.append(sub)
            _read(sub)
        else:
            sub = _spawn("sub", impl, sub_ep, str(nbytes))
            kids.append(sub)
            _read(sub)
            pub = _spawn("pub", impl, pub_ep, str(nbytes), str(duration), str(pool))
            kids.append(pub)
            _read(pub)
        if impl == "raw pyzmq":
            time.sleep(0.3)  # raw pyzmq has no readiness: give the slow joiner time
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        sent = _read(pub, duration + 30)
        got = _read(sub, duration + 30)
        seconds = got["seconds"]
        delivered = max(got["count"] - 1, 0)
        return {
            "impl": impl, "nbytes": nbytes, "sent": sent["sent"], "received": got["count"],
            "lost": got["lost"], "gbps": delivered * nbytes / seconds / 1e9 if seconds else 0.0,
            "rss_pub": sent["maxrss"], "rss_sub": got["maxrss"], "stats": sent.get("stats"),
        }
    finally:
        for kid in kids:
            try:
                kid.wait(15)
            except subprocess.TimeoutExpired:
                kid.kill()
                kid.wait(5)
            for f in (kid.stdin, kid.stdout):
                if f is not None:
                    f.close()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
            if broker.stdout is not None:
                broker.stdout.close()


def available(impl: str) -> bool:
    if impl.startswith("zenoh"):
        try:
            import zenoh  # noqa: F401
        except ImportError:
            return False
    return True


def run(sizes: list[int], duration: float, runs: int, pool: int,
        log: Any = print) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    impls = [i for i in IMPLS if available(i)]
    with tempfile.TemporaryDirectory(prefix="vbus-bench-shm-") as tmp:
        for nbytes in sizes:
            for r in range(runs):
                for impl in impls:  # interleaved: the machine's noise falls on all alike
                    one = one_run(impl, nbytes, duration, pool, tmp)
                    one["run"] = r
                    results.append(one)
                    log(f"  {nbytes // MIB:>2} MiB  {impl:<11} {one['gbps']:6.2f} GB/s  "
                        f"received {one['received']}/{one['sent']}  lost {one['lost']}")
    return results


def table(results: list[dict[str, Any]]) -> str:
    sizes = sorted({r["nbytes"] for r in results})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    med = {(i, s): statistics.median(r["gbps"] for r in results
                                     if r["impl"] == i and r["nbytes"] == s)
           for i in impls for s in sizes}
    lines = ["| system | " + " | ".join(f"{s // MIB} MiB" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for i in impls:
        lines.append(f"| {i} | " + " | ".join(f"{med[(i, s)]:.2f}" for s in sizes) + " |")
    if "zenoh shm" in impls:
        for i in ("vbus copy", "vbus loan"):
            lines.append(f"| {i} / zenoh shm | " + " | ".join(
                f"{med[(i, s)] / med[('zenoh shm', s)]:.2f}x" if med[("zenoh shm", s)] else "-"
                for s in sizes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("pub", "sub"):
        role, impl, endpoint, nbytes, *rest = args
        if role == "pub":
            publisher(impl, endpoint, int(nbytes), float(rest[0]), int(rest[1]))
        else:
            subscriber(impl, endpoint, int(nbytes))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16", help="frame sizes in MiB")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--pool", type=int, default=128, help="pool MiB (vbus and Zenoh)")
    p.add_argument("--json", help="write the results here")
    opts = p.parse_args(args)
    sizes = [int(s) * MIB for s in opts.sizes.split(",")]
    results = run(sizes, opts.duration, opts.runs, opts.pool * MIB)
    print()
    print(f"medians of {opts.runs}, payload GB/s delivered, pool {opts.pool} MiB, "
          f"{os.cpu_count()} cores")
    print(table(results))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
