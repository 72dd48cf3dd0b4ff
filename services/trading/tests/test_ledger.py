"""The ledger in Postgres and in memory: an order id is taken once, a change is one
transaction, and a load gives back the fills in order and the orders still unresolved."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import msgspec
import pytest

from pumpflow.common.events import (
    CircuitBreakerChanged,
    PositionUpdated,
    TokenTrade,
    TradingStateChanged,
    make_event,
)
from pumpflow.common.testing import eventually
from pumpflow.common.trading import EarlyTrade, TradingState, UnbookedTrade
from pumpflow.trading.ledger import (
    WITHDRAWN,
    Announced,
    EntryInFlight,
    FillRecord,
    KeyedEvent,
    LedgerChange,
    LedgerExposure,
    MemoryLedger,
    OrderOutcome,
    OrderRecord,
    PositionRecord,
    PostgresLedger,
    Superseded,
)


def order(order_id: str, **fields) -> OrderRecord:
    values = dict(
        order_id=order_id, mint="MintA", side="buy", sol_amount=0.5, token_amount=None,
        slippage_pct=5.0, reason="score 0.9", position_id=None, cause_id="cause",
        executor="paper", state="sent", requested_at=100.0, venue="pump",
        expected_v_sol=32.0, expected_v_tokens=1.0e9,
    )  # fmt: skip
    values.update(fields)
    return OrderRecord(**values)


def fill(order_id: str, time: float) -> FillRecord:
    return FillRecord(
        order_id=order_id, mint="MintA", side="buy", token_amount=1e6, sol_amount=0.5,
        price=5e-7, fee_sol=0.01, filled_at=time, reason="score 0.9",
    )  # fmt: skip


def position(tokens: float) -> PositionRecord:
    return PositionRecord(
        position_id="a", mint="MintA", opened_at=101.0, closed_at=None, close_reason="",
        token_amount=tokens, cost_sol=0.5, entry_price=5e-7, realized_pnl_sol=0.0,
        fees_sol=0.01, mark_price=None,
    )  # fmt: skip


def keyed(event_id: str, mint: str = "MintA", order_id: str | None = None) -> KeyedEvent:
    payload = PositionUpdated(
        position_id="a", mint=mint, token_amount=1e6, cost_sol=0.5, entry_price=5e-7
    )
    event = make_event(payload, source="trading/t", time=100.0, event_id=event_id)
    return KeyedEvent(event=event, order_id=order_id)


async def inserted(ledger, change: LedgerChange) -> set[str]:
    return (await ledger.commit(change)).inserted


@pytest.fixture(params=["postgres", "memory"])
def ledger(request):
    if request.param == "memory":
        return MemoryLedger()
    return PostgresLedger(request.getfixturevalue("pg_pool"))


async def test_an_order_id_is_taken_once_and_a_load_gives_back_what_is_unresolved(ledger):
    assert await inserted(ledger, LedgerChange(orders=[order("a"), order("b")])) == {"a", "b"}
    # the same id again, from a redelivered event: refused, the first one stays
    assert await inserted(ledger, LedgerChange(orders=[order("a", sol_amount=9.0)])) == set()
    await ledger.commit(
        LedgerChange(
            outcomes=[OrderOutcome(order_id="a", state="filled")], fills=[fill("a", 101.0)]
        )
    )
    snapshot = await ledger.load(remembered=10)
    assert [f.order_id for f in snapshot.fills] == ["a"]
    assert snapshot.fills[0].reason == "score 0.9"
    assert [o.order_id for o in snapshot.unresolved] == ["b"]
    assert sorted(snapshot.order_ids) == ["a", "b"]
    [stored] = await ledger.orders(limit=5, state="filled")
    assert stored["order_id"] == "a" and stored["sol_amount"] == 0.5
    assert snapshot.control is None
    await ledger.set_control("halted", "kill switch")
    assert await ledger.control() == ("halted", "kill switch")


async def test_one_order_is_read_with_its_fill(ledger):
    await ledger.commit(LedgerChange(orders=[order("a"), order("b")]))
    await ledger.commit(
        LedgerChange(
            outcomes=[OrderOutcome(order_id="a", state="filled")], fills=[fill("a", 101.0)]
        )
    )
    assert await ledger.order("a") == (replace(order("a"), state="filled"), fill("a", 101.0))
    assert await ledger.order("b") == (order("b"), None)
    assert await ledger.order("c") is None


async def test_a_retried_commit_takes_the_orders_stored_under_its_attempt_as_inserted(ledger):
    """A commit that raised may have been stored (its reply lost): its retry, the same
    decision, gets its orders back as inserted; another decision of the same order id
    (a redelivered event) is still refused, as is any when the stored one has none."""
    assert await inserted(ledger, LedgerChange(orders=[order("a", attempt="w:1")])) == {"a"}
    assert await inserted(ledger, LedgerChange(orders=[order("a", attempt="w:1")])) == {"a"}
    assert await inserted(ledger, LedgerChange(orders=[order("a", attempt="w:2")])) == set()
    assert await inserted(ledger, LedgerChange(orders=[order("a")])) == set()
    await ledger.commit(LedgerChange(orders=[order("b")]))
    assert await inserted(ledger, LedgerChange(orders=[order("b")])) == set()
    [stored] = [o for o in await ledger.orders(limit=5) if o["order_id"] == "a"]
    assert stored["attempt"] == "w:1"


async def test_a_retry_storing_its_order_refused_settles_the_row_its_lost_commit_stored(ledger):
    """A halt refuses an entry whose store raised, yet reached the ledger: its retry, the
    same decision, stores it refused, so no row says ``sent`` of an order never sent.
    Another decision's refusal of the same order id leaves the stored order as it is, as
    does a retry once the order has an outcome."""
    assert await inserted(ledger, LedgerChange(orders=[order("a", attempt="w:1")])) == {"a"}
    refused = dict(state="rejected", outcome="halted before it was sent: operator")
    other = LedgerChange(orders=[order("a", attempt="w:2", **refused)])
    assert await inserted(ledger, other) == set()
    [stored] = await ledger.orders(limit=5)
    assert stored["state"] == "sent"
    own = LedgerChange(orders=[order("a", attempt="w:1", **refused)])
    assert await inserted(ledger, own) == {"a"}
    [stored] = await ledger.orders(limit=5)
    assert stored["state"] == "rejected" and stored["outcome"] == refused["outcome"]
    assert (await ledger.load(remembered=10)).unresolved == []

    await ledger.commit(LedgerChange(orders=[order("b", attempt="w:3")]))
    await ledger.commit(
        LedgerChange(outcomes=[OrderOutcome(order_id="b", state="filled")], fills=[fill("b", 1.0)])
    )
    await ledger.commit(LedgerChange(orders=[order("b", attempt="w:3", **refused)]))
    [stored] = await ledger.orders(limit=5, state="filled")
    assert stored["order_id"] == "b"


async def test_orders_withdrawn_unsent_settle_the_rows_of_their_attempt_and_insert_none(
    ledger,
):
    """A replica standing by withdraws the orders it did not send: a row its lost commit
    stored is settled refused, and one it stored refused (a sale with nothing left) is
    kept so, both told back as held; another decision's row, one with an outcome, and
    an order the ledger never had are left as they are, none told back."""
    nothing_left = dict(state="rejected", outcome="nothing to sell: no position held")
    await ledger.commit(
        LedgerChange(
            orders=[
                order("stored", attempt="w:1"),
                order("other", attempt="w:9"),
                order("filled", attempt="w:3"),
                order("refused", attempt="w:5", side="sell", **nothing_left),
            ],
            outcomes=[OrderOutcome(order_id="filled", state="filled")],
        )
    )
    refused = dict(state="rejected", outcome=WITHDRAWN)
    withdrawn = [
        order("stored", attempt="w:1", **refused),
        order("other", attempt="w:2", **refused),
        order("filled", attempt="w:3", **refused),
        order("never", attempt="w:4", **refused),
        order("refused", attempt="w:5", side="sell", **nothing_left),
    ]
    assert await inserted(ledger, LedgerChange(withdrawn=withdrawn)) == {"stored", "refused"}
    stored = {o["order_id"]: o for o in await ledger.orders(limit=10)}
    assert {i: o["state"] for i, o in stored.items()} == {
        "stored": "rejected",
        "other": "sent",
        "filled": "filled",
        "refused": "rejected",
    }
    assert stored["refused"]["outcome"] == nothing_left["outcome"]
    # the entry withdrawn is told apart from the orders whose ids are taken for good
    snapshot = await ledger.load(remembered=10)
    assert snapshot.withdrawn == ["stored"]
    assert set(snapshot.order_ids) == {"stored", "other", "filled", "refused"}


async def test_a_load_gives_back_the_orders_given_up_with_a_signature_since_a_time(ledger):
    """What a take-over remembers for a trade showing late: the orders rejected with a
    signature (given up as unconfirmed), from the time asked on."""
    await ledger.commit(
        LedgerChange(
            orders=[
                order("old", requested_at=50.0),
                order("given-up", requested_at=100.0),
                order("refused", requested_at=101.0),
                order("open", requested_at=102.0),
            ]
        )
    )
    unconfirmed = "unconfirmed: its blockhash has expired"
    await ledger.commit(
        LedgerChange(
            outcomes=[
                OrderOutcome(order_id="old", state="rejected", outcome=unconfirmed, signature="s0"),
                OrderOutcome(
                    order_id="given-up", state="rejected", outcome=unconfirmed, signature="s1"
                ),
                OrderOutcome(order_id="refused", state="rejected", outcome="trade API refused"),
            ]
        )
    )
    snapshot = await ledger.load(remembered=10, given_up_since=60.0)
    assert [(o.order_id, o.signature) for o in snapshot.given_up] == [("given-up", "s1")]
    assert (await ledger.load(remembered=10)).given_up == []


def held(position_id: str, mint: str, opened_at: float, **fields) -> PositionRecord:
    values = dict(
        position_id=position_id, mint=mint, opened_at=opened_at, closed_at=None,
        close_reason="", token_amount=1e6, cost_sol=0.5, entry_price=5e-7,
        realized_pnl_sol=0.0, fees_sol=0.01, mark_price=None,
    )  # fmt: skip
    values.update(fields)
    return PositionRecord(**values)


async def filled(
    ledger, order_id: str, mint: str, side: str, time: float, *, row=None, position=None
) -> None:
    """Store the order ``order_id`` filled at ``time``, with the position's row it changed."""
    stored = order(order_id, mint=mint, side=side, state="filled", requested_at=time)
    await ledger.commit(
        LedgerChange(
            orders=[replace(stored, position_id=position)],
            fills=[replace(fill(order_id, time), mint=mint, side=side, position_id=position)],
            positions=[] if row is None else [row],
        )
    )


