"""Qt integration (``pip install vbus[qt]``): deliver messages on the GUI thread, forward signals.

Through qtpy, so it runs on the binding the application uses: PySide6 or PyQt6 (qtpy picks it
as for napari: ``QT_API``, else the first one installed; PySide6 is what ``vbus[qt]`` installs).

``QtSubscriber`` is a QObject whose ``received`` signal carries each ``vbus.Message`` on the
QObject's own thread (normally the GUI thread), in order. The bus is read by a Python thread of
the QtSubscriber's own (``vbus-qt-<pattern>``), blocked in a sync ``Subscriber.recv()``, so the
GUI never waits on the bus. That thread never touches a Qt object: it puts each message in a
queue (or, with ``latest_only=True``, in a one-slot-per-topic mailbox) and, when the queue goes
from empty to non-empty, makes a file descriptor readable; a ``QSocketNotifier`` on the GUI
thread then empties the queue and emits ``received``. Since no Qt call ever crosses threads,
nothing can be posted into a QObject that is being destroyed.

It stops — subscriber closed, thread joined within a deadline, descriptor closed — on
``close()``, when it is destroyed (its parent was destroyed, ``deleteLater()``, or its last
Python reference went away), when the application is about to quit, and when the bus closes
(it then finishes on the next pass of its thread's event loop).

``forward(signal, publisher, topic)`` publishes a Qt signal's arguments on a topic.

See docs/qt.md.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import qtpy
from qtpy.QtCore import QCoreApplication, QObject, QSocketNotifier, Signal, Slot

from ._bus import Bus
from ._errors import Closed
from ._message import Message, args_as_data
from ._proto.seq import BurstLog
from ._proto.topics import validate_topic
from ._publisher import AsyncPublisher, Publisher
from ._subscriber import Subscriber
from ._threads import Deadline, join
from ._waker import Waker

__all__ = ["QtSubscriber", "QtSubscriberStats", "forward"]

log = logging.getLogger("vbus.qt")

# Without latest_only, one pass of the GUI's event loop emits for at most this long; the rest
# waits for the next pass, so paint and input events are served in between.
DELIVERY_BUDGET = 0.005
# Without latest_only, at most this many messages wait for the GUI (QtSubscriber's ``hwm``).
QUEUE_HWM = 10_000
STOP_TIMEOUT = 1.0


class _Probe(QObject):
    ping = Signal()


class _Watch(QObject):
    """Stops a relay when its QtSubscriber is destroyed or the application is about to quit.

    Those signals reach a real Qt slot of this object, not a Python callable: PyQt6 calls a
    lambda through a proxy object, and a garbage collection that destroys the QtSubscriber
    can free that proxy's callable before ``destroyed`` reaches it (a crash). The relay keeps
    this object alive for as long as it may be called."""

    def __init__(self, relay: _Relay) -> None:
        super().__init__()
        self._relay = relay

    @Slot()
    def stop(self) -> None:
        self._relay.stop(STOP_TIMEOUT)


def _binding_defect() -> str | None:
    """Why this Qt binding cannot run a Qt application on this Python, or None.

    PySide6 6.12 drops a reference to ``None`` on every call of a method returning nothing and
    one to ``True`` on every ``emit()`` when it runs on Python 3.10 or 3.11, whose ``None``
    and ``True`` are not immortal (PEP 683 made them so in 3.12): a GUI then aborts the
    interpreter within seconds or minutes ("deallocating None" / "deallocating True or
    False"). Measured, not inferred from version numbers.
    """
    if sys.version_info >= (3, 12) or qtpy.API_NAME != "PySide6":
        return None  # PyQt6 keeps its references
    probe = _Probe()
    calls = 64
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(calls):
        probe.setObjectName("vbus-probe")
        probe.ping.emit()
    lost_none = none_before - sys.getrefcount(None)
    lost_true = true_before - sys.getrefcount(True)
    if lost_none < calls // 2 and lost_true < calls // 2:
        return None
    return (
        f"PySide6 {qtpy.PYSIDE_VERSION} on Python {sys.version_info[0]}.{sys.version_info[1]} "
        f"loses a reference to None or True on each call ({lost_none} and {lost_true} in "
        f"{calls} calls), which aborts the interpreter after a while; use PySide6 < 6.12 with "
        "Python < 3.12 (pip install 'PySide6-Essentials<6.12'), Python 3.12+, or PyQt6 "
        "(QT_API=pyqt6)"
    )


_DEFECT = _binding_defect()
if _DEFECT is not None:
    raise ImportError(f"vbus.qt: {_DEFECT}")


class QtSubscriberStats(msgspec.Struct, frozen=True):
    """Counters of one QtSubscriber.

    ``received``: messages its thread took from the bus. ``delivered``: ``received`` signals
    emitted. ``skipped``: with ``latest_only``, messages replaced by a newer one on the same
    topic before the GUI took them. ``dropped``: lost before reaching its thread (sequence
    gaps: the subscriber's queue at the broker was full) plus, without ``latest_only``,
    messages refused because ``hwm`` messages were already waiting for the GUI.
    ``gui_seconds``: time the GUI thread spent in delivery, the connected slots included.
    """

    pattern: str
    latest_only: bool
    received: int
    delivered: int
    skipped: int
    dropped: int
    gui_seconds: float


class _Relay:
    """What the worker thread and the GUI thread share. Holds no reference to the QObject,
    so the QObject's ordinary ownership (parent, Python references) decides its life."""

    def __init__(self, sub: Subscriber, latest_only: bool, hwm: int) -> None:
        self.sub = sub
        self.pattern = sub.pattern
        self.latest_only = latest_only
        self.hwm = hwm
        self.lock = threading.Lock()
        self.queue: deque[Message] = deque()
        self.latest: dict[str, Message] = {}
        self.signalled = False  # the wake descriptor is readable
        self.finished = False  # the worker's iteration ended (the subscriber is closed)
        self.closing = False  # close requested: nothing more is emitted
        self.released = False  # the QObject's thread let go of the notifier and descriptor
        self.abandoned = False  # released before the worker finished: it closes the descriptor
        self.received = 0
        self.delivered = 0
        self.skipped = 0
        self.overflow = 0
        self.gui_seconds = 0.0
        self.owner = threading.get_ident()  # the QObject's thread
        self.notifier: QSocketNotifier | None = None
        self.watch: _Watch | None = None
        self.watching_quit = False
        self.loss_log = BurstLog(log, f"QtSubscriber {self.pattern!r}: the GUI is behind")
        self.wake = Waker()
        # daemon=False given: else Thread() asks current_thread(), which leaves a dummy Thread
        # behind in a QThread
        self.thread = threading.Thread(
            target=self.run, name=f"vbus-qt-{self.pattern}", daemon=False
        )

    # -- the worker thread ------------------------------------------------------------------
    def run(self) -> None:
        try:
            for msg in self.sub:
                self.put(msg)
        finally:
            with self.lock:
                self.finished = True
                if self.abandoned:
                    self.wake.close()
                elif not self.released:
                    self._signal()  # the QObject's thread comes to finish

    def put(self, msg: Message) -> None:
        with self.lock:
            self.received += 1
            refused = False
            if self.latest_only:
                if self.latest.pop(msg.topic, None) is not None:
                    self.skipped += 1
                self.latest[msg.topic] = msg  # re-inserted: the mailbox keeps arrival order
            elif len(self.queue) >= self.hwm:
                self.overflow += 1
                refused = True
            else:
                self.queue.append(msg)
            if not refused:
                self._signal()
        if refused:
            self.loss_log.event(1, f"{self.hwm} messages wait for the GUI; dropping")

    def _signal(self) -> None:
        # Caller holds self.lock.
        if not self.signalled:
            self.signalled = True
            self.wake.wake()

    # -- the QObject's thread ---------------------------------------------------------------
    def _settle(self) -> None:
        # Caller holds self.lock; nothing is pending. Once the worker has finished the
        # descriptor stays readable, so that this thread comes back to finish; once released,
        # the descriptor is not ours to touch (closed, or the worker's to close).
        if self.signalled and not self.finished and not self.released:
            self.signalled = False
            self.wake.clear()

    def take_latest(self) -> list[Message]:
        with self.lock:
            batch = [] if self.closing or self.finished else list(self.latest.values())
            self.latest.clear()
            self._settle()
            return batch

    def pop(self) -> Message | None:
        with self.lock:
            if self.queue and not self.closing and not self.finished:
                return self.queue.popleft()
            self.queue.clear()
            self._settle()
            return None

    def stop(self, timeout: float) -> None:
        """Close the subscriber and join the worker. Called from another thread than the
        QObject's, it only closes the subscriber: the worker's end wakes the QObject's thread,
        which finishes the job (notifier, descriptor) on its next pass."""
        deadline = Deadline(timeout)
        self.closing = True
        self.sub.close(timeout=deadline.remaining() or 0.0)  # idempotent
        if threading.get_ident() == self.owner:
            self.finish(deadline)

    def finish(self, deadline: Deadline) -> None:
        """On the QObject's thread: join the worker, disarm the notifier, close the
        descriptor (or leave that to a worker that did not end in time). Idempotent."""
        if self.released:
            return
        self.closing = True
        if not join(self.thread, deadline):
            log.warning(
                "QtSubscriber %r: thread %s did not end in time; leaving it",
                self.pattern, self.thread.name,
            )
        notifier, self.notifier = self.notifier, None
        if notifier is not None:
            try:
                notifier.setEnabled(False)
            except RuntimeError:
                pass  # already deleted along with its parent
        with self.lock:
            self.released = True
            self.queue.clear()
            self.latest.clear()
            if self.finished or self.thread.ident is None:  # ended, or never started
                self.wake.close()
            else:
                self.abandoned = True
        watch = self.watch
        app = QCoreApplication.instance()
        if watch is not None:
            if self.watching_quit and app is not None:
                self.watching_quit = False
                try:
                    app.aboutToQuit.disconnect(watch.stop)
                except (RuntimeError, TypeError):
                    pass
            try:
                watch.deleteLater()  # not now: this may run in its own slot
            except RuntimeError:
                pass  # already deleted

    def stats(self) -> QtSubscriberStats:
        with self.lock:
            return QtSubscriberStats(
                pattern=self.pattern,
                latest_only=self.latest_only,
                received=self.received,
                delivered=self.delivered,
                skipped=self.skipped,
                dropped=self.sub.stats().dropped + self.overflow,
                gui_seconds=self.gui_seconds,
            )


class QtSubscriber(QObject):
    """Emits ``received(vbus.Message)`` on this QObject's thread for every message matching
    ``pattern``, in order. Returns once the subscription is active at the broker.

    ``latest_only=True``: at most one message per topic waits for the GUI; a newer one
    replaces it and the replaced one is counted in ``skipped``. Use it for frames and states
    where only the newest matters: the GUI gets the newest, never a backlog.

    Without it every message is delivered, in order; at most ``hwm`` messages (default
    10 000) wait for the GUI, beyond that they are dropped and counted.

    It lives like any QObject (its parent, or your Python reference) and stops when destroyed,
    on ``close()``, when the application is about to quit, and when the bus closes. Create it
    on the thread that should receive (it needs a running Qt application).
    """

    received = Signal(object)

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        *,
        type: Any = None,
        latest_only: bool = False,
        parent: QObject | None = None,
        hwm: int | None = None,
    ) -> None:
        app = QCoreApplication.instance()
        if app is None:
            raise RuntimeError("QtSubscriber: create the QApplication (or QCoreApplication) first")
        if hwm is not None and hwm < 1:
            raise ValueError(f"hwm must be at least 1, not {hwm}")
        super().__init__(parent)
        sub = bus.subscribe(pattern, type=type)
        relay = self._relay = _Relay(sub, latest_only, QUEUE_HWM if hwm is None else hwm)
        try:
            notifier = QSocketNotifier(relay.wake.fileno(), QSocketNotifier.Type.Read, self)
            notifier.activated.connect(self._on_ready)
            relay.notifier = notifier
            # Never over self: these run while self is destroyed.
            watch = relay.watch = _Watch(relay)
            self.destroyed.connect(watch.stop)
            app.aboutToQuit.connect(watch.stop)
            relay.watching_quit = True
            relay.thread.start()
        except BaseException:
            relay.stop(STOP_TIMEOUT)
            raise

    # -- public -----------------------------------------------------------------------------
    @property
    def pattern(self) -> str:
        return self._relay.pattern

    @property
    def latest_only(self) -> bool:
        return self._relay.latest_only

    @property
    def closed(self) -> bool:
        """True once stopped: subscriber closed, thread joined, nothing more is emitted."""
        return self._relay.released

    @property
    def delivered(self) -> int:
        return self._relay.delivered

    @property
    def skipped(self) -> int:
        return self._relay.skipped

    @property
    def dropped(self) -> int:
        return self.stats().dropped

    def stats(self) -> QtSubscriberStats:
        return self._relay.stats()

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop: close the subscriber and join the thread within ``timeout``. Idempotent.

        Callable from a slot, even one connected to ``received``. From another thread it
        closes the subscriber and lets this object's thread finish the rest.
        """
        self._relay.stop(timeout)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        mode = " latest_only" if self.latest_only else ""
        return f"<QtSubscriber {self.pattern!r}{mode} {state}>"

    # -- delivery (the GUI thread) ----------------------------------------------------------
    def _on_ready(self) -> None:
        relay = self._relay
        started = time.perf_counter()
        try:
            if relay.latest_only:
                for msg in relay.take_latest():
                    if relay.closing:
                        break  # a slot closed us (or the bus, or destroyed us)
                    relay.delivered += 1
                    self.received.emit(msg)
            else:
                until = started + DELIVERY_BUDGET
                while (next_msg := relay.pop()) is not None:
                    relay.delivered += 1
                    self.received.emit(next_msg)
                    if time.perf_counter() >= until:
                        break  # the descriptor stays readable: the rest on the next pass
            if relay.finished:
                # The bus, or close() from another thread, closed the subscriber.
                relay.finish(Deadline(STOP_TIMEOUT))
        finally:
            relay.gui_seconds += time.perf_counter() - started


def forward(
    signal: Any,
    publisher: Publisher,
    topic: str,
    *,
    convert: Callable[..., Any] | None = None,
    retain: bool = False,
) -> Callable[..., None]:
    """Publish on ``topic`` every time the Qt ``signal`` (a bound signal: ``widget.clicked``)
    is emitted; returns the connected slot.

    The payload is ``convert(*args)`` if given, else the signal's single argument, ``None``
    for a signal without arguments, or the list of its arguments::

        vbus.qt.forward(spinbox.valueChanged, pub, "stage/target")

    ``signal.disconnect(slot)`` stops forwarding. Once the bus is closed, emissions are
    ignored. A bad topic raises TopicError here, not at the first emission.
    """
    validate_topic(topic)
    if isinstance(publisher, AsyncPublisher):
        raise TypeError("forward() needs a sync Publisher (bus.publisher()), not an AsyncPublisher")

    def slot(*args: Any) -> None:
        data = convert(*args) if convert is not None else args_as_data(args)
        try:
            publisher.publish(topic, data, retain=retain)
        except Closed:
            pass  # the bus closed before the window did: nothing to forward to

    signal.connect(slot)
    return slot
