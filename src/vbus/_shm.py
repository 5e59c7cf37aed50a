"""Shared-memory frames, the I/O side: a publisher's pool and a subscriber's resolver.

Mechanism (Linux only; elsewhere everything takes the bytes path):
- The pool is a memfd (``os.memfd_create``), sized once and sealed against shrinking and
  growing (so no mapping of it can ever SIGBUS, even after its publisher died) and against
  new writable mappings (``F_SEAL_FUTURE_WRITE``: only the publisher's own mapping writes).
  It has no name in any filesystem: nothing exists in /dev/shm, and the memory goes back to
  the kernel when the last process that maps it unmaps it or dies, ``kill -9`` included.
- The fd reaches subscribers over an abstract-namespace unix socket (``\\0vbus-shm-<random>``,
  SOCK_SEQPACKET, SCM_RIGHTS), also without a filesystem entry. The pool thread accepts
  only peers of the same uid (SO_PEERCRED). Abstract sockets live in a network namespace:
  a subscriber with the same boot id and network namespace as the publisher (the
  descriptor's ``host``) can connect; any other is not on the same host.
- Holds (see _proto/shm.py) are taken, acknowledged and released over that socket. The
  subscriber's views are read-only numpy arrays over its read-only mapping, released when
  garbage-collected (a weak reference with a callback on the array that owns the view's
  memory: every slice or reshape of it keeps that array alive), and said to the pool in
  batches (``_Link.release``: one packet, one wake-up of the pool's thread, for several
  frames; a block may stay held a little longer than its view, never less). A subscriber
  that dies closes its socket, and the pool releases its holds.

Threads: one per pool (``vbus-shm-<name>``), joined at close. Nothing blocks without a
deadline; the pool thread never blocks in a send (a subscriber that cannot take a packet
is disconnected, and its holds released).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import select
import selectors
import socket
import struct
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any

import zmq

from ._errors import DecodeError
from ._proto import shm as proto
from ._proto import wire as _wire
from ._proto.topics import compile_pattern

try:
    import fcntl
except ImportError:  # Windows: no shared-memory frames
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("vbus.shm")
TWIN_TOPIC = proto.TWIN.decode()

AVAILABLE = sys.platform == "linux" and hasattr(os, "memfd_create") and fcntl is not None
F_SEAL_FUTURE_WRITE = 0x0010
SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
         if AVAILABLE else 0)
MAX_CLIENTS = 256
MAX_LINKS = 64
"""Pools one subscriber keeps connected at most (one per publisher it hears)."""
GOT_BATCH = 16
"""Frames a subscriber receives, at most, before it says so without waiting for a release."""
RELEASE_BATCH = 8
"""Views' releases a subscriber keeps, at most, before it sends them in one packet."""
RELEASE_DELAY = 0.002
"""A release waits at most this long (s) for others to share its packet, as seen at the next
release or frame; with none to come (the stream stopped), at the subscriber's close."""
RELEASE_SHARE = 16
"""Releases kept on a subscriber's side free at most 1/RELEASE_SHARE of the pool (an eighth of
its budget, half the pool): with a small pool, or large frames, each release goes at once."""
CONNECT_TIMEOUT = 1.0
"""How long a subscriber waits for a pool's welcome or a claim's answer."""
_UCRED = struct.Struct("3i")
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


class Lost(Exception):
    """A frame's data cannot be had (not on this host, its pool gone, its block reused):
    counted as a lost message."""


_host: str | None = None


def host_id() -> str:
    """This host and network namespace, as the pool's socket sees them."""
    global _host
    if _host is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            netns = os.stat("/proc/self/ns/net").st_ino
        except OSError:
            boot, netns = secrets.token_hex(8), 0  # unknown: never the same as anyone
        _host = f"{boot}/{netns}"
    return _host


def _numpy() -> Any:
    return sys.modules.get("numpy")


