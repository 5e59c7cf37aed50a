"""A standalone broker in a subprocess for tests: prints its address, serves until stdin closes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, vbus
    bus = vbus.Bus(bind=sys.argv[1:])
    print(bus.address, flush=True)
    sys.stdin.read()
    bus.close()
    """
)


class BrokerProcess:
    def __init__(self, *binds: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *binds],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5.0)
            raise RuntimeError(f"broker did not start: {err}")
        self.address = line

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=5.0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
