"""The readiness protocol, in one place: nothing is returned to the user before it is ready.

vbus's first promise is that no message is lost to a slow joiner: a publisher or subscriber is
handed out only once the broker has proved that it takes its messages or sends it what it
subscribed to. There are three handshakes, each with a deadline, each ended at once (Closed)
by the bus's ``closing`` waker when close() begins in another thread:

1. ``probe`` (in ``vbus.connect()``): an XPUB connects to the broker's publish port; the
   broker's XSUB subscribing to it proves a broker is there. A socket monitor tells a refused
   CURVE key or a failed security handshake from silence, so the error says which.
2. ``connect_publisher``: the same, for the socket the Publisher keeps. Any subscription
   message the broker sends (``_proto.control.is_acceptance``) proves the link: from then on
   the broker holds every message published (its XSUB subscribes to everything, or, for network
   peers, the gate's SUB subscribes to every prefix a client may send), so the first message
   published is never lost.
3. ``connect_subscriber``: subscribe to the pattern's prefixes, then to
   ``want/<token>\\0<pattern>`` (which retained values to replay), then to ``ready/<token>``
   last. The broker's service sees each subscription only after the XPUB has applied it and
   answers on the ready token; that confirmation proves everything subscribed before it
   active (``_proto/control.py`` explains why the byte order of a not-yet-connected SUB works
   out). Retained values come as replays before the confirmation; live messages that arrive
   before it are held by the inbox and delivered after the replays, with the copy of a retained
   value seen twice across that seam dropped (``_proto/inbox.py``, the seam).

The bus side (``_Core.handshake`` in _bus.py) counts the handshakes under way, so that close()
wakes them and closes the waker only when the last has left.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from ._errors import Closed, ConnectError
from ._proto import control as _control
from ._proto.inbox import Inbox
from ._proto.topics import Pattern
from ._subscriber import recv_into
from ._threads import Deadline
from ._waker import Waker


def wait_readable(sock: zmq.Socket[bytes], deadline: Deadline, closing: Waker | None) -> bool:
    """Wait for ``sock`` until ``deadline``; False on timeout. Closed as soon as the bus's
    ``closing`` waker fires: a handshake is a waiter too, and close() wakes every waiter."""
    if closing is None:
        return bool(sock.poll(int((deadline.remaining() or 0.0) * 1000)))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(closing.fileno(), zmq.POLLIN)
    events = dict(poller.poll(int((deadline.remaining() or 0.0) * 1000)))
    if closing.fileno() in events:
        raise Closed("the bus was closed")
    return sock in events


def connect_publisher(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    timeout: float,
    hwm: int,
    configure: Callable[[zmq.Socket[bytes]], None] | None = None,
    closing: Waker | None = None,
) -> zmq.Socket[bytes]:
    """An XPUB connected to ``endpoint``, returned once the broker has subscribed to it.
    ``configure`` sets options (CURVE keys) before it connects; ``closing`` (the bus's)
    ends the wait with Closed."""
    sock = context.socket(zmq.XPUB)
    try:
        sock.linger = 0
        sock.sndhwm = hwm
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        if configure is not None:
            configure(sock)
        sock.connect(endpoint)
        deadline = Deadline(timeout)
        while True:
            if not wait_readable(sock, deadline, closing):
                raise ConnectError(f"no broker answered at {endpoint} within {timeout:g} s")
            if _control.is_acceptance(sock.recv()):
                return sock
    except BaseException:
        sock.close(0)
        raise


def connect_subscriber(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    pattern: Pattern,
    *,
    timeout: float,
    hwm: int,
    type: Any = None,
    max_assembly_bytes: int,
    configure: Callable[[zmq.Socket[bytes]], None] | None = None,
    closing: Waker | None = None,
    shm: Any = None,
) -> tuple[zmq.Socket[bytes], Inbox]:
    """A SUB socket whose subscription the broker has confirmed active, and its inbox.

    The handshake: subscribe to the pattern's prefixes, then to ``want/<token>\\0<pattern>``
    (which retained values to replay), then to ``ready/<token>`` last; the broker confirms on
    the ready token once the XPUB has applied it, and everything subscribed before it is
    active then (see _proto/control.py for why the byte order works out). Whatever arrived before
    the confirmation is already in the inbox, in the order the inbox delivers it.
    """
    sock = context.socket(zmq.SUB)
    try:
        sock.linger = 0
        sock.rcvhwm = hwm
        if configure is not None:
            configure(sock)
        token = secrets.token_hex(8).encode()
        ready = _control.READY + token + b"\0"
        inbox = Inbox(pattern, ready, type, max_assembly_bytes=max_assembly_bytes)
        inbox.shm = shm  # shm: maps shared-memory frames (an _shm.Resolver), or None
        for prefix in pattern.prefixes:
            sock.subscribe(prefix)
            if shm is not None and shm.twins:  # shm: the bytes twins of those frames too
                sock.subscribe(_control.TWIN + prefix)
        want = _control.want_subscription(token, pattern.text)
        sock.subscribe(want)
        sock.subscribe(ready)  # last: its confirmation covers everything before it
        sock.connect(endpoint)
        deadline = Deadline(timeout)
        while not inbox.confirmed:
            if not wait_readable(sock, deadline, closing):
                raise ConnectError(
                    f"broker at {endpoint} did not confirm subscription {pattern.text!r} "
                    f"within {timeout:g} s"
                )
            while recv_into(sock, inbox) and not inbox.confirmed:
                pass
        sock.unsubscribe(want)
        return sock, inbox
    except BaseException:
        sock.close(0)
        if shm is not None:
            shm.close()
        raise


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def probe(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, timeout: float,
           configure: Callable[[zmq.Socket[bytes]], None] | None) -> str | None:
    """None if a broker at ``endpoint`` takes a publisher within ``timeout``, else why not
    (a template for ConnectError). A monitor tells a refusal from silence."""
    sock = context.socket(zmq.XPUB)
    try:
        sock.linger = 0
        # The PAIR first, then the monitor it listens to (not get_monitor_socket, which makes
        # them the other way round and stores the PAIR only at its end): Ctrl-C at any
        # moment leaves nothing the finally clauses below cannot close. libzmq's own end of
        # the monitor goes with ``sock``.
        monitor = context.socket(zmq.PAIR)
        try:
            monitor_address = f"inproc://vbus-probe-{secrets.token_hex(8)}"
            sock.monitor(monitor_address, _HANDSHAKE_FAILED)
            monitor.connect(monitor_address)
            if configure is not None:
                configure(sock)
            sock.connect(endpoint)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            deadline = Deadline(timeout)
            while not deadline.expired():
                events = dict(poller.poll(int((deadline.remaining() or 0.0) * 1000) + 1))
                if sock in events and _control.is_acceptance(sock.recv()):
                    return None
                if monitor in events:
                    # A failed handshake is final: ZeroMQ would only fail it again on retry.
                    event = parse_monitor_message(monitor.recv_multipart())["event"]
                    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        return ("the broker at {address} refused this client's key "
                                "(not authorized)")
                    return ("the security handshake with {address} failed: check this "
                            "client's keys and the broker's public key (does the broker use "
                            "CURVE keys, and is it this one?)")
            return "no vbus broker answered at {address} within {timeout:g} s"
        finally:
            monitor.close(0)
    finally:
        sock.close(0)
