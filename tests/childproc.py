"""Run a Python snippet in a child process with a hard timeout, for scenarios that can crash or
hang the interpreter.

The child gets ``PRELUDE`` first (helpers to snapshot and check threads and fds, a way to fail
fast, a watchdog that dumps every thread's stack before the hard timeout), then the snippet.
The parent reads the child's stdout line by line as it comes, time-stamping each line, so a test
can measure how long the child took to exit after a marker it printed. On timeout the whole
process group is killed (a forked grandchild too).

A test asserts on the returned ``Child``: ``child.check()`` fails, with the child's output, unless
the child exited 0 (no signal, no timeout) and its stderr holds no traceback or zmq error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

PRELUDE = textwrap.dedent(
    r'''
    import faulthandler, gc, os, sys, threading, time
    faulthandler.enable()

    def fds():
        return {int(fd) for fd in os.listdir("/proc/self/fd")}

    def describe(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return "?"

    def fail(message):
        """Report a failure and end at once: threads left running must not turn a failure
        into a hang of the child."""
        print(f"FAIL {message}", flush=True)
        sys.stderr.flush()
        os._exit(3)

    def warm_up():
        # pyzmq starts one process-wide garbage-collector thread (and a context) on its first
        # zero-copy send, asyncio its own bits on first use: not the bus's leaks.
        import asyncio, zmq
        zmq.Frame(bytearray(zmq.COPY_THRESHOLD * 2), copy=False)
        asyncio.run(asyncio.sleep(0))

    class Snapshot:
        """The threads and fds of this process now, to compare with later."""

        def __init__(self):
            self.threads = set(threading.enumerate())
            self.fds = fds()

        def new_threads(self):
            return [t for t in set(threading.enumerate()) - self.threads
                    if not isinstance(t, threading._DummyThread)]

        def leaks(self, grace=2.0):
            """'' if no thread and no fd is left beyond the snapshot (threads get ``grace``
            seconds to end: joining them is what a close that returned early leaves to do),
            else what is left."""
            deadline = time.monotonic() + grace
            for t in self.new_threads():
                while True:
                    try:
                        t.join(max(deadline - time.monotonic(), 0.0))
                        break
                    except RuntimeError:  # start() was interrupted: the thread is being born
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.001)  # sleep-ok: nothing to wait on until it has started
            left = sorted(t.name for t in self.new_threads())
            leaked = fds() - self.fds
            # A connection's far end in this same process (an in-process broker's side of a
            # tcp client's connection) is closed by ZeroMQ's I/O thread a moment after the
            # client's close: it gets the same grace, and must be gone by its end.
            while leaked and time.monotonic() < deadline and all(
                    describe(fd).startswith("socket:") for fd in leaked):
                time.sleep(0.005)  # sleep-ok: the kernel gives no event for another's close
                leaked = fds() - self.fds
            if not left and not leaked:
                return ""
            return (f"threads left: {left}; fds left: "
                    f"{ {fd: describe(fd) for fd in sorted(leaked)} }")

    def vmstat(key, pid="self"):
        """A /proc/PID/status field in bytes (VmRSS, VmHWM), 0 if the process is gone."""
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def watch(seconds):
        """(Re)arm the watchdog: in ``seconds`` from now, dump every thread's stack to stderr
        and exit 1, unless re-armed before. Loops arm it per step, so a hang shows fast."""
        faulthandler.dump_traceback_later(seconds, exit=True)

    MiB = 1024 * 1024
    '''
)

WATCHDOG = textwrap.dedent(
    """
    faulthandler.dump_traceback_later({seconds}, exit=True)
    """
)

BAD_WORDS = ("Traceback", "ZMQError", "zmq.error", "Fatal Python error")


@dataclass
class Child:
    code: str
    returncode: int | None
    timed_out: bool
    elapsed: float
    stdout: str
    stderr: str
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)
    ended: float = 0.0  # seconds since start when the process ended

    @property
    def signal(self) -> str | None:
        if self.returncode is not None and self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return str(-self.returncode)
        return None

    def marker_time(self, prefix: str) -> float:
        """When the first stdout line starting with ``prefix`` arrived (seconds since start)."""
        for at, line in self.lines:
            if line.startswith(prefix):
                return at
        raise AssertionError(f"marker {prefix!r} never printed\n{self.report()}")

    def values(self, prefix: str) -> list[str]:
        """The rest of every stdout line that starts with ``prefix``."""
        return [line[len(prefix):].strip() for _, line in self.lines if line.startswith(prefix)]

    def value(self, prefix: str) -> str:
        found = self.values(prefix)
        assert found, f"marker {prefix!r} never printed\n{self.report()}"
        return found[-1]

    def how(self) -> str:
        if self.timed_out:
            return f"HANG (killed after {self.elapsed:.1f} s)"
        if self.signal is not None:
            return f"CRASH (signal {self.signal})"
        return f"exit {self.returncode}"

    def report(self, tail: int = 40) -> str:
        out = "\n".join(self.stdout.splitlines()[-tail:])
        err = "\n".join(self.stderr.splitlines()[-tail:])
        fatal = self.stderr.find("Fatal Python error")
        crash = ""
        if fatal >= 0:  # the crashing thread's stack comes first in faulthandler's dump
            crash = "\n--- stderr at the crash ---\n" + "\n".join(
                self.stderr[fatal:].splitlines()[:tail])
        return (f"child: {self.how()} after {self.elapsed:.2f} s\n--- stdout (tail) ---\n{out}"
                f"{crash}\n--- stderr (tail) ---\n{err}")

    def check(self, *markers: str, allow_in_stderr: tuple[str, ...] = ()) -> None:
        """The child ran clean: exit 0, no signal, no timeout, no traceback or zmq error on
        stderr, no FAIL line, and every marker printed (a line starting with it)."""
        assert not self.timed_out, self.report()
        assert self.returncode == 0, self.report()
        failures = self.values("FAIL")
        assert not failures, self.report()
        for word in BAD_WORDS:
            assert word not in self.stderr, f"{word!r} on stderr\n{self.report()}"
        for marker in markers:
            self.marker_time(marker)


def run_child(code: str, timeout: float, *, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, stdin: str | None = None,
              watchdog: bool = True) -> Child:
    """Run PRELUDE + ``code`` (dedented) in ``python -c`` and wait at most ``timeout`` seconds.
    With ``watchdog`` the child dumps its threads' stacks to stderr and exits 2 s before the
    hard kill, so a hang shows where it hangs."""
    body = PRELUDE
    if watchdog and timeout > 4:
        body += WATCHDOG.format(seconds=timeout - 2)
    body += textwrap.dedent(code)
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", body, *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        start_new_session=True,  # one process group: a timeout kills forked children too
    )
    lines: list[tuple[float, str]] = []
    err_chunks: list[str] = []

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    def read_err() -> None:
        assert proc.stderr is not None
        err_chunks.append(proc.stderr.read())

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for r in readers:
        r.start()
    if stdin is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
    ended = time.monotonic() - started
    # A grandchild that still holds the pipes must not keep us reading: kill the group.
    for r in readers:
        r.join(2.0)
    if any(r.is_alive() for r in readers):
        kill_group(proc)
        for r in readers:
            r.join(2.0)
    kill_group(proc)  # whatever the child forked and left behind
    return Child(
        code=body, returncode=proc.returncode, timed_out=timed_out,
        elapsed=time.monotonic() - started, stdout="\n".join(line for _, line in lines),
        stderr="".join(err_chunks), lines=lines, ended=ended,
    )


def kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        pass
