"""``vbus demo``: an embedded bus, the simulated instrument (instrument.py), a sync subscriber
and an async callback, live rates in the terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from ..._bus import Bus
from ..._message import Message
from ..._subscriber import Subscriber
from .instrument import Instrument


def _drain(sub: Subscriber, counts: dict[str, int]) -> None:
    for msg in sub:
        counts["stage"] += 1
        counts["last_x"] = msg.data["x"]


def run_demo(*, duration: float | None, rate: float, fps: float, size: int) -> int:
    counts: dict[str, Any] = {"stage": 0, "frames": 0, "last_x": 0.0, "shape": None}
    out = sys.stdout
    with Bus() as bus:
        stage = bus.subscribe("stage/*")

        @bus.on("camera/**")
        async def on_frame(msg: Message) -> None:
            counts["frames"] += 1
            counts["shape"] = getattr(msg.data, "shape", None) or len(msg.data)

        stop = threading.Event()
        reader = threading.Thread(target=_drain, args=(stage, counts), name="demo-subscriber")
        instrument = Instrument(bus, fps=fps, stage_rate=rate, shape=(size, size))
        reader.start()
        instrument.start()
        print(f"vbus demo: embedded bus at {bus.address}; Ctrl-C to stop", file=out, flush=True)
        began = last = time.monotonic()
        seen = dict(stage=0, frames=0)
        try:
            while duration is None or time.monotonic() - began < duration:
                wait = 1.0 if duration is None else min(1.0, began + duration - time.monotonic())
                stop.wait(max(wait, 0.0))
                now = time.monotonic()
                dt, last = now - last, now
                stats = bus.stats()
                stage_rate = (counts["stage"] - seen["stage"]) / dt
                fps = (counts["frames"] - seen["frames"]) / dt
                print(
                    f"{now - began:6.1f} s  stage {stage_rate:9.0f} msg/s"
                    f"  x={counts['last_x']:+7.3f}  camera {fps:5.1f}"
                    f" fps {counts['shape']}  broker {stats.messages_in} in / "
                    f"{stats.messages_out} out  dropped {stats.dropped}",
                    file=out,
                    flush=True,
                )
                seen = dict(stage=counts["stage"], frames=counts["frames"])
        except KeyboardInterrupt:
            print("\nvbus demo: interrupted", file=out)
        finally:
            stop.set()
            instrument.stop()
            total = time.monotonic() - began
            t0 = time.perf_counter()
            bus.close()
            reader.join()
            print(
                f"vbus demo: {counts['stage']} stage messages ({counts['stage'] / total:.0f}/s), "
                f"{counts['frames']} camera frames in {total:.1f} s; "
                f"close() took {1000 * (time.perf_counter() - t0):.1f} ms",
                file=out,
            )
    return 0
