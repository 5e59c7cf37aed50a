"""vbus.bluesky: a real RunEngine's documents through the bus, in order, beside bluesky's own
ZeroMQ bridge (bluesky.callbacks.zmq) fed by the same runs."""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vbus

pytest.importorskip("bluesky")
pytest.importorskip("ophyd")

from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count, scan  # noqa: E402
from ophyd.sim import SynSignal, det, det1, det2, direct_img, img, motor  # noqa: E402

from vbus.bluesky import DocumentPublisher, RemoteDispatcher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

# Bus options of these tests: the defaults (batching on: batches keep order across topics,
# and a value holding arrays leaves the batching fast path by itself).
BUS_OPTIONS: dict[str, Any] = {}

camera = SynSignal(func=lambda: np.arange(256 * 320, dtype=np.uint16).reshape(256, 320),
                   name="camera", labels={"detectors"})


RUNS = 4


def plans() -> Iterator[Any]:
    """A count with image detectors (arrays in the events; files with resource and datum),
    and a scan."""
    yield count([camera, det], num=5)
    yield count([direct_img], num=2)
    yield count([img], num=3)
    yield scan([det1, det2], motor, -1, 1, 25)


def plain(value: Any) -> Any:
    """A document as data, for comparing what two bridges delivered: tuples and lists alike,
    arrays by dtype, shape and bytes, numpy scalars as numbers."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def reorderings(got: list[Any], sent: list[Any]) -> int:
    """How many documents arrived before one published earlier (adjacent inversions of the
    published positions), plus any not delivered or not published."""
    position = {id_of(doc): i for i, doc in enumerate(sent)}
    order = [position.get(id_of(doc), -1) for doc in got]
    inversions = sum(1 for a, b in zip(order, order[1:], strict=False) if b < a)
    return inversions + abs(len(got) - len(sent)) + order.count(-1)


def id_of(item: tuple[str, Any]) -> tuple[str, str]:
    name, doc = item
    return name, str(doc.get("uid") or doc.get("datum_id") or doc.get("seq_num"))


class Collector:
    """A RemoteDispatcher callback that keeps every document and signals after ``runs``
    stop documents."""

    def __init__(self, runs: int) -> None:
        self.docs: list[tuple[str, Any]] = []
        self.runs = runs
        self.done = threading.Event()

    def __call__(self, name: str, doc: Any) -> None:
        self.docs.append((name, doc))
        if name == "stop" and sum(n == "stop" for n, _ in self.docs) >= self.runs:
            self.done.set()


@pytest.fixture
def RE() -> Iterator[RunEngine]:
    engine = RunEngine({}, call_returns_result=False)
    yield engine
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(5)
    assert not engine._th.is_alive()
    engine.loop.close()


@pytest.fixture
def network_bus(leakcheck: Any) -> Iterator[vbus.Bus]:
    # Room for the rate test's burst, as its dispatcher asks for (hwm=100_000): 300 images of
    # 160 KiB cross tcp as ~900 chunks sent back to back, more than the default queues of
    # 1000 hold when the broker falls behind; a stop document dropped (and counted) there
    # would leave the dispatcher waiting for it.
    b = vbus.Bus(bind="tcp://127.0.0.1:0", hwm=100_000, **BUS_OPTIONS)
    yield b
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 1.0


def run_all(RE: RunEngine, *callbacks: Any) -> list[tuple[str, Any]]:
    local: list[tuple[str, Any]] = []
    tokens = [RE.subscribe(lambda n, d: local.append((n, d)))]
    tokens += [RE.subscribe(cb) for cb in callbacks]
    try:
        for plan in plans():
            RE(plan)
    finally:
        for token in tokens:
            RE.unsubscribe(token)
    return local


# -- vbus alone ------------------------------------------------------------------------------------
def test_documents_arrive_in_runengine_order_with_arrays(
    RE: RunEngine, network_bus: vbus.Bus
) -> None:
    dispatcher = RemoteDispatcher(network_bus.address, prefix="RE0")
    remote = Collector(runs=RUNS)
    dispatcher.subscribe(remote)
    dispatcher.start(block=False)
    publisher = DocumentPublisher(network_bus, prefix="RE0")
    try:
        local = run_all(RE, publisher)
        assert remote.done.wait(30), f"{len(remote.docs)} of {len(local)} documents"
    finally:
        dispatcher.stop()
    names = [n for n, _ in local]
    assert {"start", "descriptor", "resource", "datum", "event", "stop"} <= set(names)
    assert reorderings(remote.docs, local) == 0
    assert [plain(d) for d in remote.docs] == [plain(d) for d in local]
    image = next(d["data"]["camera"] for n, d in remote.docs
                 if n == "event" and "camera" in d["data"])
    assert image.dtype == np.uint16 and image.shape == (256, 320)
    assert dispatcher.lost == 0 and dispatcher.stopped
    print(f"\n{len(local)} documents in {RUNS} runs, {reorderings(remote.docs, local)} reorderings")


def test_events_with_several_arrays(RE: RunEngine, network_bus: vbus.Bus) -> None:
    dispatcher = RemoteDispatcher(network_bus.address, prefix="RE5")
    remote = Collector(runs=1)
    dispatcher.subscribe(remote)
    dispatcher.start(block=False)
    local: list[tuple[str, Any]] = []
    RE.subscribe(lambda n, d: local.append((n, d)))
    RE.subscribe(DocumentPublisher(network_bus, prefix="RE5"))
    try:
        RE(count([camera, direct_img], num=3))
        assert remote.done.wait(10), f"{len(remote.docs)} of {len(local)} documents"
    finally:
        dispatcher.stop()
    assert [plain(d) for d in remote.docs] == [plain(d) for d in local]


def test_a_burst_of_documents_keeps_its_order_across_topics(network_bus: vbus.Bus) -> None:
    """Documents published back to back (events, then at once the next run's start on
    another topic...): what batching could reorder. 200 runs of 25 events, no RunEngine in
    between to slow the burst."""
    runs, events = 200, 25
    sent: list[tuple[str, Any]] = []
    for r in range(runs):
        start = {"uid": f"s{r}", "time": 0.0, "scan_id": r}
        sent.append(("start", start))
        sent.append(("descriptor", {"uid": f"d{r}", "run_start": f"s{r}", "data_keys": {}}))
        sent += [("event", {"uid": f"e{r}.{i}", "seq_num": i + 1, "data": {"x": i}})
                 for i in range(events)]
        sent.append(("stop", {"uid": f"t{r}", "run_start": f"s{r}", "exit_status": "success"}))
    dispatcher = RemoteDispatcher(network_bus, prefix="burst", hwm=len(sent) + 10)
    remote = Collector(runs=runs)
    dispatcher.subscribe(remote)
    publish = DocumentPublisher(network_bus, prefix="burst")
    for name, doc in sent:
        publish(name, doc)
    dispatcher.start(block=False)
    try:
        assert remote.done.wait(30), f"{len(remote.docs)} of {len(sent)} documents"
    finally:
        dispatcher.stop()
    wrong = reorderings(remote.docs, sent)
    print(f"\n{len(sent)} documents in {runs} runs, {wrong} reorderings")
    assert wrong == 0
    assert remote.docs == sent


def test_start_blocks_until_stop_from_a_callback(network_bus: vbus.Bus) -> None:
    dispatcher = RemoteDispatcher(network_bus, prefix="RE1")
    seen: list[str] = []

    def until_stop(name: str, doc: Any) -> None:
        seen.append(name)
        if name == "stop":
            dispatcher.stop()

    dispatcher.subscribe(until_stop)
    publish = DocumentPublisher(network_bus, prefix="RE1")
    for name in ("start", "descriptor", "event", "stop", "start"):
        publish(name, {"uid": uuid.uuid4().hex})
    started = time.monotonic()
    dispatcher.start()  # returns: stop() from the callback
    assert time.monotonic() - started < 2.0
    assert seen == ["start", "descriptor", "event", "stop"]  # nothing after stop()
    with pytest.raises(RuntimeError, match="stopped"):
        dispatcher.start()


def test_stop_from_another_thread_ends_a_blocking_start(leakcheck: Any) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0", **BUS_OPTIONS) as bus:
        dispatcher = RemoteDispatcher(bus.address, prefix="RE2")  # its own connection
        ready = threading.Event()
        dispatcher.subscribe(lambda name, doc: ready.set())
        DocumentPublisher(bus, prefix="RE2")("start", {"uid": "a"})
        def stop_when_ready() -> None:
            ready.wait(10)
            dispatcher.stop()

        stopper = threading.Thread(target=stop_when_ready)
        stopper.start()
        started = time.monotonic()
        dispatcher.start()
        stopper.join(5)
        assert ready.is_set() and time.monotonic() - started < 5.0
        assert dispatcher.stopped


INTERRUPTED = textwrap.dedent("""
    import sys, threading, time
    import vbus
    from vbus.bluesky import RemoteDispatcher
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        d = RemoteDispatcher(bus.address, prefix="RE0")

        def announce():  # once start() runs: a SIGINT before the try would not be caught
            while not d._started:
                time.sleep(0.001)  # sleep-ok: a state flag (start() entered), no message
            print("ready", flush=True)

        threading.Thread(target=announce, daemon=True).start()
        try:
            d.start()
        except KeyboardInterrupt:
            started = time.monotonic()
        print("interrupted", d.stopped, [t.name for t in threading.enumerate()], flush=True)
    print("closed in", round(time.monotonic() - started, 3), flush=True)
