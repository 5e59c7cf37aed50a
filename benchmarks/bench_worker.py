"""Child-process roles of the benchmark suite: ``python bench_worker.py ROLE JSON``.

Every role talks to the controller (run.py) over its standard streams, one line each way:
it prints ``READY {json}``, ``WARMING``, ``WARMED``, ``ARMED`` and ``RESULT {json}`` on stdout
and reads JSON commands (``{"cmd": "run", ...}``, ``{"cmd": "sent", "n": N}``,
``{"cmd": "go"}``) on stdin. Closing stdin ends a role. An exception prints ``ERROR ...``
and exits non-zero; the controller shows the tail of stderr.

Three implementations of each role do the same work:

- ``vbus``: the public API only (``vbus.Bus``, ``vbus.connect``, ``publish``, ``recv``);
- ``raw``: the fastest honest pyzmq code: PUB/SUB, one frame ``topic\\0 + payload`` for small
  messages, ``[topic, data]`` with ``copy=False`` for large ones, the same high-water marks
  as vbus, a ``zmq.proxy`` XSUB/XPUB process as broker, inproc sockets in one process;
- ``zenoh``: eclipse-zenoh peer to peer (no router), callback subscribers.

Raw pyzmq and Zenoh have no readiness handshake, so their publishers send warm-up messages
on a second topic until every subscriber has seen one (the subscriber subscribed to the data
first, so its warm-up subscription arriving proves the data subscription arrived too). vbus
needs none: ``subscribe()`` and ``publisher()`` return when ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import struct
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine

TOPIC = "bench/data"
PING = "bench/ping"
PONG = "bench/pong"
WARM = "bench/warm"
GAP = 0.05  # a receive loop hands back control after this long without a message
IDLE_END = 0.5  # once the sent count is known, give up waiting for the rest after this


def vbus_default_hwm() -> int:
    """vbus's default high-water mark (from the public signature): raw sockets get the same."""
    import inspect

    import vbus

    default = inspect.signature(vbus.Bus).parameters["hwm"].default
    return int(default) if isinstance(default, int) else 1000


HWM = vbus_default_hwm()


def raw_topic(topic: str) -> bytes:
    return topic.encode() + b"\0"


