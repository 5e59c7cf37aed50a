"""vbus.Message: what a subscriber receives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

if TYPE_CHECKING:  # for the checker a bare ``Message`` is ``Message[Any]`` (PEP 696 default)
    from typing_extensions import TypeVar as _TypeVar

    T = _TypeVar("T", default=Any)
else:
    T = TypeVar("T")
"""The type of ``Message.data``: what ``subscribe(..., type=T)`` decodes into (Any without)."""


# gc=False: a Message is immutable and made by the subscriber, so it can never be part of a
# reference cycle; untracked by the garbage collector, it is about a quarter cheaper to make.
class Message(msgspec.Struct, Generic[T], frozen=True, gc=False):
    """One received message. Immutable.

    ``sender`` is the publisher's id, ``seq`` counts from 1 per publisher and topic, ``time`` is
    the publisher's clock (seconds since the epoch) at publish, ``retained`` marks a topic's
    last value replayed by the broker to a late subscriber.
    """

    topic: str
    data: T
    sender: str
    seq: int
    time: float
    retained: bool = False


def args_as_data(args: tuple[Any, ...]) -> Any:
    """The payload of a signal's emission (Qt or psygnal), one rule for both bridges: no
    argument is None, one is itself, several are a list."""
    if not args:
        return None
    return args[0] if len(args) == 1 else list(args)
