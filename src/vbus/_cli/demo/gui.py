"""``vbus demo --gui``: a live viewer for the simulated microscope of instrument.py.

A camera publishes 1 MiB numpy frames (512 x 1024 uint16) at 200 Hz from its own thread, a
stage publishes its position at 100 Hz from another, an async "analysis plugin" on the bus's
background loop publishes frame statistics. The window shows the live image through a
``QtSubscriber(latest_only=True)``, the stage position, the analysis, and the rates: frames
published, delivered to the GUI, skipped by coalescing, painted; and how much of the GUI
thread's time goes to vbus. Its exposure box is forwarded to the camera with
``vbus.qt.forward``.

Needs a Qt binding (PySide6 or PyQt6, through qtpy) and numpy (``pip install 'vbus[qt,numpy]'``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from qtpy.QtCore import (
    QElapsedTimer,
    QObject,
    QRect,
    QSize,
    QSocketNotifier,
    Qt,
    QTimer,
)
from qtpy.QtGui import QCloseEvent, QColor, QImage, QPainter, QPaintEvent
from qtpy.QtWidgets import (
    QApplication,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..._bus import Bus
from ..._errors import Closed
from ..._message import Message
from ..._waker import Waker
from ...qt import QtSubscriber, forward
from .instrument import DEFAULT_EXPOSURE_MS, FPS, FRAME_SHAPE, STAGE_RATE, Instrument


# -- the analysis plugin --------------------------------------------------------------------
def start_analysis(bus: Bus) -> None:
    """An async plugin on the bus's background loop: statistics of every frame."""
    apub = bus.async_publisher()

    @bus.on("camera/frame")
    async def analyse(msg: Message) -> None:
        sub = msg.data[::8, ::8]
        stats = {"seq": msg.seq, "mean": float(sub.mean()), "max": int(sub.max())}
        try:
            await apub.publish("camera/stats", stats)
        except Closed:
            pass  # the bus is closing: its publishers close before its callbacks stop


# -- the window -----------------------------------------------------------------------------
def _colour_table() -> list[int]:
    """Black through green to white, gamma 0.7: a fluorescence look."""
    table = []
    for i in range(256):
        v = (i / 255.0) ** 0.7
        r = int(255 * max(0.0, v - 0.55) / 0.45)
        g = int(255 * min(1.0, v * 1.25))
        b = int(255 * max(0.0, v - 0.7) / 0.3)
        table.append(QColor(r, g, b).rgb())
    return table


