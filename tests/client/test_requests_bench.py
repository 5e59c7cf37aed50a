"""The request/reply benchmark runs and prints its ratios (a tiny run, so it does not rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_reqrep.py"


def test_bench_reqrep_prints_ratios() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--count", "50", "--runs", "1"],
                          capture_output=True, text=True, timeout=60.0)
    assert done.returncode == 0, done.stderr
    assert "ratio vbus/raw: throughput" in done.stdout
    assert "ratio vbus/raw-proxy: throughput" in done.stdout