""")


def test_ctrl_c_interrupts_a_blocking_start_and_stops_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        started = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=10)
        assert child.returncode == 0
        assert time.monotonic() - started < 2.0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    interrupted, closed = out.splitlines()
    # stopped: its connection closed and no thread of it left, only the bus's own ones
    assert interrupted.startswith("interrupted True")
    assert "vbus-dispatcher" not in interrupted
    assert float(closed.split()[-1]) < 1.0


def test_callback_errors_are_reported_and_delivery_goes_on(
    network_bus: vbus.Bus, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = RemoteDispatcher(network_bus, prefix="RE3")
    good = Collector(runs=1)

    def bad(name: str, doc: Any) -> None:
        raise ValueError("broken callback")

    dispatcher.subscribe(bad)
    dispatcher.subscribe(good)
    publish = DocumentPublisher(network_bus, prefix="RE3")
    for name in ("start", "event", "stop"):
        publish(name, {"uid": name})
    dispatcher.start(block=False)
    try:
        assert good.done.wait(10)
    finally:
        dispatcher.stop()
    assert [n for n, _ in good.docs] == ["start", "event", "stop"]
    assert dispatcher.errors == 3
    assert "raised on a start document" in caplog.text
    assert "broken callback" in caplog.text  # its traceback


def test_bad_input_is_named(network_bus: vbus.Bus) -> None:
    with pytest.raises(vbus.TopicError):
        DocumentPublisher(network_bus, prefix="RE/")
    with pytest.raises(vbus.TopicError):
        RemoteDispatcher(network_bus, prefix="a b")
    with pytest.raises(vbus.ConnectError, match="127.0.0.1:9"):
        RemoteDispatcher("tcp://127.0.0.1:9", timeout=0.3)
    publish = DocumentPublisher(network_bus, prefix="RE4")
    with pytest.raises(vbus.EncodeError):
        publish("event", {"uid": "x", "data": {"obj": object()}})
    with pytest.raises(vbus.TopicError):
        publish("no such/name", {})


# -- beside bluesky.callbacks.zmq ----------------------------------------------------------------
BLUESKY_SIDE = textwrap.dedent("""
    # bluesky's own bridge: Proxy and RemoteDispatcher on ipc:// (its tcp binds every
    # interface); prints "bound", then "ready" once a warm-up document got through, and
    # writes what it received to OUT.
    import os, pickle, sys, threading, time
    from bluesky.callbacks.zmq import Proxy, RemoteDispatcher
    out, runs = sys.argv[1], int(sys.argv[2])
    proxy = Proxy(f"ipc://{out}.in", f"ipc://{out}.out")
    print("bound", flush=True)
    threading.Thread(target=proxy.start, daemon=True).start()
    d = RemoteDispatcher(f"ipc://{out}.out")
    docs, warm = [], []
    def collect(name, doc):
        if doc.get("warmup"):
            if not warm:
                warm.append(1)
                print("ready", flush=True)
            return
        docs.append((name, doc))
        if name == "stop" and sum(n == "stop" for n, _ in docs) == runs:
            last = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
            with open(out, "wb") as f:
                pickle.dump((docs, last), f)
            os._exit(0)  # its stop() cannot be called from a callback; nothing else ends it
    d.subscribe(collect)
    d.start()
