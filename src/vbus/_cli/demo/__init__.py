"""``vbus demo`` (also ``--gui``): the command; the demos are console.py and gui.py, both on the
one simulated instrument of instrument.py."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ..common import (
    UserError,
    add_parser,
    non_negative_float,
    positive_float,
    positive_int,
)


def register(commands: Any) -> None:
    p = add_parser(
        commands, "demo",
        help="an embedded bus with a simulated instrument and live rates",
        description=(
            "Start an embedded bus, a simulated instrument publishing stage positions and "
            "camera frames from its own thread, a sync subscriber and an async callback, and "
            "print live rates once a second. Ctrl-C (or --duration) exits cleanly. --gui shows "
            "the same in a Qt window (needs the vbus[qt] extra)."
        ),
        example="example: vbus demo --duration 5 --rate 2000\n         vbus demo --gui",
    )
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    p.add_argument("--rate", type=non_negative_float, default=1000.0, metavar="HZ",
                   help="stage positions per second (default: 1000; 0 = as fast as possible)")
    p.add_argument("--fps", type=positive_float, default=30.0, metavar="HZ",
                   help="camera frames per second (default: 30)")
    p.add_argument("--size", type=_frame_size, default=256, metavar="N",
                   help=f"camera frames are N x N uint16, N from 1 to {MAX_FRAME_SIZE} "
                        "(default: 256)")
    p.add_argument("--gui", action="store_true", help="a Qt window instead of the terminal")
    p.set_defaults(run=_run_demo)


MAX_FRAME_SIZE = 4096  # 32 MiB frames: past that the demo would only measure memory


def _frame_size(text: str) -> int:
    value = positive_int(text)
    if value > MAX_FRAME_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_FRAME_SIZE}, not {text}")
    return value


# Qt's xcb platform plugin aborts the process (no exception) without these X11 libraries.
_XCB_LIBRARIES = {"xcb-icccm": "libxcb-icccm4", "xcb-keysyms": "libxcb-keysyms1",
                  "xcb-cursor": "libxcb-cursor0", "xkbcommon-x11": "libxkbcommon-x11-0"}


def _missing_x11_libraries() -> list[str]:
    import ctypes.util
    import os

    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform and not platform.startswith("xcb"):
        return []  # offscreen, wayland, ...: the xcb plugin is not loaded
    if not platform and not os.environ.get("DISPLAY"):
        return []
    return [package for name, package in _XCB_LIBRARIES.items()
            if ctypes.util.find_library(name) is None]


def _run_demo(args: argparse.Namespace) -> int:
    if args.gui:
        return _run_gui_demo(args)
    from .console import run_demo

    return run_demo(duration=args.duration, rate=args.rate, fps=args.fps, size=args.size)


def _run_gui_demo(args: argparse.Namespace) -> int:
    missing = UserError("the GUI demo needs PySide6: pip install PySide6-Essentials (the "
                        "vbus[qt] extra; from a checkout: pip install -e '.[qt]')")
    try:
        import PySide6  # noqa: F401
    except ImportError:
        raise missing from None
    absent = _missing_x11_libraries()
    if absent:
        raise UserError("the GUI demo needs the X11 libraries Qt loads: "
                        f"{', '.join(absent)} (e.g. apt-get install {' '.join(absent)}), or "
                        "QT_QPA_PLATFORM=offscreen")
    try:
        module = _import("vbus._cli.demo.gui")
    except ModuleNotFoundError as exc:
        if exc.name == "vbus._cli.demo.gui":
            raise UserError("this build of vbus has no GUI demo (vbus/_cli/demo/gui.py)") from None
        if exc.name and exc.name.split(".")[0] in ("PySide6", "shiboken6"):
            raise missing from None
        raise UserError(f"the GUI demo needs the {exc.name} package: pip install "
                        f"{exc.name} (the vbus[qt,numpy] extras; from a checkout: "
                        "pip install -e '.[qt,numpy]')") from None
    except ImportError as exc:  # e.g. vbus.qt refusing a PySide6 release it cannot use
        raise UserError(f"the GUI demo cannot start: {exc}") from None
    return int(module.run_gui_demo(duration=args.duration) or 0)


def _import(name: str) -> Any:
    return importlib.import_module(name)
