"""Unit tests of vbus._proto.topics: topic checks, pattern compilation and matching (sans-io)."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from vbus._errors import TopicError, VbusError
from vbus._proto.topics import (
    MAX_TOPIC_LENGTH,
    TERMINATOR,
    Pattern,
    compile_pattern,
    topic_prefix,
    validate_topic,
)

LEVEL_CHARS = string.ascii_letters + string.digits + "_-.:"


# -- reference semantics (written from DESIGN.md, independent of the implementation) ---------


def ref_match_levels(pattern: list[str], topic: list[str]) -> bool:
    """`*` is exactly one level, `**` zero or more levels, anything else is literal."""
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return ref_match_levels(rest, topic) or (
            bool(topic) and ref_match_levels(pattern, topic[1:])
        )
    if not topic:
        return False
    if head == "*" or head == topic[0]:
        return ref_match_levels(rest, topic[1:])
    return False


def ref_match(pattern: str, topic: str) -> bool:
    plevels, tlevels = pattern.split("/"), topic.split("/")
    if plevels[0] in ("*", "**") and tlevels[0].startswith("$"):
        return False  # a leading wildcard never reaches the bus's own '$' topics
    return ref_match_levels(plevels, tlevels)


def zmq_delivers(pattern: Pattern, topic: str) -> bool:
    """What a subscriber sees: ZeroMQ's byte-prefix filter, then the optional exact predicate."""
    wire = topic.encode("ascii") + b"\0"
    if not any(wire.startswith(p) for p in pattern.prefixes):
        return False
    return pattern.matches is None or pattern.matches(topic)


# -- strategies ------------------------------------------------------------------------------

# A small vocabulary makes literal levels collide often, so matches are frequent.
small_levels = st.sampled_from(["a", "b", "ab", "a.b", "c-1", "x:y", "_"])
any_levels = st.text(alphabet=LEVEL_CHARS, min_size=1, max_size=6)
levels = st.one_of(small_levels, small_levels, any_levels)


@st.composite
def topic_levels(draw: st.DrawFn, reserved: bool | None = None) -> list[str]:
    parts = draw(st.lists(levels, min_size=1, max_size=6))
    is_reserved = draw(st.booleans()) if reserved is None else reserved
    if is_reserved:
        parts[0] = "$" + parts[0]
    return parts


@st.composite
def pattern_levels(draw: st.DrawFn) -> list[str]:
    parts = draw(st.lists(st.one_of(levels, st.sampled_from(["*", "**"])), min_size=1, max_size=6))
    if parts[0] not in ("*", "**") and draw(st.booleans()):
        parts[0] = "$" + parts[0]
    return parts


topics = topic_levels().map("/".join)
public_topics = topic_levels(reserved=False).map("/".join)
patterns = pattern_levels().map("/".join)


@st.composite
def pattern_and_matching_topic(draw: st.DrawFn) -> tuple[str, str]:
    """A pattern and a topic built by instantiating its wildcards (so it should match)."""
    plevels = draw(pattern_levels())
    tlevels: list[str] = []
    for level in plevels:
        if level == "*":
            tlevels.append(draw(levels))
        elif level == "**":
            tlevels.extend(draw(st.lists(levels, max_size=3)))
        else:
            tlevels.append(level)
    assume(tlevels)
    if plevels[0] in ("*", "**"):
        assume(not tlevels[0].startswith("$"))
    return "/".join(plevels), "/".join(tlevels)


