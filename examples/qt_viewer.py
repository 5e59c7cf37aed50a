"""A live viewer for a simulated microscope, on vbus and Qt (the same as ``vbus demo --gui``).

A camera publishes 1 MiB numpy frames at 200 Hz and a stage its position at 100 Hz, each from
a thread of its own; the window shows the newest frame (``QtSubscriber(latest_only=True)``
coalesces frames to what the GUI paints), the position, and the rates. The exposure box is
forwarded to the camera with ``vbus.qt.forward``. See docs/qt.md.

    pip install 'vbus[qt,numpy]'
    python examples/qt_viewer.py [--duration SECONDS]
    QT_API=pyqt6 python examples/qt_viewer.py        # on PyQt6 (through qtpy)
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="close after S seconds (default: when the window is closed)")
    args = parser.parse_args()
    try:
        from vbus._cli.demo.gui import run_gui_demo
    except ImportError as exc:  # no Qt binding or numpy, or a PySide6 that cannot work here
        print(f"qt_viewer: {exc}", file=sys.stderr)
        return 1
    return run_gui_demo(duration=args.duration)


if __name__ == "__main__":
    sys.exit(main())
