"""Ctrl-C anywhere (issue 10, defect 3): a KeyboardInterrupt at a random moment inside
``vbus.Bus()``, ``vbus.connect()``, ``bus.subscribe()`` and ``bus.publisher()`` propagates within
100 ms (at most 2 % of the points later, from a busy machine; none later than 1 s) and leaves
no thread and no fd behind; the process still exits promptly.

A SIGALRM handler raises the KeyboardInterrupt (what Ctrl-C does). Its moment is drawn, seeded,
from 0 to 5 ms, scaled to how long the call takes here (measured first) so that most points
land inside the call; points that land after it still check the cleanup of a finished call.
Each call kind runs in a child process with a hard timeout.

Knobs: VBUS_ADVERSITY_SEED, VBUS_ADVERSITY_POINTS (per call kind, default 60),
VBUS_ADVERSITY_INTERRUPT (s, the propagation bound, default 0.1).
"""

from __future__ import annotations

import os

import pytest

from tests.childproc import run_child

SEED = int(os.environ.get("VBUS_ADVERSITY_SEED", "20261201"))
POINTS = int(os.environ.get("VBUS_ADVERSITY_POINTS", "60"))
BOUND = float(os.environ.get("VBUS_ADVERSITY_INTERRUPT", "0.1"))

CODE = r"""
import random, signal, statistics
import vbus

KIND, SEED, POINTS, BOUND = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(SEED)
warm_up()
owner = vbus.Bus(bind="tcp://127.0.0.1:0") if KIND == "connect" else None

def make_host():
    return vbus.Bus() if KIND in ("subscribe", "publisher") else None

def call(host):
    if KIND == "Bus":
        return vbus.Bus()
    if KIND == "Bus_tcp":
        return vbus.Bus(bind="tcp://127.0.0.1:0")
    if KIND == "connect":
        return vbus.connect(owner.address)
    if KIND == "subscribe":
        return host.subscribe("a/**")
    return host.publisher()

def close(obj, host):
    if obj is not None:
        obj.close()
    if host is not None:
        host.close()

# how long the call takes here, so that the interrupts land inside it
durations = []
for _ in range(10):
    host = make_host()
    t0 = time.perf_counter()
    obj = call(host)
    durations.append(time.perf_counter() - t0)
    close(obj, host)
window = min(0.005, 1.5 * statistics.median(durations))
print(f"CALL {KIND} median={1000 * statistics.median(durations):.2f}ms "
      f"window={1000 * window:.2f}ms", flush=True)

def on_alarm(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGALRM, on_alarm)
inside = after = missed = 0
latencies, problems = [], []
leaky = late = 0
for point in range(POINTS):
    delay = rng.uniform(0, window)
    print(f"P {point} delay={1000 * delay:.2f}ms", flush=True)
    watch(8.0)  # a point that hangs (a bare context term after the interrupt) fails fast
    snap = Snapshot()
    host = make_host()
    obj = None
    outcome = "inside"
    t_fire = time.perf_counter() + delay
    try:
        signal.setitimer(signal.ITIMER_REAL, delay)
        obj = call(host)
        outcome = "after"
        signal.setitimer(signal.ITIMER_REAL, 0)
        outcome = "missed"
    except KeyboardInterrupt:
        latency = time.perf_counter() - t_fire
        if outcome == "inside":
            inside += 1
            latencies.append(latency)
            if latency > BOUND:  # a few over, from a busy machine, are tolerated below
                late += 1
                print(f"SLOW point {point} (delay {1000 * delay:.2f} ms): the "
                      f"KeyboardInterrupt came {latency:.3f} s after the signal", flush=True)
            if latency > 1.0:
                problems.append(f"point {point} (delay {1000 * delay:.2f} ms): the "
                                f"KeyboardInterrupt came {latency:.3f} s after the signal")
        else:
            after += 1
    except BaseException as exc:
        problems.append(f"point {point} (delay {1000 * delay:.2f} ms): raised {exc!r}, not "
                        f"KeyboardInterrupt")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if outcome == "missed":
        missed += 1
    try:
        close(obj, host)
    except BaseException as exc:
        problems.append(f"point {point}: close after the interrupt raised {exc!r}")
    leaks = snap.leaks(grace=1.0)
    if leaks:
        leaky += 1
        problems.append(f"point {point} (delay {1000 * delay:.2f} ms, {outcome}): LEAK {leaks}")
    if problems and problems[-1].startswith(f"point {point}"):
        print(f"PROBLEM {problems[-1]}", flush=True)
    if late >= 3 or leaky >= 10:
        break  # enough evidence; the rest would only take long
watch(30.0)
latencies.sort()
if latencies:
    print(f"LATENCY n={len(latencies)} max={1000 * latencies[-1]:.1f}ms "
          f"median={1000 * statistics.median(latencies):.2f}ms", flush=True)
print(f"SUMMARY kind={KIND} points={point + 1} inside={inside} after={after} missed={missed} "
      f"late={late} leaky={leaky} problems={len(problems)}", flush=True)
if owner is not None:
    owner.close()
if late > max(1, inside // 50):
    problems.append(f"{late} of {inside} interrupts came more than {BOUND} s after the signal")
if problems:
    fail(f"{len(problems)} problems, first: {problems[0]}")
print("DONE", flush=True)
"""


KINDS = ["Bus", "Bus_tcp", "connect", "subscribe", "publisher"]


@pytest.mark.timeout(80)
@pytest.mark.parametrize("kind", KINDS)
def test_ctrl_c_at_a_random_moment_inside_a_constructor(kind: str) -> None:
    """Defect 3: >= 200 random interrupt points in all (POINTS per call kind)."""
    seed = SEED + 100 * KINDS.index(kind)
    child = run_child(CODE, timeout=60.0, args=(kind, str(seed), str(POINTS), str(BOUND)))
    print(f"\n{kind} (seed {seed}): {child.how()} in {child.elapsed:.1f} s")
    if child.returncode == 1 and "Timeout (" in child.stderr:
        print(f"  HANG at {child.values('P ')[-1:]}: the watchdog dumped the stacks")
    for prefix in ("CALL", "LATENCY", "SUMMARY", "SLOW", "PROBLEM", "FAIL"):
        for v in child.values(prefix)[:6]:
            print(f"  {prefix} {v}")
    child.check("DONE")
    assert child.ended - child.marker_time("DONE") < 5.0, child.report()
    inside = int(child.value("SUMMARY").split("inside=")[1].split()[0])
    assert inside >= POINTS // 5, f"too few interrupts landed inside the call\n{child.report()}"
