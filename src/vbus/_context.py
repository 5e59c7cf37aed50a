"""The ZeroMQ context's lifetime: ended after its last socket, by whoever closes that socket.

``zmq.Context.term()`` waits for every socket of the context to close, and a socket may only be
closed by the thread that uses it. So nobody waits in ``term()``: the bus releases the context
when it closes, and the context is terminated at the first moment both have happened — the
bus released it and no socket is open — by the thread that brought that moment about (the
bus's close(), or a receiver closing its socket after close() returned). Until then the keeper
holds the context, so that garbage collection never destroys it under a socket in use, and a
program exits without waiting for it (the process's end takes the rest).

The keeper counts every socket that exists in libzmq, not only those pyzmq has finished making:
Ctrl-C inside ``context.socket()`` lands in pyzmq's Python code after ``zmq_socket()`` and before
the socket joins ``context._sockets``; such a socket is invisible to a plain count, lives on in
the traceback's frames, and a ``term()`` that trusted the count would wait for it forever (the
frames, hence the socket, die only after term returns). So our sockets join the count before
their libzmq socket exists, and leave it only after it is closed: a released context with such a
socket is left to whoever closes it (a constructor's cleanup: ``close_sockets``), never waited on.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import zmq

_KEPT: set[ContextKeeper] = set()  # released (or forked) and not terminated: kept from the GC


class _Socket(zmq.Socket[bytes]):
    """A socket counted by its context from before its libzmq socket exists until after it is
    closed, whatever moment Ctrl-C lands at."""

    def __init__(self, context: _Context, socket_type: int, **kwargs: Any) -> None:
        context._add_socket(self)  # first: not yet a libzmq socket, so counted as closed
        super().__init__(context, socket_type, **kwargs)

    def close(self, linger: int | None = None) -> None:
        # pyzmq uncounts first and closes second: Ctrl-C in between leaves an open socket
        # nobody counts. Close first; and tell the keeper, who may end the context now.
        super(zmq.Socket, self).close(linger=linger)
        context = self.context
        if isinstance(context, _Context):
            context._rm_socket(self)
            keeper = context.keeper()
            if keeper is not None:
                keeper.socket_closed()

    # Collected: closed by pyzmq's C code alone. pyzmq's own __del__ is Python code, where
    # Ctrl-C can land (every socket a constructor drops on its way out is collected inside
    # it) only to be swallowed as "Exception ignored in __del__": a lost Ctrl-C. (A socket
    # collected open is one that Ctrl-C cut short inside pyzmq; the constructors' cleanup
    # closes those, see ContextKeeper.close_sockets.)
    __del__ = zmq.backend.Socket.close


def _no_keeper() -> ContextKeeper | None:
    return None


class _Context(zmq.Context[zmq.Socket[bytes]]):
    _socket_class = _Socket
    keeper: Callable[[], ContextKeeper | None] = _no_keeper  # a weakref once kept

    def __init__(self) -> None:
        # pyzmq's Cython init checks for signals after making the libzmq context and before
        # noting the pid that term() insists on: Ctrl-C there leaves a context that pyzmq
        # never ends, and its fds stay till exit. The init clears ``closed`` right next to
        # noting the pid, so ``closed`` still set afterwards tells that case apart.
        self.closed = True
        try:
            super().__init__()
        except BaseException:
            handle = self.underlying
            if handle and self.closed:
                zmq.Context.shadow(handle).term()  # a shadow with its pid noted can end it
            raise


class ContextKeeper:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        if context is None:
            context = _Context()
            context.keeper = weakref.ref(self)
            # Not blocky: every socket, libzmq's own monitor sockets included, lingers 0
            # unless its owner says otherwise at close, so term() never waits on a socket
            # closed in a hurry (an interrupted constructor's, a monitor's stop event).
            context.set(zmq.BLOCKY, 0)
        self.context: zmq.Context[zmq.Socket[bytes]] = context
        self._lock = threading.RLock()  # re-entrant: a signal handler may close a bus
        self._released = False
        self._terminated = False
        self._forked = False

    @property
    def terminated(self) -> bool:
        return self._terminated

    def release(self) -> bool:
        """The owner is done with the context; True if it is terminated now."""
        # Kept from here on, not from birth: until now the owner holds us, and a keeper whose
        # owner never got hold of it (Ctrl-C inside Bus() before the core was stored) has no
        # socket and is freed with its context, fds and all, instead of staying kept forever.
        if not self._terminated:
            _KEPT.add(self)
        self._released = True
        return self._try_term()

    def socket_closed(self) -> None:
        """A socket of this context was closed; end the context if it was the last."""
        if self._released:
            self._try_term()

    def forked(self) -> None:
        """In a child after fork: the context is the parent's; never touch it."""
        self._forked = True
        _KEPT.add(self)  # kept for good: collecting it would try to end it

    def close_sockets(self) -> None:
        """Close every socket of the context, half-made ones included. Only for a context that
        no other thread has used: the cleanup of a constructor interrupted by Ctrl-C, whose
        half-made sockets live on in the traceback's frames."""
        for sock in list(getattr(self.context, "_sockets", ())):
            sock.close(0)

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