# -- talking to the controller ----------------------------------------------------------------
def say(tag: str, obj: Any = None) -> None:
    line = tag if obj is None else f"{tag} {json.dumps(obj)}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Stdin:
    """JSON commands from the controller, read without blocking beyond a timeout."""

    def __init__(self) -> None:
        self._buf = b""
        self._lines: deque[dict[str, Any]] = deque()
        self.eof = False

    def poll(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """The next command, or None if none came within ``timeout``; EOFError at the end."""
        if self._lines:
            return self._lines.popleft()
        if self.eof:
            raise EOFError
        end = now() + timeout
        while True:
            ready, _, _ = select.select([0], [], [], max(end - now(), 0.0))
            if ready:
                chunk = os.read(0, 65536)
                if not chunk:
                    self.eof = True
                    raise EOFError
                self._buf += chunk
                *lines, self._buf = self._buf.split(b"\n")
                self._lines.extend(json.loads(line) for line in lines if line.strip())
                if self._lines:
                    return self._lines.popleft()
            if now() >= end:
                return None

    def get(self, timeout: float) -> dict[str, Any]:
        cmd = self.poll(timeout)
        if cmd is None:
            raise TimeoutError(f"no command from the controller within {timeout:g} s")
        return cmd

    def wait_eof(self) -> None:
        try:
            while True:
                self.poll(3600.0)
        except EOFError:
            return


# -- payloads ---------------------------------------------------------------------------------
def make_payload(spec: dict[str, Any]) -> Any:
    """``{"kind": "bytes", "size": 64}`` or ``{"kind": "ndarray", "shape": [..], "dtype": ..}``."""
    if spec["kind"] == "bytes":
        return bytes(range(256)) * (spec["size"] // 256) + bytes(spec["size"] % 256)
    import numpy as np

    array = np.zeros(spec["shape"], dtype=spec["dtype"])
    array.reshape(-1)[:: max(array.size // 64, 1)] = 7
    return array


def payload_nbytes(spec: dict[str, Any]) -> int:
    if spec["kind"] == "bytes":
        return int(spec["size"])
    import numpy as np

    return int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize


def check_received(spec: dict[str, Any], data: Any) -> None:
    """Called on the first message of a run: the subscriber decoded what was sent."""
    if spec["kind"] == "bytes":
        size = memoryview(data).nbytes
        if size != spec["size"]:
            raise AssertionError(f"received {size} bytes, expected {spec['size']}")
        return
    if list(data.shape) != list(spec["shape"]) or data.dtype.str != spec["dtype"]:
        raise AssertionError(f"received {data.dtype.str}{data.shape}, expected {spec}")


# -- vbus -------------------------------------------------------------------------------------
class VbusEnv:
    def __init__(self, address: str | None, hwm: int | None = None, bus: Any = None) -> None:
        import vbus

        self.owned = bus is None
        if bus is not None:
            self.bus = bus
        elif address is None:
            self.bus = vbus.Bus(**({"hwm": hwm} if hwm else {}))
        else:
            self.bus = vbus.connect(address, timeout=10.0, **({"hwm": hwm} if hwm else {}))

    def close(self) -> None:
        if self.owned:
            self.bus.close()


class VbusTx:
    def __init__(self, env: VbusEnv, topic: str, spec: dict[str, Any]) -> None:
        self.pub = env.bus.publisher()
        self.topic = topic
        self.spec = spec
        self.data = make_payload(spec)
        self._dropped = 0

    def warm(self, stdin: Stdin | None) -> None:
        pass  # publisher() returned: the broker takes our messages

    def set_payload(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.data = make_payload(spec)

    def burst(self, end: float, max_count: int, batch: int) -> int:
        publish = self.pub.publish
        topic = self.topic
        data = self.data
        n = 0
        while n < max_count:
            for _ in range(min(batch, max_count - n)):
                publish(topic, data)
            n += min(batch, max_count - n)
            if now() >= end:
                break
        return n

    burst_locked = burst  # a vbus Publisher is thread-safe

    def fence(self) -> None:
        """One last message after a run through each of the publisher's lanes: the gap
        before it reveals losses at the run's tail (a subscriber counts a loss when the next
        message of that sender shows the gap). Each publishing thread has a lane of its own,
        so this thread's message covers its lane only; the run's threads have ended, and as
        many fresh threads, alive together, take (and fence) the other lanes."""
        lanes = len(getattr(self.pub, "senders", ())) or 1
        self.pub.publish(self.topic, None)
        if lanes > 1:
            together = threading.Barrier(lanes - 1)

            def fence_one_lane() -> None:
                self.pub.publish(self.topic, None)
                together.wait(10.0)  # alive until every fresh thread has taken its lane

            fencers = [threading.Thread(target=fence_one_lane) for _ in range(lanes - 1)]
            for t in fencers:
                t.start()
            for t in fencers:
                t.join(15.0)

    def dropped_delta(self) -> int | None:
        total = self.pub.stats().dropped
        delta, self._dropped = total - self._dropped, total
        return delta

    def close(self) -> None:
        self.pub.close()


class VbusRx:
    def __init__(self, env: VbusEnv, topic: str, spec: dict[str, Any],
                 hwm: int | None = None) -> None:
        self.sub = env.bus.subscribe(topic, hwm=hwm)
        self.spec = spec
        self._dropped = 0
        self.first: Any = None

    def warm(self) -> None:
        pass  # subscribe() returned: the subscription is active at the broker

    def drain(self) -> None:
        try:
            while True:
                self.sub.recv(timeout=0)
        except TimeoutError:
            pass

    def reset(self) -> None:
        self.first = None

    def pump(self, gap: float, limit: float) -> tuple[int, float, float]:
        """Receive until ``limit`` messages or ``gap`` s without one; count and time them.
        With ``recv_batch`` (the public API for floods) every message that is here comes in
        one call; each message's data is still taken, as a consumer would."""
        recv_batch = getattr(self.sub, "recv_batch", None)
        if recv_batch is None:  # a vbus without it (--src of an older checkout)
            return self._pump_one_by_one(gap, limit)
        n = 0
        t_first = t_last = 0.0
        data = None
        try:
            while n < limit:
                for msg in recv_batch(gap):
                    data = msg.data
                    n += 1
                t_last = now()
                if not t_first:
                    t_first = t_last
        except TimeoutError:
            pass
        if n and self.first is None:
            self.first = data
        return n, t_first, t_last

    def _pump_one_by_one(self, gap: float, limit: float) -> tuple[int, float, float]:
        recv = self.sub.recv
        n = 0
        t_first = t_last = 0.0
        data = None
        try:
            while n < limit:
                data = recv(gap).data
                t_last = now()
                if not n:
                    t_first = t_last
                n += 1
        except TimeoutError:
            pass
        if n and self.first is None:
            self.first = data
        return n, t_first, t_last

    def wait_fence(self, timeout: float = 5.0, rest: float = 0.3) -> bool:
        """Until the fence arrives, then the other lanes' fences (none for ``rest`` s)."""
        end = now() + timeout
        try:
            while self.sub.recv(timeout=max(end - now(), 0.0)).data is not None:
                pass
        except TimeoutError:
            return False
        with contextlib.suppress(TimeoutError):
            while True:
                self.sub.recv(timeout=rest)
        return True

    def dropped_delta(self) -> int | None:
        total = self.sub.stats().dropped
        delta, self._dropped = total - self._dropped, total
        return delta

    def close(self) -> None:
        self.sub.close()


# -- raw pyzmq --------------------------------------------------------------------------------
def _zmq() -> Any:
    import zmq

    return zmq


class RawEnv:
    """A context, and how each side reaches the other: ``{"pub": [mode, endpoint],
    "sub": [mode, endpoint]}`` with mode "bind" or "connect"."""

    def __init__(self, links: dict[str, Any], context: Any = None) -> None:
        zmq = _zmq()
        self.owned = context is None
        self.ctx = context if context is not None else zmq.Context()
        self.links = links

    def socket(self, kind: int, side: str) -> Any:
        zmq = _zmq()
        sock = self.ctx.socket(kind)
        sock.linger = 0
        if kind == zmq.PUB:
            sock.sndhwm = HWM
        else:
            sock.rcvhwm = HWM
        mode, endpoint = self.links[side]
        getattr(sock, mode)(endpoint)
        return sock

    def start_proxy(self) -> None:
        """The raw counterpart of vbus's embedded broker: ``zmq.proxy`` on a thread of this
        process, XSUB at inproc://bench-front, XPUB at inproc://bench-back."""
        zmq = _zmq()
        front, back = self.ctx.socket(zmq.XSUB), self.ctx.socket(zmq.XPUB)
        for sock in (front, back):
            sock.linger = 0
        front.rcvhwm = HWM
        back.sndhwm = HWM
        front.bind("inproc://bench-front")
        back.bind("inproc://bench-back")

        def run() -> None:
            try:
                zmq.proxy(front, back)
            except zmq.ContextTerminated:
                pass
            finally:
                front.close(0)
                back.close(0)

        self.proxy = threading.Thread(target=run, name="raw-proxy")
        self.proxy.start()

    def close(self) -> None:
        if self.owned:
            self.ctx.term()  # the proxy thread's sockets see ETERM and close
        proxy = getattr(self, "proxy", None)
        if proxy is not None:
            proxy.join(10.0)


IN_PROXY = {"pub": ["connect", "inproc://bench-front"], "sub": ["connect", "inproc://bench-back"]}


class RawTx:
    def __init__(self, env: RawEnv, topic: str, spec: dict[str, Any], side: str = "pub") -> None:
        zmq = _zmq()
        self.sock = env.socket(zmq.PUB, side)
        self.prefix = raw_topic(topic)
        self.set_payload(spec)
        self.lock = threading.Lock()

    def set_payload(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.data = make_payload(spec)

    def warm(self, stdin: Stdin | None, event: threading.Event | None = None) -> None:
        """Send warm-up messages until told to stop (by the controller, or ``event``)."""
        warm = raw_topic(WARM) + b"w"
        deadline = now() + 30.0
        if stdin is not None:
            say("WARMING")
        while now() < deadline:
            self.sock.send(warm)
            if stdin is not None:
                cmd = stdin.poll(0.005)
                if cmd is not None and cmd.get("cmd") == "go":
                    return
            elif event is not None and event.wait(0.005):
                return
        raise TimeoutError("no subscriber saw a warm-up message within 30 s")

    def burst(self, end: float, max_count: int, batch: int) -> int:
        zmq = _zmq()
        send = self.sock.send
        prefix = self.prefix
        data = self.data
        n = 0
        if self.spec["kind"] == "bytes" and len(data) < 65536:
            while n < max_count:
                for _ in range(min(batch, max_count - n)):
                    send(prefix + data)
                n += min(batch, max_count - n)
                if now() >= end:
                    break
        else:
            more = zmq.SNDMORE
            while n < max_count:
                for _ in range(min(batch, max_count - n)):
                    send(prefix, more)
                    send(data, copy=False)
                n += min(batch, max_count - n)
                if now() >= end:
                    break
        return n

    def burst_locked(self, end: float, max_count: int, batch: int) -> int:
        """The same from several threads: a pyzmq socket needs a lock around each send."""
        send = self.sock.send
        lock = self.lock
        prefix = self.prefix
        data = self.data
        n = 0
        while n < max_count:
            for _ in range(min(batch, max_count - n)):
                with lock:
                    send(prefix + data)
            n += min(batch, max_count - n)
            if now() >= end:
                break
        return n

    def dropped_delta(self) -> int | None:
        return None  # a PUB socket drops silently

    def close(self) -> None:
        self.sock.close(0)


class RawRx:
    def __init__(self, env: RawEnv, topic: str, spec: dict[str, Any], side: str = "sub") -> None:
        zmq = _zmq()
        sock = self.sock = env.ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.rcvhwm = HWM
        self.prefix = raw_topic(topic)
        sock.subscribe(self.prefix)
        sock.subscribe(raw_topic(WARM))  # last: its arrival proves the data one arrived
        mode, endpoint = env.links[side]
        getattr(sock, mode)(endpoint)
        self.spec = spec
        self.first: Any = None

    def warm(self) -> None:
        warm = raw_topic(WARM)
        deadline = now() + 30.0
        while now() < deadline:
            if self.sock.poll(100) and self.sock.recv().startswith(warm):
                self.sock.unsubscribe(warm)  # SUB also filters what is already queued
                return
        raise TimeoutError("no warm-up message within 30 s")

    def drain(self) -> None:
        zmq = _zmq()
        try:
            while True:
                self.sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass

    def reset(self) -> None:
        self.first = None

    def pump(self, gap: float, limit: float) -> tuple[int, float, float]:
        zmq = _zmq()
        sock = self.sock
        sock.rcvtimeo = max(int(gap * 1000), 1)
        recv = sock.recv
        n = 0
        t_first = t_last = 0.0
        data: Any = None
        try:
            if self.spec["kind"] == "bytes" and self.spec["size"] < 65536:
                plen = len(self.prefix)
                while n < limit:
                    data = recv()[plen:]
                    t_last = now()
                    if not n:
                        t_first = t_last
                    n += 1
            else:
                import numpy as np

                frombuffer = np.frombuffer
                dtype = self.spec.get("dtype", "|u1")
                shape = self.spec.get("shape", -1)
                while n < limit:
                    recv()
                    frame = recv(copy=False)
                    data = frombuffer(frame.buffer, dtype).reshape(shape)
                    t_last = now()
                    if not n:
                        t_first = t_last
                    n += 1
        except zmq.Again:
            pass
        if n and self.first is None:
            self.first = data
        return n, t_first, t_last

    def dropped_delta(self) -> int | None:
        return None  # raw SUB cannot know

    def close(self) -> None:
        self.sock.close(0)


def proxy_role(args: dict[str, Any], stdin: Stdin) -> None:
    """A standalone raw broker: ``zmq.proxy(XSUB, XPUB)``; ends when stdin closes."""
    zmq = _zmq()
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    for sock in (front, back):
        sock.linger = 0
    front.rcvhwm = HWM
    back.sndhwm = HWM
    if args["transport"] == "tcp":
        front_ep = f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}"
        back_ep = f"tcp://127.0.0.1:{back.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        front_ep, back_ep = f"ipc://{args['path']}", f"ipc://{args['path']}.sub"
        front.bind(front_ep)
        back.bind(back_ep)

    def watch() -> None:
        stdin.wait_eof()
        os._exit(0)  # zmq.proxy has no stop: the process simply ends

    threading.Thread(target=watch, daemon=True).start()
    say("READY", {"front": front_ep, "back": back_ep, "pid": os.getpid()})
    zmq.proxy(front, back)


# -- zenoh ------------------------------------------------------------------------------------
def zenoh_session(listen: list[str] | None = None, connect: list[str] | None = None) -> Any:
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("scouting/gossip/enabled", "false")
    conf.insert_json5("listen/endpoints", json.dumps(listen or []))
    if connect:
        conf.insert_json5("connect/endpoints", json.dumps(connect))
    return zenoh.open(conf)


class ZenohEnv:
    def __init__(self, listen: list[str] | None = None, connect: list[str] | None = None,
                 session: Any = None) -> None:
        self.owned = session is None
        self.session = session if session is not None else zenoh_session(listen, connect)

    def close(self) -> None:
        if self.owned:
            self.session.close()


class ZenohTx:
    def __init__(self, env: ZenohEnv, topic: str, spec: dict[str, Any]) -> None:
        import zenoh

        self.pub = env.session.declare_publisher(
            topic, congestion_control=zenoh.CongestionControl.BLOCK  # lossless
        )
        self.warm_pub = env.session.declare_publisher(WARM)
        self.set_payload(spec)

    def set_payload(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.data = make_payload(spec)

    def warm(self, stdin: Stdin | None, event: threading.Event | None = None) -> None:
        deadline = now() + 30.0
        if stdin is not None:
            say("WARMING")
        while now() < deadline:
            self.warm_pub.put(b"w")
            if stdin is not None:
                cmd = stdin.poll(0.005)
                if cmd is not None and cmd.get("cmd") == "go":
                    return
            elif event is not None and event.wait(0.005):
                return
        raise TimeoutError("no subscriber saw a warm-up message within 30 s")

    def burst(self, end: float, max_count: int, batch: int) -> int:
        put = self.pub.put
        data = self.data
        n = 0
        if self.spec["kind"] == "bytes":
            while n < max_count:
                for _ in range(min(batch, max_count - n)):
                    put(data)
                n += min(batch, max_count - n)
                if now() >= end:
                    break
        else:
            while n < max_count:  # zenoh takes bytes only: the array is copied
                for _ in range(min(batch, max_count - n)):
                    put(data.tobytes())
                n += min(batch, max_count - n)
                if now() >= end:
                    break
        return n

    burst_locked = burst  # a zenoh Publisher is thread-safe

    def dropped_delta(self) -> int | None:
        return 0  # CongestionControl.BLOCK: never drops

    def close(self) -> None:
        self.pub.undeclare()
        self.warm_pub.undeclare()


class ZenohRx:
    """Counts in the callback (zenoh's fastest Python delivery); ``pump`` watches the count."""

    def __init__(self, env: ZenohEnv, topic: str, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.count = 0
        self.t_first = self.t_last = 0.0
        self.first: Any = None
        self._seen = 0
        self._warm = threading.Event()
        if spec["kind"] == "bytes":
            callback = self._on_bytes
        else:
            import numpy as np

            self._frombuffer = np.frombuffer
            callback = self._on_array
        self.sub = env.session.declare_subscriber(topic, callback)
        self.warm_sub = env.session.declare_subscriber(WARM, lambda _s: self._warm.set())

    def _on_bytes(self, sample: Any) -> None:
        data = sample.payload.to_bytes()
        t = now()
        if not self.count:
            self.t_first = t
            self.first = data
        self.t_last = t
        self.count += 1

    def _on_array(self, sample: Any) -> None:
        spec = self.spec
        data = self._frombuffer(sample.payload.to_bytes(), spec["dtype"]).reshape(spec["shape"])
        t = now()
        if not self.count:
            self.t_first = t
            self.first = data
        self.t_last = t
        self.count += 1

    def warm(self) -> None:
        if not self._warm.wait(30.0):
            raise TimeoutError("no warm-up message within 30 s")
        self.warm_sub.undeclare()

    def drain(self) -> None:
        pass

    def reset(self) -> None:
        self.count = self._seen = 0
        self.t_first = self.t_last = 0.0
        self.first = None

    def pump(self, gap: float, limit: float) -> tuple[int, float, float]:
        end = now() + gap
        start = last = self._seen
        while now() < end:
            time.sleep(0.002)
            count = self.count
            if count - start >= limit:
                break
            if count != last:
                last = count
                end = now() + gap  # still arriving
        n = self.count - start
        self._seen += n
        return n, self.t_first, self.t_last

    def dropped_delta(self) -> int | None:
        return 0

    def close(self) -> None:
        self.sub.undeclare()


# -- the throughput roles ---------------------------------------------------------------------
def run_receiver(rx: Any, sent: Any, max_wait: float) -> dict[str, Any]:
    """One run of a subscriber: until ``sent()`` (None while unknown) is received, or the
    rest is given up ``IDLE_END`` s after the count became known."""
    received = 0
    t_first = t_last = 0.0
    total: int | None = None
    idle_since: float | None = None
    deadline = now() + max_wait
    while True:
        limit = float("inf") if total is None else total - received
        n, tf, tl = rx.pump(GAP, max(limit, 1))
        if n:
            if not received:
                t_first = tf
            received += n
            t_last = tl
            idle_since = None
        elif idle_since is None:
            idle_since = now()
        if total is None:
            total = sent()
        if total is not None and (
            received >= total or (idle_since is not None and now() - idle_since > IDLE_END)
        ):
            break
        if now() > deadline:
            break
    if received:
        check_received(rx.spec, rx.first)
    return {"received": received, "t_first": t_first, "t_last": t_last}


def run_sender(tx: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    threads = int(cmd.get("threads", 1))
    duration = float(cmd["duration"])
    max_count = int(cmd.get("max_count") or 1 << 62)
    batch = int(cmd.get("batch", 1))
    if threads == 1:
        t_start = now()
        sent = tx.burst(t_start + duration, max_count, batch)
        t_end = now()
    else:
        counts = [0] * threads
        barrier = threading.Barrier(threads + 1)
        share = max(max_count // threads, batch)

        def worker(i: int) -> None:
            barrier.wait()
            counts[i] = tx.burst_locked(end, share, batch)

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        t_start = now()
        end = t_start + duration
        barrier.wait()
        for w in workers:
            w.join()
        t_end = now()
        sent = sum(counts)
    return {"sent": sent, "t_start": t_start, "t_end": t_end, "dropped": tx.dropped_delta()}


def make_tx(impl: str, args: dict[str, Any], spec: dict[str, Any]) -> tuple[Any, Any]:
    if impl == "vbus":
        env: Any = VbusEnv(args.get("address"), args.get("hwm"))
        return env, VbusTx(env, TOPIC, spec)
    if impl == "raw":
        env = RawEnv({"pub": ["connect", args["front"]]})
        return env, RawTx(env, TOPIC, spec)
    env = ZenohEnv(connect=args["connect"])
    return env, ZenohTx(env, TOPIC, spec)


def make_rx(impl: str, args: dict[str, Any], spec: dict[str, Any]) -> tuple[Any, Any]:
    if impl == "vbus":
        env: Any = VbusEnv(args.get("address"), args.get("hwm"))
        return env, VbusRx(env, TOPIC, spec, args.get("hwm"))
    if impl == "raw":
        env = RawEnv({"sub": ["connect", args["back"]]})
        return env, RawRx(env, TOPIC, spec)
    env = ZenohEnv(listen=args["listen"])
    return env, ZenohRx(env, TOPIC, spec)


def pub_role(args: dict[str, Any], stdin: Stdin) -> None:
    impl = args["impl"]
    env, tx = make_tx(impl, args, args["payload"])
    try:
        tx.warm(stdin)
        say("READY", {"pid": os.getpid()})
        while True:
            try:
                cmd = stdin.get(3600.0)
            except EOFError:
                return
            if cmd["cmd"] == "run":
                if cmd.get("payload") and cmd["payload"] != tx.spec:
                    tx.set_payload(cmd["payload"])
                say("RESULT", run_sender(tx, cmd))
            elif cmd["cmd"] == "fence":
                tx.fence()
                say("FENCED")
    finally:
        tx.close()
        env.close()


def sub_role(args: dict[str, Any], stdin: Stdin) -> None:
    impl = args["impl"]
    env, rx = make_rx(impl, args, args["payload"])
    try:
        say("READY", {"pid": os.getpid()})
        if impl != "vbus":
            rx.warm()
            say("WARMED")
        while True:
            try:
                cmd = stdin.get(3600.0)
            except EOFError:
                return
            if cmd["cmd"] != "run":
                continue
            if cmd.get("payload"):
                rx.spec = cmd["payload"]
            rx.drain()
            rx.reset()
            say("ARMED")

            def sent() -> int | None:
                c = stdin.poll(0.0)
                return None if c is None else int(c["n"])

            result = run_receiver(rx, sent, float(cmd.get("max_wait", 120.0)))
            if impl == "vbus":
                say("DRAINED")  # the controller has the publisher send the fence
                result["fenced"] = rx.wait_fence()
            result["counted_lost"] = rx.dropped_delta()
            say("RESULT", result)
    finally:
        rx.close()
        env.close()


def embedded_run(impl: str, tx: Any, rx: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """One run in one process: the publisher on a thread, the subscriber on this one."""
    rx.drain()
    rx.reset()
    box: dict[str, Any] = {}

    def send() -> None:
        try:
            box.update(run_sender(tx, cmd))
        except BaseException as exc:
            box["error"] = exc
            box["sent"] = 0
            raise

    pub = threading.Thread(target=send, name="publisher")
    pub.start()
    result = run_receiver(rx, lambda: box.get("sent"), float(cmd.get("max_wait", 120)))
    pub.join()
    if "error" in box:
        raise RuntimeError(f"publisher thread failed: {box['error']!r}")
    if impl == "vbus":
        tx.fence()
        result["fenced"] = rx.wait_fence()
    result["counted_lost"] = rx.dropped_delta()
    if rx.first is not None and rx.spec["kind"] == "ndarray":
        import numpy as np

        result["zero_copy"] = bool(np.shares_memory(rx.first, tx.data))
    return {"pub": box, "sub": result}


def embedded_role(args: dict[str, Any], stdin: Stdin) -> None:
    """Publisher thread and subscriber in one process, over the in-process transport."""
    impl = args["impl"]
    spec = args["payload"]
    if impl == "vbus":
        env: Any = VbusEnv(None)
        rx: Any = VbusRx(env, TOPIC, spec)
        tx: Any = VbusTx(env, TOPIC, spec)
    elif impl == "raw":  # through a zmq.proxy thread, like vbus's embedded broker
        env = RawEnv(IN_PROXY)
        env.start_proxy()
        tx = RawTx(env, TOPIC, spec)
        rx = RawRx(env, TOPIC, spec)
    elif impl == "direct":  # PUB bound, SUB connected: no broker at all
        env = RawEnv({"pub": ["bind", "inproc://bench-data"], "sub": ["connect",
                                                                     "inproc://bench-data"]})
        tx = RawTx(env, TOPIC, spec)
        rx = RawRx(env, TOPIC, spec)
    else:
        env = ZenohEnv()
        rx = ZenohRx(env, TOPIC, spec)
        tx = ZenohTx(env, TOPIC, spec)
    try:
        if impl != "vbus":
            warmed = threading.Event()
            warmer = threading.Thread(target=tx.warm, args=(None, warmed))
            warmer.start()
            try:
                rx.warm()
            finally:
                warmed.set()
                warmer.join()
        say("READY", {"pid": os.getpid()})
        while True:
            try:
                cmd = stdin.get(3600.0)
            except EOFError:
                return
            if cmd["cmd"] != "run":
                continue
            if cmd.get("payload"):
                rx.spec = cmd["payload"]
                tx.set_payload(cmd["payload"])
            say("RESULT", embedded_run(impl, tx, rx, cmd))
    finally:
        tx.close()
        rx.close()
        env.close()


# -- latency ----------------------------------------------------------------------------------
def _ping_payload(i: int) -> bytes:
    return struct.pack("<Q", i) + bytes(56)


class Echo:
    """Answers every ping with a pong carrying the same payload. ``stop()`` ends it."""

    def __init__(self, impl: str, env: Any) -> None:
        self.impl = impl
        self.env = env
        self._stop = threading.Event()
        if impl == "vbus":
            self.sub = env.bus.subscribe(PING)
            self.pub = env.bus.publisher()
        elif impl == "raw":
            zmq = _zmq()
            self.sub = env.ctx.socket(zmq.SUB)
            self.sub.linger = 0
            self.sub.subscribe(raw_topic(PING))
            mode, ep = env.links["echo_sub"]
            getattr(self.sub, mode)(ep)
            self.pub = env.socket(zmq.PUB, "echo_pub")
        else:
            self.pub = env.session.declare_publisher(PONG)
            self.sub = env.session.declare_subscriber(PING, lambda s: self.pub.put(s.payload))

    def run(self) -> None:
        """The echo loop (vbus, raw); returns when stopped."""
        if self.impl == "vbus":
            publish = self.pub.publish
            for msg in self.sub:  # ends when the subscriber is closed
                publish(PONG, msg.data)
        elif self.impl == "raw":
            zmq = _zmq()
            recv, send = self.sub.recv, self.pub.send
            self.sub.rcvtimeo = 100
            cut = len(raw_topic(PING))
            pong = raw_topic(PONG)
            while not self._stop.is_set():
                try:
                    send(pong + recv()[cut:])
                except zmq.Again:
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self.impl == "vbus":
            self.sub.close()

    def close(self) -> None:
        if self.impl == "vbus":
            self.sub.close()
            self.pub.close()
        elif self.impl == "raw":
            self.sub.close(0)
            self.pub.close(0)
        else:
            self.sub.undeclare()
            self.pub.undeclare()


class Pinger:
    def __init__(self, impl: str, env: Any) -> None:
        self.impl = impl
        if impl == "vbus":
            self.sub = env.bus.subscribe(PONG)
            self.pub = env.bus.publisher()
        elif impl == "raw":
            zmq = _zmq()
            self.sub = env.ctx.socket(zmq.SUB)
            self.sub.linger = 0
            self.sub.subscribe(raw_topic(PONG))
            mode, ep = env.links["ping_sub"]
            getattr(self.sub, mode)(ep)
            self.pub = env.socket(zmq.PUB, "ping_pub")
        else:
            self.q: queue.SimpleQueue[bytes] = queue.SimpleQueue()
            self.pub = env.session.declare_publisher(PING)
            self.sub = env.session.declare_subscriber(
                PONG, lambda s: self.q.put(s.payload.to_bytes())
            )

    def _exchange(self, i: int, timeout: float) -> bool:
        """One ping; True when its pong came back within ``timeout``."""
        payload = _ping_payload(i)
        if self.impl == "vbus":
            self.pub.publish(PING, payload)
            end = now() + timeout
            while True:
                try:
                    msg = self.sub.recv(timeout=max(end - now(), 0.0))
                except TimeoutError:
                    return False
                if struct.unpack_from("<Q", msg.data)[0] == i:
                    return True
        elif self.impl == "raw":
            zmq = _zmq()
            self.sub.rcvtimeo = max(int(timeout * 1000), 1)
            self.pub.send(raw_topic(PING) + payload)
            cut = len(raw_topic(PONG))
            while True:
                try:
                    frame = self.sub.recv()
                except zmq.Again:
                    return False
                if struct.unpack_from("<Q", frame, cut)[0] == i:
                    return True
        else:
            self.pub.put(payload)
            end = now() + timeout
            while True:
                try:
                    got = self.q.get(timeout=max(end - now(), 0.0))
                except queue.Empty:
                    return False
                if struct.unpack_from("<Q", got)[0] == i:
                    return True

    def warm(self) -> None:
        """Ping until a pong comes back (raw and zenoh have no readiness), then some more."""
        deadline = now() + 30.0
        while not self._exchange(0, 0.02):
            if now() > deadline:
                raise TimeoutError("no pong within 30 s")
        for i in range(200):
            self._exchange(1 << 40 | i, 1.0)

    def run(self, count: int) -> dict[str, Any]:
        perf = time.perf_counter_ns
        exchange = self._exchange
        rtts: list[int] = []
        lost = 0
        for i in range(1, count + 1):
            t0 = perf()
            if exchange(i, 1.0):
                rtts.append(perf() - t0)
            else:
                lost += 1
        one_way = sorted(r / 2000.0 for r in rtts)  # microseconds
        n = len(one_way)
        return {
            "count": n,
            "lost": lost,
            "p50": one_way[n // 2] if n else None,
            "p90": one_way[int(n * 0.9)] if n else None,
            "p99": one_way[min(int(n * 0.99), n - 1)] if n else None,
            "max": one_way[-1] if n else None,
            "mean": sum(one_way) / n if n else None,
        }

    def close(self) -> None:
        if self.impl == "vbus":
            self.sub.close()
            self.pub.close()
        elif self.impl == "raw":
            self.sub.close(0)
            self.pub.close(0)
        else:
            self.sub.undeclare()
            self.pub.undeclare()


def _latency_env(impl: str, args: dict[str, Any], side: str) -> Any:
    if impl == "vbus":
        return VbusEnv(args.get("address"))
    if impl == "raw":
        return RawEnv({f"{side}_pub": ["connect", args["front"]],
                       f"{side}_sub": ["connect", args["back"]]})
    if side == "echo":
        return ZenohEnv(listen=args["listen"])
    return ZenohEnv(connect=args["connect"])


def echo_role(args: dict[str, Any], stdin: Stdin) -> None:
    impl = args["impl"]
    env = _latency_env(impl, args, "echo")
    echo = Echo(impl, env)
    thread = threading.Thread(target=echo.run, name="echo")
    thread.start()
    try:
        say("READY", {"pid": os.getpid()})
        stdin.wait_eof()
    finally:
        echo.stop()
        thread.join(10.0)
        echo.close()
        env.close()


def ping_loop(pinger: Pinger, stdin: Stdin) -> None:
    pinger.warm()
    say("READY", {"pid": os.getpid()})
    while True:
        try:
            cmd = stdin.get(3600.0)
        except EOFError:
            return
        if cmd["cmd"] == "run":
            say("RESULT", pinger.run(int(cmd["count"])))


def ping_role(args: dict[str, Any], stdin: Stdin) -> None:
    impl = args["impl"]
    env = _latency_env(impl, args, "ping")
    pinger = Pinger(impl, env)
    try:
        ping_loop(pinger, stdin)
    finally:
        pinger.close()
        env.close()


def latency_embedded_role(args: dict[str, Any], stdin: Stdin) -> None:
    impl = args["impl"]
    if impl == "vbus":
        env: Any = VbusEnv(None)
    elif impl == "raw":  # through a zmq.proxy thread, like vbus's embedded broker
        env = RawEnv({f"{side}_{kind}": IN_PROXY[kind] for side in ("ping", "echo")
                      for kind in ("pub", "sub")})
        env.start_proxy()
    elif impl == "direct":
        env = RawEnv({
            "ping_pub": ["bind", "inproc://bench-ping"],
            "echo_sub": ["connect", "inproc://bench-ping"],
            "echo_pub": ["bind", "inproc://bench-pong"],
            "ping_sub": ["connect", "inproc://bench-pong"],
        })
    else:
        env = ZenohEnv()
    impl = "raw" if impl == "direct" else impl  # the same raw code, other sockets
    echo = Echo(impl, env)
    pinger = Pinger(impl, env)
    thread = threading.Thread(target=echo.run, name="echo")
    thread.start()
    try:
        ping_loop(pinger, stdin)
    finally:
        echo.stop()
        thread.join(10.0)
        pinger.close()
        echo.close()
        env.close()


# -- brokers and the memory check -------------------------------------------------------------
def broker_role(args: dict[str, Any], stdin: Stdin) -> None:
    """A standalone vbus broker: ``vbus.Bus(bind=[...])`` until stdin closes."""
    import vbus

    kwargs = {"hwm": args["hwm"]} if args.get("hwm") else {}
    with vbus.Bus(bind=[args["bind"]], **kwargs) as bus:
        say("READY", {"address": bus.address, "pid": os.getpid()})
        stdin.wait_eof()


def stalled_sub_role(args: dict[str, Any], stdin: Stdin) -> None:
    """Subscribes, then never receives: the slow consumer of target 5."""
    env = VbusEnv(args["address"], args.get("hwm"))
    sub = env.bus.subscribe(TOPIC, hwm=args.get("hwm"))
    try:
        say("READY", {"pid": os.getpid()})
        stdin.wait_eof()
    finally:
        sub.close()
        env.close()


def flood_role(args: dict[str, Any], stdin: Stdin) -> None:
    """Publishes a fresh array (every page written, like a camera's) until told to stop."""
    import numpy as np

    env = VbusEnv(args["address"], args.get("hwm"))
    pub = env.bus.publisher()
    spec = args["payload"]
    try:
        say("READY", {"pid": os.getpid()})
        cmd = stdin.get(60.0)
        end = now() + float(cmd["duration"])
        rate = float(cmd.get("rate") or 0.0)
        sent = 0
        t0 = now()
        while now() < end:
            frame = np.empty(spec["shape"], dtype=spec["dtype"])
            frame.reshape(-1).view(np.uint8)[::4096] = sent & 0xFF
            pub.publish(TOPIC, frame)
            del frame
            sent += 1
            if stdin.poll(0.0) is not None:
                break  # the controller's stop
            if rate:
                pause = t0 + sent / rate - now()
                if pause > 0:
                    time.sleep(pause)
        stats = pub.stats()
        say("RESULT", {"sent": sent, "published": stats.published, "dropped": stats.dropped,
                       "elapsed": now() - t0, "hwm": args.get("hwm") or HWM})
        stdin.wait_eof()
    finally:
        pub.close()
        env.close()


# -- the guarantees check (issue 14, target 4) -----------------------------------------------
GUARD = "bench/g"
GUARD_TOPICS = tuple(f"{GUARD}/{name}" for name in ("a", "b/c", "d"))
GUARD_FENCE = f"{GUARD}/fence"


def guard_pub_role(args: dict[str, Any], stdin: Stdin) -> None:
    """Publishes a flood of counters over three topics in runs of random length (batches and
    the switches between them), from ``threads`` threads sharing one publisher; then, on
    request, fences: one message on each topic and a marker, which reveal any loss."""
    import random

    env = VbusEnv(args["address"])
    pub = env.bus.publisher()
    try:
        say("READY", {"pid": os.getpid()})
        fences = runs = attempted = 0  # attempted: publish() calls, all of them
        while True:
            try:
                cmd = stdin.get(3600.0)
            except EOFError:
                return
            if cmd["cmd"] == "run":
                threads, count = int(cmd["threads"]), int(cmd["count"])
                runs += 1

                def flood(thread: int, count: int = count, run: int = runs) -> None:
                    rng = random.Random(thread)
                    index = run * 100 + thread  # the counters of one thread of one run
                    publish = pub.publish
                    i = 0
                    while i < count:
                        topic = GUARD_TOPICS[rng.randrange(3)]
                        for _ in range(min(rng.randrange(1, 300), count - i)):
                            publish(topic, [index, i])
                            i += 1

                workers = [threading.Thread(target=flood, args=(t,)) for t in range(threads)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                attempted += threads * count
                say("RESULT", {"sent": threads * count})
            elif cmd["cmd"] == "fence":
                # From as many threads at once as the run had: each takes a lane (the
                # flood's threads have ended, so theirs are free), and every lane's tail is
                # then followed by a message on each topic.
                fences += 1
                fencers = int(cmd["threads"])
                barrier = threading.Barrier(fencers)

                def fence(_thread: int, round_: int = fences,
                          barrier: threading.Barrier = barrier) -> None:
                    barrier.wait(10.0)
                    for topic in GUARD_TOPICS:
                        pub.publish(topic, [-1, round_])
                    pub.publish(GUARD_FENCE, round_)

                workers = [threading.Thread(target=fence, args=(t,)) for t in range(fencers)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                attempted += fencers * (len(GUARD_TOPICS) + 1)
                say("FENCED", {"round": fences, "attempted": attempted,
                               "lanes": len(pub.senders), "pub_dropped": pub.stats().dropped})
    finally:
        pub.close()
        env.close()


def guard_sub_role(args: dict[str, Any], stdin: Stdin) -> None:
    """Receives the flood with a small queue and pauses now and then (so that it loses at its
    queue), checking that each publishing thread's counters only grow, across topics. Asked
    to check a fence round: whether all of that round came (then every message before it is
    received or counted lost), and the counts."""
    env = VbusEnv(args["address"])
    sub = env.bus.subscribe(f"{GUARD}/**", hwm=int(args.get("hwm", 16)))
    pause_every = int(args.get("pause_every", 30_000))
    last: dict[int, int] = {}
    fence_parts: dict[int, int] = {}
    first_seq: dict[tuple[str, str], int] = {}
    counts = {"received": 0, "disorder": 0, "before_first": 0}

    def take(timeout: float) -> None:
        try:
            batch = sub.recv_batch(timeout)
        except TimeoutError:
            return
        for msg in batch:
            counts["received"] += 1
            stream = (msg.sender, msg.topic)
            if stream not in first_seq:
                # A subscriber counts losses from the first message it sees of a stream
                # (it cannot tell a late join from a loss); these publishers started after
                # it subscribed, at seq 1, so what came before is known lost too.
                first_seq[stream] = msg.seq
                counts["before_first"] += msg.seq - 1
            if msg.topic == GUARD_FENCE:
                fence_parts[msg.data] = fence_parts.get(msg.data, 0) + 1
                continue
            index, i = msg.data
            if index < 0:  # a fence's message on a data topic
                fence_parts[i] = fence_parts.get(i, 0) + 1
            else:
                if i <= last.get(index, -1):
                    counts["disorder"] += 1
                last[index] = i
            if counts["received"] % pause_every == 0:
                time.sleep(0.02)  # a slow consumer: its queue overflows meanwhile

    try:
        say("READY", {"pid": os.getpid()})
        while True:
            try:
                cmd = stdin.poll(0.0)
            except EOFError:
                return
            if cmd is None or cmd["cmd"] != "check":
                take(0.01)
                continue
            want = int(cmd["round"])
            parts = int(cmd["fencers"]) * (len(GUARD_TOPICS) + 1)
            end = now() + 2.0
            while fence_parts.get(want, 0) < parts and now() < end:
                take(0.05)
            say("CHECKED", {"complete": fence_parts.get(want, 0) == parts,
                            "dropped": sub.stats().dropped, **counts})
    finally:
        sub.close()
        env.close()


ROLES = {
    "broker": broker_role,
    "proxy": proxy_role,
    "pub": pub_role,
    "sub": sub_role,
    "embedded": embedded_role,
    "echo": echo_role,
    "ping": ping_role,
    "latency-embedded": latency_embedded_role,
    "stalled-sub": stalled_sub_role,
    "flood": flood_role,
    "guard-pub": guard_pub_role,
    "guard-sub": guard_sub_role,
}


def main() -> int:
    role, args = sys.argv[1], json.loads(sys.argv[2])
    stdin = Stdin()
    try:
        ROLES[role](args, stdin)
    except BaseException as exc:  # the controller shows stderr on failure
        traceback.print_exc()
        say("ERROR", f"{role}: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
