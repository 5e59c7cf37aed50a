"""The command-line tools driven as a user would: a broker subprocess, clients in other
subprocesses, outputs checked. No sleep waits for a message: a subscriber says on stderr when
it is subscribed, and that line is what the test waits for (with a deadline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vbus
from tests._support import ENV, WAIT, Proc, one_error_line, run, start, subscribed
from vbus._cli import bench as _cmd_bench
from vbus._cli import demo as _cmd_demo
from vbus._cli import main as _cli


# -- broker -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_prints_its_addresses_serves_and_exits_0_within_1s_on_signal(
    leakcheck: Any, procs: list[Proc], tmp_path: Path, sig: signal.Signals
) -> None:
    ipc = f"ipc://{tmp_path}/bus"
    p = start(procs, "broker", "--bind", "tcp://127.0.0.1:0", "--bind", ipc)
    tcp = p.line("out")
    assert tcp.startswith("tcp://127.0.0.1:") and not tcp.endswith(":0")
    assert p.line("out") == ipc
    for address in (tcp, ipc):  # both endpoints serve clients
        with vbus.connect(address, timeout=5.0) as bus:
            sub = bus.subscribe("x")
            bus.publisher().publish("x", address)
            assert sub.recv(timeout=5.0).data == address
    p.wait_for("serving")
    began = time.monotonic()
    p.popen.send_signal(sig)
    assert p.finish() == 0
    assert time.monotonic() - began < 1.0
    err = "\n".join(p.err_lines + p.rest("err"))
    assert sig.name in err and "Traceback" not in err


def test_broker_refuses_an_open_network_bind_unless_insecure(procs: list[Proc]) -> None:
    line = one_error_line(run("broker", "--bind", "tcp://0.0.0.0:0"), "broker")
    assert "tcp://0.0.0.0:0" in line and "--insecure" in line

    p = start(procs, "broker", "--bind", "tcp://0.0.0.0:0", "--insecure")
    assert p.line("out").startswith("tcp://0.0.0.0:")
    assert "open to the network" in p.wait_for("WARNING")
    p.popen.send_signal(signal.SIGTERM)
    assert p.finish() == 0


# -- pub and sub ------------------------------------------------------------------------------
def test_pub_and_sub_json(procs: list[Proc], broker: str) -> None:
    sub = subscribed(procs, broker, "stage/*", "--json", "--count", "3")
    value = {"a": [1, 2.5, "s"], "b": None, "c": True}
    done = run("pub", broker, "stage/x", json.dumps(value), "--count", "2")
    assert done.returncode == 0, done.stderr
    assert "published 2 message(s) on stage/x" in done.stderr
    assert run("pub", broker, "other/x", "1").returncode == 0  # not matched: never printed
    assert run("pub", broker, "stage/y", '"text"').returncode == 0
    assert sub.finish() == 0
    lines = [json.loads(line) for line in sub.rest("out")]
    assert [(m["topic"], m["data"], m["seq"]) for m in lines] == [
        ("stage/x", value, 1), ("stage/x", value, 2), ("stage/y", "text", 1)]
    for m in lines:
        assert set(m) == {"topic", "data", "sender", "seq", "time", "retained"}
        assert len(m["sender"]) == 16 and int(m["sender"], 16) >= 0
        assert abs(m["time"] - time.time()) < 60 and m["retained"] is False
    assert lines[0]["sender"] == lines[1]["sender"] != lines[2]["sender"]


def test_sub_shows_numpy_and_bytes_as_summaries(leakcheck: Any, procs: list[Proc],
                                                broker: str) -> None:
    human = subscribed(procs, broker, "data/**", "--count", "3")
    as_json = subscribed(procs, broker, "data/**", "--count", "3", "--json")
    with vbus.connect(broker, timeout=5.0) as bus:
        pub = bus.publisher()
        pub.publish("data/frame", np.zeros((2, 3), dtype=np.uint16))
        pub.publish("data/blob", b"\x00" * 100_000)
        pub.publish("data/nested", {"k": 1, "raw": b"abc", "nan": float("nan")})
        assert human.finish() == 0 and as_json.finish() == 0
    out = human.rest("out")
    assert len(out) == 3
    assert out[0].endswith("  data/frame  ndarray (2, 3) uint16")
    assert out[1].endswith("  data/blob  <100000 bytes>")
    assert out[2].endswith('  data/nested  {"k": 1, "raw": {"$bytes": {"length": 3}}, "nan": null}')
    data = [json.loads(line)["data"] for line in as_json.rest("out")]
    assert data == [
        {"$ndarray": {"dtype": "<u2", "shape": [2, 3]}},
        {"$bytes": {"length": 100_000}},
        {"k": 1, "raw": {"$bytes": {"length": 3}}, "nan": None},
    ]


def test_pub_count_and_rate(procs: list[Proc], broker: str) -> None:
    sub = subscribed(procs, broker, "tick", "--json", "--count", "5")
    done = run("pub", broker, "tick", "7", "--count", "5", "--rate", "50")
    assert done.returncode == 0, done.stderr
    assert sub.finish() == 0
    msgs = [json.loads(line) for line in sub.rest("out")]
    assert [m["seq"] for m in msgs] == [1, 2, 3, 4, 5]
    assert msgs[-1]["time"] - msgs[0]["time"] >= 4 / 50 * 0.9  # paced, not a burst


def test_pub_retain_reaches_a_later_subscriber(procs: list[Proc], broker: str) -> None:
    assert run("pub", broker, "stage/state", '{"moving": false}', "--retain").returncode == 0
    sub = subscribed(procs, broker, "stage/*", "--json", "--count", "1")
    assert sub.finish() == 0
    [line] = sub.rest("out")
    msg = json.loads(line)
    assert (msg["topic"], msg["data"], msg["retained"]) == ("stage/state", {"moving": False}, True)


def test_sub_duration_without_enough_messages_fails_and_ctrl_c_exits_0(
    procs: list[Proc], broker: str
) -> None:
    done = run("sub", broker, "quiet/topic", "--count", "1", "--duration", "0.3")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"vbus sub: subscribed to quiet/topic at {broker}",
        "vbus sub: error: received 0 of 1 message(s) within 0.3 s"]
    sub = subscribed(procs, broker, "**")
    sub.popen.send_signal(signal.SIGINT)
    assert sub.finish() == 0


# -- stats ------------------------------------------------------------------------------------
def test_stats_shows_the_brokers_per_topic_statistics(procs: list[Proc], broker: str) -> None:
    watch = start(procs, "stats", broker, "--watch")  # not a terminal: one table per update
    done = run("pub", broker, "stage/x", "1.5", "--count", "20")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + WAIT
    while True:  # a table per second; the publisher's last report counts all 20
        row = watch.wait_for("stage/x", stream="out", timeout=deadline - time.monotonic())
        if row.split("│")[2].strip() == "20":  # the messages column
            break
    watch.popen.send_signal(signal.SIGINT)
    assert watch.finish() == 0

    once = run("stats", broker)
    assert once.returncode == 0, once.stderr
    assert "vbus broker " in once.stdout and f"at {broker}, up " in once.stdout
    for column in ("subscribers", "dropped", "msg/s", "bytes/s"):
        assert column in once.stdout
    assert "stage/x" in once.stdout


def test_stats_table_renders_the_documented_map() -> None:
    from rich.console import Console

    from vbus._cli import stats as _cmd_stats

    stats = _cmd_stats.decode({
        "broker": "ab12cd34", "time": 1.0, "uptime": 75.0, "messages_in": 1234,
        "bytes_in": 5_000_000, "messages_out": 2468, "bytes_out": 10_000_000,
        "subscribers": 3, "dropped": 7, "future_key": "ignored",
        "topics": {"camera/frame": {"messages": 30, "bytes": 3_932_160,
                                    "message_rate": 30.0, "byte_rate": 3_932_160.0},
                   "stage/x": {"messages": 1204, "bytes": 54_180, "message_rate": 1000.0,
                               "byte_rate": 45_000.0}},
    })
    console = Console(record=True, width=120)
    console.print(_cmd_stats.table(stats, "tcp://h:1"))
    text = console.export_text()
    assert "vbus broker ab12cd34 at tcp://h:1, up 1m15s" in text
    assert "1,234 msg / 5.0 MB" in text and "2,468 msg / 10.0 MB" in text
    assert text.index("stage/x") < text.index("camera/frame")  # busiest topic first
    assert "1,000.0" in text and "3.9 MB/s" in text
    with pytest.raises(vbus.VbusError, match=r"unexpected \$vbus/stats"):
        _cmd_stats.decode({"broker": 1})


# -- user mistakes and --help -----------------------------------------------------------------
def _mistakes(tmp_path: Path) -> list[tuple[list[str], str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not a recording\n")
    unreachable = "tcp://127.0.0.1:1"
    return [
        (["pub", "tcp://nohost", "a", "1"], "bad address 'tcp://nohost'"),
        (["pub", "udp://h:1", "a", "1"], "bad address"),
        (["pub", unreachable, "a//b", "1"], "empty level"),
        (["pub", unreachable, "a", "{oops"], "not valid JSON"),
        (["pub", unreachable, "a", "hello"], "a string needs JSON quotes"),
        (["pub", unreachable, "a", "1", "--timeout", "0.3"],
         f"no vbus broker answered at {unreachable}"),
        (["pub", "inproc://x", "a", "1"], "inproc:// addresses exist only inside one process"),
        (["sub", unreachable, "a/b*"], "wildcards must be a whole level"),
        (["sub", unreachable, "a", "--timeout", "0.3"], "no vbus broker answered"),
        (["stats", unreachable, "--timeout", "0.3"], "no vbus broker answered"),
        (["record", unreachable, "**", "-o", str(tmp_path / "no" / "x.mcap")],
         "No such file or directory"),
        (["record", unreachable, "**", "-o", str(tmp_path / "x.mcap"), "--timeout", "0.3"],
         "no vbus broker answered"),
        (["replay", str(tmp_path / "missing.mcap"), "--to", unreachable],
         "missing.mcap: No such file or directory"),
        (["replay", str(text), "--to", unreachable], "not an MCAP file"),
        (["replay", str(tmp_path), "--to", unreachable], "Is a directory"),
        (["info", str(text)], "not an MCAP file"),
        (["info", str(tmp_path / "missing.mcap")], "No such file or directory"),
        (["pub", unreachable, "a", "NaN"], "JSON has no NaN"),
        (["record", unreachable, "**", "-o", str(tmp_path)], "is a directory"),
        (["hz", unreachable, "a/b*"], "wildcards must be a whole level"),
        (["topics", unreachable, "--timeout", "0.3"], "no vbus broker answered"),
        (["broker", "--bind", "tcp://127.0.0.1"], "bad address"),
        (["broker", "--bind", "tcp://*:0"], "--insecure"),
    ]


def test_user_mistakes_are_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    (tmp_path / "x.mcap").write_bytes(b"an earlier recording")
    for args, expected in _mistakes(tmp_path):
        line = one_error_line(run(*args), args[0])
        assert expected in line, (args, line)
    # a recording that could not start leaves the earlier file as it was, and nothing else
    assert (tmp_path / "x.mcap").read_bytes() == b"an earlier recording"
    assert not (tmp_path / "x.mcap.part").exists()


def test_usage_errors_and_help_on_every_command() -> None:
    top = run("--help")
    assert top.returncode == 0 and "example:" in top.stdout
    for command in ("broker", "pub", "sub", "stats", "record", "replay", "info", "topics", "hz",
                    "keygen", "demo", "bench"):
        done = run(command, "--help")
        assert done.returncode == 0, (command, done.stderr)
        assert "example" in done.stdout and f"vbus {command}" in done.stdout, done.stdout
    bad = run("pub", "tcp://127.0.0.1:1", "a", "1", "--count", "-1")
    assert bad.returncode == 2 and "must be zero or positive" in bad.stderr
    assert "Traceback" not in bad.stderr
    inf = run("sub", "tcp://127.0.0.1:1", "a", "--duration", "inf")
    assert inf.returncode == 2 and "must be a positive number, not inf" in inf.stderr
    assert run("sub").returncode == 2
    assert run("sub", "a", "b", "--bogus").returncode == 2


# -- bench and demo --gui ---------------------------------------------------------------------
def test_bench_runs_the_suite_of_a_source_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_cmd_bench, "suite_path", lambda: tmp_path / "benchmarks" / "run.py")
    assert _cli.main(["bench"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs a source checkout" in err[0]

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "helper.py").write_text("ANSWER = 3\n")
    (tmp_path / "benchmarks" / "run.py").write_text(
        "import helper\n"
        "def main(argv):\n"
        "    print('suite got', argv)\n"
        "    return helper.ANSWER\n"
    )
    assert _cli.main(["bench", "--quick", "pubsub"]) == 3
    assert "suite got ['--quick', 'pubsub']" in capsys.readouterr().out


def test_bench_finds_the_suite_next_to_the_package() -> None:
    assert _cmd_bench.suite_path() == Path(vbus.__file__).resolve().parents[2] / (
        "benchmarks/run.py")


def test_an_installed_package_finds_the_suite_of_the_clone_it_runs_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    installed = tmp_path / "venv" / "lib" / "site-packages" / "vbus" / "__init__.py"
    monkeypatch.setattr(vbus, "__file__", str(installed))
    clone = tmp_path / "clone"
    monkeypatch.chdir(tmp_path)  # not a clone: the message says what is missing
    assert _cli.main(["bench"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "not installed with the package" in line and "needs a source checkout" in line
    (clone / "src" / "vbus").mkdir(parents=True)
    (clone / "benchmarks").mkdir()
    (clone / "benchmarks" / "run.py").write_text("def main(argv):\n    print('clone suite')\n")
    monkeypatch.chdir(clone)
    assert _cmd_bench.suite_path() == clone / "benchmarks" / "run.py"
    assert _cli.main(["bench"]) == 0
    assert "clone suite" in capsys.readouterr().out


def test_demo_gui_without_pyside6_names_the_qt_extra() -> None:
    code = ("import sys; sys.modules['PySide6'] = None; from vbus._cli.main import main; "
            "raise SystemExit(main(['demo', '--gui', '--duration', '0.1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=ENV)
    line = one_error_line(done, "demo")
    assert "vbus[qt]" in line


@pytest.mark.parametrize(("error", "expected"), [
    (ModuleNotFoundError("no vbus._cli.demo.gui", name="vbus._cli.demo.gui"), "has no GUI demo"),
    (ImportError("vbus.qt: this PySide6 is broken"),
     "the GUI demo cannot start: vbus.qt: this PySide6 is broken"),
])
def test_demo_gui_that_cannot_load_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: ImportError,
    expected: str
) -> None:
    def fail(name: str) -> None:
        raise error

    monkeypatch.setattr(_cmd_demo, "_import", fail)
    assert _cli.main(["demo", "--gui"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("vbus demo: error: ") and expected in line


# -- keys -------------------------------------------------------------------------------------
def test_keygen_and_a_secure_broker_from_the_command_line(procs: list[Proc],
                                                          tmp_path: Path) -> None:
    done = run("keygen", str(tmp_path / "server"))
    assert done.returncode == 0 and len(done.stdout.strip()) == 40
    assert (os.stat(tmp_path / "server.key").st_mode & 0o777) == 0o600
    again = run("keygen", str(tmp_path / "server"))
    assert again.returncode == 1 and "exists" in again.stderr
    assert run("keygen", str(tmp_path / "alice")).returncode == 0
    assert run("keygen", str(tmp_path / "mallory")).returncode == 0
    clients = tmp_path / "clients"
    clients.mkdir()
    (tmp_path / "alice.key.pub").rename(clients / "alice.key.pub")
    b = start(procs, "broker", "--bind", "tcp://127.0.0.1:0",
              "--keys", str(tmp_path / "server.key"), "--authorized", str(clients))
    address = b.line("out")
    alice = ["--keys", str(tmp_path / "alice.key"),
             "--server-key", str(tmp_path / "server.key.pub")]
    sub = subscribed(procs, address, "secure/*", "--count", "1", "--json", *alice)
    assert run("pub", address, "secure/x", '"hello"', *alice).returncode == 0
    assert sub.finish() == 0
    assert json.loads(sub.rest()[-1])["data"] == "hello"
    mallory = ["--keys", str(tmp_path / "mallory.key"),
               "--server-key", str(tmp_path / "server.key.pub")]
    for args in (mallory, [], ["--keys", str(tmp_path / "alice.key")]):
        denied = run("pub", address, "secure/x", "1", "--timeout", "3", *args)
        assert denied.returncode != 0, args
        assert len(denied.stderr.strip().splitlines()) == 1 and "Traceback" not in denied.stderr
    exposed = run("broker", "--bind", "tcp://0.0.0.0:0")
    assert exposed.returncode == 1 and "--insecure" in exposed.stderr
