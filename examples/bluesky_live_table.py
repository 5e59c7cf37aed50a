"""A bluesky RunEngine in one process, a live table in another, through `vbus broker`.

    python examples/bluesky_live_table.py                 # all of it: broker, table, RunEngine

runs the three parts as separate processes and stops them all. Or run each by hand:

    vbus broker --bind tcp://127.0.0.1:5555               # terminal 1: prints its address
    python examples/bluesky_live_table.py table tcp://127.0.0.1:5555   # terminal 2
    python examples/bluesky_live_table.py run tcp://127.0.0.1:5555     # terminal 3

The RunEngine publishes every document on RE0/<name> (`DocumentPublisher`); the table side
(`RemoteDispatcher`) feeds them, in the RunEngine's order, to bluesky's `LiveTable` and to a
callback that shows the camera frames (numpy arrays inside event documents) it receives. It
stops at the end of the second run. Needs `pip install 'vbus[bluesky]'` (bluesky, ophyd).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np

import vbus

PREFIX = "RE0"
RUNS = 2


def table(address: str) -> None:
    """Print a live table of RE0's scans and the camera frames of its counts."""
    from bluesky.callbacks import LiveTable

    from vbus.bluesky import RemoteDispatcher

    dispatcher = RemoteDispatcher(address, prefix=PREFIX)  # returns once subscribed
    dispatcher.subscribe(LiveTable(["motor", "det"]))
    stops = []

    def show_frames(name: str, doc: Any) -> None:
        if name == "event" and "camera" in doc["data"]:
            frame = doc["data"]["camera"]
            print(f"camera frame {doc['seq_num']}: {frame.dtype} {frame.shape}, "
                  f"mean {frame.mean():.1f}", flush=True)
        if name == "stop":
            stops.append(doc)
            if len(stops) == RUNS:
                dispatcher.stop()  # start() returns

    dispatcher.subscribe(show_frames)
    print("ready", flush=True)  # for the launcher: documents sent from now on arrive
    dispatcher.start()


def run(address: str) -> None:
    """A count of a simulated camera, then a scan of a detector against a motor."""
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from ophyd.sim import SynSignal, det, motor

    from vbus.bluesky import DocumentPublisher

    camera = SynSignal(name="camera", labels={"detectors"},
                       func=lambda: np.random.default_rng().integers(0, 4096, (480, 640),
                                                                     dtype=np.uint16))
    with vbus.connect(address) as bus:
        RE = RunEngine({})
        RE.subscribe(DocumentPublisher(bus, prefix=PREFIX))
        RE(count([camera], num=3))
        RE(scan([det], motor, -1, 1, 11))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("table", "run"):
        (table if sys.argv[1] == "table" else run)(sys.argv[2])
        return 0
    if len(sys.argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    # The launcher: a broker, the table (once it is subscribed), then the RunEngine.
    broker = subprocess.Popen([sys.executable, "-m", "vbus", "broker", "--bind",
                               "tcp://127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    try:
        assert broker.stdout is not None
        address = broker.stdout.readline().strip()
        viewer = subprocess.Popen([sys.executable, __file__, "table", address],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert viewer.stdout is not None
            if viewer.stdout.readline().strip() != "ready":
                raise SystemExit("the table did not start")
            runner = subprocess.run([sys.executable, __file__, "run", address], timeout=60)
            for line in viewer.stdout:  # the table's output, until it stops
                print(line, end="")
            status = viewer.wait(10)
        finally:
            if viewer.poll() is None:
                viewer.kill()
                viewer.wait(5)
        return runner.returncode or status
    finally:
        broker.terminate()  # SIGTERM: it exits 0 within a second
        broker.wait(5)


if __name__ == "__main__":
    sys.exit(main())
