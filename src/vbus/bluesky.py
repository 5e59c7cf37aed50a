"""bluesky bridge (``pip install vbus[bluesky]``): a RunEngine's documents over the bus.

``DocumentPublisher(bus, prefix)`` is a callable ``(name, doc)`` for ``RE.subscribe``: each
document goes out on ``PREFIX/<name>`` (``RE0/start``, ``RE0/descriptor``, ``RE0/event``,
``RE0/stop``, ...), numpy arrays in it (an image detector's frames in an event) as frames of
their own. ``RemoteDispatcher(address, prefix)`` is the other end, in another process or on
another host, like ``bluesky.callbacks.zmq.RemoteDispatcher``: ``subscribe(callback)``, then
``start()``, which delivers ``(name, doc)`` to the callbacks in the RunEngine's order until
``stop()`` (from a callback or from any thread). ``start(block=False)`` runs it on a thread of
its own instead. Documents arrive as msgpack gives them back: tuples become lists, and arrays
are read-only numpy arrays.

See the README's section on psygnal, qtpy and bluesky, and examples/bluesky_live_table.py.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from event_model import DocumentNames

from ._bus import Bus, connect
from ._proto.topics import validate_topic
from ._publisher import Publisher
from ._security import Keypair
from ._threads import Deadline, join

__all__ = ["DocumentPublisher", "RemoteDispatcher"]

log = logging.getLogger("vbus.bluesky")

DocumentCallback = Callable[[str, Mapping[str, Any]], Any]
_NAMES = frozenset(n.value for n in DocumentNames)


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (a topic, such as 'RE0'), not {prefix!r}")
    validate_topic(prefix)  # TopicError names what is wrong with it
    return prefix


class DocumentPublisher:
    """Publishes every ``(name, doc)`` it is called with on ``PREFIX/<name>``::

        RE.subscribe(DocumentPublisher(bus, prefix="RE0"))

    One publisher for all documents, so a subscriber of ``PREFIX/*`` (a RemoteDispatcher)
    gets them in the order the RunEngine emitted them. A document that cannot be encoded
    raises ``vbus.EncodeError`` in the RunEngine's callback (nothing is sent); once the bus
    is closed, ``vbus.Closed``. ``close()`` closes its publisher (the bus's close does too).
    """

    def __init__(self, bus: Bus, prefix: str = "RE0") -> None:
        self._prefix = _check_prefix(prefix)
        # topic per document name, validated once
        self._topics = {n.value: f"{prefix}/{n.value}" for n in DocumentNames}
        self._publisher: Publisher = bus.publisher()

    @property
    def prefix(self) -> str:
        return self._prefix

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        topic = self._topics.get(name)
        if topic is None:
            topic = f"{self._prefix}/{name}"
            validate_topic(topic)
        self._publisher.publish(topic, doc)

    def close(self) -> None:
        self._publisher.close()

    def __repr__(self) -> str:
        return f"<vbus.bluesky.DocumentPublisher {self._prefix!r}>"


class RemoteDispatcher:
    """Delivers the documents published by a DocumentPublisher with the same ``prefix`` to
    callbacks, in the order they were published.

    ``address`` is a broker's address (``vbus broker``, or a ``Bus(bind=...)``), connected
    with ``vbus.connect(address, timeout, keypair=..., server_key=...)``, or a ``vbus.Bus``
    to use as it is (not closed by ``stop()``). The constructor returns once the
    subscription is active: documents published from then on are kept for ``start()``
    (up to ``hwm`` ZeroMQ messages, the bus's default if None).

    Callbacks subscribe as to ``bluesky.run_engine.Dispatcher`` (``subscribe(func,
    name='all')`` returns a token for ``unsubscribe``) and run on the thread of ``start()``.
    A callback that raises is logged with its traceback and counted in ``errors``; the
    other callbacks and the next documents go on, as with bluesky's. Lost documents (a
    consumer so slow that its queue overflowed) are never silent: logged, and counted in
    ``lost``.
    """

    def __init__(
        self,
        address: str | Bus,
        prefix: str = "RE0",
        *,
        timeout: float = 5.0,
        hwm: int | None = None,
        keypair: Keypair | None = None,
        server_key: str | None = None,
    ) -> None:
        self._prefix = _check_prefix(prefix)
        self._cut = len(prefix) + 1
        self._callbacks: dict[int, tuple[str, DocumentCallback]] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._lost = 0
        self._errors = 0
        self._started = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        if isinstance(address, Bus):
            self._bus, self._owns_bus = address, False
        else:
            self._bus = connect(address, timeout, keypair=keypair, server_key=server_key)
            self._owns_bus = True
        try:
            self._sub = self._bus.subscribe(f"{prefix}/*", hwm=hwm, on_loss=self._on_loss)
        except BaseException:
            if self._owns_bus:
                self._bus.close()
            raise

    # -- callbacks --------------------------------------------------------------------------
    def subscribe(self, func: DocumentCallback, name: str = "all") -> int:
        """Call ``func(name, doc)`` for every document (or only those called ``name``), after
        the callbacks subscribed before it; returns a token for ``unsubscribe``."""
        if not callable(func):
            raise TypeError(f"callback must be callable, not {func!r}")
        if name != "all" and name not in _NAMES:
            raise ValueError(f"name must be 'all' or a document name {sorted(_NAMES)}, "
                             f"not {name!r}")
        token = next(self._tokens)
        with self._lock:
            self._callbacks = {**self._callbacks, token: (name, func)}
        return token

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._callbacks = {t: c for t, c in self._callbacks.items() if t != token}

    def unsubscribe_all(self) -> None:
        with self._lock:
            self._callbacks = {}

    # -- running ----------------------------------------------------------------------------
    def start(self, block: bool = True) -> None:
        """Deliver documents until ``stop()``. Blocking, like bluesky's; ``block=False``
        delivers them on a thread of its own (``vbus-dispatcher-<prefix>``) and returns at
        once. Ctrl-C interrupts a blocking start(); it then stops. A RemoteDispatcher starts
        once: after stop(), start() raises RuntimeError."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self!r} was stopped: make a new RemoteDispatcher")
            if self._started:
                raise RuntimeError(f"{self!r} was already started")
            self._started = True
            if not block:
                self._thread = threading.Thread(
                    target=self._run, name=f"vbus-dispatcher-{self._prefix}"
                )
                self._thread.start()
                return
        try:
            self._run()
        finally:
            self.stop()

    def _run(self) -> None:
        cut = self._cut
        for msg in self._sub:
            name = msg.topic[cut:]
            if name not in _NAMES:
                log.warning("RemoteDispatcher %r: skipped %r, not a bluesky document name",
                            self._prefix, msg.topic)
                continue
            doc = msg.data
            for wanted, func in self._callbacks.values():  # a snapshot: copied on change
                if wanted != "all" and wanted != name:
                    continue
                try:
                    func(name, doc)
                except Exception:
                    # as bluesky's own dispatcher (its event loop logs it): report, go on
                    self._errors += 1
                    log.exception("RemoteDispatcher %r: callback %r raised on a %s document",
                                  self._prefix, func, name)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop delivering (a callback in progress finishes) and let go of the connection,
        within ``timeout``. Callable from a callback, from a signal handler, from any thread;
        idempotent."""
        deadline = Deadline(timeout)
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._sub.close(timeout=deadline.remaining() or 0.0)
        if not join(thread, deadline):
            log.warning("RemoteDispatcher %r: a callback did not return within %g s; "
                        "leaving its thread", self._prefix, timeout)
        if self._owns_bus:
            self._bus.close(timeout=deadline.remaining() or 0.0)

    close = stop

    def __enter__(self) -> RemoteDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def lost(self) -> int:
        """Documents lost before they reached this dispatcher (its queue was full)."""
        return self._lost

    @property
    def errors(self) -> int:
        """Documents on which a callback raised."""
        return self._errors

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _on_loss(self, topic: str, sender: str, count: int) -> None:
        self._lost += count
        log.warning("RemoteDispatcher %r: %d document(s) on %r from %s were lost",
                    self._prefix, count, topic, sender)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running" if self._started else "ready"
        return f"<vbus.bluesky.RemoteDispatcher {self._prefix!r} {state}>"

