"""vbus: a message bus for Python programs on ZeroMQ.

An embedded broker by default, twin sync and asyncio APIs, callbacks on a managed background
loop, delivery without sleeps, losses counted, and a shutdown that never hangs.
"""

from ._bus import Bus, BusStats, Handle, connect
from ._errors import (
    AddressError,
    Closed,
    ConnectError,
    DecodeError,
    EncodeError,
    NoResponder,
    RemoteError,
    SecurityError,
    TopicError,
    VbusError,
)
from ._message import Message
from ._publisher import AsyncPublisher, Publisher, PublisherStats
from ._requests import RequestStats, Server
from ._security import (
    Keypair,
    generate_keypair,
    load_keypair,
    load_public_key,
)
from ._subscriber import AsyncSubscriber, Subscriber, SubscriberStats

__version__ = "0.1.0"

__all__ = [
    "AddressError",
    "AsyncPublisher",
    "AsyncSubscriber",
    "Bus",
    "BusStats",
    "Closed",
    "ConnectError",
    "DecodeError",
    "EncodeError",
    "Handle",
    "Keypair",
    "Message",
    "NoResponder",
    "Publisher",
    "PublisherStats",
    "RemoteError",
    "RequestStats",
    "SecurityError",
    "Server",
    "Subscriber",
    "SubscriberStats",
    "TopicError",
    "VbusError",
    "connect",
    "generate_keypair",
    "load_keypair",
    "load_public_key",
]
