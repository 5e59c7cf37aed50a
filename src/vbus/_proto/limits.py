"""How vbus bounds its queues in bytes, in one place.

ZeroMQ bounds a queue (a pipe between two sockets) in messages, not bytes. vbus makes the two
the same: no ZeroMQ message that may cross a network transport (tcp, ipc) is larger than
``CHUNK_SIZE`` plus a small header, because larger payloads travel as a run of chunks (see
docs/protocol.md). A message-count high-water mark of ``n`` is then a bound of about
``n * CHUNK_SIZE`` bytes. ``socket_hwm`` turns a byte budget into the message count each
socket gets, so that all the queues one process holds on the path of a message stay within
the budget. In-process (inproc) traffic is never chunked, to stay zero-copy; there the
publisher bounds the bytes it has in flight itself (see the publisher's outbox).
"""

from __future__ import annotations

CHUNK_SIZE = 64 * 1024
"""The largest payload piece of one ZeroMQ message on a network transport (bytes)."""
MESSAGE_OVERHEAD = 512
"""Bytes one ZeroMQ message may carry besides its chunk: topic, header, chunk metadata."""
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024
"""What a stalled subscriber may cost each process by default (bytes of queued data)."""
QUEUES_PER_PROCESS = 4
"""Queues one process may hold on a message's path: publisher out, broker in, broker out
(per subscriber), subscriber in (all four in a process with an embedded broker)."""


DEFAULT_HWM = 1000


def effective_hwm(hwm: int | None, max_queue_bytes: int | None,
                  queues: int = QUEUES_PER_PROCESS) -> int:
    """The high-water mark a socket gets from what the user set. Neither set: the default
    count, lowered to fit the default byte budget. Only ``hwm`` set: exactly that many
    messages (the user chose a count). ``max_queue_bytes`` set: the count that fits it."""
    if hwm is not None and max_queue_bytes is None:
        if hwm < 1:
            raise ValueError(f"hwm must be at least 1, not {hwm}")
        return hwm
    return socket_hwm(DEFAULT_HWM if hwm is None else hwm,
                      DEFAULT_MAX_QUEUE_BYTES if max_queue_bytes is None else max_queue_bytes,
                      queues)


def socket_hwm(hwm: int, max_queue_bytes: int, queues: int = QUEUES_PER_PROCESS) -> int:
    """The high-water mark (messages) a socket gets: ``hwm``, lowered so that ``queues``
    such queues of chunk-sized messages stay within ``max_queue_bytes``."""
    if hwm < 1:
        raise ValueError(f"hwm must be at least 1, not {hwm}")
    if max_queue_bytes < CHUNK_SIZE + MESSAGE_OVERHEAD:
        raise ValueError(
            f"max_queue_bytes must be at least {CHUNK_SIZE + MESSAGE_OVERHEAD} (one chunk), "
            f"not {max_queue_bytes}"
        )
    by_bytes = max_queue_bytes // (queues * (CHUNK_SIZE + MESSAGE_OVERHEAD))
    return max(1, min(hwm, by_bytes))
