"""The command-line tests' fixtures: the subprocesses a test starts, a standalone broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._support import Proc, start


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every subprocess a test starts; killed (if still running) when the test ends."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def broker(procs: list[Proc]) -> str:
    """A standalone broker subprocess on a free port; its address."""
    p = start(procs, "broker", "--bind", "tcp://127.0.0.1:0")
    address = p.line("out")
    assert address.startswith("tcp://127.0.0.1:"), address
    return address
