"""The command line, driven as a user would: real processes, outputs checked."""

from __future__ import annotations

import re
import signal
import subprocess
import sys


def _vbus(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vbus", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_demo_runs_prints_rates_and_exits_cleanly() -> None:
    done = _vbus("demo", "--duration", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("vbus demo: embedded bus at inproc://")
    rates = [int(m.group(1)) for m in (re.search(r"stage +(\d+) msg/s", ln) for ln in lines) if m]
    assert len(rates) >= 2 and all(r > 100 for r in rates), done.stdout
    assert re.search(r"camera +\d+\.\d fps \(256, 256\)", done.stdout)
    assert "dropped 0" in done.stdout
    assert re.search(r"close\(\) took \d+\.\d ms", lines[-1])
    assert "Traceback" not in done.stderr


def test_demo_exits_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vbus", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("vbus demo:")
        assert "msg/s" in proc.stdout.readline()  # one live line, then Ctrl-C
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10.0)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "interrupted" in out and "close() took" in out
    assert "Traceback" not in err


def test_help_and_usage_errors_are_one_clean_line() -> None:
    done = _vbus("--help")
    assert done.returncode == 0 and "demo" in done.stdout
    demo_help = _vbus("demo", "--help")
    assert "example: vbus demo" in demo_help.stdout
    bad = _vbus("demo", "--duration", "soon")
    assert bad.returncode == 2 and "must be a number, not 'soon'" in bad.stderr
    big = _vbus("demo", "--size", "100000")
    assert big.returncode == 2 and "must be at most 4096, not 100000" in big.stderr
    assert "Traceback" not in bad.stderr
