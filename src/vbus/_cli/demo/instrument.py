"""The simulated microscope both demos run (``vbus demo`` and ``vbus demo --gui``).

A stage publishes its position on ``stage/position`` (``{"x": µm, "y": µm}``) and a camera its
frames on ``camera/frame`` (numpy uint16, a crop of a synthetic specimen that moves with the
stage), each from a thread of its own; ``camera/exposure`` (ms, 1..16) sets the exposure.
numpy is optional: without it the frames are bytes of the same size.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..._bus import Bus
from ..._message import Message
from ..._publisher import Publisher
from ..._threads import Deadline, join

FRAME_SHAPE = (512, 1024)  # uint16: 1 MiB a frame
FPS = 200.0
STAGE_RATE = 100.0
PIXEL_UM = 0.5  # the sample moves under the camera with the stage
DEFAULT_EXPOSURE_MS = 10
_TRAVEL_UM = (110.0, 240.0)  # the stage's scan: ±y, ±x


def stage_position(t: float) -> tuple[float, float]:
    """The stage's slow Lissajous scan, in micrometres."""
    return (_TRAVEL_UM[1] * math.sin(2 * math.pi * 0.05 * t),
            _TRAVEL_UM[0] * math.sin(2 * math.pi * 0.083 * t))


def make_sample(shape: tuple[int, int], seed: int = 7) -> Any:
    """A smooth synthetic specimen, 12-bit at 16 ms exposure: cells with a bright rim and a
    nucleus on a faint background. Computed once; frames are crops of it. Needs numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    img = 180.0 + 120.0 * np.sin(xx / 310.0) * np.cos(yy / 270.0)
    for _ in range(max(4, round(90 * h * w / (1024 * 2048)))):  # as dense at every size
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        radius = rng.uniform(14, 46)
        bright = rng.uniform(900, 2600)
        y0, y1 = int(max(cy - 2 * radius, 0)), int(min(cy + 2 * radius, h))
        x0, x1 = int(max(cx - 2 * radius, 0)), int(min(cx + 2 * radius, w))
        r = np.hypot(yy[y0:y1] - cy, xx[:, x0:x1] - cx)
        rim = np.exp(-(((r - radius) / (0.18 * radius)) ** 2))
        body = 0.25 * np.exp(-((r / radius) ** 2))
        nucleus = 0.9 * np.exp(-((r / (0.32 * radius)) ** 2))
        img[y0:y1, x0:x1] += bright * (rim + body + nucleus)
    return np.clip(img, 0, 4095).astype(np.uint16)


class Instrument:
    """A camera (``camera/frame``) and a stage (``stage/position``), each publishing from a
    thread of its own at its rate (0: as fast as it can) once ``start()`` is called;
    ``stop()`` ends them. ``frames`` counts the frames published."""

    def __init__(
        self, bus: Bus, *, fps: float = FPS, stage_rate: float = STAGE_RATE,
        shape: tuple[int, int] = FRAME_SHAPE,
    ) -> None:
        self.bus = bus
        self.fps = fps
        self.stage_rate = stage_rate
        self.shape = shape
        self._margin = (math.ceil(_TRAVEL_UM[0] / PIXEL_UM), math.ceil(_TRAVEL_UM[1] / PIXEL_UM))
        try:
            self.sample: Any = make_sample((shape[0] + 2 * self._margin[0],
                                            shape[1] + 2 * self._margin[1]))
        except ImportError:  # no numpy: frames of zero bytes, as large
            self.sample = None
        self.exposure = DEFAULT_EXPOSURE_MS
        self.frames = 0
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        bus.on("camera/exposure", self._set_exposure)
        self._threads = [
            threading.Thread(target=self._camera, name="demo-camera"),
            threading.Thread(target=self._stage, name="demo-stage"),
        ]

    def _set_exposure(self, msg: Message) -> None:
        if isinstance(msg.data, (int, float)):
            self.exposure = int(min(max(msg.data, 1), 16))

    def start(self) -> None:
        self._t0 = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        deadline = Deadline(timeout)
        for thread in self._threads:
            join(thread, deadline)

    def frame_at(self, t: float) -> Any:
        h, w = self.shape
        if self.sample is None:
            return bytes(h * w * 2)
        import numpy as np

        x, y = stage_position(t)
        row = self._margin[0] + int(y / PIXEL_UM)
        col = self._margin[1] + int(x / PIXEL_UM)
        row = min(max(row, 0), self.sample.shape[0] - h)
        col = min(max(col, 0), self.sample.shape[1] - w)
        frame = np.empty(self.shape, dtype=np.uint16)  # a new array each time: sent zero-copy
        np.multiply(self.sample[row : row + h, col : col + w], self.exposure, out=frame)
        frame >>= 4
        return frame

    def _paced(self, rate: float, step: Callable[[Publisher, float], None]) -> None:
        pub = self.bus.publisher()
        try:
            start = time.monotonic()
            n = 0
            while not self._stop.is_set():
                step(pub, time.monotonic() - self._t0)
                if rate <= 0:
                    continue
                n += 1
                ahead = start + n / rate - time.monotonic()
                if ahead < -0.25:  # fell far behind (machine busy): do not burst to catch up
                    start, n = time.monotonic(), 0
                if self._stop.wait(max(ahead, 0.0)):
                    break
        finally:
            pub.close()

    def _camera(self) -> None:
        def shoot(pub: Publisher, t: float) -> None:
            pub.publish("camera/frame", self.frame_at(t))
            self.frames += 1

        self._paced(self.fps, shoot)

    def _stage(self) -> None:
        def move(pub: Publisher, t: float) -> None:
            x, y = stage_position(t)
            pub.publish("stage/position", {"x": round(x, 3), "y": round(y, 3)})

        self._paced(self.stage_rate, move)
