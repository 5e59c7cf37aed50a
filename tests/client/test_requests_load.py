"""10 000 requests from 4 threads and 2 processes to 3 servers: each answered exactly once, by
exactly one server, the load shared."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
import threading
import time

import vbus
from tests._support import LeakCheck

TOTAL = 10_000
THREADS, PROCESSES, SERVERS = 4, 2, 3
PER_REQUESTER = TOTAL // (THREADS + PROCESSES)
PER_THREAD = PER_REQUESTER
PER_PROCESS = (TOTAL - THREADS * PER_THREAD) // PROCESSES

CHILD = textwrap.dedent(
    """
    import json, sys, vbus
    address, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    per, bad = {}, 0
    with vbus.connect(address) as bus:
        for i in range(n):
            data = f"{who}:{i}"
            reply = bus.request("load/work", data, timeout=20.0)
            bad += reply.data[1] != data
            per[reply.sender] = per.get(reply.sender, 0) + 1
    print(json.dumps({"bad": bad, "per": per}), flush=True)
    """
)


def test_ten_thousand_requests_each_answered_once_by_one_server(leakcheck: LeakCheck) -> None:
    assert THREADS * PER_THREAD + PROCESSES * PER_PROCESS == TOTAL
    with vbus.Bus(bind="tcp://127.0.0.1:0", hwm=10_000) as broker:
        server_buses = [vbus.connect(broker.address) for _ in range(SERVERS)]
        requester_bus = vbus.connect(broker.address)
        handled: list[list[str]] = [[] for _ in range(SERVERS)]
        try:
            servers = []
            for index, sbus in enumerate(server_buses):
                def handler(msg: vbus.Message, log: list[str] = handled[index],
                            index: int = index) -> list[object]:
                    log.append(msg.data)
                    return [index, msg.data]
                servers.append(sbus.serve("load/work", handler))
            by_id = {s.id: i for i, s in enumerate(servers)}

            started = time.perf_counter()
            children = [
                subprocess.Popen([sys.executable, "-c", CHILD, broker.address, f"p{i}",
                                  str(PER_PROCESS)], stdout=subprocess.PIPE, text=True)
                for i in range(PROCESSES)
            ]
            per_server: collections.Counter[int] = collections.Counter()
            bad: list[str] = []
            lock = threading.Lock()

            def ask(who: str) -> None:
                for i in range(PER_THREAD):
                    data = f"{who}:{i}"
                    reply = requester_bus.request("load/work", data, timeout=20.0)
                    with lock:
                        if reply.data != [by_id[reply.sender], data]:
                            bad.append(data)
                        per_server[by_id[reply.sender]] += 1

            threads = [threading.Thread(target=ask, args=(f"t{i}",)) for i in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120.0)
                assert not t.is_alive()
            for child in children:
                out, _ = child.communicate(timeout=120.0)
                assert child.returncode == 0
                result = json.loads(out)
                bad += ["child"] * result["bad"]
                for sender, n in result["per"].items():
                    per_server[by_id[sender]] += n
            took = time.perf_counter() - started
        finally:
            requester_bus.close()
            for sbus in server_buses:
                sbus.close()

    assert not bad
    every = collections.Counter(data for log in handled for data in log)
    expected = {f"t{t}:{i}" for t in range(THREADS) for i in range(PER_THREAD)}
    expected |= {f"p{p}:{i}" for p in range(PROCESSES) for i in range(PER_PROCESS)}
    assert set(every) == expected  # every request reached a server
    assert max(every.values()) == 1  # ... exactly one, exactly once
    assert sum(per_server.values()) == TOTAL  # and every requester got exactly its replies
    counts = [len(log) for log in handled]
    assert counts == [per_server[i] for i in range(SERVERS)]
    assert min(counts) > 0.8 * TOTAL / SERVERS  # round-robin shares the load
    print(f"\n{TOTAL} requests from {THREADS} threads and {PROCESSES} processes to {SERVERS} "
          f"servers in {took:.2f} s ({TOTAL / took:.0f}/s); per server {counts}")
