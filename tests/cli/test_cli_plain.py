"""Every command works after a plain install: the optional libraries (rich, numpy) are
blocked in the child process, and the commands still do their work (plain-text output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

import vbus
from tests._support import ENV, WAIT, Proc

BLOCK = ("import sys\n"
         "for name in ('rich', 'numpy', 'PySide6', 'qtpy'):\n"
         "    sys.modules[name] = None  # import raises ImportError, as if not installed\n"
         "from vbus._cli.main import main\n"
         "raise SystemExit(main(sys.argv[1:]))\n")


def plain(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def plain_proc(procs: list[Proc], *args: str) -> Proc:
    p = Proc.__new__(Proc)
    # Proc runs "python -m vbus ARGS"; this one runs the blocking prelude instead
    import queue
    import threading

    p.popen = subprocess.Popen([sys.executable, "-c", BLOCK, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    p.out, p.err = queue.Queue(), queue.Queue()
    p.err_lines = []
    p._readers = [threading.Thread(target=Proc._pump, args=(p.popen.stdout, p.out)),
                  threading.Thread(target=Proc._pump, args=(p.popen.stderr, p.err))]
    for t in p._readers:
        t.start()
    procs.append(p)
    return p


def test_the_prelude_really_blocks_them() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK.replace(
        "from vbus._cli.main import main", "import rich")], capture_output=True, text=True,
        timeout=30)
    assert "ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr


def test_stats_pub_sub_record_replay_info_without_rich_or_numpy(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    stats = plain("stats", broker)
    assert stats.returncode == 0, stats.stderr
    assert "vbus broker " in stats.stdout and f"at {broker}" in stats.stdout
    assert "topic" in stats.stdout and "msg/s" in stats.stdout

    path = tmp_path / "plain.mcap"
    rec = plain_proc(procs, "record", broker, "pl/**", "-o", str(path), "--count", "3")
    rec.wait_for("vbus record: recording")
    sub = plain_proc(procs, "sub", broker, "pl/**", "--json", "--count", "3")
    sub.wait_for("subscribed")
    for value in ("1", '"two"', '{"k": [3]}'):
        done = plain("pub", broker, "pl/x", value)
        assert done.returncode == 0, done.stderr
    assert rec.finish() == 0, rec.rest("err")
    assert sub.finish() == 0
    assert [json.loads(line)["data"] for line in sub.rest("out")] == [1, "two", {"k": [3]}]

    info = plain("info", str(path))
    assert info.returncode == 0, info.stderr
    assert "messages   3" in info.stdout and "pl/x" in info.stdout
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("pl/x") as check:
        done = plain("replay", str(path), "--to", broker, "--speed", "0")
        assert done.returncode == 0, done.stderr
        assert [check.recv(timeout=WAIT).data for _ in range(3)] == [1, "two", {"k": [3]}]


def test_a_recorder_without_numpy_says_what_it_could_not_keep(
    leakcheck: Any, procs: list[Proc], broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "arrays.mcap"
    rec = plain_proc(procs, "record", broker, "arr/**", "-o", str(path), "--count", "1")
    rec.wait_for("vbus record: recording")
    with vbus.connect(broker, timeout=5.0) as bus:
        pub = bus.publisher()
        pub.publish("arr/frame", np.zeros((4, 4), "u2"))  # undecodable there: no numpy
        pub.publish("arr/x", 1.0)
        assert rec.finish() == 1
    err = "\n".join(rec.err_lines + rec.rest("err"))
    assert "1 message(s) could not be decoded" in err, err
