"""Topic and pattern rules, sans-io.

Topics are ``/``-separated levels of letters, digits and ``_ - . :``. Patterns may use ``*``
(exactly one level) and ``**`` (zero or more levels) as whole levels. Topics whose first level
starts with ``$`` belong to the bus itself; wildcards in the first level never match them.

On the wire every message starts with ``topic + b"\\0"``; ZeroMQ's byte-prefix subscription is
narrowed to the exact vbus semantics here: an exact topic subscribes ``topic\\0`` (so ``camera``
never sees ``camera2``), a pattern subscribes its literal head and is matched exactly in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .._errors import TopicError

TERMINATOR = b"\0"
RESERVED_PREFIX = "$"
MAX_TOPIC_LENGTH = 1024

_LEVEL = re.compile(r"[A-Za-z0-9_\-.:]+")
_BAD_CHAR = re.compile(r"[^A-Za-z0-9_\-.:]")


def _check_level(kind: str, whole: str, level: str, index: int, first: bool) -> None:
    if not level:
        raise TopicError(f"{kind} {whole!r}: empty level at position {index + 1}")
    body = level[1:] if first and level.startswith(RESERVED_PREFIX) else level
    if not body:
        raise TopicError(f"{kind} {whole!r}: level {level!r} has nothing after '$'")
    if _LEVEL.fullmatch(body) is None:
        bad = _BAD_CHAR.search(body)
        char = bad.group() if bad else "?"
        raise TopicError(
            f"{kind} {whole!r}: level {level!r} contains {char!r}; "
            "allowed are letters, digits and _ - . :"
        )


def _split(kind: str, value: object) -> list[str]:
    if not isinstance(value, str):
        raise TopicError(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        raise TopicError(f"{kind} is empty")
    if len(value) > MAX_TOPIC_LENGTH:
        raise TopicError(f"{kind} {value[:40]!r}... is longer than {MAX_TOPIC_LENGTH} characters")
    if value.startswith("/") or value.endswith("/"):
        raise TopicError(f"{kind} {value!r}: leading or trailing '/'")
    return value.split("/")


def validate_topic(topic: str, *, allow_reserved: bool = False) -> str:
    """Return ``topic`` if it is a valid concrete topic, else raise TopicError."""
    levels = _split("topic", topic)
    for i, level in enumerate(levels):
        if "*" in level:
            raise TopicError(f"topic {topic!r}: wildcard {level!r} is only allowed in patterns")
        _check_level("topic", topic, level, i, first=i == 0)
    if topic.startswith(RESERVED_PREFIX) and not allow_reserved:
        raise TopicError(f"topic {topic!r}: topics starting with '$' are reserved for the bus")
    return topic


def topic_prefix(topic: str) -> bytes:
    """The wire prefix of a concrete topic: its ASCII bytes and the terminator."""
    return topic.encode("ascii") + TERMINATOR


@dataclass(frozen=True)
class Pattern:
    """A compiled subscription pattern.

    ``prefixes`` are the ZeroMQ subscriptions that cover the pattern; ``matches`` is None when
    those prefixes already give the exact semantics, else a predicate on the decoded topic.
    """

    text: str
    prefixes: tuple[bytes, ...]
    matches: Callable[[str], bool] | None

    def match(self, topic: str) -> bool:
        """Exact vbus semantics, for any valid topic."""
        if self.matches is not None:
            return self.matches(topic)
        encoded = topic.encode("ascii") + TERMINATOR
        return any(encoded.startswith(p) for p in self.prefixes)


def compile_pattern(pattern: str) -> Pattern:
    """Validate ``pattern`` and compile it; raise TopicError naming the bad part."""
    levels = _split("pattern", pattern)
    for i, level in enumerate(levels):
        if level in ("*", "**"):
            continue
        if "*" in level:
            raise TopicError(
                f"pattern {pattern!r}: {level!r} mixes '*' with text; "
                "wildcards must be a whole level"
            )
        _check_level("pattern", pattern, level, i, first=i == 0)

    levels = _collapse_double_stars(levels)  # '**/**' means what '**' means
    wild = [i for i, level in enumerate(levels) if level in ("*", "**")]
    if not wild:
        return Pattern(pattern, (topic_prefix(pattern),), None)

    first = wild[0]
    head = "/".join(levels[:first])
    if first == 0:
        # A leading wildcard must not reach the bus's own '$' topics.
        prefixes: tuple[bytes, ...] = (b"",)
    else:
        prefixes = (head.encode("ascii") + b"/",)
        if levels[first] == "**" and first == len(levels) - 1:
            # 'a/**' also matches 'a' itself (zero levels); the prefixes say it all.
            return Pattern(pattern, (topic_prefix(head), *prefixes), None)

    reserved_ok = first > 0 or pattern.startswith(RESERVED_PREFIX)
    if levels.count("**") <= 1:
        # One '**' at most: a regex, whose backtracking stays linear in the topic's levels.
        regex = re.compile("".join(_level_regex(level) for level in levels))

        def full_match(topic: str) -> bool:
            return regex.fullmatch("/" + topic) is not None
    else:
        def full_match(topic: str) -> bool:
            return _match_levels(levels, topic.split("/"))

    def matches(topic: str) -> bool:
        if not reserved_ok and topic.startswith(RESERVED_PREFIX):
            return False
        return full_match(topic)

    return Pattern(pattern, prefixes, matches)


def _collapse_double_stars(levels: list[str]) -> list[str]:
    out: list[str] = []
    for level in levels:
        if not (level == "**" and out and out[-1] == "**"):
            out.append(level)
    return out


def _match_levels(pattern: list[str], topic: list[str]) -> bool:
    """Glob matching over levels in O(len(pattern) * len(topic)): a set of positions in the
    pattern advances one topic level at a time, so no input makes it backtrack."""
    end = len(pattern)

    def closure(states: set[int]) -> set[int]:
        for p in list(states):
            while p < end and pattern[p] == "**":  # '**' may match zero levels
                p += 1
                states.add(p)
        return states

    states = closure({0})
    for level in topic:
        advanced: set[int] = set()
        for p in states:
            if p == end:
                continue
            if pattern[p] == "**":
                advanced.add(p)
            elif pattern[p] == "*" or pattern[p] == level:
                advanced.add(p + 1)
        if not advanced:
            return False
        states = closure(advanced)
    return end in states


def _level_regex(level: str) -> str:
    # Each level is matched together with the '/' before it; the topic gets a leading '/'.
    if level == "**":
        return r"(?:/[^/]+)*"
    if level == "*":
        return r"/[^/]+"
    return "/" + re.escape(level)