""")


class BlueskyZmq:
    """bluesky.callbacks.zmq in a child process (its proxy runs forever and its dispatcher
    does not stop cleanly: a child can be killed); a bluesky Publisher here."""

    def __init__(self, tmp_path: Path, runs: int) -> None:
        from bluesky.callbacks.zmq import Publisher

        self.out = tmp_path / "bluesky-docs.pickle"
        self.child = subprocess.Popen(
            [sys.executable, "-c", BLUESKY_SIDE, str(self.out), str(runs)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.child.stdout is not None
        assert self._line(10.0) == "bound"
        self.publisher = Publisher(f"ipc://{self.out}.in")
        # bluesky's bridge has no readiness: offer warm-up documents until one got through
        deadline = time.monotonic() + 10.0
        while True:
            self.publisher("start", {"warmup": True})
            try:
                assert self._line(0.05) == "ready"
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def _line(self, timeout: float) -> str:
        assert self.child.stdout is not None
        if not select.select([self.child.stdout], [], [], timeout)[0]:
            raise TimeoutError("no line from the bluesky side")
        return self.child.stdout.readline().strip()

    def result(self, timeout: float) -> tuple[list[tuple[str, Any]], float]:
        """The documents received, and the time.monotonic() of the last one."""
        assert self.child.wait(timeout) == 0
        with open(self.out, "rb") as f:
            docs, last = pickle.load(f)
        return docs, last

    def close(self) -> None:
        self.publisher.close()
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait(5)
        assert self.child.stdout is not None
        self.child.stdout.close()


def test_same_documents_in_the_same_order_as_bluesky_zmq(
    RE: RunEngine, network_bus: vbus.Bus, tmp_path: Path
) -> None:
    """The same runs, fed to both bridges at once: both deliver the RunEngine's documents,
    the same ones, in the same order."""
    theirs = BlueskyZmq(tmp_path, runs=RUNS)
    dispatcher = RemoteDispatcher(network_bus.address, prefix="RE0")
    ours = Collector(runs=RUNS)
    dispatcher.subscribe(ours)
    dispatcher.start(block=False)
    try:
        local = run_all(RE, DocumentPublisher(network_bus, prefix="RE0"), theirs.publisher)
        assert ours.done.wait(30)
        their_docs, _ = theirs.result(30)
    finally:
        dispatcher.stop()
        theirs.close()
    expected = [plain(d) for d in local]
    assert [plain(d) for d in their_docs] == expected
    assert [plain(d) for d in ours.docs] == expected
    assert reorderings(ours.docs, local) == 0 and reorderings(their_docs, local) == 0


VBUS_SIDE = textwrap.dedent("""
    # vbus's bridge, the same work as BLUESKY_SIDE's: a RemoteDispatcher (subscribed when it
    # returns: no warm-up) writes what it received and stops itself.
    import pickle, sys, time
    from vbus.bluesky import RemoteDispatcher
    out, address, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    d = RemoteDispatcher(address, prefix="rate", hwm=100_000)
    docs = []
    def collect(name, doc):
        docs.append((name, doc))
        if name == "stop" and sum(n == "stop" for n, _ in docs) == runs:
            last = time.monotonic()
            with open(out, "wb") as f:
                pickle.dump((docs, last), f)
            d.stop()
    d.subscribe(collect)
    print("ready", flush=True)
    d.start()