async def test_a_load_since_a_time_gives_back_the_fills_of_the_positions_open_or_closed_since(
    ledger,
):
    """Each token's fills from the opening buy of its first position open or closed since
    then (a sale showing late for a position closed before among them), what every
    position and order in flight adds up to, and what the limits measure: the open
    positions' cost by token and the entries in flight."""
    await ledger.commit(LedgerChange(orders=[order("entry", mint="MintD", sol_amount=0.3)]))
    totals = await ledger.totals()
    assert (totals.open_positions, totals.entries_in_flight) == (0, 1)
    entry = EntryInFlight(order_id="entry", mint="MintD", sol_amount=0.3)
    assert await ledger.exposure() == LedgerExposure(entries_in_flight=[entry])

    a1, c1, b1 = held("a1", "MintA", 10.0), held("c1", "MintC", 15.0), held("b1", "MintB", 110.0)
    sold = dict(token_amount=0.0, cost_sol=0.0, fees_sol=0.02)
    await filled(ledger, "a1", "MintA", "buy", 10.0, row=a1)
    await filled(ledger, "c1", "MintC", "buy", 15.0, row=c1)
    a1 = replace(a1, closed_at=20.0, realized_pnl_sol=-0.1, **sold)
    await filled(ledger, "a1:x", "MintA", "sell", 20.0, row=a1, position="a1")
    c1 = replace(c1, closed_at=25.0, realized_pnl_sol=0.2, **sold)
    await filled(ledger, "c1:x", "MintC", "sell", 25.0, row=c1, position="c1")
    await filled(ledger, "b1", "MintB", "buy", 110.0, row=b1)
    await filled(ledger, "a2", "MintA", "buy", 120.0, row=held("a2", "MintA", 120.0))
    await filled(ledger, "b1:more", "MintB", "buy", 130.0, row=replace(b1, cost_sol=1.0))
    # a sale of the token's closed position, showing late: booked to no position
    await filled(ledger, "a1:late", "MintA", "sell", 135.0, position="a1")
    b1 = replace(b1, closed_at=150.0, realized_pnl_sol=-0.05, **sold)
    await filled(ledger, "b1:x", "MintB", "sell", 150.0, row=b1, position="b1")
    await ledger.commit(LedgerChange(orders=[order("a2:x", mint="MintA", side="sell")]))

    snapshot = await ledger.load(remembered=10, closed_since=100.0)
    assert [f.order_id for f in snapshot.fills] == ["b1", "a2", "b1:more", "a1:late", "b1:x"]
    everything = await ledger.load(remembered=10)
    assert len(everything.fills) == 9
    totals = snapshot.totals
    assert totals == everything.totals == await ledger.totals()
    assert totals.realized_pnl_sol == pytest.approx(0.05, rel=1e-12)
    assert (totals.open_positions, totals.closed_positions) == (1, 3)
    assert (totals.open_fees_sol, totals.closed_fees_sol) == pytest.approx((0.01, 0.06))
    assert totals.open_cost_sol == 0.5
    assert (totals.entries_in_flight, totals.entries_in_flight_sol) == (1, 0.3)
    assert totals.sales_in_flight == 1
    await ledger.commit(
        LedgerChange(orders=[order("later", mint="MintA", sol_amount=0.2, requested_at=200.0)])
    )
    later = EntryInFlight(order_id="later", mint="MintA", sol_amount=0.2)
    assert await ledger.exposure() == LedgerExposure(
        open_cost_sol={"MintA": 0.5}, entries_in_flight=[entry, later]
    )


