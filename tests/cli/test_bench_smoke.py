"""The benchmark suite runs (benchmarks are never tests: this checks only that it works).

The suite runs in a subprocess, as `vbus bench` and `python benchmarks/run.py` do, in its
tiniest mode: one workload, one run of 2000 messages, no Zenoh.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


@pytest.mark.timeout(120)
def test_bench_suite_runs_and_prints_ratios(tmp_path: Path) -> None:
    if not RUN.is_file():
        pytest.skip("no benchmarks/ in this checkout")
    report = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--only", "throughput-embedded", "--runs", "1",
         "--messages", "2000", "--no-zenoh", "--quiet", "--output", str(report)],
        capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    ratio_lines = [line for line in proc.stdout.splitlines() if line.startswith("ratio ")]
    assert ratio_lines, output
    assert "throughput-embedded 64 B: vbus/raw " in ratio_lines[0]
    assert "x" in ratio_lines[0].split("vbus/raw ", 1)[1]  # a figure such as 0.42x, not n/a
    text = report.read_text()
    assert "| throughput | embedded | 64 B |" in text
    assert "## Machine" in text
    assert report.with_suffix(".json").is_file()
