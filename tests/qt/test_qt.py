"""vbus.qt: delivery on the GUI thread, coalescing, forwarding signals, lifecycle, the viewer."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import asyncio  # noqa: E402
import gc  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import vbus  # noqa: E402

pytest.importorskip("qtpy")
pytest.importorskip("pytestqt")

# pytest-qt has loaded its binding (PYTEST_QT_API, else PySide6 first); qtpy takes the one
# already loaded, so vbus.qt and these tests run on that binding.
import qtpy  # noqa: E402
from qtpy.QtCore import QEventLoop, QObject, QRect, QThread, QTimer, Signal  # noqa: E402
from qtpy.QtGui import QImage, QPainter  # noqa: E402
from qtpy.QtWidgets import QApplication, QSpinBox, QWidget  # noqa: E402

try:
    from vbus._cli.demo.gui import open_viewer
    from vbus.qt import QtSubscriber, forward

    BINDING_DEFECT: str | None = None
except ImportError as exc:  # vbus.qt refuses a binding that would abort the interpreter
    if "loses a reference" not in str(exc):
        raise
    BINDING_DEFECT = str(exc)

ROOT = Path(__file__).resolve().parents[2]
needs_binding = pytest.mark.skipif(BINDING_DEFECT is not None, reason=str(BINDING_DEFECT))


BINDINGS = {"PySide6": "pyside6", "PyQt6": "pyqt6"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("binding", sorted(BINDINGS.values()))
def test_under_each_binding(binding: str) -> None:
    """Every test of this module under PySide6 and PyQt6: this process runs them under one
    binding (pytest-qt's), a child process under the other."""
    if BINDINGS.get(qtpy.API_NAME) == binding:
        pytest.skip(f"{qtpy.API_NAME} {qtpy.QT_VERSION}: the tests of this process")
    import importlib.util

    if importlib.util.find_spec({"pyside6": "PySide6", "pyqt6": "PyQt6"}[binding]) is None:
        pytest.skip(f"{binding} is not installed")  # not imported: one binding a process
    env = dict(os.environ, QT_API=binding, PYTEST_QT_API=binding, VBUS_QT_BINDING_RUN="1",
               QT_QPA_PLATFORM="offscreen")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not test_under_each_binding"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    summary = result.stdout.strip().splitlines()[-1:] or [""]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]
    print(f"\n{binding}: {summary[0]}")


def test_binding_in_use() -> None:
    """qtpy and pytest-qt agree: one binding in this process."""
    import sys as _sys

    loaded = [name for name in BINDINGS if name in _sys.modules]
    assert loaded == [qtpy.API_NAME], loaded
    print(f"\n{qtpy.API_NAME} {qtpy.PYSIDE_VERSION or qtpy.PYQT_VERSION}, Qt {qtpy.QT_VERSION}")


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None and True are immortal on "
                    "Python 3.12+ (PEP 683): no binding can lose a reference to them")
def test_the_qt_binding_keeps_its_references() -> None:
    """PySide6 6.12 on Python < 3.12 aborts any Qt program after a while: pin PySide6 < 6.12
    there. vbus.qt measures it on import and refuses to load; measured again here."""
    assert BINDING_DEFECT is None, BINDING_DEFECT
    from vbus import qt as vbus_qt

    assert vbus_qt._binding_defect() is None


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _qt_warmup(qapp: QApplication) -> None:
    """Qt loads fonts and image plugins on first use; do that before any test's leak check
    takes its snapshot of threads and file descriptors."""
    if BINDING_DEFECT is not None:
        return
    image = QImage(64, 32, QImage.Format.Format_RGB32)
    painter = QPainter(image)
    painter.drawText(2, 20, "warm-up")
    painter.end()
    widget = QSpinBox()
    widget.show()
    widget.grab().toImage().save(os.devnull, "PNG")  # type: ignore[call-overload]  # str works
    widget.close()
    widget.deleteLater()
    qapp.processEvents()