async def test_a_change_is_one_transaction(pg_pool):
    ledger = PostgresLedger(pg_pool)
    # a fill of an order the ledger does not have breaks the foreign key: nothing is kept
    broken = LedgerChange(orders=[order("c")], fills=[fill("missing", 1.0)])
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await ledger.commit(broken)
    assert await ledger.orders(limit=5) == []


async def test_joined_changes_are_stored_as_written_one_after_the_other(ledger):
    """Events decided together share a transaction: an order, its outcomes, fill and
    position from later events, each later state winning, as if stored one by one."""
    joined = LedgerChange.joined(
        [
            LedgerChange(orders=[order("a")]),
            LedgerChange(
                outcomes=[OrderOutcome(order_id="a", state="unknown")], positions=[position(1e6)]
            ),
            LedgerChange(
                orders=[order("b")],
                outcomes=[OrderOutcome(order_id="a", state="filled", signature="sig")],
                fills=[fill("a", 101.0)],
                positions=[position(2e6)],
            ),
        ]
    )
    assert await inserted(ledger, joined) == {"a", "b"}
    snapshot = await ledger.load(remembered=10)
    assert [f.order_id for f in snapshot.fills] == ["a"]
    assert [o.order_id for o in snapshot.unresolved] == ["b"]
    [stored] = await ledger.orders(limit=5, state="filled")
    assert stored["order_id"] == "a" and stored["signature"] == "sig"
    [held] = await ledger.positions(open_only=True, limit=5)
    assert held["token_amount"] == 2e6


