"""psygnal bridge (``pip install vbus[psygnal]``): devices' psygnal signals across processes.

``forward(bus, signal, topic)`` publishes every emission of a psygnal ``SignalInstance`` on
``topic``: a signal with one argument as that value, with several as the list of them, with
none as ``None`` (or ``convert(*args)``). ``Relay(bus, pattern)`` is the other way round: its
``received`` is a psygnal ``Signal(Message)`` emitted for every message matching ``pattern``,
on the bus's background loop thread, or on a thread you name (``thread=``, psygnal's queued
connections: that thread calls ``psygnal.emit_queued()``; a Qt GUI thread runs
``psygnal.qt.start_emitting_from_queue()``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Literal

from psygnal import Signal, SignalInstance

from ._bus import Bus
from ._errors import Closed, EncodeError
from ._message import Message, args_as_data
from ._proto.topics import validate_topic
from ._publisher import AsyncPublisher, Publisher
from ._subscriber import AsyncSubscriber, SubscriberStats

__all__ = ["Forward", "Relay", "forward"]

log = logging.getLogger("vbus.psygnal")

_publishers: weakref.WeakKeyDictionary[Bus, Publisher] = weakref.WeakKeyDictionary()
_publishers_lock = threading.Lock()


def _publisher_of(bus: Bus) -> Publisher:
    """One publisher per bus for every forward(): emissions of all forwarded signals reach a
    subscriber in the order they were emitted, whatever their topics."""
    with _publishers_lock:
        pub = _publishers.get(bus)
        if pub is None or pub.closed:
            pub = _publishers[bus] = bus.publisher()
        return pub


def _signal_name(signal: SignalInstance) -> str:
    owner = signal.instance
    name = signal.name or "<signal>"
    return f"{type(owner).__name__}.{name}" if owner is not None else name


class Forward:
    """The handle forward() returns: ``close()`` stops forwarding (idempotent)."""

    def __init__(self, signal: SignalInstance, topic: str, slot: Callable[..., None]) -> None:
        self.signal = signal
        self.topic = topic
        self._slot: Callable[..., None] | None = slot

    @property
    def closed(self) -> bool:
        return self._slot is None

    def close(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self.signal.disconnect(slot, missing_ok=True)

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<vbus.psygnal.Forward {_signal_name(self.signal)} -> {self.topic!r} {state}>"


def forward(
    bus: Bus | Publisher,
    signal: SignalInstance,
    topic: str,
    *,
    convert: Callable[..., Any] | None = None,
    retain: bool = False,
) -> Forward:
    """Publish on ``topic`` every time ``signal`` is emitted; returns a handle to stop.

    The payload is ``convert(*args)`` if given, else the emission's single argument, the
    list of its arguments when there are several, ``None`` when there are none::

        forward(bus, stage.sigPosition, "stage/position")   # emit(1.5) publishes 1.5
        forward(bus, stage.sigMoved, "stage/moved")         # emit(1.5, "mm") publishes [1.5, "mm"]

    Given a bus, every forward() of that bus shares one publisher, so subscribers see the
    emissions of all forwarded signals in emission order; give a Publisher to choose. The
    publish happens in the emitting thread, inside ``emit()``; it never blocks. Arguments
    that cannot be encoded raise ``vbus.EncodeError`` naming the signal and the topic, which
    psygnal's ``emit()`` passes on as the cause of its ``psygnal.EmitLoopError`` (psygnal
    wraps whatever a slot raises). Once the bus is closed, emissions are ignored. A bad
    topic raises ``TopicError`` here, not at the first emission.
    """
    validate_topic(topic)
    if not isinstance(signal, SignalInstance):
        raise TypeError(
            f"forward() takes a psygnal SignalInstance (obj.signal), not {signal!r}"
        )
    if isinstance(bus, AsyncPublisher):
        raise TypeError("forward() needs a Bus or a sync Publisher, not an AsyncPublisher")
    publisher = bus if isinstance(bus, Publisher) else _publisher_of(bus)
    name = _signal_name(signal)

    def slot(*args: Any) -> None:
        data = convert(*args) if convert is not None else args_as_data(args)
        try:
            publisher.publish(topic, data, retain=retain)
        except Closed:
            pass  # the bus closed before the device did: nothing to forward to
        except EncodeError as exc:
            kinds = ", ".join(type(a).__name__ for a in args)
            raise EncodeError(
                f"{name}({kinds}) cannot be published on {topic!r}: {exc}"
            ) from None

    signal.connect(slot)
    return Forward(signal, topic, slot)


class Relay:
    """``received`` is emitted with every ``vbus.Message`` matching ``pattern``, in order.

    Returns once the subscription is active at the broker. By default ``received`` is
    emitted on the bus's background loop thread: keep slots short, or connect them with
    psygnal's ``thread=``. With ``thread=`` (a ``threading.Thread``, ``"main"`` or
    ``"current"``) every emission of ``received`` happens on that thread instead, when it
    calls ``psygnal.emit_queued()`` (in a Qt application:
    ``psygnal.qt.start_emitting_from_queue()`` on the GUI thread).

    A slot that raises is logged and counted (``errors``); delivery goes on. ``close()``
    stops it (from any thread, from a slot too); so does the bus's close.
    """

    received = Signal(Message)
    _arrived = Signal(Message)  # emitted on the loop thread, queued to ``thread``

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        *,
        type: Any = None,
        hwm: int | None = None,
        thread: threading.Thread | Literal["main", "current"] | None = None,
    ) -> None:
        self._errors = 0
        self._closing = False
        self._queued = thread is not None
        if thread is not None:
            self._arrived.connect(self.received.emit, thread=thread)
        self._sub: AsyncSubscriber = bus.async_subscribe(pattern, type=type, hwm=hwm)
        try:
            self._task: concurrent.futures.Future[None] = bus.submit(self._pump())
        except BaseException:
            self._sub.close()
            raise
        self._loop_thread: int | None = None

    @property
    def pattern(self) -> str:
        return self._sub.pattern

    @property
    def closed(self) -> bool:
        """True once close() was called or the bus closed: nothing more is emitted."""
        return self._closing or self._task.done()

    @property
    def errors(self) -> int:
        """Messages on which a slot raised."""
        return self._errors

    def stats(self) -> SubscriberStats:
        return self._sub.stats()

    async def _pump(self) -> None:
        self._loop_thread = threading.get_ident()
        emit = self._arrived.emit if self._queued else self.received.emit
        try:
            async for msg in self._sub:
                if self._closing:
                    break  # a slot closed us, or another thread did
                try:
                    emit(msg)
                except Exception:
                    self._errors += 1
                    log.exception("Relay %r: a slot raised on %r", self.pattern, msg.topic)
        finally:  # the end of the subscription, close(), or the bus closed (cancelled)
            self._sub.close()

    def close(self, timeout: float = 1.0) -> None:
        """Stop: the subscription is closed and nothing is emitted after this returns
        (but emissions already queued to ``thread``). Idempotent."""
        self._closing = True
        self._sub.close(timeout=timeout)
        if threading.get_ident() != self._loop_thread:
            concurrent.futures.wait([self._task], timeout)
        if self._queued:
            self._arrived.disconnect(self.received.emit, missing_ok=True)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vbus.psygnal.Relay {self.pattern!r} {'closed' if self.closed else 'open'}>"
