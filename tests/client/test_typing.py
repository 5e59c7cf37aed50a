"""The payload type reaches the checker: mypy run on a snippet that uses the public API."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = textwrap.dedent('''
    import msgspec
    import vbus
    from typing import Any
    from typing_extensions import assert_type

    class State(msgspec.Struct):
        x: int

    def sync(bus: vbus.Bus) -> None:
        sub = bus.subscribe("a", type=State)
        assert_type(sub, vbus.Subscriber[State])
        assert_type(sub.recv().data, State)
        for msg in sub:
            assert_type(msg, vbus.Message[State])
        assert_type(bus.subscribe("a").recv().data, Any)

    async def asynchronous(bus: vbus.Bus) -> None:
        sub = bus.async_subscribe("a", type=State)
        assert_type(sub, vbus.AsyncSubscriber[State])
        assert_type((await sub.recv()).data, State)
        async for msg in sub:
            assert_type(msg.data, State)

    def misuse(bus: vbus.Bus) -> None:
        sub = bus.subscribe("a", type=State)
        n: int = sub.recv().data  # E: a State is no int
        async_sub = bus.async_subscribe("a")
        for _ in async_sub:  # E: an AsyncSubscriber is iterated with async for
            pass
''')


@pytest.mark.timeout(300)
def test_subscribe_with_a_type_gives_the_checker_that_type(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(SNIPPET)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--hide-error-context",
         "--no-error-summary", str(source)],
        capture_output=True, text=True, timeout=280, cwd=root,
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    lines = SNIPPET.splitlines()
    flagged = sorted(int(e.split(":")[1]) for e in errors)
    expected = sorted(i + 1 for i, text in enumerate(lines) if "# E:" in text)
    assert flagged == expected, done.stdout  # the two misuses, and nothing else
