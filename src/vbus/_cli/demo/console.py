"""``vbus demo``: an embedded bus, a simulated instrument, a sync subscriber, an async callback."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any

from ..._bus import Bus
from ..._message import Message
from ..._subscriber import Subscriber


def _camera_frame(size: int, tick: int) -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional: frames then travel as bytes
        return bytes(size * size * 2)
    frame = numpy.empty((size, size), dtype=numpy.uint16)
    frame[:] = (numpy.arange(size, dtype=numpy.uint16) + tick) % 4096
    return frame


def _instrument(bus: Bus, stop: threading.Event, rate: float, fps: float, size: int) -> None:
    """Stage positions at ``rate`` Hz (0: flat out) and camera frames at ``fps`` Hz."""
    pub = bus.publisher()
    start = next_frame = time.monotonic()
    period = 1.0 / rate if rate > 0 else 0.0
    sent = tick = 0
    while True:
        t = time.monotonic() - start
        pub.publish("stage/x", 10.0 * math.sin(t))
        pub.publish("stage/y", 10.0 * math.cos(t))
        sent += 1
        if fps > 0 and time.monotonic() >= next_frame:
            pub.publish("camera/frame", _camera_frame(size, tick))
            next_frame += 1.0 / fps
            tick += 1
        ahead = start + sent * period - time.monotonic() if period else 0.0
        if stop.wait(ahead) if ahead > 0 else stop.is_set():
            break
    pub.close()


def _drain(sub: Subscriber, counts: dict[str, int]) -> None:
    for msg in sub:
        counts["stage"] += 1
        counts["last_x"] = msg.data


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
        instrument = threading.Thread(
            target=_instrument, args=(bus, stop, rate, fps, size), name="demo-instrument"
        )
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
            instrument.join()
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