class FrameView(QWidget):
    """Shows the newest frame, scaled to fit. It paints at most at the screen's refresh
    rate, and converts a frame to colour only when it paints it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(QSize(320, 160))
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)
        self._frame: Any = None
        self._seq = 0
        self._image: QImage | None = None
        self._pixels: Any = None  # keeps the QImage's buffer alive
        # 12-bit camera values straight to 32-bit colour: one table look-up a pixel
        table = np.array(_colour_table(), dtype=np.uint32)
        self._lut = table[np.minimum(np.arange(4096) >> 4, 255)]
        self._scheduled = False
        self._last_paint = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.update)
        self.painted = 0
        self.paint_seconds = 0.0

    def sizeHint(self) -> QSize:
        return QSize(768, 384)

    def set_frame(self, frame: Any, seq: int) -> None:
        self._frame, self._seq = frame, seq
        self._image = None
        if self._scheduled:
            return  # the paint to come will show this frame
        self._scheduled = True
        screen = self.screen()
        hz = min(max(screen.refreshRate() if screen is not None else 60.0, 30.0), 240.0)
        wait = self._last_paint + 1.0 / hz - time.perf_counter()
        if wait > 0:
            self._timer.start(max(int(wait * 1000), 1))
        else:
            self.update()

    def image_rect(self) -> QRect:
        if self._frame is None:
            return self.rect()
        h, w = self._frame.shape[:2]
        scale = min(self.width() / w, self.height() / h)
        iw, ih = int(w * scale), int(h * scale)
        return QRect((self.width() - iw) // 2, (self.height() - ih) // 2, iw, ih)

    def paintEvent(self, event: QPaintEvent) -> None:
        started = time.perf_counter()
        self._scheduled = False
        self._last_paint = started
        painter = QPainter(self)
        try:
            painter.fillRect(self.rect(), QColor(16, 16, 16))
            if self._frame is None:
                painter.setPen(QColor(200, 200, 200))
                painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "waiting for frames")
                return
            if self._image is None:
                pixels = np.take(self._lut, self._frame, mode="clip")
                h, w = pixels.shape
                self._image = QImage(pixels.data, w, h, 4 * w, QImage.Format.Format_RGB32)
                self._pixels = pixels
            painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
            target = self.image_rect()
            painter.drawImage(target, self._image)
            painter.setPen(QColor(255, 255, 255))
            painter.drawText(
                target.adjusted(8, 6, -8, -6),
                int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop),
                f"frame {self._seq}",
            )
            self.painted += 1
        finally:
            painter.end()
            self.paint_seconds += time.perf_counter() - started


@dataclass(frozen=True)
class Snapshot:
    """Counters at one instant; two of them give rates (see ``ViewerWindow.rates``)."""

    wall: float
    published: int  # the camera publisher's sequence number of the newest frame seen
    delivered: int
    skipped: int
    painted: int
    deliveries: int  # messages delivered by all the window's QtSubscribers
    delivery: float  # seconds the GUI thread spent in QtSubscriber delivery, slots included
    slots: float  # seconds in our slots connected to QtSubscriber.received
    paint: float
    lag: float  # the most a 20 ms timer fired late since ``reset_lag()``


class ViewerWindow(QWidget):
    """The live viewer. Everything it shows comes through QtSubscribers; the exposure box
    goes out through ``vbus.qt.forward``."""

    def __init__(self, bus: Bus, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("vbus live viewer")
        self.bus = bus
        self.slot_seconds = 0.0
        self.view = FrameView(self)
        self.stage_label = QLabel("waiting for the stage")
        self.camera_label = QLabel("waiting for the camera")
        self.analysis_label = QLabel("waiting for the analysis plugin")
        self.rates_label = QLabel("measuring")
        self.gui_label = QLabel("measuring")
        self.loss_label = QLabel("measuring")
        for label in (self.stage_label, self.camera_label, self.analysis_label,
                      self.rates_label, self.gui_label, self.loss_label):
            label.setTextFormat(Qt.TextFormat.PlainText)
            label.setMinimumWidth(330)
        self.exposure = QSpinBox()
        self.exposure.setRange(1, 16)
        self.exposure.setSuffix(" ms")
        self.exposure.setValue(DEFAULT_EXPOSURE_MS)

        box = QGroupBox("Instrument")
        form = QFormLayout(box)
        form.addRow("Stage", self.stage_label)
        form.addRow("Camera", self.camera_label)
        form.addRow("Exposure", self.exposure)
        form.addRow("Analysis", self.analysis_label)
        rates = QGroupBox("Bus")
        rform = QFormLayout(rates)
        rform.addRow("Frames/s", self.rates_label)
        rform.addRow("GUI thread", self.gui_label)
        rform.addRow("Losses", self.loss_label)
        panel = QHBoxLayout()
        panel.addWidget(box, 1)
        panel.addWidget(rates, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.view, 1)
        layout.addLayout(panel)

        # Display-only data: the newest value of each topic is all the GUI wants.
        self.frames = QtSubscriber(bus, "camera/frame", latest_only=True, parent=self)
        self.frames.received.connect(self._on_frame)
        self.stage = QtSubscriber(bus, "stage/position", latest_only=True, parent=self)
        self.stage.received.connect(self._on_stage)
        self.analysis = QtSubscriber(bus, "camera/stats", latest_only=True, parent=self)
        self.analysis.received.connect(self._on_stats)
        self.qsubs = (self.frames, self.stage, self.analysis)
        self._pub = bus.publisher()
        forward(self.exposure.valueChanged, self._pub, "camera/exposure")

        self.last_seq = 0
        self.latency_max = 0.0  # for the display, per refresh
        self.latency_worst = 0.0  # since reset_lag()
        self._tick = QElapsedTimer()
        self._tick.start()
        self._ticker = QTimer(self)  # how late the event loop serves a 20 ms timer
        self._ticker.setTimerType(Qt.TimerType.PreciseTimer)
        self._ticker.timeout.connect(self._on_tick)
        self._ticker.start(20)
        self._last: Snapshot | None = None
        self._refresh = QTimer(self)
        self._refresh.timeout.connect(self._show_rates)
        self._refresh.start(500)

    # -- slots ------------------------------------------------------------------------------
    def _on_frame(self, msg: Message) -> None:
        started = time.perf_counter()
        frame = msg.data
        if not self.last_seq:
            h, w = frame.shape
            self.camera_label.setText(f"{h} x {w} {frame.dtype}, {frame.nbytes >> 10} KiB a frame")
        self.last_seq = msg.seq
        self.view.set_frame(frame, msg.seq)
        self.slot_seconds += time.perf_counter() - started

    def _on_stage(self, msg: Message) -> None:
        started = time.perf_counter()
        self.stage_label.setText(f"x = {msg.data['x']:+8.2f} µm   y = {msg.data['y']:+8.2f} µm")
        self.slot_seconds += time.perf_counter() - started

    def _on_stats(self, msg: Message) -> None:
        started = time.perf_counter()
        d = msg.data
        self.analysis_label.setText(f"frame {d['seq']}: mean {d['mean']:.0f}, max {d['max']}")
        self.slot_seconds += time.perf_counter() - started

    def _on_tick(self) -> None:
        late = self._tick.restart() / 1000.0 - 0.020
        self.latency_max = max(self.latency_max, late)
        self.latency_worst = max(self.latency_worst, late)

    def reset_lag(self) -> None:
        self.latency_worst = 0.0

    # -- measurements -----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        frames = self.frames.stats()
        return Snapshot(
            wall=time.perf_counter(),
            published=self.last_seq,
            delivered=frames.delivered,
            skipped=frames.skipped,
            painted=self.view.painted,
            deliveries=sum(q.stats().delivered for q in self.qsubs),
            delivery=sum(q.stats().gui_seconds for q in self.qsubs),
            slots=self.slot_seconds,
            paint=self.view.paint_seconds,
            lag=self.latency_worst,
        )

    @staticmethod
    def rates(a: Snapshot, b: Snapshot) -> dict[str, float]:
        """Frame rates (per second) and shares of the GUI thread's wall time (0..1)."""
        dt = max(b.wall - a.wall, 1e-9)
        return {
            "seconds": dt,
            "published_fps": (b.published - a.published) / dt if a.published else 0.0,
            "delivered_fps": (b.delivered - a.delivered) / dt,
            "skipped_fps": (b.skipped - a.skipped) / dt,
            "painted_fps": (b.painted - a.painted) / dt,
            "vbus_share": (b.delivery - a.delivery - (b.slots - a.slots)) / dt,
            "deliveries_per_s": (b.deliveries - a.deliveries) / dt,
            "vbus_us_per_delivery": 1e6 * (b.delivery - a.delivery - (b.slots - a.slots))
            / max(b.deliveries - a.deliveries, 1),
            "slots_share": (b.slots - a.slots) / dt,
            "paint_share": (b.paint - a.paint) / dt,
            "max_lag_ms": 1000 * b.lag,
        }

    def _show_rates(self) -> None:
        now = self.snapshot()
        if self._last is not None:
            r = self.rates(self._last, now)
            self.rates_label.setText(
                f"published {r['published_fps']:.0f}   delivered {r['delivered_fps']:.0f}   "
                f"skipped {r['skipped_fps']:.0f}   painted {r['painted_fps']:.0f}"
            )
            self.gui_label.setText(
                f"vbus {100 * r['vbus_share']:.1f} %   slots {100 * r['slots_share']:.1f} %   "
                f"paint {100 * r['paint_share']:.1f} %   lag {r['max_lag_ms']:.0f} ms"
            )
            self.latency_max = 0.0  # per display period
            dropped = sum(q.stats().dropped for q in self.qsubs)
            self.loss_label.setText(f"dropped {dropped}   skipped {now.skipped} frames in all")
        self._last = now

    def closeEvent(self, event: QCloseEvent) -> None:
        for q in self.qsubs:
            q.close()
        self._pub.close()
        super().closeEvent(event)