async def test_events_are_numbered_per_mint_once_each_and_only_if_published(ledger):
    """A change's events take their mints' next seqs in order; the request of an order the
    ledger had already (a redelivery's, never published) takes none; an event numbered
    before (a retry of a commit whose reply was lost) keeps its seq."""
    first = await ledger.commit(
        LedgerChange(
            orders=[order("a")],
            events=[keyed("e1", order_id="a"), keyed("e2"), keyed("f1", mint="MintB")],
        )
    )
    assert first.inserted == {"a"} and first.seqs == {"e1": 1, "e2": 2, "f1": 1}
    again = await ledger.commit(
        LedgerChange(orders=[order("a")], events=[keyed("e3", order_id="a"), keyed("e4")])
    )
    assert again.inserted == set() and again.seqs == {"e4": 3}
    retry = await ledger.commit(LedgerChange(events=[keyed("e2"), keyed("e4"), keyed("e5")]))
    assert retry.seqs == {"e2": 2, "e4": 3, "e5": 4}


async def test_a_ledger_taking_over_numbers_on_above_its_predecessor(pg_pool):
    await PostgresLedger(pg_pool).commit(LedgerChange(events=[keyed("e1"), keyed("e2")]))
    taking_over = PostgresLedger(pg_pool)
    numbered = await taking_over.commit(LedgerChange(events=[keyed("e3"), keyed("e1")]))
    assert numbered.seqs == {"e3": 3, "e1": 1}


async def test_the_outbox_holds_the_numbered_events_until_they_are_gone(ledger):
    """A load gives back the events numbered and not told gone, with their seqs, each
    mint's in order; gone ones leave with the next change."""
    await ledger.commit(
        LedgerChange(events=[keyed("b1", mint="MintB"), keyed("a1"), keyed("b2", mint="MintB")])
    )
    outbox = (await ledger.load(remembered=10)).outbox
    assert [(e.id, e.key, e.seq) for e in outbox] == [
        ("a1", "MintA", 1),
        ("b1", "MintB", 1),
        ("b2", "MintB", 2),
    ]
    assert outbox[0].data.token_amount == 1e6
    # told gone with nothing to write: nothing is written
    await ledger.commit(LedgerChange(gone=["a1", "b1"]))
    assert len((await ledger.load(remembered=10)).outbox) == 3
    await ledger.commit(LedgerChange(events=[keyed("a2")], gone=["a1", "b1"]))
    outbox = (await ledger.load(remembered=10)).outbox
    assert [(e.id, e.seq) for e in outbox] == [("a2", 2), ("b2", 2)]


