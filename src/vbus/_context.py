"""The ZeroMQ context's lifetime: ended after its last socket, by whoever closes that socket.

``zmq.Context.term()`` waits for every socket of the context to close, and a socket may only be
closed by the thread that uses it. So nobody waits in ``term()``: the bus releases the context
when it closes, and the context is terminated at the first moment both have happened — the
bus released it and no socket is open — by the thread that brought that moment about (the
bus's close(), or a receiver closing its socket after close() returned). Until then the keeper
holds the context, so that garbage collection never destroys it under a socket in use, and a
program exits without waiting for it (the process's end takes the rest).
"""

from __future__ import annotations

import threading

import zmq

_KEPT: set[ContextKeeper] = set()  # contexts not yet terminated, kept from the collector


class ContextKeeper:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        if context is None:
            context = zmq.Context()
            # Not blocky: every socket, libzmq's own monitor sockets included, lingers 0
            # unless its owner says otherwise at close, so term() never waits on a socket
            # closed in a hurry (an interrupted constructor's, a monitor's stop event).
            context.set(zmq.BLOCKY, 0)
        self.context: zmq.Context[zmq.Socket[bytes]] = context
        self._lock = threading.RLock()  # re-entrant: a signal handler may close a bus
        self._released = False
        self._terminated = False
        self._forked = False
        _KEPT.add(self)

    @property
    def terminated(self) -> bool:
        return self._terminated

    def release(self) -> bool:
        """The owner is done with the context; True if it is terminated now."""
        self._released = True
        return self._try_term()

    def socket_closed(self) -> None:
        """A socket of this context was closed; end the context if it was the last."""
        if self._released:
            self._try_term()

    def forked(self) -> None:
        """In a child after fork: the context is the parent's; never touch it."""
        self._forked = True  # kept in _KEPT: collecting it would try to end it

    def open_sockets(self) -> int:
        return sum(1 for s in list(getattr(self.context, "_sockets", ())) if not s.closed)

    def _try_term(self) -> bool:
        with self._lock:
            if self._terminated or self._forked:
                return self._terminated
            if self.open_sockets():
                return False
            self._terminated = True
        self.context.term()  # no socket left: returns at once (after any linger)
        _KEPT.discard(self)
        return True