def summary(r: dict[str, float]) -> str:
    return (
        f"frames published {r['published_fps']:.0f}/s, delivered {r['delivered_fps']:.0f}/s, "
        f"skipped {r['skipped_fps']:.0f}/s, painted {r['painted_fps']:.0f}/s; GUI thread: "
        f"vbus {100 * r['vbus_share']:.1f} % ({r['deliveries_per_s']:.0f} deliveries/s, "
        f"{r['vbus_us_per_delivery']:.0f} µs each), slots {100 * r['slots_share']:.1f} %, paint "
        f"{100 * r['paint_share']:.1f} %; a 20 ms timer fired at most {r['max_lag_ms']:.0f} ms late"
    )


# -- the program ----------------------------------------------------------------------------
def _no_display() -> str | None:
    if os.environ.get("QT_QPA_PLATFORM") or not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return "no display (set DISPLAY, or QT_QPA_PLATFORM=offscreen to run without one)"


class _SigintToQuit(QObject):
    """Ctrl-C quits the Qt event loop: the signal's wakeup byte wakes a socket notifier, so
    Python runs its handler without a polling timer."""

    def __init__(self, app: QApplication) -> None:
        super().__init__(app)
        self._waker = Waker(for_signals=True)
        self._old_fd = signal.set_wakeup_fd(self._waker.wakeup_fd())
        self._old_handler = signal.signal(signal.SIGINT, lambda *_: app.quit())
        self._notifier = QSocketNotifier(self._waker.fileno(), QSocketNotifier.Type.Read, self)
        self._notifier.activated.connect(self._waker.clear)

    def restore(self) -> None:
        self._notifier.setEnabled(False)
        signal.signal(signal.SIGINT, self._old_handler)
        signal.set_wakeup_fd(self._old_fd)
        self._waker.close()