async def test_an_event_published_and_given_again_in_the_change_that_drops_it_is_numbered_anew(
    ledger,
):
    """An order's outcome event has an id of the order's: its refusal as unconfirmed and
    the fill of its trade showing late share it. Given again by the change that takes the
    published refusal out of the outbox, it is a new event: the mint's next seq, kept in
    the outbox as given (the old seq would have the exit drop the fill as a copy)."""
    first = await ledger.commit(LedgerChange(events=[keyed("outcome")]))
    assert first.seqs == {"outcome": 1}
    event = keyed("outcome").event
    filled = msgspec.structs.replace(event.data, token_amount=7.0)
    late = KeyedEvent(event=msgspec.structs.replace(event, data=filled))
    again = await ledger.commit(LedgerChange(events=[late], gone=["outcome"]))
    assert again.seqs == {"outcome": 2}
    [stored] = (await ledger.load(remembered=10)).outbox
    assert (stored.seq, stored.data.token_amount) == (2, 7.0)


def unbooked(signature: str, time: float, candidates: tuple[str, ...] = ()) -> UnbookedTrade:
    return UnbookedTrade(
        signature=signature, mint="MintA", side="buy", tokens=1e6, sol=0.4, time=time,
        candidates=candidates,
    )  # fmt: skip


async def test_unbooked_trades_are_kept_with_their_change_until_acknowledged(ledger):
    """Stored once each with the change that found them, given back oldest first from a
    time on, the latest ``limit``; acknowledged, they are gone."""
    assert await ledger.unbooked(since=0.0, limit=10) == []
    older, hand = replace(unbooked("s1", 100.0), order_id="o0"), unbooked("s2", 200.0, ("o1",))
    await ledger.commit(LedgerChange(unbooked=[hand, older]))
    await ledger.commit(LedgerChange(unbooked=[unbooked("s2", 999.0)]))  # again: kept as was
    assert await ledger.unbooked(since=0.0, limit=10) == [older, hand]
    assert await ledger.unbooked(since=0.0, limit=1) == [hand]
    assert await ledger.unbooked(since=150.0, limit=10) == [hand]
    assert await ledger.acknowledge_unbooked(["s2", "s9"]) == 1
    assert await ledger.unbooked(since=0.0, limit=10) == [older]
    await ledger.commit(LedgerChange(unbooked=[unbooked("s3", 300.0)]))
    assert await ledger.acknowledge_unbooked(None) == 2
    assert await ledger.unbooked(since=0.0, limit=10) == []


def early(signature: str, time: float) -> EarlyTrade:
    trade = TokenTrade(
        signature=signature, mint="MintA", traderPublicKey="OurWallet", txType="buy",
        tokenAmount=1e6, newTokenBalance=1e6, bondingCurveKey="Curve",
        vTokensInBondingCurve=1e9, vSolInBondingCurve=31.2, marketCapSol=31.0, solAmount=0.4,
        pool="pump",
    )  # fmt: skip
    return EarlyTrade(trade=trade, sol=0.4, time=time)


async def test_early_trades_are_kept_until_the_change_that_books_or_unbooks_them(ledger):
    """A trade of the wallet waiting for answers is kept with the change of its event,
    once, and given back by a load, oldest first, until a change stores a fill or an
    unbooked trade of its signature (the same change too)."""
    first, second, third = early("s1", 200.0), early("s2", 100.0), early("s3", 300.0)
    await ledger.commit(LedgerChange(orders=[order("a", executor="live")], early=[first]))
    await ledger.commit(LedgerChange(early=[second, replace(first, sol=9.0)]))
    assert (await ledger.load(remembered=10)).early == [second, first]

    booked = replace(fill("a", 201.0), signature="s1")
    await ledger.commit(LedgerChange(fills=[booked], unbooked=[unbooked("s2", 100.0)]))
    assert (await ledger.load(remembered=10)).early == []
    await ledger.commit(LedgerChange(early=[third], unbooked=[unbooked("s3", 300.0)]))
    assert (await ledger.load(remembered=10)).early == []


