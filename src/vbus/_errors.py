"""The one exception tree of vbus. No zmq.ZMQError leaves the public API."""

from __future__ import annotations


class VbusError(Exception):
    """Base class of every error vbus raises (besides the builtin TimeoutError)."""


class Closed(VbusError):
    """The bus, publisher or subscriber is closed, or was closed while you waited on it."""


class TopicError(VbusError, ValueError):
    """A topic or pattern is malformed; the message names the offending part."""


class EncodeError(VbusError, TypeError):
    """A payload could not be serialized; nothing was sent."""


class DecodeError(VbusError, ValueError):
    """A received message could not be decoded (or validated into the requested type)."""


class ConnectError(VbusError, ConnectionError):
    """No broker answered at the given address in time."""
