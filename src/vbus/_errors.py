"""The one exception tree of vbus: every error class vbus defines, all under VbusError.

No zmq.ZMQError leaves the public API. The public ones are re-exported by ``vbus``; some
are also importable where they are raised (``_proto.endpoints.AddressError``,
``_security.SecurityError``, ``_cli.mcap.RecordingError``, ``_cli.common.UserError``)."""

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


class AddressError(VbusError, ValueError):
    """An address is malformed, or cannot be bound."""


class SecurityError(VbusError, ValueError):
    """A key or key file is malformed or missing, or security options do not fit together."""


class RecordingError(VbusError, ValueError):
    """A file is not a readable vbus recording; the message names the file and the problem."""


class UserError(VbusError):
    """The command line's: a mistake the user can fix; printed as one line, exit status 1."""


class NoResponder(VbusError):
    """Nobody serves the topic of a request (raised at once, not after the timeout)."""


class RemoteError(VbusError):
    """The server's handler raised: ``type_name`` and ``text`` are its exception's."""

    def __init__(self, topic: str, type_name: str, text: str) -> None:
        super().__init__(f"the handler of {topic!r} raised {type_name}: {text}")
        self.topic = topic
        self.type_name = type_name
        self.text = text

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return type(self), (self.topic, self.type_name, self.text)
