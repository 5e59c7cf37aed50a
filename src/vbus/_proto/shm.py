"""Shared-memory frames, sans-io: the descriptor, the pool's allocator and its holds ledger,
and the packets of the pool's unix-socket protocol. The I/O is in _shm.py.

A publisher owns one pool: a sealed memfd of fixed size, carved into *blocks* (one per
frame, page-aligned). A block is identified by its *serial*, unique over the pool's life, so
a descriptor can never name the wrong frame: a serial that is no longer live is refused.

Holds. A block stays unwritten while anyone holds it:
- the publisher itself while it fills it (a copy, or a loan not yet published: ``pinned``);
- each registered subscriber whose patterns matched the topic at publish time (*pending*
  until the subscriber acknowledges the descriptor, then *held* until its view is
  garbage-collected). An acknowledgement of serial S also releases the subscriber's pending
  holds below S: ZeroMQ delivers one publisher's messages in order, so those descriptors
  were dropped on the way (a full queue) and will never arrive;
- a subscriber that claimed the block (it registered after the publish).
A block nobody holds is *retired*: its memory may be reused, but until it is, a late claim
still succeeds (the data is intact): the last QUARANTINE retired blocks keep their memory
(a subscriber's first frame from a publisher is claimed: it connects to the pool only when
that first descriptor arrives); older ones, or all of them when room runs out, are free and
no longer claimable.
Allocation is first-fit from the start of the pool, so a few blocks rotate and stay in the
CPU's cache (a copy into cold memory runs at DRAM speed: half as fast, measured).

Each subscriber may hold at most ``client_budget`` bytes; frames beyond that are not held for
it (``publish`` says which clients were skipped: the shell tells them, and they claim or lose
the frame). So a stalled subscriber costs the pool a bounded share, and the others go on.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from . import control as _control
from . import wire as _wire

SHM_THRESHOLD = 64 * 1024
"""numpy frames this large or larger travel through the pool."""
DEFAULT_POOL_BYTES = 128 * 1024 * 1024
"""Size of a publisher's pool unless set (``shm_pool_bytes``)."""
MIN_POOL_BYTES = 1024 * 1024
ALIGN = 4096
"""Every block starts on a page: numpy's alignment needs and fast copies both like it."""
QUARANTINE = 8
"""Retired blocks whose memory is kept from reuse while there is other room."""
PUBLISHER = 0
"""The client id of the publisher's own hold (a block being filled, or an unpublished loan)."""


