"""``vbus bench``: the benchmark suite (benchmarks/run.py), raw pyzmq side by side.

The suite is not part of the installed package: it lives in a source checkout. ``vbus bench``
finds it next to the package (an editable install) or in the current directory (any install,
run from inside a clone), and otherwise says that it needs a checkout."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .common import UserError, add_parser


def register(commands: Any) -> None:
    p = add_parser(
        commands, "bench",
        help="run the benchmark suite, raw pyzmq side by side",
        description=(
            "Run the benchmark suite (benchmarks/run.py of a source checkout of vbus): vbus "
            "and raw pyzmq doing the same work in the same run, with their ratio. Every "
            "argument after 'bench' goes to the suite; 'vbus bench --help' also shows its "
            "options."
        ),
        example="example: vbus bench\n         vbus bench --help",
        usage="%(prog)s [ARGS...]",
        add_help=False,  # --help and the suite's options are handled in run_bench
    )
    p.set_defaults(run=run_bench, parser=p, passthrough=True)


SUITE = Path("benchmarks") / "run.py"


def suite_path() -> Path:
    """benchmarks/run.py of the checkout the package runs from, else of the current directory
    (if it is a vbus checkout); the first of them if neither has it."""
    import vbus

    beside = Path(vbus.__file__).resolve().parents[2] / SUITE
    here = Path.cwd() / SUITE
    if beside.is_file() or not (here.is_file() and (here.parents[1] / "src" / "vbus").is_dir()):
        return beside
    return here


def run_bench(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.extra)
    path = suite_path()
    wants_help = "-h" in argv or "--help" in argv
    if wants_help:
        args.parser.print_help()
    if not path.is_file():
        if wants_help:
            return 0
        raise UserError(
            f"the benchmark suite is not installed with the package: it needs a source "
            f"checkout of vbus ({path} not found); run 'vbus bench' inside a clone of the "
            "repository"
        )
    if wants_help:
        print(f"\noptions of {path}:", flush=True)
    folder = str(path.parent)
    sys.path.insert(0, folder)  # the suite may import its sibling modules
    try:
        main = _load_main(path)
        return int(main(argv) or 0)
    except SystemExit as exc:  # an argparse-based suite exits on --help or a usage error
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _load_main(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("vbus_benchmarks_run", path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load the benchmark suite {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if not callable(main):
        raise UserError(f"{path} has no main(argv) function")
    return main
