"""LookBack: recent events per subscribed mint, bounded, pruned on the clock, with coverage."""

from __future__ import annotations

import math

import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import make_event
from pumpflow.common.features.history import HistoryConfig
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.testing import base58_key
from pumpflow.feed.lookback import LookBack

T0 = 1_000.0
A, B, C = base58_key("A"), base58_key("B"), base58_key("C")
W, CURVE = base58_key("w"), base58_key("b")
#: SOL reserves on the constant product at 1.07e9 tokens
V_SOL = 30 * 1.073e9 / 1.07e9


def trade(mint: str, i: int, time: float, tx: str = "buy"):
    raw = (
        b'{"signature":"%s","mint":"%s","traderPublicKey":"%s","txType":"%s",'
        b'"tokenAmount":1,"solAmount":0.01,"newTokenBalance":5,"bondingCurveKey":"%s",'
        b'"vTokensInBondingCurve":1.07e9,"vSolInBondingCurve":%r,"marketCapSol":%r}'
        % (base58_key(f"s-{mint}-{i}", 88).encode(), mint.encode(), W.encode(), tx.encode(),
           CURVE.encode(), V_SOL, V_SOL / 1.07)
    )  # fmt: skip
    return make_event(decode_frame(raw), source="feed/t", time=time, seq=i)


def lookback(clock, **bounds) -> LookBack:
    config = HistoryConfig(**{"max_events_per_token": 5, "max_age_s": 60.0, **bounds})
    return LookBack(config, clock=clock, prune_every_s=10.0)


def test_only_tracked_mints_are_held_and_only_while_the_connection_is_ours():
    clock = ReplayClock(T0)
    back = lookback(clock)
    back.track([A], since=T0)
    back.add(trade(A, 1, T0 + 1))  # not connected yet: nothing to cover
    assert back.events(A) == [] and back.covered_from(A) is None
    back.activate(T0 + 2)
    back.add(trade(A, 2, T0 + 3))
    back.add(trade(B, 1, T0 + 3))  # never subscribed
    assert [e.seq for e in back.events(A)] == [2]
    assert not back.holds(B) and back.events(B) == []
    # complete from when the connection was taken (later than the subscription)
    assert back.covered_from(A) == T0 + 2
    assert back.covers(A, T0 + 2) and not back.covers(A, T0 + 1.9)
    assert not back.covers(A, None)  # an open start is Postgres's
    back.deactivate()  # the lease lost: another replica streams now
    assert back.events(A) == [] and back.covered_from(A) is None


def test_windows_are_half_open_and_filtered_by_type_and_limit():
    clock = ReplayClock(T0)
    back = lookback(clock, max_events_per_token=100)
    back.activate(T0)
    back.track([A], since=T0)
    for i in range(1, 7):
        back.add(trade(A, i, T0 + i, tx="buy" if i % 2 else "sell"))
    assert [e.seq for e in back.events(A, T0 + 2, T0 + 5)] == [2, 3, 4]
    assert [e.seq for e in back.events(A, limit=2)] == [5, 6]
    assert back.events(A, limit=2, types=["token.created"]) == []
    assert [e.seq for e in back.events(A, types=["token.trade"], limit=3)] == [4, 5, 6]


def test_the_count_bound_drops_the_oldest_and_moves_the_coverage_past_them():
    clock = ReplayClock(T0)
    back = lookback(clock, max_events_per_token=3)
    back.activate(T0)
    back.track([A], since=T0)
    for i in range(1, 6):
        back.add(trade(A, i, T0 + i))
    assert [e.seq for e in back.events(A)] == [3, 4, 5]
    # events 1 and 2 are gone: from T0 + 3 on (exclusive of a tie with them) all are held
    assert back.covered_from(A) == math.nextafter(T0 + 3, math.inf)
    assert not back.covers(A, T0 + 2)


async def test_old_events_are_pruned_on_the_clock_and_an_unsubscribed_mint_is_forgotten():
    clock = ReplayClock(T0)
    back = lookback(clock, max_age_s=60.0)
    back.start()
    back.activate(T0)
    back.track([A, B], since=T0)
    back.add(trade(A, 1, T0 + 1))
    back.add(trade(B, 1, T0 + 1))
    assert len(back) == 2
    await clock.advance(55.0)
    back.add(trade(A, 2, T0 + 55))
    await clock.advance(15.0)  # the timer at T0 + 70 prunes what is older than T0 + 10
    assert [e.seq for e in back.events(A)] == [2]
    assert back.events(B) == []
    assert back.covered_from(A) == T0 + 10
    back.untrack([A])
    assert not back.holds(A) and back.events(A) == []
    back.close()
    assert clock.pending_timers == 0


def test_mints_beyond_the_bound_are_not_held():
    clock = ReplayClock(T0)
    back = lookback(clock, max_tokens=2)
    back.activate(T0)
    back.track([A, B, C], since=T0)
    assert [back.holds(m) for m in (A, B, C)] == [True, True, False]


def test_prune_every_must_be_positive():
    with pytest.raises(ValueError):
        LookBack(HistoryConfig(), clock=ReplayClock(), prune_every_s=0)