def open_viewer(bus: Bus) -> tuple[Instrument, ViewerWindow]:
    """The demo's parts on ``bus``: the simulated instrument running, the analysis callback
    subscribed, the window shown. The caller stops the instrument and closes the window."""
    instrument = Instrument(bus)
    start_analysis(bus)
    window = ViewerWindow(bus)
    window.resize(900, 640)
    window.show()
    instrument.start()
    return instrument, window


def run_gui_demo(duration: float | None = None) -> int:
    """Run the live viewer until its window closes, Ctrl-C, or ``duration`` seconds; then
    print the measured rates and GUI-thread shares. Returns the exit status."""
    problem = _no_display()
    if problem is not None:
        print(f"vbus demo --gui: {problem}", file=sys.stderr)
        return 1
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication(sys.argv[:1])
    sigint = _SigintToQuit(app)
    out = sys.stdout
    with Bus() as bus:
        instrument, window = open_viewer(bus)
        print(
            f"vbus demo --gui: camera {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16 at {FPS:g} Hz, "
            f"stage at {STAGE_RATE:g} Hz; close the window or Ctrl-C to stop",
            file=out, flush=True,
        )
        began = time.perf_counter()
        marks: list[Snapshot] = []
        # The summary leaves out the first second (start-up, first paints).
        def mark() -> None:
            window.reset_lag()
            marks.append(window.snapshot())

        QTimer.singleShot(1000, mark)
        if duration is not None:
            QTimer.singleShot(int(duration * 1000), window.close)
        try:
            app.exec()
        finally:
            end = window.snapshot()
            window.close()
            instrument.stop()
            t0 = time.perf_counter()
            bus.close()
            closing = time.perf_counter() - t0
            sigint.restore()
            sigint.deleteLater()
    total = time.perf_counter() - began
    if marks:
        r = ViewerWindow.rates(marks[0], end)
        print(f"vbus demo --gui: {r['seconds']:.1f} s measured: {summary(r)}", file=out)
    print(f"vbus demo --gui: ran {total:.1f} s; bus.close() took {1000 * closing:.1f} ms",
          file=out)
    return 0