""")


class VbusChild(BlueskyZmq):
    """vbus.bluesky's RemoteDispatcher in a child process, connected to ``address``."""

    def __init__(self, tmp_path: Path, address: str, runs: int) -> None:
        self.out = tmp_path / "vbus-docs.pickle"
        self.child = subprocess.Popen(
            [sys.executable, "-c", VBUS_SIDE, str(self.out), address, str(runs)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self._line(20.0) == "ready"

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait(5)
        assert self.child.stdout is not None
        self.child.stdout.close()


def test_document_rate_beside_bluesky_zmq(RE: RunEngine, network_bus: vbus.Bus,
                                          tmp_path: Path) -> None:
    """Documents per second, first sent to last received in another process, through each
    bridge: the documents of two runs (a count of 300 camera images, 160 KiB each, and a
    300-point scan) sent again back to back, three rounds each, alternating. Printed, the
    best round of each; both must deliver every document in order."""
    docs: list[tuple[str, Any]] = []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    RE(count([camera, det], num=300))
    RE(scan([det1, det2], motor, -1, 1, 300))
    publish = DocumentPublisher(network_bus, prefix="rate")
    rates: dict[str, list[float]] = {"vbus": [], "bluesky.callbacks.zmq": []}
    for _ in range(3):
        for name in rates:
            side: BlueskyZmq = (VbusChild(tmp_path, network_bus.address, runs=2)
                                if name == "vbus" else BlueskyZmq(tmp_path, runs=2))
            send = publish if name == "vbus" else side.publisher
            try:
                started = time.monotonic()
                for doc_name, doc in docs:
                    send(doc_name, doc)
                got, last = side.result(60)
            finally:
                side.close()
            assert [plain(d) for d in got] == [plain(d) for d in docs]
            rates[name].append(len(docs) / (last - started))
    print(f"\n{len(docs)} documents, best of 3: " + ", ".join(
        f"{name} {max(r):,.0f}/s (rounds {', '.join(f'{x:,.0f}' for x in r)})"
        for name, r in rates.items()))


# -- the example -----------------------------------------------------------------------------------
def test_example_runs_as_written() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bluesky_live_table.py")],
        capture_output=True, text=True, timeout=90, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "|      motor |        det |" in out  # the live table's header
    assert out.count("|") > 40  # and its rows
    assert "camera frame 3: uint16 (480, 640)" in out
    assert "Traceback" not in done.stderr
