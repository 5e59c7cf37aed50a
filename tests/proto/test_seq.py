"""Unit tests of vbus._proto.seq: loss counting per (sender, topic) and burst-limited logging."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbus._proto.seq import BurstLog, SequenceTracker

A = b"AAAAAAAA"
B = b"BBBBBBBB"


# -- SequenceTracker ---------------------------------------------------------------------------


def test_first_message_sets_the_baseline() -> None:
    tracker = SequenceTracker()
    assert tracker.observe(A, "t", 1000) == 0  # joined late: earlier messages are not losses
    assert tracker.lost == 0
    assert tracker.observe(A, "t", 1001) == 0
    assert tracker.lost == 0


def test_consecutive_sequence_has_no_loss() -> None:
    tracker = SequenceTracker()
    assert [tracker.observe(A, "t", seq) for seq in range(1, 50)] == [0] * 49
    assert tracker.lost == 0


def test_gap_is_counted_and_returned() -> None:
    tracker = SequenceTracker()
    tracker.observe(A, "t", 1)
    assert tracker.observe(A, "t", 2) == 0
    assert tracker.observe(A, "t", 5) == 2  # 3 and 4 lost
    assert tracker.lost == 2
    assert tracker.observe(A, "t", 6) == 0
    assert tracker.observe(A, "t", 16) == 9
    assert tracker.lost == 11


def test_gaps_are_tracked_per_sender_and_topic() -> None:
    tracker = SequenceTracker()
    assert tracker.observe(A, "x", 1) == 0
    assert tracker.observe(A, "y", 10) == 0  # new topic: own baseline
    assert tracker.observe(B, "x", 7) == 0  # new sender: own baseline
    assert tracker.observe(A, "x", 2) == 0
    assert tracker.observe(A, "y", 11) == 0
    assert tracker.observe(B, "x", 8) == 0
    assert tracker.lost == 0
    assert tracker.observe(A, "y", 14) == 2
    assert tracker.observe(B, "x", 9) == 0
    assert tracker.observe(A, "x", 4) == 1
    assert tracker.lost == 3


def test_same_topic_name_from_different_senders_does_not_interleave() -> None:
    tracker = SequenceTracker()
    for seq in range(1, 6):
        assert tracker.observe(A, "t", seq) == 0
        assert tracker.observe(B, "t", seq) == 0
    assert tracker.lost == 0


@pytest.mark.parametrize("seq", [1, 3, 5])
def test_repeated_or_older_sequence_is_not_a_loss(seq: int) -> None:
    tracker = SequenceTracker()
    tracker.observe(A, "t", 5)
    assert tracker.observe(A, "t", seq) == 0
    assert tracker.lost == 0


def test_restarted_publisher_sets_a_new_baseline() -> None:
    tracker = SequenceTracker()
    tracker.observe(A, "t", 100)
    assert tracker.observe(A, "t", 1) == 0  # the publisher started over
    assert tracker.observe(A, "t", 2) == 0
    assert tracker.observe(A, "t", 4) == 1
    assert tracker.lost == 1


@given(
    st.dictionaries(
        st.tuples(st.sampled_from([A, B, b"C" * 8]), st.sampled_from(["a", "b/c", "d"])),
        st.lists(st.integers(1, 2**40), min_size=1, max_size=30, unique=True).map(sorted),
        min_size=1,
        max_size=6,
    ),
    st.randoms(use_true_random=False),
)
def test_lost_is_the_sum_of_gaps_after_each_baseline(
    streams: dict[tuple[bytes, str], list[int]], rnd: object
) -> None:
    # Interleave the increasing streams of every (sender, topic) in a random order.
    order = [key for key, seqs in streams.items() for _ in seqs]
    rnd.shuffle(order)  # type: ignore[attr-defined]
    pending = {key: iter(seqs) for key, seqs in streams.items()}
    ordered = [(key, next(pending[key])) for key in order]

    tracker = SequenceTracker()
    returned = sum(tracker.observe(sender, topic, seq) for (sender, topic), seq in ordered)
    expected = sum(seqs[-1] - seqs[0] + 1 - len(seqs) for seqs in streams.values())
    assert tracker.lost == expected
    assert returned == expected


# -- BurstLog ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


LOGGER = "vbus.test.burst"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def burst(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> BurstLog:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return BurstLog(logging.getLogger(LOGGER), "lost messages", quiet=1.0, clock=clock)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_first_event_is_logged_at_once(burst: BurstLog, caplog: pytest.LogCaptureFixture) -> None:
    assert burst.event(3, "3 message(s) on 'a'") is True
    assert messages(caplog) == ["lost messages: 3 message(s) on 'a'"]
    assert caplog.records[-1].levelno == logging.WARNING


def test_rest_of_burst_is_summarized_when_the_next_burst_starts(
    burst: BurstLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert burst.event(1, "first") is True
    for _ in range(5):
        clock.advance(0.1)
        assert burst.event(2, "suppressed") is False
    assert messages(caplog) == ["lost messages: first"]
    clock.advance(5.0)
    assert burst.event(1, "second burst") is True
    assert messages(caplog) == [
        "lost messages: first",
        "lost messages: 10 more in the last burst",
        "lost messages: second burst",
    ]


def test_flush_writes_the_summary_once(
    burst: BurstLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    burst.event(1, "first")
    clock.advance(0.5)
    burst.event(4, "x")
    clock.advance(0.5)
    burst.event(1, "y")
    burst.flush()
    burst.flush()
    assert messages(caplog) == ["lost messages: first", "lost messages: 5 more in the last burst"]


def test_flush_without_pending_events_logs_nothing(
    burst: BurstLog, caplog: pytest.LogCaptureFixture
) -> None:
    burst.flush()
    assert messages(caplog) == []
    burst.event(1, "only")
    burst.flush()
    assert messages(caplog) == ["lost messages: only"]


def test_single_event_bursts_have_no_summary(
    burst: BurstLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        assert burst.event(1, f"event {i}") is True
        clock.advance(2.0)
    assert messages(caplog) == [f"lost messages: event {i}" for i in range(3)]


def test_steady_stream_stays_one_burst(
    burst: BurstLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    logged = []
    for _ in range(100):  # 50 s of events, never quiet for a whole second
        logged.append(burst.event(1, "drop"))
        clock.advance(0.5)
    assert logged == [True] + [False] * 99
    assert messages(caplog) == ["lost messages: drop"]
    burst.flush()
    assert messages(caplog)[-1] == "lost messages: 99 more in the last burst"


def test_exc_info_is_attached_to_the_first_event(
    burst: BurstLog, caplog: pytest.LogCaptureFixture
) -> None:
    error = ValueError("bad payload")
    assert burst.event(1, "decode failed", exc_info=error) is True
    record = caplog.records[-1]
    assert record.exc_info is not None
    assert record.exc_info[1] is error


def test_quiet_period_is_configurable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = FakeClock()
    burst = BurstLog(logging.getLogger(LOGGER), "errors", quiet=10.0, clock=clock)
    assert burst.event(1, "a") is True
    clock.advance(5.0)
    assert burst.event(1, "b") is False
    clock.advance(10.5)
    assert burst.event(1, "c") is True
    assert messages(caplog) == ["errors: a", "errors: 1 more in the last burst", "errors: c"]


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.integers(1, 1000)), min_size=1, max_size=40))
def test_every_event_is_accounted_for_once(events: list[tuple[float, int]]) -> None:
    logger = logging.getLogger(LOGGER + ".property")
    logger.propagate = False
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        clock = FakeClock(0.0)
        burst = BurstLog(logger, "w", quiet=1.0, clock=clock)
        expected_firsts = []
        last = None
        for i, (delay, count) in enumerate(events):
            clock.advance(delay)
            new = last is None or clock.now - last > 1.0
            last = clock.now
            assert burst.event(count, f"#{i}:{count}") is new
            if new:
                expected_firsts.append(i)
        burst.flush()
    finally:
        logger.removeHandler(handler)

    firsts = [line for line in handler.lines if line.startswith("w: #")]
    summaries = [line for line in handler.lines if line.endswith("more in the last burst")]
    assert len(firsts) + len(summaries) == len(handler.lines)
    assert [int(line[4:].split(":")[0]) for line in firsts] == expected_firsts
    assert len(summaries) <= len(firsts)
    logged = sum(int(line.split(":")[2]) for line in firsts)
    summarized = sum(int(line.split()[1]) for line in summaries)
    assert logged + summarized == sum(count for _, count in events)