class Descriptor(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What crosses ZeroMQ instead of a frame's bytes (payload kind KIND_SHM)."""

    pool: str  # the pool's abstract unix socket name, without the leading NUL
    host: str  # boot id and network namespace of the publisher: same host, same netns
    serial: int
    offset: int
    nbytes: int
    descr: Any  # the array's .npy dtype description
    shape: tuple[int, ...]


_DESCRIPTOR_ENCODER = msgspec.msgpack.Encoder()
_DESCRIPTOR_DECODER = msgspec.msgpack.Decoder(Descriptor)


def encode_descriptor(d: Descriptor) -> bytes:
    return _DESCRIPTOR_ENCODER.encode(d)


def decode_descriptor(data: bytes | memoryview) -> Descriptor:
    """A descriptor; msgspec errors (hostile input) are the caller's to count."""
    return _DESCRIPTOR_DECODER.decode(data)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Block:
    __slots__ = ("serial", "offset", "length", "nbytes", "holders", "pinned")

    def __init__(self, serial: int, offset: int, length: int, nbytes: int) -> None:
        self.serial = serial
        self.offset = offset
        self.length = length  # aligned
        self.nbytes = nbytes
        self.holders: set[int] = set()
        self.pinned = True

    @property
    def end(self) -> int:
        return self.offset + self.length


class _Client:
    __slots__ = ("matches", "pending", "held", "held_bytes")

    def __init__(self, matches: Callable[[str], bool]) -> None:
        self.matches = matches
        self.pending: deque[int] = deque()  # serials held at publish, not yet acknowledged
        self.held: set[int] = set()  # serials acknowledged (a view exists) or claimed
        self.held_bytes = 0


class Ledger:
    """The pool's allocator and holds. Not thread-safe: the shell serializes calls."""

    def __init__(self, size: int, *, client_budget: int | None = None) -> None:
        if size < MIN_POOL_BYTES:
            raise ValueError(f"shm pool must be at least {MIN_POOL_BYTES} bytes, not {size}")
        self.size = size - size % ALIGN
        self.client_budget = self.size // 2 if client_budget is None else client_budget
        self.next_serial = 1
        self.live: dict[int, Block] = {}  # held or pinned: never overwritten
        self.retired: dict[int, Block] = {}  # in quarantine: nobody holds them, claimable
        # The blocks occupying memory (live, quarantined): their offsets, sorted, and their
        # ends in the same order (blocks never overlap), for first fit without a lookup.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._by_start: dict[int, Block] = {}
        self._quarantine: deque[Block] = deque()
        self._clients: dict[int, _Client] = {}
        self._route: dict[str, tuple[int, ...]] = {}  # topic -> matching clients (a cache)
        self.exhausted = 0

    # -- clients ----------------------------------------------------------------------------
    def add_client(self, client: int, matches: Callable[[str], bool]) -> int:
        """Register a subscriber; returns the first serial that may be held for it (earlier
        ones it must claim)."""
        self._clients[client] = _Client(matches)
        self._route.clear()
        return self.next_serial

    def drop_client(self, client: int) -> None:
        """A subscriber has gone: every hold of its is released."""
        c = self._clients.pop(client, None)
        if c is None:
            return
        self._route.clear()
        for serial in (*c.pending, *c.held):
            self._unhold(serial, client)

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- allocation -------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> Block | None:
        """A pinned block of ``nbytes``, or None when no room is free (counted)."""
        length = aligned(max(nbytes, 1))
        offset = self._fit(length)
        while offset is None and self._quarantine:
            self._free(self._quarantine.popleft())  # room runs out: quarantine ends
            offset = self._fit(length)
        if offset is None:
            self.exhausted += 1
            return None
        block = Block(self.next_serial, offset, length, nbytes)
        self.next_serial += 1
        self.live[block.serial] = block
        self._occupy(block)
        return block

    def _occupy(self, block: Block) -> None:
        i = bisect.bisect_left(self._starts, block.offset)
        self._starts.insert(i, block.offset)
        self._ends.insert(i, block.end)
        self._by_start[block.offset] = block

    def _fit(self, length: int) -> int | None:
        # The lowest gap that holds ``length``: a plain walk over two lists of ints (every
        # frame, over the few dozen blocks that occupy memory).
        pos = 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start - pos >= length:
                return pos
            pos = end
        return pos if self.size - pos >= length else None

    # -- publishing -------------------------------------------------------------------------
    def publish(self, block: Block, topic: str) -> list[int]:
        """Hold ``block`` for every registered subscriber of ``topic`` and unpin it; return
        the subscribers that matched but were over their budget (not held for them)."""
        route = self._route.get(topic)
        if route is None:
            if len(self._route) > 4096:
                self._route.clear()
            route = self._route[topic] = tuple(
                cid for cid, c in self._clients.items() if c.matches(topic))
        skipped: list[int] = []
        for cid in route:
            c = self._clients[cid]
            if c.held_bytes + block.length > self.client_budget:
                skipped.append(cid)
                continue
            c.pending.append(block.serial)
            c.held_bytes += block.length
            block.holders.add(cid)
        block.pinned = False
        self._maybe_retire(block)
        return skipped

    def unpin(self, block: Block) -> None:
        """The publisher lets go of a block it did not publish (a loan given back)."""
        block.pinned = False
        self._maybe_retire(block)

    # -- what subscribers say ---------------------------------------------------------------
    def got(self, client: int, serial: int) -> None:
        """``client`` received the descriptor of ``serial`` (held for it at publish)."""
        c = self._clients.get(client)
        if c is None:
            return
        pending = c.pending
        while pending and pending[0] < serial:
            self._release(c, client, pending.popleft())  # dropped on the way: never coming
        if pending and pending[0] == serial:
            pending.popleft()
            c.held.add(serial)

    def claim(self, client: int, serial: int) -> bool:
        """A subscriber that was not holding ``serial`` wants it; True if its data is intact."""
        c = self._clients.get(client)
        if c is None:
            return False
        if serial in c.held:
            return True
        if serial in c.pending:
            # Allocated before the subscriber registered, published after: held for it, and
            # its claim is its acknowledgement (else the next frame's would take it for one
            # dropped on the way, and release it under the subscriber's view).
            c.pending.remove(serial)
            c.held.add(serial)
            return True
        block = self.live.get(serial) or self.retired.get(serial)
        if block is None or c.held_bytes + block.length > self.client_budget:
            return False
        if serial in self.retired:
            del self.retired[serial]
            self.live[serial] = block
            if self._by_start.get(block.offset) is block:  # still in quarantine
                self._quarantine.remove(block)
            else:
                self._occupy(block)
        block.holders.add(client)
        c.held.add(serial)
        c.held_bytes += block.length
        return True

    def release(self, client: int, serials: Iterable[int]) -> None:
        """``client``'s views of ``serials`` are gone."""
        c = self._clients.get(client)
        if c is None:
            return
        for serial in serials:
            if serial in c.held:
                c.held.discard(serial)
                self._unhold(serial, client, c)
            elif serial in c.pending:  # released before its acknowledgement was seen
                c.pending.remove(serial)
                self._unhold(serial, client, c)

    def _release(self, c: _Client, client: int, serial: int) -> None:
        self._unhold(serial, client, c)

    def _unhold(self, serial: int, client: int, c: _Client | None = None) -> None:
        block = self.live.get(serial)
        if block is None:
            return
        if client in block.holders:
            block.holders.discard(client)
            if c is not None:
                c.held_bytes -= block.length
        self._maybe_retire(block)

    def _maybe_retire(self, block: Block) -> None:
        if block.pinned or block.holders or block.serial not in self.live:
            return
        del self.live[block.serial]
        self.retired[block.serial] = block
        self._quarantine.append(block)  # it keeps its memory a while: a late claim may come
        if len(self._quarantine) > QUARANTINE:
            self._free(self._quarantine.popleft())

    def _free(self, block: Block) -> None:
        self.retired.pop(block.serial, None)  # its memory may be reused: no longer claimable
        i = bisect.bisect_left(self._starts, block.offset)
        del self._starts[i]
        del self._ends[i]
        del self._by_start[block.offset]

    @property
    def live_bytes(self) -> int:
        return sum(b.length for b in self.live.values())


# -- the unix-socket protocol (SOCK_SEQPACKET: one packet, one message) -------------------------
HELLO = 1  # subscriber -> pool: msgpack list of patterns
WELCOME = 2  # pool -> subscriber: size, first serial; the memfd rides along (SCM_RIGHTS)
CLAIM = 3  # subscriber -> pool: serial
CLAIMED = 4  # pool -> subscriber: serial, 1 or 0
GOT = 5  # subscriber -> pool: u32 n, n serials received, then serials released (u64 each)
UNHELD = 6  # pool -> subscriber: serial not held for it (over its budget)
OP = struct.Struct("<B")
SERIAL = struct.Struct("<BQ")
WELCOME_PACKET = struct.Struct("<BQQ")
CLAIMED_PACKET = struct.Struct("<BQB")
MAX_PACKET = 64 * 1024
_PATTERNS = msgspec.msgpack.Decoder(list[str])
_ENC = msgspec.msgpack.Encoder()


def hello(patterns: list[str]) -> bytes:
    return OP.pack(HELLO) + _ENC.encode(patterns)


def parse_hello(packet: bytes) -> list[str]:
    return _PATTERNS.decode(packet[1:])


_GOT_HEAD = struct.Struct("<BI")


def got(received: Iterable[int], released: Iterable[int] = ()) -> bytes:
    """Serials received (in order) and serials released, in one packet: a subscriber sends
    one packet a frame or fewer (its pool's thread wakes once for each)."""
    got, rel = list(received), list(released)
    return _GOT_HEAD.pack(GOT, len(got)) + struct.pack(f"<{len(got) + len(rel)}Q", *got, *rel)


def parse_got(packet: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    _, n = _GOT_HEAD.unpack_from(packet)
    total = (len(packet) - _GOT_HEAD.size) // 8
    if n > total:
        raise ValueError(f"a got packet announcing {n} serials holds {total}")
    serials = struct.unpack_from(f"<{total}Q", packet, _GOT_HEAD.size)
    return serials[:n], serials[n:]


# -- bytes twins: the same publish, as bytes, for subscribers that cannot map the pool ----------
TWIN = _control.TWIN
"""First-frame prefix of a frame's bytes twin: ``$vbus/twin/<topic>\\0<header>...``, the same
seq as its descriptor. Subscribers that take twins subscribe to ``TWIN + prefix``."""
TWINS_STATE = b"\xfdvbus/twins/"
"""The broker's service publishes there which twin prefixes are subscribed (msgpack list of
bytes): on ``.../all`` when it changes, and on ``.../<token>`` to a publisher that subscribes
that token (its handshake). 0xFD-led: no network peer can send it through the broker's gate."""
MAX_TWIN_PREFIXES = 10_000
_PREFIXES = msgspec.msgpack.Decoder(list[bytes])


class TwinRegistry:
    """The service's side, sans-io: fed subscription changes, returns the frames to publish.
    ZeroMQ forwards the first subscription of a prefix and its last unsubscription only, so
    this is a set."""

    def __init__(self, state_frame: Callable[[bytes, bytes], bytes]) -> None:
        self._frame = state_frame  # (topic, payload) -> a one-frame control message
        self.prefixes: dict[bytes, None] = {}

    def subscription(self, subscribe: bool, body: bytes) -> list[bytes] | None:
        """None if ``body`` is not about twins; else the frames to send (maybe none)."""
        if body.startswith(TWIN):
            prefix = body[len(TWIN) :]
            if subscribe:
                if prefix in self.prefixes or len(self.prefixes) >= MAX_TWIN_PREFIXES:
                    return []
                self.prefixes[prefix] = None
            elif prefix in self.prefixes:
                del self.prefixes[prefix]
            else:
                return []
            return [self.state(TWINS_STATE + b"all")]
        if body.startswith(TWINS_STATE):
            if subscribe and len(body) > len(TWINS_STATE):
                return [self.state(body)]
            return []
        return None

    def state(self, topic: bytes) -> bytes:
        return self._frame(topic, _ENC.encode(list(self.prefixes)))


def parse_twin_state(payload: bytes | memoryview) -> list[bytes]:
    return _PREFIXES.decode(payload)


def twin_registry(sender: bytes) -> TwinRegistry:
    """The broker service's registry; its frames are control messages from ``sender``."""

    def frame(topic: bytes, payload: bytes) -> bytes:
        return _control.control_frame(topic, sender,
                                      payload=_wire.Payload(_wire.KIND_MSGPACK, payload))

    return TwinRegistry(frame)
