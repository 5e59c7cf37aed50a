"""Controller-side helpers: child processes with bounded waits, statistics, the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_worker.py"
CHILD_ENV: dict[str, str] = {}  # added to every worker's environment (run.py --src)


def use_vbus_from(src: Path) -> None:
    """Workers import vbus from ``src`` (a checkout's src/ folder) instead of the installed
    one: to measure a baseline beside the working tree."""
    path = str(src.resolve())
    CHILD_ENV["PYTHONPATH"] = os.pathsep.join(
        p for p in (path, os.environ.get("PYTHONPATH", "")) if p
    )


class BenchError(RuntimeError):
    """A workload could not be measured (a child failed or did not answer in time)."""


class Child:
    """A worker process: JSON commands on its stdin, tagged lines on its stdout."""

    def __init__(self, role: str, args: dict[str, Any], name: str | None = None) -> None:
        self.name = name or role
        # stderr goes to a file kept for the child's lifetime: shown when it fails
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **CHILD_ENV)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), role, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=str(HERE),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"bench-{self.name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"{self.name} is gone: {exc}\n{self.stderr_tail()}") from None

    def expect(self, tag: str, timeout: float) -> Any:
        """Wait for a line ``TAG [json]``; return its JSON (or None)."""
        found, value = self.poll(tag, timeout)
        if not found:
            raise BenchError(f"{self.name}: no {tag} within {timeout:g} s\n{self.stderr_tail()}")
        return value

    def poll(self, tag: str, timeout: float) -> tuple[bool, Any]:
        """Like expect(), but (False, None) when nothing came in time."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                return False, None
            if line is None:
                self._lines.put(None)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                raise BenchError(
                    f"{self.name} exited ({self.proc.returncode}) before {tag}\n"
                    f"{self.stderr_tail()}"
                )
            head, _, rest = line.partition(" ")
            if head == "ERROR":
                raise BenchError(f"{self.name}: {rest}\n{self.stderr_tail()}")
            if head == tag:
                return True, (json.loads(rest) if rest else None)

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        tail = text.strip().splitlines()[-lines:]
        return "\n".join("    " + t for t in tail)

    def stderr_text(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def close(self, timeout: float = 10.0) -> None:
        """Close stdin (the worker's signal to finish), wait, then kill if need be."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self._stderr.close()


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to append children to; every one is closed on exit, last started first."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- statistics -------------------------------------------------------------------------------
class Summary:
    """Median, min and max of a series of runs."""

    def __init__(self, values: Sequence[float | None]) -> None:
        vals = [v for v in values if v is not None]
        self.values = vals
        self.median = statistics.median(vals) if vals else None
        self.min = min(vals) if vals else None
        self.max = max(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.values}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "msg/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M"
        if value >= 1e3:
            return f"{value / 1e3:.1f}k"
        return f"{value:.0f}"
    if unit == "GB/s":
        return f"{value:.2f}"
    if unit == "us":
        return f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    return f"{value:.3g}"


def fmt_summary(s: Summary | None, unit: str) -> str:
    if s is None or s.median is None:
        return "n/a"
    if len(s.values) == 1:
        return fmt_num(s.median, unit)
    return f"{fmt_num(s.median, unit)} [{fmt_num(s.min, unit)}–{fmt_num(s.max, unit)}]"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


# -- the machine ------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    import zmq

    info: dict[str, str] = {}
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["CPU"] = cpu
    info["cores"] = str(os.cpu_count())
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory"] = f"{int(mem) / 1024 / 1024:.1f} GiB"
    info["OS"] = f"{platform.system()} {platform.release()}"
    info["Python"] = f"{platform.python_implementation()} {platform.python_version()}"
    info["pyzmq / libzmq"] = f"{zmq.pyzmq_version()} / {zmq.zmq_version()}"
    for name in ("msgspec", "numpy", "zenoh"):
        info[name] = _version(name)
    info["vbus"] = _vbus_in_children()
    with contextlib.suppress(OSError):
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        dist = {"zenoh": "eclipse-zenoh"}.get(name, name)
        return version(dist)
    except Exception:
        return "not installed"


def _vbus_in_children() -> str:
    """Which vbus the workers import, and the git state of its checkout."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import vbus; print(vbus.__file__)"],
            capture_output=True, text=True, timeout=30, env=dict(os.environ, **CHILD_ENV),
        )
        where = Path(out.stdout.strip()).parent
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = f"{_version('vbus')} from {where}"
    try:
        git = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5,
        )
        if git.returncode == 0:
            text += f" (git {git.stdout.strip()})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return text


def zenoh_available() -> bool:
    try:
        import zenoh  # noqa: F401
    except ImportError:
        return False
    return True


def proc_status_kib(pid: int, key: str = "VmRSS") -> int | None:
    """A memory figure of a process from /proc (Linux): VmRSS (resident), VmHWM (its peak)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def mem_available_kib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
