"""CURVE on network endpoints: authorized clients in, everyone else out, nothing in clear."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import vbus
from tests._support import LeakCheck
from vbus._proto.endpoints import parse_address
from vbus._security import write_keypair

MARKER = "PAYLOAD-MARKER-7f3a"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, vbus.Keypair]:
    return {name: write_keypair(tmp_path / name) for name in ("server", "client", "rogue")}


def _run(code: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def test_keygen_files_and_loaders(tmp_path: Path) -> None:
    pair = write_keypair(tmp_path / "alice")
    secret, public = tmp_path / "alice.key", tmp_path / "alice.key.pub"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert pair.secret not in public.read_text()
    assert vbus.load_keypair(secret) == pair
    assert vbus.load_public_key(public) == pair.public == vbus.load_public_key(secret)
    assert "secret" not in repr(pair).replace("secret=<hidden>", "")
    with pytest.raises(vbus.SecurityError, match="no secret-key"):
        vbus.load_keypair(public)
    with pytest.raises(vbus.SecurityError, match="cannot read"):
        vbus.load_keypair(tmp_path / "missing.key")
    with pytest.raises(vbus.SecurityError, match="Z85"):
        vbus.connect("tcp://127.0.0.1:9", keypair=pair, server_key="short")
    with pytest.raises(vbus.SecurityError, match="both"):
        vbus.connect("tcp://127.0.0.1:9", keypair=pair)
    with pytest.raises(vbus.SecurityError, match="both"):
        vbus.Bus(bind="tcp://127.0.0.1:0", keypair=pair)


def test_authorized_process_gets_in_and_unauthorized_ones_do_not(
    leakcheck: LeakCheck, keys: dict[str, vbus.Keypair], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, client, rogue = keys["server"], keys["client"], keys["rogue"]
    with caplog.at_level(logging.WARNING, logger="vbus"), vbus.Bus(
        bind="tcp://127.0.0.1:0", keypair=server, authorized=[client.public]
    ) as bus:
        inproc = bus.subscribe("**")  # in-process: no keys needed
        good = _run(f"""
            import vbus
            with vbus.connect({bus.address!r}, keypair=vbus.load_keypair({str(tmp_path / 'client.key')!r}),
                              server_key={server.public!r}) as bus:
                sub = bus.subscribe("reply")
                bus.publisher().publish("secure/in", "from the client")
                print(sub.recv(timeout=5).data if False else "sent")
            """)  # noqa: E501
        assert good.returncode == 0, good.stderr
        assert inproc.recv(timeout=5.0).data == "from the client"
        cases = {
            "unknown key": f"keypair=vbus.load_keypair({str(tmp_path / 'rogue.key')!r}), "
                           f"server_key={server.public!r}",
            "no key": "",
            "wrong server key": f"keypair=vbus.load_keypair({str(tmp_path / 'client.key')!r}), "
                                f"server_key={rogue.public!r}",
        }
        for name, args in cases.items():
            started = time.monotonic()
            bad = _run(f"""
                import vbus
                try:
                    vbus.connect({bus.address!r}, timeout=3.0, {args})
                except vbus.ConnectError as exc:
                    print("refused:", exc)
                """)
            assert bad.returncode == 0, (name, bad.stderr)
            assert bad.stdout.startswith("refused:"), (name, bad.stdout)
            assert bus.address in bad.stdout
            assert time.monotonic() - started < 10.0
        with pytest.raises(TimeoutError):
            inproc.recv(timeout=0.2)  # none of them injected anything
    denials = [r for r in caplog.records if "denied" in r.getMessage()]
    assert len(denials) == 1 and "127.0.0.1" in denials[0].getMessage()
    assert rogue.public in denials[0].getMessage()


def test_a_raw_unauthenticated_peer_neither_injects_nor_receives(
    leakcheck: LeakCheck, keys: dict[str, vbus.Keypair]
) -> None:
    server, client = keys["server"], keys["client"]
    with vbus.Bus(bind="tcp://127.0.0.1:0", keypair=server, authorized=[client.public]) as bus:
        inside = bus.subscribe("**")
        ends = parse_address(bus.address)
        ctx = zmq.Context()
        pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
        try:
            for s in (pub, sub):
                s.linger = 0
            pub.connect(ends.publish)
            sub.subscribe(b"")
            sub.connect(ends.subscribe)
            for _ in range(50):
                pub.send(b"secure/x\0" + bytes(40))
            bus.publisher().publish("secure/x", MARKER)
            assert inside.recv(timeout=2.0).data == MARKER  # only ours
            assert not sub.poll(300)  # and the outsider hears nothing
        finally:
            pub.close(0)
            sub.close(0)
            ctx.term()


def test_new_key_files_take_effect_without_restart(
    leakcheck: LeakCheck, keys: dict[str, vbus.Keypair], tmp_path: Path
) -> None:
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    latecomer = vbus.generate_keypair()
    with vbus.Bus(bind="tcp://127.0.0.1:0", keypair=keys["server"],
                  authorized=authorized) as bus:
        with pytest.raises(vbus.ConnectError, match="not authorized"):
            vbus.connect(bus.address, timeout=2.0, keypair=latecomer,
                         server_key=keys["server"].public)
        write_keypair(tmp_path / "latecomer", latecomer)
        (tmp_path / "latecomer.key.pub").rename(authorized / "latecomer.key.pub")
        with vbus.connect(bus.address, timeout=2.0, keypair=latecomer,
                          server_key=keys["server"].public) as client:
            sub = bus.subscribe("late")
            client.publisher().publish("late", 1)
            assert sub.recv(timeout=2.0).data == 1


class Tap:
    """A TCP relay on two consecutive ports that records every byte that crosses it."""

    def __init__(self, target: str) -> None:
        host, port = target[len("tcp://"):].rsplit(":", 1)
        self.target = (host, int(port))
        self.captured = bytearray()
        self._listeners = self._listen_pair()
        self.address = f"tcp://127.0.0.1:{self._listeners[0].getsockname()[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="tap")
        self._thread.start()

    @staticmethod
    def _listen_pair() -> list[socket.socket]:
        for _ in range(100):
            a = socket.socket()
            a.bind(("127.0.0.1", 0))
            b = socket.socket()
            try:
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                a.close()
                b.close()
                continue
            for s in (a, b):
                s.listen()
            return [a, b]
        raise RuntimeError("no free port pair")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        peers: dict[socket.socket, socket.socket] = {}
        for offset, listener in enumerate(self._listeners):
            sel.register(listener, selectors.EVENT_READ, offset)
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock in self._listeners:
                        inside, _ = sock.accept()
                        outside = socket.create_connection(
                            (self.target[0], self.target[1] + key.data))
                        peers[inside], peers[outside] = outside, inside
                        sel.register(inside, selectors.EVENT_READ)
                        sel.register(outside, selectors.EVENT_READ)
                        continue
                    data = sock.recv(65536)
                    if data:
                        self.captured += data
                        peers[sock].sendall(data)
                    else:
                        other = peers.pop(sock)
                        peers.pop(other, None)
                        for s in (sock, other):
                            sel.unregister(s)
                            s.close()
        finally:
            for s in list(peers):
                s.close()
            sel.close()

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(5.0)
        for s in (*self._listeners, self._wake_r, self._wake_w):
            s.close()


@pytest.fixture
def tap_factory() -> Iterator[list[Tap]]:
    taps: list[Tap] = []
    yield taps
    for tap in taps:
        tap.close()


@pytest.mark.parametrize("secure", [True, False])
def test_payload_never_crosses_the_wire_in_clear(
    leakcheck: LeakCheck, keys: dict[str, vbus.Keypair], secure: bool,
    tap_factory: list[Tap],
) -> None:
    server, client = keys["server"], keys["client"]
    options = {"keypair": server, "authorized": [client.public]} if secure else {}
    with vbus.Bus(bind="tcp://127.0.0.1:0", **options) as bus:  # type: ignore[arg-type]
        tap = Tap(bus.address)
        tap_factory.append(tap)
        creds = {"keypair": client, "server_key": server.public} if secure else {}
        with vbus.connect(tap.address, **creds) as remote:  # type: ignore[arg-type]
            sub = remote.subscribe("secret/**")
            inside = bus.subscribe("secret/**")
            remote.publisher().publish("secret/up", MARKER + " up")
            bus.publisher().publish("secret/down", MARKER + " down")
            both = {MARKER + " up", MARKER + " down"}
            assert {inside.recv(timeout=5.0).data for _ in range(2)} == both
            assert {sub.recv(timeout=5.0).data for _ in range(2)} == both
    assert len(tap.captured) > 0
    assert (MARKER.encode() in tap.captured) is not secure
    assert (b"secret/up" in tap.captured) is not secure  # topics are encrypted too


CLOSE = 1.0
SCHEDULING_SLACK = 1.0


def test_shutdown_with_authentication_under_traffic(
    leakcheck: LeakCheck, keys: dict[str, vbus.Keypair]
) -> None:
    server, client = keys["server"], keys["client"]
    slowest = 0.0
    for i in range(200):
        bus = vbus.Bus(bind="tcp://127.0.0.1:0", keypair=server, authorized=[client.public])
        remote = vbus.connect(bus.address, keypair=client, server_key=server.public)
        sub = bus.subscribe("t")
        pub = remote.publisher()
        for j in range(50):
            pub.publish("t", j)
        assert sub.recv(timeout=5.0).data == 0
        started = time.perf_counter()
        (remote if i % 2 else bus).close(timeout=CLOSE)  # traffic still in flight either way
        (bus if i % 2 else remote).close(timeout=CLOSE)
        slowest = max(slowest, time.perf_counter() - started)
    print(f"\nslowest pair of closes: {slowest * 1000:.0f} ms")
    # Each close keeps to its timeout (the contract), give or take a loaded machine's
    # scheduling; a hang would end the test by its own timeout. 1.02 s was seen for a pair
    # at load 5 on 2 cores, so a fixed 1 s bound was a benchmark, not a check.
    assert slowest < 2 * CLOSE + SCHEDULING_SLACK
