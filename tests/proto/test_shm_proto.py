"""The shared pool's ledger, sans-io: allocation, holds, acknowledgements, claims, budgets."""

from __future__ import annotations

import pytest

from vbus._proto import shm as proto

MIB = 1024 * 1024


def everything(topic: str) -> bool:
    return True


def test_a_held_block_is_never_reused_while_later_frames_flow() -> None:
    ledger = proto.Ledger(4 * MIB)
    ledger.add_client(1, everything)
    first = ledger.allocate(MIB)
    assert first is not None
    ledger.publish(first, "cam")
    ledger.got(1, first.serial)  # the subscriber keeps its view
    for _ in range(50):
        block = ledger.allocate(MIB)
        assert block is not None
        assert block.end <= first.offset or block.offset >= first.end
        ledger.publish(block, "cam")
        ledger.got(1, block.serial)
        ledger.release(1, [block.serial])
    assert first.serial in ledger.live


def test_acknowledgement_releases_descriptors_dropped_on_the_way() -> None:
    ledger = proto.Ledger(8 * MIB)
    ledger.add_client(1, everything)
    blocks = []
    for _ in range(3):
        b = ledger.allocate(MIB)
        assert b is not None
        ledger.publish(b, "cam")
        blocks.append(b)
    assert set(ledger.live) == {b.serial for b in blocks}
    ledger.got(1, blocks[2].serial)  # the first two never arrived
    assert set(ledger.live) == {blocks[2].serial}
    ledger.release(1, [blocks[2].serial])
    assert not ledger.live


def test_exhaustion_is_counted_and_a_release_makes_room() -> None:
    ledger = proto.Ledger(2 * MIB, client_budget=2 * MIB)
    ledger.add_client(1, everything)
    a, b = ledger.allocate(MIB), ledger.allocate(MIB)
    assert a is not None and b is not None
    ledger.publish(a, "cam")
    ledger.publish(b, "cam")
    assert ledger.allocate(MIB) is None
    assert ledger.exhausted == 1
    ledger.got(1, a.serial)
    ledger.release(1, [a.serial])
    c = ledger.allocate(MIB)
    assert c is not None and c.offset == a.offset


def test_unheld_blocks_stay_claimable_until_reused() -> None:
    ledger = proto.Ledger(2 * MIB)
    a = ledger.allocate(MIB)
    assert a is not None
    assert ledger.publish(a, "cam") == []  # nobody registered: retired at once
    ledger.add_client(7, everything)
    assert ledger.claim(7, a.serial)  # intact: the late subscriber gets it
    ledger.release(7, [a.serial])
    b = ledger.allocate(MIB)
    c = ledger.allocate(MIB)  # reuses a's memory: a's serial is gone for good
    assert b is not None and c is not None
    assert not ledger.claim(7, a.serial)
    assert not ledger.claim(7, 12345)


def test_a_client_over_its_budget_is_skipped_and_a_dropped_client_frees_all() -> None:
    ledger = proto.Ledger(8 * MIB, client_budget=2 * MIB)
    ledger.add_client(1, everything)
    ledger.add_client(2, lambda t: t == "other")
    skipped = []
    for _ in range(4):
        b = ledger.allocate(MIB)
        assert b is not None
        skipped.append(ledger.publish(b, "cam"))
    assert skipped == [[], [], [1], [1]]  # a stalled subscriber costs two blocks, no more
    assert len(ledger.live) == 2
    ledger.drop_client(1)
    assert not ledger.live


def test_pinned_blocks_and_loans() -> None:
    ledger = proto.Ledger(2 * MIB)
    loan = ledger.allocate(MIB)
    assert loan is not None and loan.serial in ledger.live
    ledger.unpin(loan)  # given back unpublished
    assert loan.serial not in ledger.live


def test_first_fit_skips_held_blocks() -> None:
    ledger = proto.Ledger(4 * MIB, client_budget=4 * MIB)
    ledger.add_client(1, everything)
    held = []
    for _ in range(4):
        b = ledger.allocate(MIB)
        assert b is not None
        ledger.publish(b, "cam")
        ledger.got(1, b.serial)
        held.append(b)
    ledger.release(1, [held[1].serial, held[3].serial])
    x, y = ledger.allocate(MIB), ledger.allocate(MIB)
    assert x is not None and y is not None
    assert {x.offset, y.offset} == {held[1].offset, held[3].offset}
    assert ledger.allocate(1) is None


def test_descriptor_and_packets_round_trip() -> None:
    d = proto.Descriptor("vbus-shm-x", "boot/1", 3, 4096, 100, "<u2", (10, 5))
    assert proto.decode_descriptor(proto.encode_descriptor(d)) == d
    assert proto.parse_got(proto.got([5, 6], [1, 2])) == ((5, 6), (1, 2))
    assert proto.parse_got(proto.got([], [3])) == ((), (3,))
    assert proto.parse_hello(proto.hello(["a/**"])) == ["a/**"]
    with pytest.raises(ValueError):
        proto.Ledger(1000)


