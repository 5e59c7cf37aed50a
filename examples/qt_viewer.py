"""A small live viewer on vbus and Qt, with the public API only.

A simulated camera publishes numpy frames from a thread of its own; the window shows the
newest one through ``QtSubscriber(latest_only=True)`` (frames the GUI has no time for are
skipped, never queued), and its exposure box is forwarded to the camera with
``vbus.qt.forward``. Ctrl-C or closing the window ends it cleanly. ``vbus demo --gui`` is the
fuller viewer (a stage, an analysis plugin, live rates). See docs/qt.md.

    pip install 'vbus[qt,numpy]'
    python examples/qt_viewer.py [--duration SECONDS]
    QT_API=pyqt6 python examples/qt_viewer.py        # on PyQt6 (through qtpy)
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

import numpy as np
from qtpy.QtCore import QSocketNotifier, QTimer
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QApplication, QFormLayout, QLabel, QSpinBox, QWidget

import vbus
from vbus.qt import QtSubscriber, forward

SHAPE = (256, 512)  # rows, columns of uint16
FPS = 100.0


class Camera:
    """Publishes ``camera/frame`` at FPS from its own thread; ``camera/exposure`` (ms) sets
    the exposure."""

    def __init__(self, bus: vbus.Bus) -> None:
        self.exposure = 8
        self.published = 0
        self._bus = bus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera")
        bus.on("camera/exposure", self._set_exposure)

    def _set_exposure(self, msg: vbus.Message) -> None:
        self.exposure = int(min(max(msg.data, 1), 16))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        rows, cols = np.ogrid[0 : SHAPE[0], 0 : SHAPE[1]]
        with self._bus.publisher() as pub:
            while not self._stop.wait(1.0 / FPS):
                t = time.monotonic()
                wave = np.sin(cols / 37.0 + t) * np.cos(rows / 23.0 - 0.7 * t) + 1.0
                frame = (wave * 127.0 * self.exposure).astype(np.uint16)  # up to 12 bits
                pub.publish("camera/frame", frame)
                self.published += 1


class Viewer(QWidget):
    def __init__(self, bus: vbus.Bus) -> None:
        super().__init__()
        self.setWindowTitle("vbus: camera/frame")
        self.shown = 0
        self.image = QLabel()
        self.exposure = QSpinBox()
        self.exposure.setRange(1, 16)
        self.exposure.setValue(8)
        self.exposure.setSuffix(" ms")
        layout = QFormLayout(self)
        layout.addRow(self.image)
        layout.addRow("exposure", self.exposure)
        self.frames = QtSubscriber(bus, "camera/frame", latest_only=True, parent=self)
        self.frames.received.connect(self.show_frame)  # on this (the GUI) thread
        self.pub = bus.publisher()
        forward(self.exposure.valueChanged, self.pub, "camera/exposure")

    def show_frame(self, msg: vbus.Message) -> None:
        gray = (msg.data >> 4).astype(np.uint8)
        rows, cols = gray.shape
        image = QImage(gray.tobytes(), cols, rows, cols, QImage.Format.Format_Grayscale8)
        self.image.setPixmap(QPixmap.fromImage(image.copy()))
        self.shown += 1


def quit_on_ctrl_c(app: QApplication) -> tuple[socket.socket, socket.socket, QSocketNotifier]:
    """Ctrl-C quits the event loop: Python's signal wakeup byte wakes a socket notifier, so
    Python gets to run its handler while Qt waits in C. Keep what it returns."""
    read, write = socket.socketpair()
    read.setblocking(False)
    write.setblocking(False)
    signal.set_wakeup_fd(write.fileno())
    signal.signal(signal.SIGINT, lambda *_: app.quit())
    notifier = QSocketNotifier(read.fileno(), QSocketNotifier.Type.Read, app)
    notifier.activated.connect(lambda *_: read.recv(64))
    return read, write, notifier


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="close after S seconds (default: when the window is closed)")
    args = parser.parse_args()
    app = QApplication.instance() or QApplication(sys.argv)
    ctrl_c = quit_on_ctrl_c(app)  # noqa: F841 - kept for as long as the loop runs
    with vbus.Bus() as bus:
        camera = Camera(bus)
        viewer = Viewer(bus)
        viewer.show()
        camera.start()
        if args.duration is not None:
            QTimer.singleShot(int(args.duration * 1000), viewer.close)
        try:
            app.exec()
        finally:
            camera.stop()
            viewer.close()
            started = time.perf_counter()
            bus.close()
            took = 1000 * (time.perf_counter() - started)
        print(f"qt_viewer: {camera.published} frames published, {viewer.shown} shown; "
              f"bus.close() took {took:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