# -- validate_topic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["a", "camera", "camera/frame", "stage/x", "a/b/c/d/e", "A-z_0.9:x", "1/2/3", "..", "a/-/_"],
)
def test_valid_topics_are_returned_unchanged(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "offending"),
    [
        ("a b", "' '"),
        ("camera/fr ame", "'fr ame'"),
        ("a/b#c", "'#'"),
        ("a/b+c", "'+'"),
        ("a/caf\u00e9", "'\u00e9'"),
        ("a\0b", "'\\x00'"),
        ("a/b\nc", "'\\n'"),
        ("a/$b", "'$b'"),
        ("a/b$", "'b$'"),
        ("a/$", "'$'"),
        ("a//b", "position 2"),
        ("/a", "'/a'"),
        ("a/", "'a/'"),
        ("/", "'/'"),
        ("a/*", "'*'"),
        ("*", "'*'"),
        ("a/**/b", "'**'"),
        ("a/b*", "'b*'"),
    ],
)
def test_invalid_topics_raise_topic_error_naming_the_part(topic: str, offending: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert offending in str(info.value)


def test_topic_error_is_a_value_error_and_a_vbus_error() -> None:
    with pytest.raises(ValueError):
        validate_topic("a//b")
    assert issubclass(TopicError, ValueError)
    assert issubclass(TopicError, VbusError)


def test_empty_topic_is_rejected() -> None:
    with pytest.raises(TopicError, match="empty"):
        validate_topic("")


@pytest.mark.parametrize("value", [None, 5, b"camera", ["a"], 1.5])
def test_non_str_topic_is_rejected_naming_the_type(value: object) -> None:
    with pytest.raises(TopicError) as info:
        validate_topic(value)  # type: ignore[arg-type]
    assert type(value).__name__ in str(info.value)


def test_topic_length_limit() -> None:
    ok = "a" * MAX_TOPIC_LENGTH
    assert validate_topic(ok) == ok
    with pytest.raises(TopicError, match="longer"):
        validate_topic(ok + "b")


@pytest.mark.parametrize("topic", ["$vbus", "$vbus/stats", "$sys/a/b"])
def test_reserved_topics_need_allow_reserved(topic: str) -> None:
    with pytest.raises(TopicError, match="reserved") as info:
        validate_topic(topic)
    assert topic in str(info.value)
    assert validate_topic(topic, allow_reserved=True) == topic


@pytest.mark.parametrize("topic", ["$", "$/a", "$$a", "$a b"])
def test_reserved_topics_still_need_a_valid_name(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(topic, allow_reserved=True)


@given(public_topics)
def test_generated_public_topics_are_valid(topic: str) -> None:
    assert validate_topic(topic) == topic
    assert validate_topic(topic, allow_reserved=True) == topic


@given(topic_levels(reserved=True).map("/".join))
def test_generated_reserved_topics_are_reserved(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(topic)
    assert validate_topic(topic, allow_reserved=True) == topic


@given(
    st.lists(any_levels, min_size=1, max_size=4),
    st.data(),
    st.characters(exclude_characters=LEVEL_CHARS + "/*$"),
)
def test_any_bad_character_is_named(parts: list[str], data: st.DataObject, bad: str) -> None:
    index = data.draw(st.integers(0, len(parts) - 1))
    pos = data.draw(st.integers(0, len(parts[index])))
    parts[index] = parts[index][:pos] + bad + parts[index][pos:]
    topic = "/".join(parts)
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert repr(bad) in str(info.value)
    with pytest.raises(TopicError) as info:
        compile_pattern(topic)
    assert repr(bad) in str(info.value)


@given(st.text(max_size=30))
@example("")
@example("a//b")
@example("**/$x")
def test_arbitrary_text_is_accepted_or_raises_topic_error(text: str) -> None:
    try:
        assert validate_topic(text) == text
    except TopicError as exc:
        assert str(exc)
    try:
        compiled = compile_pattern(text)
    except TopicError as exc:
        assert str(exc)
    else:
        assert compiled.text == text
        assert compiled.prefixes


@given(st.text(alphabet=LEVEL_CHARS + "/$", max_size=30))
@example("camera")
@example("$vbus/x")
def test_a_valid_topic_is_a_valid_pattern_matching_only_itself(text: str) -> None:
    try:
        validate_topic(text, allow_reserved=True)
    except TopicError:
        return
    pattern = compile_pattern(text)
    assert pattern.match(text)
    assert not pattern.match(text + "x")
    assert not pattern.match(text + "/x")


# -- compile_pattern: validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "offending"),
    [
        ("camera/*x", "'*x'"),
        ("camera/x*", "'x*'"),
        ("***", "'***'"),
        ("a/**b/c", "'**b'"),
        ("a/*/b c", "'b c'"),
        ("a//*", "position 2"),
        ("*/", "'*/'"),
        ("/**", "'/**'"),
        ("*/$vbus", "'$vbus'"),
        ("$*", "'$*'"),
        ("a/b#", "'#'"),
    ],
)
def test_bad_patterns_raise_topic_error_naming_the_part(pattern: str, offending: str) -> None:
    with pytest.raises(TopicError) as info:
        compile_pattern(pattern)
    assert offending in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", ["", None, 3, b"a/*"])
def test_empty_or_non_str_pattern_is_rejected(value: object) -> None:
    with pytest.raises(TopicError):
        compile_pattern(value)  # type: ignore[arg-type]


@given(patterns)
def test_generated_patterns_compile(pattern: str) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.text == pattern
    assert compiled.prefixes
    assert all(isinstance(p, bytes) for p in compiled.prefixes)


@given(patterns)
def test_patterns_with_wildcards_are_not_topics(pattern: str) -> None:
    assume("*" in pattern)
    with pytest.raises(TopicError):
        validate_topic(pattern, allow_reserved=True)


# -- matching: examples --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("camera", "camera", True),
        ("camera", "camera2", False),
        ("camera", "camera/x", False),
        ("camera", "cam", False),
        ("camera", "x/camera", False),
        ("camera/frame", "camera/frame", True),
        ("camera/frame", "camera/frames", False),
        ("camera/*", "camera/x", True),
        ("camera/*", "camera", False),
        ("camera/*", "camera/x/y", False),
        ("camera/*", "camera2/x", False),
        ("camera/*/frame", "camera/1/frame", True),
        ("camera/*/frame", "camera/frame", False),
        ("camera/*/frame", "camera/1/2/frame", False),
        ("camera/**", "camera", True),
        ("camera/**", "camera/x", True),
        ("camera/**", "camera/x/y/z", True),
        ("camera/**", "camera2", False),
        ("camera/**", "camera2/x", False),
        ("camera/**/frame", "camera/frame", True),
        ("camera/**/frame", "camera/a/b/frame", True),
        ("camera/**/frame", "camera/a/b/frame/x", False),
        ("camera/**/frame", "camera/frame2", False),
        ("**", "a", True),
        ("**", "a/b/c", True),
        ("*", "a", True),
        ("*", "a/b", False),
        ("*/*", "a/b", True),
        ("*/*", "a", False),
        ("**/frame", "frame", True),
        ("**/frame", "a/b/frame", True),
        ("**/frame", "a/b/frame2", False),
        ("*/**", "a", True),
        ("*/**", "a/b/c", True),
        ("**/**", "a/b", True),
        ("a/**/**/b", "a/b", True),
        ("a/*/**", "a", False),
        ("a/*/**", "a/b", True),
        ("a.b", "aXb", False),  # '.' is literal, not a regex dot
        ("a/**", "a.b", False),
    ],
)
def test_match_examples(pattern: str, topic: str, expected: bool) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.match(topic) is expected
    assert zmq_delivers(compiled, topic) is expected
    assert ref_match(pattern, topic) is expected  # keep the reference honest too