def test_a_late_claim_finds_the_recent_frames_intact() -> None:
    # A subscriber connects to the pool when its first descriptor arrives: frames published
    # just before that must still be claimable, however fast the publisher reuses memory.
    ledger = proto.Ledger(64 * MIB)
    blocks = []
    for _ in range(proto.QUARANTINE):
        b = ledger.allocate(MIB)
        assert b is not None
        ledger.publish(b, "cam")
        blocks.append(b)
    assert len({b.offset for b in blocks}) == proto.QUARANTINE  # none reused yet
    ledger.add_client(1, everything)
    assert ledger.claim(1, blocks[0].serial)
    ledger.release(1, [blocks[0].serial])
    again = ledger.allocate(MIB)
    assert again is not None and again.offset < 64 * MIB // 2  # first fit: low, cache-warm


def test_the_service_registry_tracks_twin_prefixes_and_answers_tokens() -> None:
    sent: list[tuple[bytes, list[bytes]]] = []

    def frame(topic: bytes, payload: bytes) -> bytes:
        sent.append((topic, proto.parse_twin_state(payload)))
        return topic

    registry = proto.TwinRegistry(frame)
    assert registry.subscription(True, b"cam/") is None  # not about twins
    assert registry.subscription(True, proto.TWIN + b"cam/") == [proto.TWINS_STATE + b"all"]
    assert registry.subscription(True, proto.TWIN + b"cam/") == []  # already known
    assert registry.subscription(True, proto.TWINS_STATE + b"tok") == [proto.TWINS_STATE + b"tok"]
    assert registry.subscription(True, proto.TWINS_STATE) == []  # the prefix, no token
    assert registry.subscription(False, proto.TWIN + b"cam/") == [proto.TWINS_STATE + b"all"]
    assert registry.subscription(False, proto.TWIN + b"cam/") == []
    assert [s for _, s in sent] == [[b"cam/"], [b"cam/"], []]


def test_a_subscriber_takes_each_publisher_by_descriptor_or_by_twin_never_both() -> None:
    from vbus import _shm
    from vbus._proto import wire

    env = wire.Envelope("$vbus/twin/cam/x", 0, wire.KIND_NDARRAY, b"p" * 8, 3, 0.0, 40)
    other = wire.Envelope("$vbus/stats", 0, wire.KIND_MSGPACK, b"b" * 8, 1, 0.0, 20)
    remote = proto.encode_descriptor(
        proto.Descriptor("vbus-shm-x", "another-host/1", 1, 0, 100, "|u1", (100,)))
    plain = _shm.Resolver(["cam/**"])
    assert plain.twin(env) is None  # it takes no twins: dropped
    assert plain.twin(other) is other  # another $ topic: the inbox decides
    assert not plain.skip(b"p" * 8, memoryview(remote))  # a descriptor it cannot map: lost
    off = _shm.Resolver(["cam/**"], forced=True)
    assert off.skip(b"p" * 8, memoryview(remote))  # the twin brings it
    twin = off.twin(env)
    assert twin is not None and twin.topic == "cam/x" and twin.seq == 3 and twin.offset == 40
    remote_style = _shm.Resolver(["cam/**"], twins=True)
    assert remote_style.skip(b"p" * 8, memoryview(remote))  # another host: by twin
    assert remote_style.twin(env) is not None


def test_a_claim_of_a_block_held_for_its_claimer_is_its_acknowledgement() -> None:
    # A block allocated before a subscriber registered (its serial below the subscriber's
    # first) but published after is held for it (pending), and the subscriber claims it (it
    # cannot know). That claim must count as the acknowledgement: else the acknowledgement
    # of the next frame takes the block for one dropped on the way, and releases it under
    # the subscriber's view (found by test_shm_adversity.py).
    ledger = proto.Ledger(64 * MIB)
    early = ledger.allocate(MIB)  # being filled...
    assert early is not None
    first = ledger.add_client(1, everything)  # ...when the subscriber registers
    assert early.serial < first
    ledger.publish(early, "cam")  # held for it all the same
    assert ledger.claim(1, early.serial)
    later = ledger.allocate(MIB)
    assert later is not None
    ledger.publish(later, "cam")
    ledger.got(1, later.serial)
    assert 1 in early.holders and early.serial in ledger.live  # still held: a view uses it
    for _ in range(proto.QUARANTINE + 2):
        b = ledger.allocate(MIB)
        assert b is not None and b.offset != early.offset
        ledger.publish(b, "other")
    ledger.release(1, [early.serial])
    assert early.serial not in ledger.live
