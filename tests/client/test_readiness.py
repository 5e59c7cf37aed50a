"""Readiness: a message published after publisher() and subscribe() return is delivered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

import vbus
from tests._support import LeakCheck


def test_subscribe_then_publish_at_once_delivers_1000_of_1000(any_bus: vbus.Bus) -> None:
    delivered = 0
    for i in range(1000):
        sub = any_bus.subscribe(f"trial/{i}")
        pub = any_bus.publisher()
        pub.publish(f"trial/{i}", i)
        if sub.recv(timeout=2.0).data == i:
            delivered += 1
        sub.close()
        pub.close()
    assert delivered == 1000


def test_async_subscribe_and_on_are_ready_when_they_return(any_bus: vbus.Bus) -> None:
    got = threading.Event()
    any_bus.on("cb/ready", lambda msg: got.set())

    async def main() -> int:
        asub = any_bus.async_subscribe("a/ready")
        apub = any_bus.async_publisher()
        await apub.publish("a/ready", 7)
        await apub.publish("cb/ready", 8)
        msg = await asub.recv(timeout=2.0)
        asub.close()
        apub.close()
        return int(msg.data)

    assert asyncio.run(main()) == 7
    assert got.wait(2.0)


def test_connect_to_nothing_raises_connect_error_naming_the_address(leakcheck: LeakCheck) -> None:
    with pytest.raises(vbus.ConnectError, match="tcp://127.0.0.1:9"):
        vbus.connect("tcp://127.0.0.1:9", timeout=0.2)
    with pytest.raises(vbus.ConnectError, match="inproc://nobody"):
        vbus.connect("inproc://nobody", timeout=0.2)


@pytest.mark.parametrize(
    ("bad", "named"),
    [("tcp://127.0.0.1", "'tcp://127.0.0.1'"), ("http://x:1", "'http://x:1'"),
     ("tcp://h:99999", "'tcp://h:99999'"), ("ipc://", "empty path"), (5, "not int")],
)
def test_bad_addresses_are_named(leakcheck: LeakCheck, bad: object, named: str) -> None:
    with pytest.raises(vbus.AddressError, match=named):
        vbus.connect(bad, timeout=0.2)  # type: ignore[arg-type]


def test_bind_conflict_is_a_clear_error(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as first:
        with pytest.raises(vbus.AddressError, match="cannot bind"):
            vbus.Bus(bind=first.address)


def test_connect_in_process_shares_the_broker(leakcheck: LeakCheck) -> None:
    owner = vbus.Bus()
    client = vbus.connect(owner.address)
    sub = owner.subscribe("x")
    client.publisher().publish("x", "from client")
    assert sub.recv(timeout=2.0).data == "from client"
    owner.close()  # closes its in-process clients first
    assert client.closed


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_publisher_in_another_process(leakcheck: LeakCheck, transport: str,
                                      tmp_path: object) -> None:
    bind = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/bus"
    with vbus.Bus(bind=bind) as bus:
        sub = bus.subscribe("remote/**")
        child = _child(
            f"""
            import vbus
            with vbus.connect({bus.address!r}) as bus:
                pub = bus.publisher()
                for i in range(100):
                    pub.publish("remote/n", i)
            """
        )
        try:
            got = [sub.recv(timeout=10.0).data for _ in range(100)]
            assert child.wait(10.0) == 0, child.stderr.read() if child.stderr else ""
        finally:
            child.kill()
            child.communicate()
        assert got == list(range(100))


def test_subscriber_in_another_process(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        child = _child(
            f"""
            import vbus
            with vbus.connect({bus.address!r}) as bus:
                sub = bus.subscribe("to/child")
                print("ready", flush=True)
                print(sub.recv(timeout=10.0).data, flush=True)
            """
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            bus.publisher().publish("to/child", "hello")  # no sleep: ready means ready
            out, err = child.communicate(timeout=10.0)
        finally:
            child.kill()
            child.communicate()
        assert out.strip() == "hello", err


def test_port_zero_skips_ports_whose_twin_is_taken(
    leakcheck: LeakCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Port 0 needs two consecutive free ports; a pick whose twin is taken is retried."""
    import socket

    import zmq

    blocker = socket.socket()
    for _ in range(100):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        try:
            blocker.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            continue
    blocker.listen()
    original = zmq.Socket.bind_to_random_port
    picks: list[int] = []

    def first_pick_collides(self: zmq.Socket, addr: str, *args: object, **kw: object) -> int:
        if not picks:
            self.bind(f"{addr}:{port}")
            picks.append(port)
            return port
        picked = original(self, addr, *args, **kw)  # type: ignore[arg-type]
        picks.append(picked)
        return picked

    monkeypatch.setattr(zmq.Socket, "bind_to_random_port", first_pick_collides)
    try:
        with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
            assert picks[0] == port and len(picks) >= 2  # a random retry may collide too
            assert bus.address == f"tcp://127.0.0.1:{picks[-1]}"
            with vbus.connect(bus.address) as client:
                sub = bus.subscribe("t")
                client.publisher().publish("t", 1)
                assert sub.recv(timeout=2.0).data == 1
    finally:
        blocker.close()