async def test_the_holder_taking_over_fences_off_its_predecessors_commits(ledger):
    """A load naming its holder makes it the ledger's: the predecessor's commits are
    refused from then on, whole. The predecessor is named with whether it stood by and
    whether it stored orders that may be unsent."""
    assert await ledger.predecessor() is None
    await ledger.load(remembered=10, holder="w1")
    await ledger.commit(LedgerChange(orders=[order("a", attempt="w1:1")], holder="w1"))
    found = await ledger.predecessor()
    assert (found.holder, found.stood_by, found.unsent) == ("w1", False, True)
    await ledger.stood_by("w2")  # not the holder: nothing
    assert not (await ledger.predecessor()).stood_by
    await ledger.stood_by("w1")
    assert (await ledger.predecessor()).stood_by

    await ledger.load(remembered=10, holder="w2")
    late = LedgerChange(
        orders=[order("b", attempt="w1:2")],
        withdrawn=[order("a", attempt="w1:1", state="rejected", outcome=WITHDRAWN)],
        holder="w1",
    )
    with pytest.raises(Superseded):
        await ledger.commit(late)
    [stored] = await ledger.orders(limit=10)
    assert stored["order_id"] == "a" and stored["state"] == "sent"
    found = await ledger.predecessor()
    assert (found.holder, found.stood_by, found.unsent) == ("w2", False, False)
    assert await inserted(ledger, LedgerChange(orders=[order("c")], holder="w2")) == {"c"}


async def test_a_predecessor_telling_events_published_after_a_take_over_drops_nothing(ledger):
    """The outbox is the holder's too: a predecessor standing by late, telling the events
    it published gone, is refused, and leaves what its successor stored under the same
    ids (an order's late fill has its refusal's) for it to publish."""
    await ledger.load(remembered=10, holder="w1")
    await ledger.commit(LedgerChange(events=[keyed("outcome")], holder="w1"))  # published
    await ledger.load(remembered=10, holder="w2")
    await ledger.commit(LedgerChange(events=[keyed("outcome")], gone=["outcome"], holder="w2"))
    with pytest.raises(Superseded):
        await ledger.published(["outcome"], holder="w1")
    [stored] = (await ledger.load(remembered=10)).outbox
    assert (stored.id, stored.seq) == ("outcome", 2)
    await ledger.published(["outcome"], holder="w2")
    assert (await ledger.load(remembered=10)).outbox == []


def announcement(event_id: str, payload: CircuitBreakerChanged | TradingStateChanged) -> KeyedEvent:
    return KeyedEvent(event=make_event(payload, source="trading/t", time=100.0, event_id=event_id))


async def test_what_the_announcements_last_said_is_kept_with_them_in_the_outbox(ledger):
    """Trading's announcements of its breakers and its state are keyless: they wait in
    the outbox in the order stored (without a seq of their own), beside the keyed events,
    and the same commit keeps what each subject last said; a superseded holder's change
    keeps nothing."""
    assert (await ledger.load(remembered=10)).announced == Announced()
    tripped = CircuitBreakerChanged(breaker="stale", tripped=True, reason="feed lag 3.0s")
    halted = TradingStateChanged(state="halted", previous_state="active", reason="stale")
    rate = CircuitBreakerChanged(breaker="rate", tripped=True, reason="2000 events/s")
    await ledger.load(remembered=10, holder="w1")
    await ledger.commit(
        LedgerChange(
            events=[announcement("trip", tripped), keyed("a"), announcement("halt", halted)],
            announced=[tripped, halted],
            holder="w1",
        )
    )
    await ledger.commit(
        LedgerChange(events=[announcement("rate", rate)], announced=[rate], holder="w1")
    )
    snapshot = await ledger.load(remembered=10)
    assert snapshot.announced == Announced(
        state=TradingState.HALTED, tripped=frozenset({"stale", "rate"})
    )
    keyless = [e for e in snapshot.outbox if e.key is None]
    assert [(e.id, e.seq) for e in keyless] == [("trip", None), ("halt", None), ("rate", None)]
    assert [(e.id, e.seq) for e in snapshot.outbox if e.key is not None] == [("a", 1)]

    # the later announcement of a subject wins, in one change as across changes
    recovered = CircuitBreakerChanged(breaker="stale", tripped=False, reason="quiet")
    active = TradingStateChanged(state="active", previous_state="halted", reason="quiet")
    await ledger.commit(
        LedgerChange(announced=[recovered, halted, active], gone=["trip", "halt"], holder="w1")
    )
    snapshot = await ledger.load(remembered=10)
    assert snapshot.announced == Announced(state=TradingState.ACTIVE, tripped=frozenset({"rate"}))
    assert [e.id for e in snapshot.outbox] == ["rate", "a"]

    await ledger.load(remembered=10, holder="w2")
    with pytest.raises(Superseded):
        await ledger.commit(LedgerChange(announced=[tripped], holder="w1"))
    assert (await ledger.load(remembered=10)).announced.tripped == {"rate"}