@pytest.mark.parametrize("pattern", ["*", "**", "*/x", "**/x", "*/**", "**/*"])
@pytest.mark.parametrize("topic", ["$vbus/x", "$vbus", "$sys/x/y", "$x/x"])
def test_leading_wildcards_never_match_reserved_topics(pattern: str, topic: str) -> None:
    compiled = compile_pattern(pattern)
    assert not compiled.match(topic)
    assert not zmq_delivers(compiled, topic)


@pytest.mark.parametrize(
    ("pattern", "topic"),
    [
        ("$vbus", "$vbus"),
        ("$vbus/*", "$vbus/stats"),
        ("$vbus/**", "$vbus"),
        ("$vbus/**", "$vbus/a/b"),
        ("$vbus/*/x", "$vbus/a/x"),
    ],
)
def test_explicit_reserved_patterns_match_reserved_topics(pattern: str, topic: str) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.match(topic)
    assert zmq_delivers(compiled, topic)


def test_exact_pattern_prefix_is_terminated() -> None:
    compiled = compile_pattern("camera")
    assert compiled.prefixes == (b"camera" + TERMINATOR,)
    assert compiled.matches is None
    assert topic_prefix("camera") == b"camera\0"


def test_pattern_is_immutable() -> None:
    compiled = compile_pattern("a/*")
    with pytest.raises(AttributeError):
        compiled.text = "b"  # type: ignore[misc]


# -- matching: properties against the reference ------------------------------------------------


def prefixes_admit(pattern: Pattern, topic: str) -> bool:
    wire = topic.encode() + b"\0"
    return any(wire.startswith(prefix) for prefix in pattern.prefixes)


@given(patterns, topics)
def test_match_agrees_with_reference(pattern: str, topic: str) -> None:
    compiled = compile_pattern(pattern)
    expected = ref_match(pattern, topic)
    assert compiled.match(topic) is expected
    assert zmq_delivers(compiled, topic) is expected


@given(pattern_and_matching_topic())
def test_instantiated_patterns_match(pair: tuple[str, str]) -> None:
    pattern, topic = pair
    assert ref_match(pattern, topic)
    compiled = compile_pattern(pattern)
    assert compiled.match(topic)
    assert zmq_delivers(compiled, topic)


@given(pattern_and_matching_topic())
def test_prefixes_never_hide_a_matching_message(pair: tuple[str, str]) -> None:
    pattern, topic = pair
    compiled = compile_pattern(pattern)
    assert prefixes_admit(compiled, topic), (pattern, topic, compiled.prefixes)


@given(patterns, topics)
def test_prefixes_are_sound_for_random_pairs(pattern: str, topic: str) -> None:
    compiled = compile_pattern(pattern)
    if compiled.match(topic):
        assert prefixes_admit(compiled, topic), (pattern, topic, compiled.prefixes)


@pytest.mark.parametrize(
    ("pattern", "topic"),
    [("a/**/**", "a"), ("a/b/**/**/**", "a/b"), ("$vbus/**/**", "$vbus")],
)
def test_prefixes_admit_head_of_consecutive_trailing_double_stars(pattern: str, topic: str) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.match(topic)
    assert prefixes_admit(compiled, topic)


@given(st.lists(levels, min_size=1, max_size=5), st.lists(levels, min_size=1, max_size=3))
def test_exact_pattern_never_matches_longer_names(base: list[str], extra: list[str]) -> None:
    name = "/".join(base)
    compiled = compile_pattern(name)
    assert compiled.match(name)
    assert not compiled.match(name + "/" + "/".join(extra))
    assert not compiled.match(name + extra[0])


@pytest.mark.timeout(2)
def test_match_time_is_not_exponential_in_double_star_count() -> None:
    compiled = compile_pattern("**/**/**/**/z")
    topic = validate_topic("/".join(["a"] * 512))  # a valid topic of 1023 characters
    assert not compiled.match(topic)
