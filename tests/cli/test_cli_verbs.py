"""The everyday verbs driven as a user would: default address, pub that never drops its own
messages, stdin, clearing a retained value, topics, hz, several patterns, --version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest

import vbus
from tests._support import ENV, VBUS, WAIT, Proc, one_error_line, run, start, timed_recording


def run_env(*args: str, env: dict[str, str], stdin: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VBUS, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, input=stdin)


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"vbus {vbus.__version__}"


def test_address_defaults_to_vbus_address_and_host_port_means_tcp(
    leakcheck: Any, broker: str, tmp_path: Any
) -> None:
    env = {**ENV, "VBUS_ADDRESS": broker}
    host_port = broker.removeprefix("tcp://")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("dflt/*") as sub:
        done = run_env("pub", "dflt/x", "1", env=env)  # no ADDRESS: $VBUS_ADDRESS
        assert done.returncode == 0, done.stderr
        assert f"at {broker}" in done.stderr
        done = run_env("pub", host_port, "dflt/y", "2", env=env)  # host:port
        assert done.returncode == 0, done.stderr
        assert [(m.topic, m.data) for m in (sub.recv(timeout=WAIT), sub.recv(timeout=WAIT))] == [
            ("dflt/x", 1), ("dflt/y", 2)]
    stats = run_env("stats", env=env)
    assert stats.returncode == 0 and f"at {broker}" in stats.stdout, stats.stderr
    topics = run_env("topics", "--duration", "0.1", "--json", env=env)  # a stats wait, too
    assert topics.returncode == 0, topics.stderr
    assert json.loads(topics.stdout)["topics"]["dflt/x"]["messages_claimed"] == 1
    path = tmp_path / "dflt.mcap"
    rec = run_env("record", "dflt/*", "-o", str(path), "--duration", "0.2", "--quiet", env=env)
    assert rec.returncode == 0 and path.exists(), rec.stderr
    timed = tmp_path / "timed.mcap"
    timed_recording(timed, [0.0])
    replay = run_env("replay", str(timed), "--speed", "0", env=env)  # no --to
    assert replay.returncode == 0 and f"to {broker}" in replay.stderr, replay.stderr
    # without $VBUS_ADDRESS: tcp://127.0.0.1:5555, named in what it says
    bare = {k: v for k, v in ENV.items() if k != "VBUS_ADDRESS"}
    done = run_env("pub", "dflt/x", "1", "--timeout", "0.5", env=bare)
    assert "tcp://127.0.0.1:5555" in done.stderr, done.stderr


def test_pub_never_drops_its_own_messages_and_counts_truly(
    leakcheck: Any, broker: str
) -> None:
    count = 100_000
    with vbus.connect(broker, timeout=5.0, hwm=100_000) as bus, bus.subscribe(
        "flood/x", hwm=100_000
    ) as sub:
        pub = subprocess.Popen([*VBUS, "pub", broker, "flood/x", json.dumps("z" * 1000),
                                "--count", str(count)], stderr=subprocess.PIPE, text=True,
                               env=ENV)
        seqs: list[int] = []
        try:
            while not seqs or seqs[-1] < count:  # its last message is confirmed: it comes
                msg = sub.recv(timeout=WAIT)
                seqs.append(msg.seq)
        finally:
            err = pub.communicate(timeout=WAIT)[1]
        assert pub.returncode == 0, err
        dropped_here = sub.stats().dropped
    assert f"published {count} message(s) on flood/x" in err
    assert "dropped" not in err
    if dropped_here == 0:  # this subscriber kept up: every seq is there
        assert seqs == list(range(1, count + 1))


def test_pub_refuses_nan_and_reads_values_from_stdin(leakcheck: Any, broker: str) -> None:
    for bad in ("NaN", "Infinity", "-Infinity", '{"x": NaN}'):
        line = one_error_line(run("pub", broker, "in/x", "--", bad), "pub")
        assert "not valid JSON" in line, line
    assert "JSON has no NaN" in one_error_line(run("pub", broker, "in/x", "NaN"), "pub")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("in/x") as sub:
        done = run_env("pub", broker, "in/x", "-", env=ENV, stdin='1\n"two"\n\n{"k": [3]}\n')
        assert done.returncode == 0, done.stderr
        assert "published 3 message(s)" in done.stderr
        got = [sub.recv(timeout=WAIT) for _ in range(3)]
    assert [(m.data, m.seq) for m in got] == [(1, 1), ("two", 2), ({"k": [3]}, 3)]
    refused = run_env("pub", broker, "in/x", "-", env=ENV, stdin="1\nnope\n")
    line = one_error_line(refused, "pub")
    assert "stdin line 2" in line and "not valid JSON" in line


def test_pub_clear_retained(leakcheck: Any, broker: str) -> None:
    assert run("pub", broker, "ret/state", '"on"', "--retain").returncode == 0
    with vbus.connect(broker, timeout=5.0) as bus:
        with bus.subscribe("ret/state") as before:
            assert before.recv(timeout=WAIT).retained
        done = run("pub", broker, "ret/state", "--clear-retained")
        assert done.returncode == 0, done.stderr
        assert "cleared the retained value of ret/state" in done.stderr
        with bus.subscribe("ret/state") as after:
            bus.publisher().publish("ret/state", "marker")
            msg = after.recv(timeout=WAIT)
    assert (msg.data, msg.retained) == ("marker", False)  # no retained value came first


def test_pub_after_ctrl_c_says_how_many_it_published(leakcheck: Any, broker: str) -> None:
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("tick/x") as sub:
        pub = Proc("pub", broker, "tick/x", "1", "--count", "0", "--rate", "200")
        try:
            for _ in range(20):
                last = sub.recv(timeout=WAIT).seq
            pub.popen.send_signal(signal.SIGINT)
            assert pub.finish() == 0  # --count 0 runs until Ctrl-C: that is its normal end
            line = pub.wait_for("vbus pub: published")
            published = int(line.split("published ")[1].split()[0])
            assert published >= 20
            while last < published:  # every one it counts reaches us
                try:
                    last = sub.recv(timeout=5).seq
                except TimeoutError:
                    raise AssertionError(f"published {published}, the last came: {last}") from None
            assert last == published
        finally:
            pub.kill()


def test_sub_several_patterns_and_data_only(procs: list[Proc], broker: str) -> None:
    sub = start(procs, "sub", broker, "a/x", "b/*", "a/*", "--data", "--count", "3")
    for pattern in ("a/x", "b/*", "a/*"):
        sub.wait_for(f"subscribed to {pattern} at {broker}")
    for topic, value in (("a/x", "1"), ("b/y", '"two"'), ("a/z", '{"k": null}')):
        assert run("pub", broker, topic, value).returncode == 0
    assert sub.finish() == 0
    # a/x matches two patterns: printed once
    assert sorted(sub.rest("out")) == sorted(["1", '"two"', '{"k":null}'])


def test_topics_lists_rates_publishers_and_retained(procs: list[Proc], broker: str) -> None:
    assert run("pub", broker, "top/state", '"idle"', "--retain").returncode == 0
    ticker = start(procs, "pub", broker, "top/tick", "0", "--count", "0", "--rate", "100")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("top/tick") as sub:
        sub.recv(timeout=WAIT)  # the ticker is going
    done = run("topics", broker, "--duration", "1.5", "--json")
    ticker.popen.send_signal(signal.SIGINT)
    assert done.returncode == 0, done.stderr
    topics = json.loads(done.stdout)["topics"]
    assert topics["top/state"]["retained"] is True
    assert topics["top/state"]["publishers"] == 1
    assert topics["top/tick"]["retained"] is False and topics["top/tick"]["publishers"] == 1
    assert 30 < topics["top/tick"]["rate"] < 200, topics
    table = run("topics", broker, "--duration", "0.2")
    assert table.returncode == 0 and "top/state" in table.stdout and "yes" in table.stdout


def test_hz_measures_rate_and_jitter_at_the_subscriber(procs: list[Proc], broker: str) -> None:
    ticker = start(procs, "pub", broker, "hz/x", "0", "--count", "0", "--rate", "100")
    with vbus.connect(broker, timeout=5.0) as bus, bus.subscribe("hz/x") as sub:
        sub.recv(timeout=WAIT)
    done = run("hz", broker, "hz/x", "--duration", "2.5")
    ticker.popen.send_signal(signal.SIGINT)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("hz/x  rate ")]
    assert len(lines) >= 2, done.stdout
    rate = float(lines[-1].split("rate ")[1].split()[0].replace(",", ""))
    assert 50 < rate < 150, lines[-1]
    for word in ("min", "max", "std", "lost 0"):
        assert word in lines[-1]
    assert "the last window of each topic" in done.stderr


def test_new_mistakes_are_one_clear_line(tmp_path: Any) -> None:
    began = time.monotonic()
    line = one_error_line(run("pub", "tcp://no-such-host.invalid:5555", "a", "1"), "pub")
    assert "does not resolve" in line and "no-such-host.invalid" in line
    assert time.monotonic() - began < 4.0  # said at once, not after the 5 s timeout
    line = one_error_line(run("record", "tcp://127.0.0.1:1", "**", "-o", str(tmp_path)),
                          "record")
    assert "is a directory" in line
    assert not os.listdir(tmp_path)
    bad = run("sub", "tcp://127.0.0.1:1", "a", "--count", "many")
    assert bad.returncode == 2 and "must be an integer, not 'many'" in bad.stderr
    assert "non_negative_int" not in bad.stderr
    line = one_error_line(run("pub", "a", "b", "c", "d"), "pub")
    assert "expected [ADDRESS] TOPIC VALUE" in line


@pytest.mark.parametrize("command", [["stats", "--watch"], ["sub", "**"]])
def test_a_reader_that_goes_away_ends_it_with_exit_0(broker: str, command: list[str]) -> None:
    """`vbus stats --watch | head -1`: the pipe closes, the command exits 0, silently."""
    p = subprocess.Popen([*VBUS, command[0], broker, *command[1:]], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        if command[0] == "sub":
            assert p.stderr is not None and "subscribed" in p.stderr.readline()
            feeder = subprocess.Popen([*VBUS, "pub", broker, "pipe/x", "1", "--count", "0",
                                       "--rate", "20"], stderr=subprocess.DEVNULL, env=ENV)
        assert p.stdout is not None and p.stdout.readline()
        p.stdout.close()  # the reader goes away
        assert p.wait(timeout=WAIT) == 0
        assert p.stderr is not None and "Traceback" not in p.stderr.read()
    finally:
        if command[0] == "sub":
            feeder.kill()
            feeder.wait(timeout=WAIT)
        p.kill()
        p.wait(timeout=WAIT)


def _free_port_pair() -> int:
    """A port whose successor is free too (a tcp broker uses PORT and PORT+1)."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(20_000, 60_000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no free port pair")


def test_sub_says_when_the_broker_goes_and_comes_back(procs: list[Proc]) -> None:
    port = _free_port_pair()
    first = start(procs, "broker", "--bind", f"tcp://127.0.0.1:{port}")
    address = first.line("out")
    sub = start(procs, "sub", address, "rs/x")
    sub.wait_for(f"subscribed to rs/x at {address}")
    first.popen.send_signal(signal.SIGTERM)
    assert first.finish() == 0
    assert "no word from the broker" in sub.wait_for("no word", timeout=WAIT)
    again = start(procs, "broker", "--bind", address)
    assert again.line("out") == address
    sub.wait_for("answers again", timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while True:  # and its messages flow again (the subscription is renewed by itself)
        assert time.monotonic() < deadline, "no message after the broker came back"
        assert run("pub", address, "rs/x", "7").returncode == 0
        try:
            if sub.line("out", timeout=1.0).endswith("rs/x  7"):
                break
        except AssertionError:
            continue
    sub.popen.send_signal(signal.SIGINT)
    assert sub.finish() == 0
