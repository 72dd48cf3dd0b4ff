"""The fault suite's ledger tells a lost, doubled or reordered event from a clean run."""

from __future__ import annotations

from collections import Counter

from pumpflow.common.consumer.keyed import Record
from pumpflow.common.testing.faults import (
    BusTap,
    Ledger,
    _behind,
    _consumer_counts,
    _features_short,
    read_sent_log,
)


async def test_the_tap_counts_copies_and_events_carried_after_a_later_one():
    tap = BusTap()
    for key, seq in (("a", 1), ("a", 3), ("b", 1), ("a", 2), ("a", 3), ("b", 2)):
        tap.deliveries.append((key, seq))
    assert tap.summary() == {"carried": 5, "copies": 1, "reordered": 1}


def test_the_sent_log_gives_good_frames_once_copies_and_hostile_classes(tmp_path):
    log = tmp_path / "sent.tsv"
    log.write_text(
        "1\tframe\tcreate\tm1\ts1\n"
        "1\tduplicate\tbuy\tm1\ts2\n"
        "1\tframe\tbuy\tm1\ts2\n"
        "1\thostile_deep_nesting\t-\t-\thostile1\n"
        "2\tmalformed_truncated\tsell\tm1\ts3\n"
        "2\tframe\tsell\tm1"  # the last line of a simulator killed mid-write
    )
    sent, copies, hostile = read_sent_log(log)
    assert sent == {("create", "s1"), ("buy", "s2")}
    assert copies == 1
    assert hostile == Counter(deep_nesting=1)


def test_losses_are_problems_unless_the_fault_cut_the_socket_and_the_feed_said_so():
    clean = Ledger(bus={"carried": 3}, published=3)
    assert clean.problems() == []
    lost = Ledger(lost=2, lost_sample=["s1", "s2"], bus={"carried": 3}, published=3)
    assert "2 good frames sent and never stored" in lost.problems()[0]
    assert "lost silently" in lost.problems(may_lose=True)[0]
    lost.feed_reported = {"reconnects": 1.0}
    assert lost.problems(may_lose=True) == []
    # a feed that let go of the socket with no fault of the socket's lost the market
    away = Ledger(bus={"carried": 3}, published=3, simulator={"unconnected": 40})
    assert away.problems() == ["the feed let go of the socket while the market sent 40 frames"]


def _record(*, applied: dict[str, int], published: int = 0) -> Record:
    return Record(state=b"", applied=applied, published=published)


def test_consumer_counts_find_events_lost_and_applied_twice():
    # mint a: 3 foldable events, features folded 4 (one twice) and published 4, activity
    # took 4; mint b: 2 events, features folded 1 and stopped at seq 1
    state = {
        "stored": {
            "a": [(1, "token.created", True), (2, "token.trade", True), (3, "token.trade", True)],
            "b": [(1, "token.created", True), (2, "token.trade", True)],
        },
        "records": {
            "features": {
                "a": _record(applied={"feed": 3}, published=4),
                "b": _record(applied={"feed": 1}, published=1),
            },
            "activity": {"a": _record(applied={"features": 4}), "b": _record(applied={})},
        },
        "features_events": {"a": 4, "b": 1},
    }
    assert _behind(state) == ["b: features applied feed seq 1 of 2"]
    metrics = {
        "activity": {
            'pumpflow_consumer_events_total{outcome="applied",service="activity"}': 4.0,
        }
    }
    counts = _consumer_counts(state, metrics, killed=Counter())
    assert counts["features"]["twice"] == 1
    assert counts["features"]["lost"] == 1
    # activity never saw b's one update: lost by its record and by its counter
    assert counts["activity"]["lost"] == 1
    assert counts["activity"]["twice"] == 0
    # the short mint comes with its record's bookkeeping, to tell a loss from a miscount
    short = _features_short(state)
    assert [(s["mint"], s["stored"], s["folded"]) for s in short] == [("b", 2, 1)]
    assert short[0]["record"]["applied"] == {"feed": 1}
    ledger = Ledger(bus={"carried": 5}, published=5, features_short=short)
    ledger.consumers = counts
    assert "'mint': 'b'" in next(p for p in ledger.problems() if p.startswith("features"))