async def test_the_operators_writes_of_a_predecessor_are_fenced_off_as_its_commits(ledger):
    """The trading state and the acknowledgement of unbooked trades are the holder's too:
    a predecessor's, late, is refused, and leaves what its successor stored (a resume of
    the old holder would undo the halt the new one was given)."""
    await ledger.load(remembered=10, holder="w1")
    await ledger.set_control(TradingState.ACTIVE, "w1's", holder="w1")
    await ledger.commit(LedgerChange(unbooked=[unbooked("s1", 100.0)], holder="w1"))
    await ledger.load(remembered=10, holder="w2")
    await ledger.set_control(TradingState.HALTED, "w2's", holder="w2")
    with pytest.raises(Superseded) as refused:
        await ledger.set_control(TradingState.ACTIVE, "late", holder="w1")
    assert refused.value.current == "w2"
    with pytest.raises(Superseded):
        await ledger.acknowledge_unbooked(None, holder="w1")
    assert await ledger.control() == (TradingState.HALTED, "w2's")
    assert [t.signature for t in await ledger.unbooked(since=0.0, limit=10)] == ["s1"]
    assert await ledger.acknowledge_unbooked(["s1"], holder="w2") == 1
    await ledger.set_control(TradingState.ACTIVE, "w2's again", holder="w2")
    assert await ledger.control() == (TradingState.ACTIVE, "w2's again")


async def test_a_shutdown_is_applied_once_its_halt_is_stored_and_not_by_a_halt_refused(ledger):
    """The request ids of the shutdowns a halt applies are kept in its write: a halt the
    ledger refuses (a predecessor's, late) keeps none of them; one stored keeps them all,
    and a resume after it leaves them kept."""
    await ledger.load(remembered=10, holder="w1")
    await ledger.load(remembered=10, holder="w2")
    with pytest.raises(Superseded):
        await ledger.set_control(TradingState.HALTED, "late", holder="w1", shutdowns={"s1": "a"})
    assert not await ledger.shutdown_applied("s1")
    await ledger.set_control(
        TradingState.HALTED, "w2's", holder="w2", shutdowns={"s1": "a", "s2": "b"}
    )
    await ledger.set_control(TradingState.HALTED, "again", holder="w2", shutdowns={"s2": "b"})
    await ledger.set_control(TradingState.ACTIVE, "resumed", holder="w2")
    assert await ledger.shutdown_applied("s1") and await ledger.shutdown_applied("s2")
    assert not await ledger.shutdown_applied("s3")


async def test_a_resume_given_after_a_time_stands_and_a_halt_resumes_nothing(ledger):
    """What a shutdown waiting in trading's queue asks: was the operator's state stored
    resumed after the shutdown was requested (by the service's clock)? Not when nothing
    is stored, nor for a resume given before, nor once halted again after it."""
    assert not await ledger.resumed_after(1_000.0)
    await ledger.set_control(TradingState.ACTIVE, "resumed", now=1_000.0)
    assert await ledger.resumed_after(999.5)
    assert not await ledger.resumed_after(1_000.5)
    await ledger.set_control(TradingState.HALTED, "halted", now=1_001.0)
    assert not await ledger.resumed_after(999.5)


async def test_a_shutdowns_barrier_is_unpublished_until_a_replica_says_it_is_out(ledger):
    """A shutdown whose halt is stored waits, with its reason, for a replica to say its
    barrier is out (the one that halted on it, or, killed before, the next to trade);
    said once, it is no longer waiting, whatever is said again."""
    await ledger.load(remembered=10, holder="w1")
    await ledger.set_control(
        TradingState.HALTED, "shutdown: deploy", holder="w1", shutdowns={"s1": "deploy"}
    )
    await ledger.set_control(
        TradingState.HALTED, "shutdown: again", holder="w1", shutdowns={"s2": "again"}
    )
    assert await ledger.unpublished_barriers() == [("s1", "deploy"), ("s2", "again")]
    await ledger.barrier_published("s1")
    await ledger.barrier_published("s1")
    await ledger.barrier_published("unknown")
    assert await ledger.unpublished_barriers() == [("s2", "again")]
    assert await ledger.shutdown_applied("s1") and not await ledger.shutdown_applied("unknown")