class Pool:
    """A publisher's shared pool. ``place`` and ``loan`` are called under the publisher's
    lock; the ledger is shared with the pool thread under ``_lock``."""

    def __init__(self, size: int = proto.DEFAULT_POOL_BYTES,
                 twins: TwinWatcher | None = None) -> None:
        if not AVAILABLE:
            raise OSError("shared-memory frames need Linux (memfd)")
        import numpy

        self._np = numpy
        self.ledger = proto.Ledger(size)
        size = self.ledger.size
        self.name = f"vbus-shm-{secrets.token_hex(8)}"
        self.host = host_id()
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # held by whoever reads subscribers' packets
        self._returned: deque[int] = deque()  # loans given back by their finalizers
        self._loans: dict[int, Any] = {}  # serial -> the loan's block, until published/given back
        self._conns: dict[int, socket.socket] = {}
        # The same connections, for the publisher's own look at them (``_drain``): a poll
        # object kept up to date costs a tenth of a select() over the list, every frame.
        self._polled = select.poll()
        self.twins = twins  # which topics have subscribers that take bytes (None: nobody)
        self.sent = 0
        self.exhausted = 0
        self.twinned = 0
        self._encoder = _wire.new_encoder()
        self._descrs: dict[Any, Any] = {}  # dtype -> its .npy description (numpy's is slow)
        self._closed = False
        fds: list[Any] = []
        try:
            self._fd = os.memfd_create("vbus-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fds.append(self._fd)
            os.ftruncate(self._fd, size)
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, SEALS)
            self._base = numpy.frombuffer(self._mm, numpy.uint8)
            self._addr = self._base.ctypes.data
            self._listener = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            fds.append(self._listener)
            self._listener.bind("\0" + self.name)
            self._listener.listen(64)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            fds += [self._wake_r, self._wake_w]
            self._wake_w.setblocking(False)
            self._thread = threading.Thread(target=self._serve, name=self.name)
            self._thread.start()
        except BaseException:
            for f in fds:
                if isinstance(f, int):
                    os.close(f)
                else:
                    f.close()
            raise

    @property
    def size(self) -> int:
        return self.ledger.size

    # -- the publisher's side -----------------------------------------------------------------
    def place(self, topic: str, data: Any) -> tuple[bytes, _wire.Payload | None] | None:
        """``data`` placed in the pool: its descriptor, and its bytes twin if some subscriber
        of ``topic`` takes bytes. None when it takes the bytes path (not a large numpy array,
        or no room: counted in ``exhausted``)."""
        descriptor = self.place_frame(topic, data)
        if descriptor is None:
            return None
        twin = None
        if self.twins is not None and self.twins.wanted(topic):
            array = data
            if array.base is not None and array.ctypes.data - self._addr in range(self.size):
                array = array.copy()  # a loan: its block may be reused before the twin leaves
            twin = _wire.encode_payload(array, self._encoder)
            self.twinned += 1
        return descriptor, twin

    def place_frame(self, topic: str, data: Any) -> bytes | None:
        """The descriptor of ``data`` placed in the pool, or None (see ``place``)."""
        np = self._np
        if type(data) is not np.ndarray or data.nbytes < proto.SHM_THRESHOLD or self._closed:
            return None
        dtype = data.dtype
        if dtype.hasobject:
            return None  # the bytes path names the error
        block = self._take_loan(data)
        if block is None:
            self._drain()
            with self._lock:
                self._give_back()
                block = self.ledger.allocate(data.nbytes)
            if block is None:
                self.exhausted += 1
                return None
            try:
                # Raw bytes, padding included (as the bytes path sends them): one copy.
                src = data if data.flags.c_contiguous else np.ascontiguousarray(data)
                dst = np.frombuffer(self._mm, np.uint8, data.nbytes, block.offset)
                dst[:] = src.reshape(-1).view(np.uint8)
            except BaseException:
                with self._lock:
                    self.ledger.unpin(block)
                raise
        descr = self._descrs.get(dtype)
        if descr is None:
            descr = np.lib.format.dtype_to_descr(dtype)
            if len(self._descrs) < 256:
                self._descrs[dtype] = descr
        descriptor = proto.Descriptor(self.name, self.host, block.serial, block.offset,
                                      data.nbytes, descr, data.shape)
        with self._lock:
            skipped = self.ledger.publish(block, topic)
            conns = [self._conns.get(cid) for cid in skipped]
        for conn in conns:
            if conn is not None:
                self._notify(conn, proto.SERIAL.pack(proto.UNHELD, block.serial))
        self.sent += 1
        return proto.encode_descriptor(descriptor)

    def _take_loan(self, data: Any) -> proto.Block | None:
        if not self._loans:
            return None
        offset = data.ctypes.data - self._addr
        if not 0 <= offset < self.size or not data.flags.c_contiguous:
            return None
        for serial, block in list(self._loans.items()):
            if block.offset == offset and block.nbytes == data.nbytes:
                del self._loans[serial]
                data.flags.writeable = False  # it belongs to its subscribers now
                return block  # type: ignore[no-any-return]
        return None

    def loan(self, shape: Any, dtype: Any) -> Any:
        """A writable array in the pool, or None when there is no room."""
        np = self._np
        dtype = np.dtype(dtype)
        count = 1
        for n in (shape if isinstance(shape, tuple) else (shape,)):
            count *= int(n)
        nbytes = count * dtype.itemsize
        if dtype.hasobject or nbytes < proto.SHM_THRESHOLD or self._closed:
            return None
        self._drain()
        with self._lock:
            self._give_back()
            block = self.ledger.allocate(nbytes)
        if block is None:
            self.exhausted += 1
            return None
        array = np.frombuffer(self._mm, dtype, count, block.offset).reshape(shape)
        self._loans[block.serial] = block
        weakref.finalize(array, self._returned.append, block.serial)
        return array

    def _give_back(self) -> None:
        # Under _lock: loans garbage-collected without being published.
        while self._returned:
            serial = self._returned.popleft()
            block = self._loans.pop(serial, None)
            if block is not None:
                self.ledger.unpin(block)

    def _drain(self) -> None:
        # The releases subscribers sent, taken here before allocating rather than left for
        # the pool thread alone: on a busy machine that thread may not have run since, and
        # every block it has not yet seen given back pushes the copy into colder memory.
        if not self._conns or not self._reading.acquire(blocking=False):
            return  # nobody to hear, or the pool thread is reading: it takes them
        try:
            self._drain_locked()
        finally:
            self._reading.release()

    def _drain_locked(self) -> None:
        # Under _reading: the pool thread drops (unregisters and closes) a connection only
        # under it too, so every fd the poll names is a live connection's.
        try:
            ready = self._polled.poll(0)
        except OSError:
            return
        for fd, _ in ready:
            conn = self._conns.get(fd)
            if conn is None:
                continue
            for _ in range(64):
                try:
                    packet = conn.recv(proto.MAX_PACKET, socket.MSG_DONTWAIT)
                except OSError:
                    break
                if not packet:
                    break  # its end: the pool thread drops it
                try:
                    self._handle(conn, conn.fileno(), packet)
                except (ValueError, struct.error, DecodeError):
                    self._notify_cut(conn)
                    break

    def _notify_cut(self, conn: socket.socket) -> None:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _notify(self, conn: socket.socket, packet: bytes) -> None:
        try:
            conn.send(packet, socket.MSG_DONTWAIT)
        except OSError:
            # It does not read its socket (stalled) or has gone: cut it, its holds go too.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the pool thread --------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(self._listener, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        return
                    if sock is self._listener:
                        self._accept(sel)
                    else:
                        assert isinstance(sock, socket.socket)
                        self._take(sel, sock)
        except Exception:
            log.exception("vbus: shared-memory pool %s failed; its frames take the bytes path",
                          self.name)
            self._closed = True
        finally:
            with self._reading, self._lock:  # not under the publisher's look at them
                for cid, conn in list(self._conns.items()):
                    self._polled.unregister(cid)
                    conn.close()
                self._conns.clear()
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds: try again when one is free
                log.warning("vbus: shared-memory pool %s cannot accept: %s", self.name, exc)
                return
            uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _UCRED.size))[1]
            if uid != os.getuid() or len(self._conns) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            with self._lock:
                self._conns[conn.fileno()] = conn
                self._polled.register(conn.fileno(), select.POLLIN)
            sel.register(conn, selectors.EVENT_READ)

    def _take(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        # One reader at a time (the publisher's thread drains too): a subscriber's packets
        # must be handled in the order it sent them.
        with self._reading:
            self._take_locked(sel, conn)

    def _take_locked(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        cid = conn.fileno()
        while True:
            try:
                packet = conn.recv(proto.MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:
                self._drop(sel, conn, cid)
                return
            try:
                self._handle(conn, cid, packet)
            except (ValueError, struct.error, DecodeError) as exc:
                log.info("vbus: shared-memory pool %s: bad packet (%s); peer cut", self.name, exc)
                self._drop(sel, conn, cid)
                return

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket, cid: int) -> None:
        sel.unregister(conn)
        with self._lock:
            self.ledger.drop_client(cid)
            self._conns.pop(cid, None)
            try:
                self._polled.unregister(cid)
            except KeyError:
                pass
        conn.close()

    def _handle(self, conn: socket.socket, cid: int, packet: bytes) -> None:
        op = packet[0]
        if op == proto.GOT:
            received, released = proto.parse_got(packet)
            with self._lock:
                for serial in sorted(received):
                    self.ledger.got(cid, serial)
                if released:
                    self.ledger.release(cid, released)
        elif op == proto.CLAIM:
            _, serial = proto.SERIAL.unpack(packet)
            with self._lock:
                ok = self.ledger.claim(cid, serial)
            self._notify(conn, proto.CLAIMED_PACKET.pack(proto.CLAIMED, serial, int(ok)))
        elif op == proto.HELLO:
            try:
                patterns = [compile_pattern(p) for p in proto.parse_hello(packet)]
            except Exception as exc:
                raise ValueError(f"bad hello: {exc}") from None

            def matches(topic: str) -> bool:
                # A pattern without a matcher is exact by its ZeroMQ prefixes alone.
                wire = topic.encode("ascii") + b"\0"
                return any(wire.startswith(p.prefixes) if p.matches is None else p.matches(topic)
                           for p in patterns)

            with self._lock:
                first = self.ledger.add_client(cid, matches)
            welcome = proto.WELCOME_PACKET.pack(proto.WELCOME, self.size, first)
            try:
                socket.send_fds(conn, [welcome], [self._fd], socket.MSG_DONTWAIT)
            except OSError:
                conn.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(f"unknown op {op}")

    # -- closing ----------------------------------------------------------------------------
    def close(self, timeout: float = 1.0) -> bool:
        """Stop the pool thread and free the publisher's side; subscribers' mappings stay
        valid until they let go. False if the thread did not end in time."""
        if self._closed and not self._thread.is_alive():
            return True
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(max(timeout, 0.0))
        if self._thread.is_alive():
            return False
        if self.twins is not None:
            self.twins.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        del self._base
        _let_go(self._mm)
        del self._mm  # what still maps it (loans) keeps the mmap object alone
        return True


class TwinWatcher:
    """A publisher's view of which topics have subscribers that take bytes (the broker's
    service publishes the twin prefixes subscribed). Until the service's first answer has
    come, every topic is taken to have some: twins are sent rather than missed. Its SUB
    socket is used under the publisher's lock only, and closed there."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                 configure: Callable[[zmq.Socket[bytes]], None] | None = None) -> None:
        sock = context.socket(zmq.SUB)
        try:
            sock.linger = 0
            if configure is not None:
                configure(sock)
            self._token = proto.TWINS_STATE + secrets.token_hex(8).encode() + b"\0"
            sock.subscribe(proto.TWINS_STATE)
            sock.subscribe(self._token[:-1])
            sock.connect(endpoint)
        except BaseException:
            sock.close(0)
            raise
        self._sock = sock
        self.known = False
        self.prefixes: tuple[bytes, ...] = ()
        self._cache: dict[str, bool] = {}

    def _take(self, first: bytes) -> None:
        # The topic is 0xFD-led (not ASCII): the header follows the terminator.
        offset = first.find(b"\0") + 1 + _wire.HEADER_SIZE
        try:
            self.prefixes = tuple(proto.parse_twin_state(memoryview(first)[offset:]))
        except Exception:  # not from our broker's service: nothing else can send 0xFD
            return
        self._cache.clear()
        if first.startswith(self._token):
            self.known = True

    def wanted(self, topic: str) -> bool:
        """Whether some subscriber takes ``topic`` as bytes (as last heard)."""
        sock = self._sock
        try:
            # Plain ints: pyzmq's enums make ``&`` a Python call (enum.Flag), every publish.
            while int(sock.getsockopt(_EVENTS)) & _POLLIN:  # poll() costs ten times more
                first = sock.recv(_NOBLOCK)
                while sock.rcvmore:
                    sock.recv(_NOBLOCK)
                self._take(first)
        except zmq.ZMQError:
            pass
        if not self.known:
            return True
        hit = self._cache.get(topic)
        if hit is None:
            if not self.prefixes:
                return False
            wire = topic.encode("ascii") + b"\0"
            hit = any(wire.startswith(p) for p in self.prefixes)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[topic] = hit
        return hit

    def close(self) -> None:
        self._sock.close(0)


class Placer:
    """A publisher's shared-memory side (``Outbox.shm``): its pool and twin watcher, made
    on the first frame that needs them. Called under the publisher's lock."""

    def __init__(self, size: int, watcher: Callable[[], TwinWatcher]) -> None:
        self._size = size
        self._watcher = watcher
        self.pool: Pool | None = None
        self._failed = False

    def _start(self) -> Pool | None:
        if self._failed:
            return None
        try:
            import numpy  # noqa: F401  (frames are numpy arrays)

            watcher = self._watcher()
            try:
                self.pool = Pool(self._size, watcher)
            except BaseException:
                watcher.close()
                raise
        except (OSError, ImportError, zmq.ZMQError) as exc:
            self._failed = True
            log.warning("vbus: no shared-memory pool (%s); large frames go as bytes", exc)
            return None
        return self.pool

    def place(self, topic: str, data: Any) -> tuple[bytes, _wire.Payload | None] | None:
        np = _numpy()
        if np is None or type(data) is not np.ndarray or data.nbytes < proto.SHM_THRESHOLD:
            return None
        pool = self.pool or self._start()
        return None if pool is None else pool.place(topic, data)

    def loan(self, shape: Any, dtype: Any) -> Any:
        pool = self.pool or self._start()
        return None if pool is None else pool.loan(shape, dtype)

    @property
    def sent(self) -> int:
        return self.pool.sent if self.pool is not None else 0

    @property
    def exhausted(self) -> int:
        return self.pool.exhausted if self.pool is not None else 0

    @property
    def twinned(self) -> int:
        return self.pool.twinned if self.pool is not None else 0

    def close(self) -> None:
        self._failed = True
        if self.pool is not None:
            self.pool.close()


class _Link:
    """A subscriber's connection to one publisher's pool, and its read-only mapping."""

    def __init__(self, d: proto.Descriptor, patterns: list[str]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fds: list[int] = []
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect("\0" + d.pool)
            sock.sendall(proto.hello(patterns))
            msg, fds, _, _ = socket.recv_fds(sock, 64, 1)
            if len(msg) != proto.WELCOME_PACKET.size or msg[0] != proto.WELCOME or len(fds) != 1:
                raise OSError("no welcome from the pool")
            _, size, first = proto.WELCOME_PACKET.unpack(msg)
            fd = fds[0]
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != (
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            ) or os.fstat(fd).st_size < size:
                raise OSError("the pool is not sealed: a mapping of it could fault")
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)  # the mapping keeps the memory
        sock.setblocking(False)
        self.sock = sock
        self._poller = select.poll()  # a poll(0) is cheaper than a recv that raises EAGAIN
        self._poller.register(sock.fileno(), select.POLLIN)
        self.size = size
        self.first = first
        self.unheld: set[int] = set()
        self.dead = False
        self.views = 0
        self.closing = False
        self._released: deque[int] = deque()
        self._got: deque[int] = deque()  # received, not yet said
        self._since = 0.0  # when the oldest release not yet said was queued (0: none)
        self._pending_bytes = 0  # what the releases not yet said free
        self._share = max(size // RELEASE_SHARE, 1)
        self._watched: dict[int, tuple[weakref.ref[Any], int, int]] = {}  # views -> serials
        self._send_lock = threading.Lock()

    def poll(self) -> None:
        """Take what the pool said (frames not held for us; its end)."""
        while not self.dead and self._poller.poll(0):
            try:
                packet = self.sock.recv(proto.MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:
                self.dead = True  # the publisher closed or died: its memory stays valid
                return
            if packet[0] == proto.UNHELD and len(packet) == proto.SERIAL.size:
                self.unheld.add(proto.SERIAL.unpack(packet)[1])
                if len(self.unheld) > 65536:
                    self.unheld.clear()  # bounded; a stale entry only costs a claim

    def claim(self, serial: int) -> bool:
        if self.dead:
            return False
        with self._send_lock:
            try:
                self.sock.send(proto.SERIAL.pack(proto.CLAIM, serial))
                self.sock.settimeout(CONNECT_TIMEOUT)
                try:
                    while True:
                        packet = self.sock.recv(proto.MAX_PACKET)
                        if not packet:
                            self.dead = True
                            return False
                        if packet[0] == proto.CLAIMED:
                            _, got, ok = proto.CLAIMED_PACKET.unpack(packet)
                            if got == serial:
                                return bool(ok)
                        elif packet[0] == proto.UNHELD:
                            self.unheld.add(proto.SERIAL.unpack(packet)[1])
                finally:
                    self.sock.setblocking(False)
            except OSError:
                self.dead = True
                return False

    def got(self, serial: int) -> None:
        # Said with the releases (a packet for several frames), or once GOT_BATCH have piled
        # up; a frame's arrival also sends releases that have waited RELEASE_DELAY.
        self._got.append(serial)
        since = self._since
        if len(self._got) >= GOT_BATCH or (since and monotonic() - since >= RELEASE_DELAY):
            self.send_released()

    def watch(self, owner: Any, serial: int, nbytes: int) -> None:
        # A weak reference with a callback: a tenth of weakref.finalize's cost, which matters
        # thousands of times a second (finalize's registry also feeds the cyclic GC).
        ref = weakref.ref(owner, self._gone)
        # By id: a ref hashes as its array (unhashable).
        self._watched[id(ref)] = (ref, serial, nbytes)

    def _gone(self, ref: weakref.ref[Any]) -> None:
        entry = self._watched.pop(id(ref), None)
        if entry is not None:
            self.release(entry[1], entry[2])

    def release(self, serial: int, nbytes: int) -> None:
        """A view's end: any thread, any moment. Queued, and sent (with the frames received
        meanwhile) once RELEASE_BATCH are queued, or they free 1/RELEASE_SHARE of the pool,
        or the oldest has waited RELEASE_DELAY (seen at this release or the next frame), or
        the subscriber is closed: one packet, and one wake-up of the pool's thread, for
        several frames. Until it is sent the block stays held for us (never overwritten:
        a late release only keeps memory a little longer, within our budget)."""
        self._released.append(serial)
        self._pending_bytes += nbytes
        self.views -= 1
        now = monotonic()
        since = self._since
        if not since:
            self._since = since = now
        if (self.closing or len(self._released) >= RELEASE_BATCH
                or self._pending_bytes >= self._share or now - since >= RELEASE_DELAY):
            self.send_released()
        if self.closing and self.views <= 0:
            self._close_now()

    def send_released(self) -> None:
        if not self._send_lock.acquire(blocking=False):
            return  # the holder sends what we queued after its own send
        try:
            self._since = 0.0  # before taking them: one queued meanwhile restarts the clock
            self._pending_bytes = 0
            while True:
                got: list[int] = []
                while self._got and len(got) < 1000:
                    got.append(self._got.popleft())
                rel: list[int] = []
                while self._released and len(rel) < 1000:
                    rel.append(self._released.popleft())
                if (got or rel) and not self.dead:
                    try:
                        self.sock.send(proto.got(got, rel), socket.MSG_DONTWAIT)
                    except OSError:
                        pass  # gone, or not reading: our holds die with the connection
                if not self._released and not self._got:
                    return
        finally:
            self._send_lock.release()

    def close(self) -> None:
        """After the subscriber closed: the connection (and our holds) last as long as the
        views the user still has; the releases queued are said now."""
        self.closing = True
        self.send_released()
        if self.views <= 0:
            self._close_now()

    def _close_now(self) -> None:
        with self._send_lock:
            self.sock.close()
        self.dead = True
        _let_go(self.mm)
        del self.mm  # the views, if any, keep the mmap object alone

def _let_go(mm: mmap.mmap) -> None:
    """Unmap now, or, while arrays still use the mapping, when the last of them goes: the
    mmap object (and the fd it keeps, a dup of the pool's) then lives only through them, so
    it ends by reference counting, not at some later garbage collection."""
    try:
        mm.close()
    except BufferError:
        pass  # views or loans still use it: they keep the mmap object, and only they


class Resolver:
    """A subscriber's side: turns descriptors into read-only views, and chooses per publisher
    between its descriptors and its bytes twins. Used by the receiving thread only (views'
    finalizers only queue and send releases).

    ``twins``: this subscriber subscribed to twins (it is forced off shared memory, or may
    hear publishers of other hosts). A publisher whose pool it can map is then taken by
    descriptor and its twins dropped; any other is taken by twin and its descriptors dropped
    before loss accounting (the twin carries the same seq). Without ``twins`` a descriptor it
    cannot resolve is a lost message."""

    def __init__(self, patterns: list[str], *, twins: bool = False, forced: bool = False) -> None:
        self._patterns = patterns
        self._prefixes = [p for text in patterns for p in compile_pattern(text).prefixes]
        self.twins = twins or forced
        self.forced = forced or not AVAILABLE
        self._links: dict[str, _Link] = {}
        self._refused: dict[str, str] = {}  # pools we cannot reach, and why
        self._modes: dict[bytes, bool] = {}  # sender -> True: by descriptor, False: by twin
        self._dtypes: dict[str, Any] = {}
        self.wants_twins = False  # a publisher of another host was heard: take its twins
        self.received = 0
        self.lost = 0
        self.why = ""

    # -- choosing between a descriptor and its twin -------------------------------------------
    def twin(self, env: _wire.Envelope) -> _wire.Envelope | None:
        """A ``$``-topic message: if it is a twin this subscriber takes, the envelope of the
        message it carries (same offsets); else None (drop it)."""
        topic = env.topic
        if not topic.startswith(TWIN_TOPIC):
            return env
        if not self.twins or self._modes.get(env.sender) is True:
            return None  # not ours; or we map that publisher's pool: its descriptor came
        return _wire.Envelope(topic[len(TWIN_TOPIC) :], env.flags, env.kind, env.sender,
                              env.seq, env.time, env.offset)

    def skip(self, sender: bytes, inline: memoryview) -> bool:
        """A descriptor from ``sender``: True if this subscriber takes its twin instead."""
        if not self.twins:
            return False
        mode = self._modes.get(sender)
        if mode is None:
            mode = not self.forced and self._usable(inline)
            if len(self._modes) > 4096:
                self._modes.clear()
            self._modes[sender] = mode
        return not mode

    def _usable(self, inline: memoryview) -> bool:
        try:
            d = proto.decode_descriptor(inline)
            if d.pool not in self._links:
                self._connect(d)
        except (DecodeError, Lost, Exception):
            return False
        return True

    def take_twins(self) -> tuple[bytes, ...]:
        """The shell subscribes to the twins of these prefixes now: from here on, publishers
        of other hosts come by twin (the frames lost until the first twin are counted)."""
        self.wants_twins = False
        if self.twins:
            return ()
        self.twins = True
        self._modes.clear()
        return tuple(self._prefixes)

    # -- descriptors ------------------------------------------------------------------------
    def resolve(self, inline: memoryview) -> Any:
        """The frame a descriptor names, as a read-only numpy array; None when its data
        cannot be had (a lost message: ``why`` says why). DecodeError for a bad descriptor."""
        try:
            return self._resolve(inline)
        except Lost as exc:
            self.why = str(exc)
            return None

    def _resolve(self, inline: memoryview) -> Any:
        try:
            d = proto.decode_descriptor(inline)
        except Exception as exc:
            raise DecodeError(f"bad shared-memory descriptor: {exc}") from None
        link = self._links.get(d.pool)
        if link is None:
            link = self._connect(d)
        if d.offset < 0 or d.nbytes < 0 or d.offset + d.nbytes > link.size:
            raise DecodeError(f"descriptor outside its pool: {d.offset}+{d.nbytes}")
        link.poll()
        if d.serial in link.unheld:
            # Over our budget when it was published: we are behind (a claim, one round
            # trip, would cost more time than we have). Lost, counted.
            link.unheld.discard(d.serial)
            self.lost += 1
            raise Lost("this subscriber held its whole share of the pool (it is behind)")
        if d.serial >= link.first:
            link.got(d.serial)
        else:
            if not link.claim(d.serial):
                self.lost += 1
                raise Lost("its block was reused before it arrived" if not link.dead
                           else "its publisher is gone")
        try:
            array = self._array(d, link.mm)
        except DecodeError:
            link.views += 1
            link.release(d.serial, link.size)  # at once
            raise
        owner = array.base if isinstance(array.base, _numpy().ndarray) else array
        link.views += 1
        link.watch(owner, d.serial, d.nbytes)
        self.received += 1
        return array

    def _array(self, d: proto.Descriptor, mm: mmap.mmap) -> Any:
        # The dtype of a description, parsed once (numpy's parser costs ~10 us a frame).
        key = d.descr if isinstance(d.descr, str) else repr(d.descr)
        dtype = self._dtypes.get(key)
        if dtype is None:
            view = _wire._array(d.descr, tuple(d.shape), memoryview(mm)[d.offset : d.offset
                                                                        + d.nbytes])
            if len(self._dtypes) < 256 and view.dtype.itemsize:
                self._dtypes[key] = view.dtype
            return view
        count = d.nbytes // dtype.itemsize
        shape = tuple(d.shape)
        n = 1
        for k in shape:
            n *= k
        if n != count or count * dtype.itemsize != d.nbytes:
            raise DecodeError(f"descriptor of {d.nbytes} bytes for shape {shape} of {dtype}")
        return _numpy().frombuffer(mm, dtype, count, d.offset).reshape(shape)

    def _connect(self, d: proto.Descriptor) -> _Link:
        why = self._refused.get(d.pool)
        if why is None:
            if not AVAILABLE:
                why = "shared memory is not available here"
            elif d.host != host_id():
                why = "its publisher is on another host (its frames come as bytes from now on)"
                self.wants_twins = not self.twins
            elif len(self._links) >= MAX_LINKS:
                self._forget_dead()
                if len(self._links) >= MAX_LINKS:
                    why = f"more than {MAX_LINKS} publishers' pools"
        if why is None:
            try:
                link = _Link(d, self._patterns)
            except (OSError, struct.error) as exc:
                why = f"its pool does not answer ({_reason(exc)})"
            else:
                self._links[d.pool] = link
                return link
        if len(self._refused) > 4096:
            self._refused.clear()
        self._refused[d.pool] = why
        self.lost += 1
        raise Lost(why)

    def _forget_dead(self) -> None:
        for name, link in list(self._links.items()):
            if link.dead:
                link.close()
                del self._links[name]

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return str(exc) or type(exc).__name__