@pytest.fixture
def qt_painting_threads(qapp: QApplication) -> None:
    """Qt scales images smoothly on a pool of threads of its own (each with an eventfd) that
    it starts on demand and ends after 30 s idle. Request this fixture before ``bus`` so that
    they run before the leak check's snapshot."""
    source = QImage(1024, 512, QImage.Format.Format_RGB32)
    source.fill(0x204060)
    target = QImage(900, 640, QImage.Format.Format_RGB32)
    for _ in range(5):
        painter = QPainter(target)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        painter.drawImage(QRect(66, 10, 768, 384), source)
        painter.end()
    qapp.processEvents()


@pytest.fixture(autouse=True)
def _no_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    errors: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        errors.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")
        previous(args)

    monkeypatch.setattr(threading, "excepthook", hook)
    yield errors
    assert not errors, f"exceptions in threads: {errors}"


def qt_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("vbus-qt-")}


def wait_while_busy(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Like qtbot.waitUntil, but without processing Qt events: the GUI thread stays busy."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met within the timeout"
        time.sleep(0.001)  # sleep-ok: simulates a busy GUI thread that processes no events


def frame(value: int) -> Any:
    return np.full((512, 1024), value, dtype=np.uint16)  # 1 MiB, like the viewer's camera


class Flood:
    """Publishes camera frames and stage positions from a thread until stopped."""

    def __init__(self, bus: vbus.Bus) -> None:
        self.pub = bus.publisher()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-flood")

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        assert not self._thread.is_alive()
        self.pub.close()

    def _run(self) -> None:
        base = frame(0)
        while not self._stop.is_set():
            try:
                self.pub.publish("camera/frame", base + (self.sent % 4096))
                self.pub.publish("stage/x", float(self.sent))
            except vbus.Closed:
                return  # a test closed the bus
            self.sent += 1
            self._stop.wait(0.002)  # pacing: about 500 frames/s



# -- delivery ------------------------------------------------------------------------------------
@needs_binding
def test_delivers_on_the_gui_thread_in_order(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "seq/*")
    got: list[tuple[int, bool, str, int]] = []
    gui = threading.get_ident()
    caught_up = threading.Condition()

    def take(m: vbus.Message) -> None:
        with caught_up:
            got.append(
                (threading.get_ident(), QThread.currentThread() is qsub.thread(), m.topic, m.data)
            )
            caught_up.notify()

    qsub.received.connect(take)
    assert qt_threads() == {"vbus-qt-seq/*"}
    n, step = 2000, 250

    def publish() -> None:
        # In steps the GUI has taken: a flood of all 2000 at once could overflow the
        # queues on a loaded machine (publisher drops, counted: not what this test is about).
        pub = bus.publisher()
        for start in range(0, n, step):
            for i in range(start, start + step):
                pub.publish("seq/a" if i % 2 else "seq/b", i)
            with caught_up:
                end = start + step
                caught_up.wait_for(lambda: len(got) >= end, timeout=10.0)  # noqa: B023
        pub.close()

    publisher = threading.Thread(target=publish, name="test-publisher")
    publisher.start()
    try:
        qtbot.waitUntil(lambda: len(got) == n, timeout=10_000)
    except Exception as exc:  # say what was lost where, not only that time ran out
        raise AssertionError(f"{len(got)} of {n} delivered; {qsub.stats()}") from exc
    publisher.join(5.0)
    assert not publisher.is_alive()
    assert {ident for ident, *_ in got} == {gui}
    assert all(on_own_thread for _, on_own_thread, _, _ in got)
    # Order is guaranteed per publisher and topic (the publisher batches per topic).
    assert [data for _, _, topic, data in got if topic == "seq/b"] == list(range(0, n, 2))
    assert [data for _, _, topic, data in got if topic == "seq/a"] == list(range(1, n, 2))
    stats = qsub.stats()
    assert (stats.received, stats.delivered, stats.skipped, stats.dropped) == (n, n, 0, 0)
    assert qsub.delivered == n and qsub.skipped == 0
    qsub.close()
    assert qsub.closed and qt_threads() == set()


@needs_binding
def test_typed_subscription_delivers_structs(bus: vbus.Bus, qtbot: Any) -> None:
    class State(msgspec.Struct):
        x: float
        moving: bool

    qsub = QtSubscriber(bus, "stage/state", type=State)
    with qtbot.waitSignal(qsub.received, timeout=5000) as blocker:
        bus.publisher().publish("stage/state", State(1.5, True))
    assert blocker.args[0].data == State(1.5, True)
    qsub.close()


@needs_binding
def test_bad_pattern_or_closed_bus_raise_and_start_nothing(bus: vbus.Bus, qtbot: Any) -> None:
    with pytest.raises(vbus.TopicError, match="camera//x"):
        QtSubscriber(bus, "camera//x")
    with pytest.raises(ValueError):
        QtSubscriber(bus, "x", hwm=0)
    bus.close()
    with pytest.raises(vbus.Closed):
        QtSubscriber(bus, "x")
    assert qt_threads() == set()


@needs_binding
def test_latest_only_coalesces_while_the_gui_is_busy(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "camera/*", latest_only=True)
    got: list[vbus.Message] = []
    qsub.received.connect(got.append)
    pub = bus.publisher()
    n_a, n_b = 40, 25
    for i in range(n_a):
        pub.publish("camera/a", frame(i))
        if i < n_b:
            pub.publish("camera/b", frame(1000 + i))
    # This test does not return to the event loop: the GUI thread is busy, the bus is not.
    wait_while_busy(lambda: qsub.stats().received == n_a + n_b)
    assert got == [] and qsub.delivered == 0
    qtbot.waitUntil(lambda: qsub.delivered == 2, timeout=5000)
    # One message per topic: the newest, in the order the newest ones arrived.
    assert [(m.topic, m.seq) for m in got] == [("camera/b", n_b), ("camera/a", n_a)]
    assert int(got[0].data[0, 0]) == 1000 + n_b - 1 and int(got[1].data[0, 0]) == n_a - 1
    assert qsub.skipped == (n_a - 1) + (n_b - 1)
    # Nothing more is pending: the next message is delivered at once, and alone.
    with qtbot.waitSignal(qsub.received, timeout=5000) as blocker:
        pub.publish("camera/a", frame(7))
    assert blocker.args[0].seq == n_a + 1
    stats = qsub.stats()
    assert (stats.received, stats.delivered, stats.skipped) == (n_a + n_b + 1, 3, n_a + n_b - 2)
    assert stats.delivered + stats.skipped == stats.received
    qsub.close()


@needs_binding
def test_latest_only_under_load_accounts_for_every_message(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "camera/frame", latest_only=True)
    seqs: list[int] = []
    n = 300

    def slow_paint(msg: vbus.Message) -> None:
        seqs.append(msg.seq)
        # A GUI slower than the camera: busy until three newer frames have come in.
        wait_while_busy(lambda: qsub.stats().received >= min(msg.seq + 3, n))

    qsub.received.connect(slow_paint)
    pub = bus.publisher()

    def camera() -> None:
        for i in range(n):
            pub.publish("camera/frame", np.full((128, 256), i, dtype=np.uint16))
            time.sleep(0.0005)  # sleep-ok: pacing the producer: a stream, not one burst

    producer = threading.Thread(target=camera, name="test-camera")
    producer.start()
    qtbot.waitUntil(lambda: bool(seqs) and seqs[-1] == n, timeout=20_000)
    producer.join(5.0)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # in order, never twice
    stats = qsub.stats()
    assert stats.received == n and stats.dropped == 0
    assert stats.delivered == len(seqs) and stats.delivered + stats.skipped == n
    assert stats.skipped >= 2 * (stats.delivered - 1)  # never a backlog
    qsub.close()


@needs_binding
def test_without_latest_only_a_busy_gui_gets_everything_in_batches(
    bus: vbus.Bus, qtbot: Any
) -> None:
    qsub = QtSubscriber(bus, "n")
    events: list[object] = []

    def slot(msg: vbus.Message) -> None:
        events.append(msg.data)
        end = time.perf_counter() + 0.0002  # some GUI work per message
        while time.perf_counter() < end:
            pass

    qsub.received.connect(slot)
    ticker = QTimer()
    ticker.timeout.connect(lambda: events.append("tick"))
    pub = bus.publisher()
    n = 300
    for i in range(n):
        pub.publish("n", i)
    wait_while_busy(lambda: qsub.stats().received == n)
    ticker.start(0)
    qtbot.waitUntil(lambda: qsub.delivered == n, timeout=5000)
    ticker.stop()
    assert [e for e in events if e != "tick"] == list(range(n))
    first = events.index(0)
    last = events.index(n - 1)
    # 300 x 0.2 ms exceed the 5 ms a pass may take: the timer ran between batches.
    assert "tick" in events[first:last]
    qsub.close()


@needs_binding
def test_without_latest_only_hwm_bounds_the_backlog(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "n", hwm=50)
    got: list[int] = []
    qsub.received.connect(lambda m: got.append(m.data))
    pub = bus.publisher()
    for i in range(80):
        pub.publish("n", i)
    wait_while_busy(lambda: qsub.stats().received == 80)
    qtbot.waitUntil(lambda: len(got) == 50, timeout=5000)
    assert got == list(range(50))  # the oldest kept, the rest refused and counted
    assert qsub.stats().dropped == 30 and qsub.dropped == 30
    qsub.close()


@needs_binding
def test_delivers_on_the_thread_of_the_qobject(bus: vbus.Bus, qtbot: Any) -> None:
    """Created in another thread running a Qt event loop, it emits there, not on the GUI's."""
    seen: list[tuple[int, int]] = []
    ready = threading.Event()

    def worker() -> None:
        loop = QEventLoop()
        qsub = QtSubscriber(bus, "work")

        def on_message(msg: vbus.Message) -> None:
            seen.append((threading.get_ident(), msg.data))
            if msg.data == 9:
                loop.quit()

        qsub.received.connect(on_message)
        QTimer.singleShot(0, ready.set)
        loop.exec()
        qsub.close()

    thread = threading.Thread(target=worker, name="test-qt-worker")
    thread.start()
    assert ready.wait(5.0)
    pub = bus.publisher()
    for i in range(10):
        pub.publish("work", i)
    thread.join(5.0)
    assert not thread.is_alive()
    assert seen == [(thread.ident, i) for i in range(10)]
    assert qt_threads() == set()


# -- forwarding signals --------------------------------------------------------------------------
class Panel(QObject):
    clicked = Signal()
    moved = Signal(float, float)
    named = Signal(str)


@needs_binding
def test_forward_publishes_signal_arguments(bus: vbus.Bus, qtbot: Any) -> None:
    sub = bus.subscribe("ui/**")
    pub = bus.publisher()
    panel = Panel()
    spin = QSpinBox()
    forward(panel.clicked, pub, "ui/clicked")
    forward(panel.moved, pub, "ui/moved")
    slot = forward(panel.named, pub, "ui/named", retain=True)
    forward(spin.valueChanged, pub, "ui/spin", convert=lambda v: {"value": v})
    panel.clicked.emit()
    panel.moved.emit(1.5, -2.0)
    panel.named.emit("objective 40x")
    spin.setValue(7)
    got = [sub.recv(timeout=2.0) for _ in range(4)]
    assert [(m.topic, m.data) for m in got] == [
        ("ui/clicked", None),
        ("ui/moved", [1.5, -2.0]),
        ("ui/named", "objective 40x"),
        ("ui/spin", {"value": 7}),
    ]
    assert got[2].sender == pub.id
    panel.named.disconnect(slot)
    panel.named.emit("not forwarded")
    panel.clicked.emit()
    assert sub.recv(timeout=2.0).topic == "ui/clicked"
    late = bus.subscribe("ui/named")  # forward(retain=True) left the topic's last value
    assert late.recv(timeout=2.0).data == "objective 40x"
    with pytest.raises(vbus.TopicError):
        forward(panel.clicked, pub, "ui/*")
    with pytest.raises(TypeError):
        forward(panel.clicked, bus.async_publisher(), "ui/x")  # type: ignore[arg-type]
    bus.close()
    panel.clicked.emit()  # the bus is gone: ignored, not an error


# -- lifecycle -----------------------------------------------------------------------------------
@needs_binding
def test_bus_close_from_a_slot_returns_promptly(bus: vbus.Bus, qtbot: Any) -> None:
    async_running = threading.Event()

    @bus.on("camera/frame")
    async def analyse(msg: vbus.Message) -> None:
        async_running.set()
        await asyncio.sleep(0.001)

    frames = QtSubscriber(bus, "camera/frame", latest_only=True)
    stage = QtSubscriber(bus, "stage/x")
    took: list[float] = []

    def close_the_bus(msg: vbus.Message) -> None:
        if async_running.is_set():
            started = time.perf_counter()
            bus.close()
            took.append(time.perf_counter() - started)

    stage.received.connect(close_the_bus)
    with Flood(bus):
        qtbot.waitUntil(lambda: bool(took), timeout=10_000)
    assert took[0] < 1.0
    assert len(took) == 1  # nothing was delivered after the bus closed
    qtbot.waitUntil(lambda: frames.closed and stage.closed, timeout=2000)
    assert qt_threads() == set()


@needs_binding
def test_bus_closed_elsewhere_stops_the_qtsubscriber(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "x")
    got: list[int] = []
    qsub.received.connect(lambda m: got.append(m.data))
    with qtbot.waitSignal(qsub.received, timeout=5000):
        bus.publisher().publish("x", 1)
    closer = threading.Thread(target=bus.close, name="test-closer")
    closer.start()
    closer.join(5.0)
    assert not closer.is_alive()
    qtbot.waitUntil(lambda: qsub.closed, timeout=2000)  # on its thread's next pass
    assert qt_threads() == set() and got == [1]


@needs_binding
def test_close_from_its_own_slot_stops_delivery(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "n")
    got: list[int] = []

    def slot(msg: vbus.Message) -> None:
        got.append(msg.data)
        qsub.close()

    qsub.received.connect(slot)
    pub = bus.publisher()
    for i in range(100):
        pub.publish("n", i)
    qtbot.waitUntil(lambda: qsub.closed, timeout=5000)
    assert got == [0]
    assert qt_threads() == set()
    qsub.close()  # idempotent


@needs_binding
def test_close_from_another_thread(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "n")
    closer = threading.Thread(target=qsub.close, name="test-closer")
    closer.start()
    closer.join(5.0)
    assert not closer.is_alive()
    qtbot.waitUntil(lambda: qsub.closed, timeout=2000)
    assert qt_threads() == set()


def delete_now(obj: QObject) -> None:
    """Destroy the C++ object at once, as the binding offers it."""
    if qtpy.API_NAME == "PySide6":
        import shiboken6

        shiboken6.delete(obj)  # type: ignore[arg-type]  # a QObject is a shiboken wrapper
    else:
        from PyQt6 import sip

        sip.delete(obj)  # type: ignore[arg-type]  # a QObject is a sip wrapper


@needs_binding
def test_parent_destroyed_stops_the_subscriber_and_its_thread(bus: vbus.Bus, qtbot: Any) -> None:
    parent = QWidget()
    qsub = QtSubscriber(bus, "camera/frame", latest_only=True, parent=parent)
    got: list[int] = []
    qsub.received.connect(lambda m: got.append(m.seq))
    witness = QtSubscriber(bus, "camera/frame", latest_only=True)  # keeps receiving
    subscribers = len(bus.stats().per_subscriber)
    with Flood(bus):
        qtbot.waitUntil(lambda: len(got) >= 3, timeout=5000)
        assert "vbus-qt-camera/frame" in qt_threads()
        delete_now(parent)  # destroys the child QtSubscriber, traffic in flight
        # Stopped synchronously: one QtSubscriber thread left, the witness's.
        names = [t.name for t in threading.enumerate()]
        assert names.count("vbus-qt-camera/frame") == 1
        assert len(bus.stats().per_subscriber) == subscribers - 1  # its Subscriber closed
        delivered = len(got)
        seen = witness.delivered
        qtbot.waitUntil(lambda: witness.delivered >= seen + 10, timeout=5000)
    assert len(got) == delivered  # nothing emitted into the deleted object
    witness.close()
    assert qt_threads() == set()


@needs_binding
def test_deletelater_and_dropped_references_stop_it(bus: vbus.Bus, qtbot: Any) -> None:
    qsub = QtSubscriber(bus, "a")
    qsub.deleteLater()
    qtbot.waitUntil(lambda: "vbus-qt-a" not in qt_threads(), timeout=2000)
    orphan: QtSubscriber | None = QtSubscriber(bus, "b")
    assert "vbus-qt-b" in qt_threads()
    orphan = None  # noqa: F841 - the last reference: Qt deletes it, and it stops
    gc.collect()
    assert qt_threads() == set()
    assert bus.stats().per_subscriber == ()


@needs_binding
def test_quitting_with_traffic_and_async_callbacks_does_not_hang(
    bus: vbus.Bus, qtbot: Any, qapp: QApplication
) -> None:
    handled = {"async": 0, "sync": 0}

    @bus.on("camera/**")
    async def analyse(msg: vbus.Message) -> None:
        handled["async"] += 1
        await asyncio.sleep(0.001)

    @bus.on("stage/*")
    def log_stage(msg: vbus.Message) -> None:
        handled["sync"] += 1

    frames = QtSubscriber(bus, "camera/frame", latest_only=True)
    stage = QtSubscriber(bus, "stage/x")
    with Flood(bus):
        qtbot.waitUntil(
            lambda: frames.delivered > 5 and stage.delivered > 5 and handled["async"] > 5,
            timeout=10_000,
        )
        QTimer.singleShot(0, qapp.quit)
        started = time.perf_counter()
        qapp.exec()  # aboutToQuit stops both QtSubscribers
        took = time.perf_counter() - started
        assert frames.closed and stage.closed
        assert qt_threads() == set()
    assert took < 1.0
    assert handled["sync"] > 0
    # the bus fixture closes the bus, with its callbacks, within 1 s


def _run_script(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )


@needs_binding
def test_a_program_that_quits_mid_traffic_exits_promptly() -> None:
    """A whole process: Qt quits with frames in flight and an async callback running, and the
    program forgets bus.close(). It must exit, quickly and with status 0."""
    code = """if 1:
        import asyncio, sys, threading, time
        import numpy as np
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QApplication
        import vbus
        from vbus.qt import QtSubscriber
        app = QApplication([])
        bus = vbus.Bus()
        @bus.on("camera/frame")
        async def analyse(msg):
            await asyncio.sleep(0.01)
        frames = QtSubscriber(bus, "camera/frame", latest_only=True)
        forgotten = QtSubscriber(bus, "camera/frame")      # never closed by this program
        def camera():
            pub = bus.publisher()
            while True:
                try:
                    pub.publish("camera/frame", np.zeros((512, 1024), np.uint16))
                except vbus.Closed:
                    return
                time.sleep(0.002)  # sleep-ok: pacing a simulated 500 Hz camera
        threading.Thread(target=camera).start()  # not a daemon: the exit hook stops it
        frames.received.connect(lambda m: frames.delivered > 20 and app.quit())
        t0 = time.monotonic()
        app.exec()
        print("quit after", round(time.monotonic() - t0, 2), "delivered", frames.delivered)
    """
    started = time.monotonic()
    result = _run_script(code)
    assert result.returncode == 0, result.stderr
    assert "quit after" in result.stdout
    assert time.monotonic() - started < 30


@needs_binding
def test_example_runs_and_closes_cleanly_with_duration() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "qt_viewer.py"), "--duration", "1.5"],
        env=dict(os.environ, QT_QPA_PLATFORM="offscreen",
                 PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found = re.search(r"(\d+) frames published, (\d+) shown; bus.close\(\) took", result.stdout)
    assert found, result.stdout
    assert int(found[1]) > 10 and int(found[2]) > 0, result.stdout  # it showed live frames
    assert "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 45


# -- the viewer ----------------------------------------------------------------------------------
@needs_binding
def test_viewer_renders_live_frames(
    qt_painting_threads: None, bus: vbus.Bus, qtbot: Any, tmp_path: Path
) -> None:
    instrument, window = open_viewer(bus)
    try:
        started = time.perf_counter()
        qtbot.waitUntil(
            lambda: window.view.painted >= 20 and time.perf_counter() - started >= 1.0,
            timeout=15_000,
        )
        qtbot.waitUntil(lambda: window.stage_label.text().startswith("x ="), timeout=5000)
        qtbot.waitUntil(lambda: window.analysis_label.text().startswith("frame"), timeout=5000)
        path = tmp_path / "qt_viewer.png"  # kept by pytest: look at it when this test fails
        assert window.grab().save(str(path))
        shot = QImage(str(path)).convertToFormat(QImage.Format.Format_Grayscale8)
        area = window.view.image_rect().translated(window.view.pos())
        bits = shot.constBits()
        if hasattr(bits, "setsize"):  # PyQt6: a sip.voidptr of unknown size
            bits.setsize(shot.sizeInBytes())
        pixels = np.frombuffer(bits, np.uint8).reshape(
            shot.height(), shot.bytesPerLine()
        )[area.top() : area.bottom(), area.left() : area.right()]
        assert pixels.size > 100_000
        assert pixels.std() > 10, f"the image area is blank (std {pixels.std():.1f})"
        assert window.frames.delivered >= 20
        stats = window.frames.stats()  # at most one frame waits for the GUI
        assert stats.received - (stats.delivered + stats.skipped) in (0, 1)
    finally:
        window.close()
        instrument.stop()


# -- psygnal in a Qt application ---------------------------------------------------------------
@needs_binding
def test_psygnal_relay_emits_on_the_gui_thread(bus: vbus.Bus, qtbot: Any) -> None:
    """vbus.psygnal.Relay with thread="main": psygnal queues each emission for the GUI
    thread, and psygnal.qt's timer emits it there."""
    psygnal_qt = pytest.importorskip("psygnal.qt")
    from vbus.psygnal import Relay

    relay = Relay(bus, "stage/*", thread="main")
    got: list[tuple[Any, bool]] = []
    gui = threading.get_ident()
    relay.received.connect(lambda msg: got.append((msg.data, threading.get_ident() == gui)))
    psygnal_qt.start_emitting_from_queue()
    try:
        pub = bus.publisher()
        for i in range(50):
            pub.publish("stage/x", i)
        qtbot.waitUntil(lambda: len(got) == 50, timeout=5000)
    finally:
        psygnal_qt.stop_emitting_from_queue()
        relay.close()
    assert got == [(i, True) for i in range(50)]