async def test_a_shutdown_request_is_forgotten_once_kept_long_enough_and_its_barrier_out(
    pg_pool,
):
    """Storing a shutdown forgets those applied more than ``shutdowns_kept_s`` ago whose
    barriers are out; a recent one is kept, as is an old one whose barrier the next
    replica to trade must still publish."""
    ledger = PostgresLedger(pg_pool, shutdowns_kept_s=3600.0)
    await ledger.load(remembered=10, holder="w1")
    shutdowns = {"old": "a", "old-unpublished": "b", "recent": "c"}
    await ledger.set_control(TradingState.HALTED, "stop", holder="w1", shutdowns=shutdowns)
    await ledger.barrier_published("old")
    await ledger.barrier_published("recent")
    await pg_pool.execute(
        "UPDATE trading_shutdown_requests SET applied_at = now() - interval '61 minutes' "
        "WHERE request_id LIKE 'old%'"
    )
    await ledger.set_control(TradingState.HALTED, "stop", holder="w1", shutdowns={"next": "d"})
    applied = {r: await ledger.shutdown_applied(r) for r in [*shutdowns, "next"]}
    assert applied == {"old": False, "old-unpublished": True, "recent": True, "next": True}
    assert await ledger.unpublished_barriers() == [("old-unpublished", "b"), ("next", "d")]


async def test_a_take_over_reads_what_a_commit_under_way_stores_and_fences_the_next(pg_pool):
    """The holder's write waits for a predecessor's commit under way (which checked the
    holder first): the load after it reads what that commit stored, and the
    predecessor's next commit is refused."""
    import asyncio

    async def waiting(watcher, holding) -> bool:
        # blocked by the holding transaction: another run's waits on the server are not it
        return await watcher.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%INSERT INTO trading_holder%' AND $1 = ANY(pg_blocking_pids(pid))",
            holding.get_server_pid(),
        )

    ledger = PostgresLedger(pg_pool)
    await ledger.load(remembered=10, holder="w1")
    async with pg_pool.acquire() as conn, pg_pool.acquire() as watcher:
        async with conn.transaction():
            assert (
                await conn.fetchval(
                    "SELECT holder FROM trading_holder WHERE name = 'decide' FOR SHARE"
                )
                == "w1"
            )
            taking = asyncio.create_task(ledger.load(remembered=10, holder="w2"))
            await eventually(lambda: waiting(watcher, conn),
                             what="the take-over waiting for the commit")  # fmt: skip
            await conn.execute(
                "INSERT INTO orders (order_id, mint, side, slippage_pct, reason, executor, "
                "state, requested_at, venue, attempt) "
                "VALUES ('a', 'MintA', 'buy', 5, '', 'paper', 'sent', 100, 'pump', 'w1:1')"
            )
        snapshot = await taking
    assert [o.order_id for o in snapshot.unresolved] == ["a"]
    with pytest.raises(Superseded):
        await ledger.commit(LedgerChange(orders=[order("b")], holder="w1"))


async def test_a_take_over_waits_for_a_stalled_commit_no_longer_than_the_idle_limit(
    pg_pool, monkeypatch
):
    """A predecessor stalled inside its commit (frozen, its connection open) holds the
    holder's row read shared: the server ends its transaction once idle past the limit,
    so the take-over goes on, and nothing of the stalled commit is stored, then or after
    it wakes."""
    import asyncio

    from pumpflow.common.db import transactions
    from pumpflow.trading import ledger as ledger_module

    monkeypatch.setattr(transactions, "HOLDING_IDLE_LIMIT_S", 0.5)
    fenced, wake = asyncio.Event(), asyncio.Event()
    fence = ledger_module._fence

    async def stalling(conn, holder):
        await fence(conn, holder)
        if holder == "w1":
            fenced.set()
            await wake.wait()

    monkeypatch.setattr(ledger_module, "_fence", stalling)
    ledger = PostgresLedger(pg_pool)
    await ledger.load(remembered=10, holder="w1")
    stalled = asyncio.create_task(ledger.commit(LedgerChange(orders=[order("a")], holder="w1")))
    await fenced.wait()
    # a generous bound: without the limit the take-over waits as long as the stall
    snapshot = await asyncio.wait_for(ledger.load(remembered=10, holder="w2"), 30)
    assert snapshot.unresolved == []
    wake.set()
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await stalled
    assert await ledger.orders(limit=10) == []
    with pytest.raises(Superseded):
        await ledger.commit(LedgerChange(orders=[order("a")], holder="w1"))
    assert await inserted(ledger, LedgerChange(orders=[order("b")], holder="w2")) == {"b"}
