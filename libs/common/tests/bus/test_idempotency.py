"""The Sequencer holds the keys seen lately only, and never gives a seq twice."""

from __future__ import annotations

from pumpflow.common.bus.idempotency import Sequencer


def test_keys_number_from_one_consecutively():
    seq = Sequencer()
    assert [seq.next("a", first=True), seq.next("a"), seq.next("b"), seq.next("a")] == [1, 2, 1, 3]
    assert seq.last("a") == 3 and seq.snapshot() == {"a": 3, "b": 1}


def test_quiet_keys_leave_and_come_back_above_every_seq_given():
    seq = Sequencer()
    seq.next("quiet", at=0.0)
    for i in range(5):
        seq.next("busy", at=float(i))
    assert seq.retire_idle(before=2.0) == 1  # "quiet", last numbered at 0
    assert len(seq) == 1 and seq.floor == 1
    seq.retire_idle(before=10.0)
    assert len(seq) == 0 and seq.floor == 5
    # a key back after it left, whatever it had: above every seq given, and said so
    assert seq.number("quiet", at=11.0) == (6, True)
    assert seq.number("quiet", at=11.0) == (7, False)
    assert seq.next("busy", at=11.0) == 6
    # a creation is a key's first event ever: from 1
    assert seq.number("new", at=11.0, first=True) == (1, False)
    # nothing has left yet: a key first seen midway starts at 1 all the same
    assert Sequencer().number("midway") == (1, False)


def test_many_short_lived_keys_level_off_and_no_key_reuses_a_seq():
    seq = Sequencer()
    given: dict[str, list[int]] = {}
    held = []
    for n in range(10_000):
        key = f"k{n}"
        at = float(n)
        given.setdefault(key, []).append(seq.next(key, at=at, first=True))
        given[key].append(seq.next(key, at=at))
        if n % 7 == 0 and n > 200:  # an old key trades again, long after it left
            old = f"k{n - 200}"
            given[old].append(seq.next(old, at=at))
        seq.retire_idle(before=at - 100.0)
        held.append(len(seq))
    # the last 100 s of keys, and the old ones back in them: not a key more later on
    assert max(held) <= 120
    assert max(held[5_000:]) <= max(held[:5_000])
    for key, seqs in given.items():
        assert seqs == sorted(set(seqs)), key


def test_a_restart_goes_on_from_the_store():
    seq = Sequencer()
    seq.raise_floor(40)
    seq.restore({"recent": 7}, at=100.0)
    assert seq.next("recent", at=101.0) == 8
    assert seq.next("old", at=101.0) == 41
