"""Request/reply through a standalone broker: tcp and ipc, CURVE, a broker restart, a server
process that dies, and ``vbus req``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import vbus
from tests._support import LeakCheck, free_port_pair
from tests.brokerproc import BrokerProcess


def _address(transport: str, tmp_path: Path) -> str:
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_port_pair()}"
    return f"ipc://{tmp_path}/broker"


def _request_until_answered(bus: vbus.Bus, topic: str, limit: float = 15.0) -> vbus.Message:
    """Ask again while the broker is coming back (each try bounded); the first reply."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            return bus.request(topic, "again", timeout=0.2)
        except (vbus.NoResponder, TimeoutError):
            continue
    raise AssertionError(f"no reply on {topic!r} within {limit} s")


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_through_a_standalone_broker(leakcheck: LeakCheck, tmp_path: Path,
                                     transport: str) -> None:
    with BrokerProcess(_address(transport, tmp_path)) as broker:
        try:
            with vbus.connect(broker.address) as server_bus, \
                    vbus.connect(broker.address) as client:
                server_bus.serve("stage/move", lambda msg: {"at": msg.data["x"]})
                assert client.request("stage/move", {"x": 2.5}).data == {"at": 2.5}
                with pytest.raises(vbus.NoResponder):
                    client.request("stage/stop", None)
        finally:
            assert broker.stop() == 0


def test_with_curve(leakcheck: LeakCheck) -> None:
    server_key, a, b = (vbus.generate_keypair() for _ in range(3))
    with vbus.Bus(bind="tcp://127.0.0.1:0", keypair=server_key,
                  authorized=[a.public, b.public]) as broker:
        with vbus.connect(broker.address, keypair=a, server_key=server_key.public) as server, \
                vbus.connect(broker.address, keypair=b, server_key=server_key.public) as client:
            server.serve("secret", lambda msg: msg.data[::-1])
            assert client.request("secret", "olleh").data == "hello"


def test_in_flight_requests_fail_cleanly_across_a_broker_restart_and_later_ones_work(
        leakcheck: LeakCheck) -> None:
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    broker = BrokerProcess(address)
    try:
        with vbus.connect(broker.address) as server_bus, vbus.connect(broker.address) as client:
            entered, release = threading.Event(), threading.Event()

            def handler(msg: vbus.Message) -> object:
                if msg.data == "hold":
                    entered.set()
                    release.wait(10.0)
                return msg.data

            server_bus.serve("dev/cmd", handler)
            assert client.request("dev/cmd", 1).data == 1
            outcome: list[BaseException] = []

            def ask() -> None:
                try:
                    client.request("dev/cmd", "hold", timeout=1.0)
                except BaseException as exc:
                    outcome.append(exc)

            asker = threading.Thread(target=ask)
            asker.start()
            assert entered.wait(5.0)
            broker.kill()
            asker.join(5.0)
            assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
            release.set()  # its reply goes nowhere, or arrives late and is dropped
            broker = BrokerProcess(address)
            assert _request_until_answered(client, "dev/cmd").data == "again"
            assert [client.request("dev/cmd", i).data for i in range(20)] == list(range(20))
    finally:
        broker.stop()


SERVER_CHILD = textwrap.dedent(
    """
    import sys, vbus
    bus = vbus.connect(sys.argv[1])
    bus.serve("child/echo", lambda msg: msg.data)
    print("serving", flush=True)
    sys.stdin.read()
    """
)


def test_a_server_process_that_dies_is_forgotten_by_the_broker(leakcheck: LeakCheck) -> None:
    with vbus.Bus(bind="tcp://127.0.0.1:0") as broker:
        child = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, broker.address],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "serving\n"
            assert broker.request("child/echo", 5).data == 5
            child.kill()
            child.wait(5.0)
            # Its connection's end unsubscribes its registration: NoResponder, not timeouts.
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    broker.request("child/echo", 0, timeout=0.2)
                except vbus.NoResponder:
                    break
                except TimeoutError:
                    pass  # routed to it before the broker saw it go
                assert time.monotonic() < deadline, "the dead server was never forgotten"
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=5.0)


def _vbus(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "vbus", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_cli_req_prints_the_reply_as_json(leakcheck: LeakCheck) -> None:
    def handler(msg: vbus.Message) -> object:
        if msg.data == "fail":
            raise RuntimeError("motor stalled")
        if msg.data == "slow":
            time.sleep(1.0)  # sleep-ok: a handler slower than the request's timeout
        return {"echo": msg.data, "list": [1, 2.5, None]}

    with vbus.Bus(bind="tcp://127.0.0.1:0") as bus:
        bus.serve("stage/move", handler)
        done = _vbus("req", bus.address, "stage/move", '{"x": 1}')
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"echo": {"x": 1}, "list": [1, 2.5, None]}

        none = _vbus("req", bus.address, "stage/stop", "1")
        assert none.returncode == 1 and none.stdout == ""
        assert none.stderr.count("\n") == 1 and "nobody serves 'stage/stop'" in none.stderr

        failed = _vbus("req", bus.address, "stage/move", '"fail"')
        assert failed.returncode == 1
        assert failed.stderr.count("\n") == 1
        assert "RuntimeError: motor stalled" in failed.stderr

        slow = _vbus("req", bus.address, "stage/move", '"slow"', "--timeout", "0.3")
        assert slow.returncode == 1 and slow.stderr.count("\n") == 1
        assert "no reply" in slow.stderr and "Traceback" not in slow.stderr

        bad = _vbus("req", bus.address, "stage/move", "not json")
        assert bad.returncode == 1 and "not valid JSON" in bad.stderr


def test_cli_req_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    done = _vbus("req", f"ipc://{tmp_path}/nobody", "t", "1", "--timeout", "0.3")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
