"""Token event factories and sample payloads: valid, publishable, consistent."""

from __future__ import annotations

import pytest

from pumpflow.common.bus import partition_of
from pumpflow.common.bus.dispatch import check_publishable
from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import frame_consistency_error
from pumpflow.common.events import (
    TokenCreated,
    TokenTrade,
    decode_event,
    encode_event,
    make_event,
    registered,
)
from pumpflow.common.testing import START, TokenEvents, partition_keys, sample_payload


def round_trip(event):
    """The event as a consumer over RabbitMQ decodes it (validated against its schema)."""
    return decode_event(encode_event(event))


def test_token_events_are_publishable_and_survive_the_wire(token_events):
    mint = token_events.mint()
    events = [
        token_events.created(mint),
        token_events.buy(mint, "alice", sol=1.0),
        token_events.buy(mint, "bob", sol=0.2),
        token_events.sell(mint, "alice"),
        token_events.migrated(mint),
    ]
    for event in events:
        check_publishable(event)
        assert round_trip(event) == event
    assert [e.type for e in events] == [
        "token.created", "token.trade", "token.trade", "token.trade", "token.migrated",
    ]  # fmt: skip
    assert {e.key for e in events} == {mint} and {e.source for e in events} == {"feed/test"}
    assert len({e.data.signature for e in events}) == 5


def test_seq_per_mint_and_times_step_on(token_events):
    a, b = token_events.mint(), token_events.mint()
    assert a != b and a.endswith("pump")
    events = [token_events.created(a), token_events.created(b), token_events.buy(a)]
    assert [(e.key, e.seq) for e in events] == [(a, 1), (b, 1), (a, 2)]
    assert [e.time for e in events] == [START, START + 1, START + 2]
    pinned = token_events.buy(a, time=5.0, seq=9)
    assert (pinned.time, pinned.seq) == (5.0, 9)
    assert token_events.buy(a).seq == 10  # numbering goes on after a pinned seq


def test_times_come_from_the_clock_when_given():
    clock = ReplayClock(start=42.0)
    tokens = TokenEvents(clock)
    assert tokens.created("m").time == 42.0
    clock.set_sync(50.0)
    assert tokens.buy("m").time == 50.0


def test_trades_move_the_curve_and_the_balances(token_events):
    mint = token_events.mint()
    created = token_events.created(mint, sol=1.0).data
    buy = token_events.buy(mint, "alice", sol=2.0).data
    sell = token_events.sell(mint, "alice", tokens=buy.tokenAmount / 2).data
    for frame in (created, buy, sell):
        error = frame_consistency_error(
            frame.vSolInBondingCurve, frame.vTokensInBondingCurve, frame.marketCapSol
        )
        assert error < 1e-9
    assert buy.vSolInBondingCurve - created.vSolInBondingCurve == pytest.approx(buy.solAmount)
    assert buy.vSolInBondingCurve - sell.vSolInBondingCurve == pytest.approx(sell.solAmount)
    assert sell.newTokenBalance == pytest.approx(buy.tokenAmount / 2)
    assert token_events.balance(mint, "alice") == pytest.approx(buy.tokenAmount / 2)
    assert token_events.balance(mint, "creator") == created.initialBuy
    everything = token_events.sell(mint, "alice").data
    assert everything.newTokenBalance == 0 and token_events.balance(mint, "alice") == 0


def test_fields_override_the_defaults(token_events):
    created = token_events.created("m", name="Dog", symbol="DOG", is_mayhem_mode=True)
    assert (created.data.name, created.data.symbol, created.data.is_mayhem_mode) == (
        "Dog", "DOG", True,
    )  # fmt: skip
    old_frame = token_events.buy("m", solAmount=None, pool=None)
    assert old_frame.data.solAmount is None
    assert round_trip(old_frame) == old_frame


@pytest.mark.parametrize(
    "schema", sorted(registered().values(), key=lambda s: s.TYPE), ids=lambda s: s.TYPE
)
def test_sample_payloads_of_every_registered_type_are_publishable(schema):
    payload = sample_payload(schema, "k1")
    event = make_event(payload, source="test/1", time=1.0)
    check_publishable(event)
    assert round_trip(event) == event
    if schema.KEY_FIELD is not None:
        assert event.key == "k1"


def test_sample_payload_takes_overrides():
    assert sample_payload(TokenTrade, "m", traderPublicKey="zed").traderPublicKey == "zed"
    assert isinstance(sample_payload(TokenCreated, "m"), TokenCreated)


@pytest.mark.parametrize("partitions", [1, 4, 16])
def test_partition_keys_hit_each_partition_once(partitions):
    keys = partition_keys(partitions, prefix="b")
    assert [partition_of(k, partitions) for k in keys] == list(range(partitions))
    assert len(set(keys)) == partitions
