"""The rule that ends a graceful exit, in both stores: every partition listed and no
position or placeholder open (trading's barrier, entries in flight, positions trading
held); the change that makes it so finishes the run, once, with every line."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pumpflow.common.events import ExitLine, OrderFilled
from pumpflow.exit.records import (
    BARRIER,
    ExitOrderRecord,
    MemoryExitStore,
    PostgresExitStore,
    RunRecord,
    TradingClose,
    entry_position_id,
    held_position_id,
    resume_state,
)

from .helpers import START


def line(position_id: str, *, completed: bool = True) -> ExitLine:
    return ExitLine(
        position_id=position_id, mint=f"mint-{position_id}", tokens_sold=100.0,
        sol_received=1.0, tranches=2, completed=completed, reason="graceful",
    )  # fmt: skip


async def test_a_run_ends_when_every_partition_is_listed_and_no_position_is_open():
    await ends_when_all_is_done(MemoryExitStore())


@pytest.mark.postgres
async def test_a_run_ends_when_every_partition_is_listed_and_none_is_open_in_postgres(pg_pool):
    await ends_when_all_is_done(PostgresExitStore(pg_pool))


async def ends_when_all_is_done(store) -> None:
    run = await store.begin_run(RunRecord.new("test", START, START + 60, partitions=2))
    # replica a: partition 0 and its position, sold out at once; trading's barrier is here
    ended = await store.update_run(
        run.run_id, time=START + 1, partitions=[0], positions=[("p1", "mint-p1")],
        withdraw=[BARRIER],
    )  # fmt: skip
    assert ended is None
    assert await store.update_run(run.run_id, time=START + 2, lines=[line("p1")]) is None
    assert (await store.active_run()).run_id == run.run_id, "ended with partition 1 unlisted"
    # replica b: partition 1 and two positions; one sold out, one left by the deadline
    ended = await store.update_run(
        run.run_id, time=START + 3, partitions=[1],
        positions=[("p2", "mint-p2"), ("p3", "mint-p3")], lines=[line("p2")],
    )  # fmt: skip
    assert ended is None, "ended with p3 open"
    # a repeat listing reopens nothing
    await store.update_run(run.run_id, time=START + 4, positions=[("p1", "mint-p1")])
    ended = await store.update_run(run.run_id, time=START + 5, lines=[line("p3", completed=False)])
    assert ended is not None and ended.finished_at == START + 5
    summary = ended.summary
    assert sorted(p["position_id"] for p in summary["positions"]) == ["p1", "p2", "p3"]
    assert summary["positions_left"] == 1 and summary["graceful"] is True
    assert summary["sol_recovered"] == pytest.approx(3.0)
    assert await store.active_run() is None
    assert (await store.get_run(run.run_id)).summary == summary
    # the end is told once
    assert await store.update_run(run.run_id, time=START + 6, lines=[line("p3")]) is None


async def test_an_entry_in_flight_keeps_the_run_open_until_withdrawn_or_listed():
    await placeholders_hold_the_run(MemoryExitStore())


@pytest.mark.postgres
async def test_an_entry_in_flight_keeps_the_run_open_until_withdrawn_or_listed_in_postgres(
    pg_pool,
):
    await placeholders_hold_the_run(PostgresExitStore(pg_pool))


async def placeholders_hold_the_run(store) -> None:
    run = await store.begin_run(RunRecord.new("test", START, START + 60, partitions=1))
    # p1 held, and two entries in flight: o1 (mint-a, will fill), o2 (mint-b, refused)
    ended = await store.update_run(
        run.run_id, time=START + 1, partitions=[0], positions=[("p1", "mint-p1")],
        entries={"mint-a": ["o1"], "mint-b": ["o2"]}, withdraw=[BARRIER],
    )  # fmt: skip
    assert ended is None
    assert await store.update_run(run.run_id, time=START + 2, lines=[line("p1")]) is None
    # o2 refused: withdrawn; o1 still in flight
    ended = await store.update_run(run.run_id, time=START + 3, withdraw=[entry_position_id("o2")])
    assert ended is None, "ended with the entry o1 in flight"
    # a stale listing of o2 does not bring it back; o1 filled: its position is listed
    ended = await store.update_run(
        run.run_id, time=START + 4, positions=[("pa", "mint-a")],
        entries={"mint-b": ["o2"]}, withdraw=[entry_position_id("o1")],
    )  # fmt: skip
    assert ended is None, "ended with pa open"
    ended = await store.update_run(run.run_id, time=START + 5, lines=[line("pa")])
    assert ended is not None and ended.finished_at == START + 5
    # the placeholders have no line
    assert sorted(p["position_id"] for p in ended.summary["positions"]) == ["p1", "pa"]


async def test_trading_barrier_keeps_the_run_open_until_seen_or_overdue():
    await barrier_holds_the_run(MemoryExitStore())


@pytest.mark.postgres
async def test_trading_barrier_keeps_the_run_open_until_seen_or_overdue_in_postgres(pg_pool):
    await barrier_holds_the_run(PostgresExitStore(pg_pool))


async def barrier_holds_the_run(store) -> None:
    run = await store.begin_run(RunRecord.new("test", START, START + 60, partitions=1))
    # every partition listed, nothing held here: the barrier is still to come
    ended = await store.update_run(run.run_id, time=START + 1, partitions=[0])
    assert ended is None, "ended before trading's barrier came"
    # the barrier: entry o1 in flight (mint-a), positions pb (mint-b) and pc (mint-c) held
    ended = await store.update_run(
        run.run_id, time=START + 2, withdraw=[BARRIER],
        positions=[(entry_position_id("o1"), "mint-a"), (held_position_id("pb"), "mint-b"),
                   (held_position_id("pc"), "mint-c")],
    )  # fmt: skip
    assert ended is None
    # pb seen here: listed with its placeholder's withdrawal; o1 refused
    ended = await store.update_run(
        run.run_id, time=START + 3, positions=[("pb", "mint-b")],
        withdraw=[held_position_id("pb"), entry_position_id("o1")],
    )  # fmt: skip
    assert ended is None
    # a barrier told again changes nothing withdrawn
    await store.update_run(
        run.run_id, time=START + 4, positions=[(entry_position_id("o1"), "mint-a")]
    )
    assert await store.update_run(run.run_id, time=START + 5, lines=[line("pb")]) is None
    # past the deadline pc, never seen, ends with an empty line: left, not sold
    ended = await store.update_run(run.run_id, time=START + 61, overdue=True)
    assert ended is not None and ended.finished_at == START + 61
    lines = {p["position_id"]: p for p in ended.summary["positions"]}
    assert sorted(lines) == ["pb", "pc"]
    assert lines["pc"]["tokens_sold"] == 0 and not lines["pc"]["completed"]
    assert lines["pc"]["mint"] == "mint-c"
    assert ended.summary["positions_left"] == 1


async def test_the_ids_ended_at_retired_tokens_are_kept_as_long_as_their_records():
    await keeps_ended(MemoryExitStore())


@pytest.mark.postgres
async def test_the_ids_ended_at_retired_tokens_are_kept_in_postgres(pg_pool):
    await keeps_ended(PostgresExitStore(pg_pool))


async def keeps_ended(store) -> None:
    assert await store.ended_ids() == set()
    await store.record_ended({"mint-a": ("entry-1", "pos-1")}, time=START, keep_s=60.0)
    # stored again (a retirement written again after a crash): the same ids, no error
    await store.record_ended({"mint-a": ("entry-1", "pos-1")}, time=START + 1, keep_s=60.0)
    await store.record_ended({"mint-b": ("entry-2",)}, time=START + 30, keep_s=60.0)
    assert await store.ended_ids() == {"entry-1", "pos-1", "entry-2"}
    # past the records' TTL the oldest go
    await store.record_ended({"mint-c": ("entry-3",)}, time=START + 80, keep_s=60.0)
    assert await store.ended_ids() == {"entry-2", "entry-3"}


async def test_positions_trading_closed_are_kept_with_the_run_and_resumed_closed():
    await resumes_closes(MemoryExitStore())


@pytest.mark.postgres
async def test_positions_trading_closed_are_kept_with_the_run_in_postgres(pg_pool):
    await resumes_closes(PostgresExitStore(pg_pool))


def order(position_id: str, number: int, *, filled: float | None) -> ExitOrderRecord:
    sent = ExitOrderRecord(
        order_id=f"{position_id}:exit:{number}", mint=f"mint-{position_id}",
        position_id=position_id, rule="graceful", number=number, token_amount=50.0,
        sent_at=START + number, tokens_at_start=100.0, started_at=START, run_id="r",
    )  # fmt: skip
    if filled is None:
        return sent
    fill = OrderFilled(
        order_id=sent.order_id, mint=sent.mint, side="sell", token_amount=filled,
        sol_amount=filled / 100, price=0.01, position_id=position_id,
    )  # fmt: skip
    return sent.settled(fill, START + number + 0.5)


async def resumes_closes(store) -> None:
    run = await store.begin_run(RunRecord.new("test", START, START + 60, partitions=1))
    await store.update_run(
        run.run_id, time=START, partitions=[0], positions=[("p1", "mint-p1")],
        withdraw=[BARRIER],
    )  # fmt: skip
    # p1 was listed; p2 closes before its listing got to the records: listed with it
    await store.record_close(run.run_id, "p1", TradingClose(mint="mint-p1", reason="manual",
                                                            time=START + 5))  # fmt: skip
    await store.record_close(run.run_id, "p2", TradingClose(mint="mint-p2", reason="rule",
                                                            time=START + 6))  # fmt: skip
    closes = await store.run_closes(run.run_id)
    assert closes == {
        "p1": TradingClose(mint="mint-p1", reason="manual", time=START + 5),
        "p2": TradingClose(mint="mint-p2", reason="rule", time=START + 6),
    }
    records, sent = resume_state([order("p1", 1, filled=50.0)], closes)
    by_id = {r.position_id: r for r in records}
    # half sold, the rest closed by trading; closed before its first tranche, nothing sold
    assert by_id["p1"].closed == "manual" and by_id["p1"].tokens_sold == 50.0
    assert by_id["p2"].closed == "rule" and by_id["p2"].tokens_sold == 0.0
    assert all(r.completed and r.finished_at is not None for r in records)
    assert sent == {"p1": 1}
    # the run waits for both lines
    assert await store.update_run(run.run_id, time=START + 7, lines=[by_id["p1"].line()]) is None
    ended = await store.update_run(run.run_id, time=START + 8, lines=[by_id["p2"].line()])
    assert ended is not None and ended.summary["positions_left"] == 0
    assert sorted(p["closed"] for p in ended.summary["positions"]) == ["manual", "rule"]


def test_a_position_its_tranches_sold_out_is_not_resumed_closed_by_trading():
    """The exit's own last tranche closed the position: sold out, not closed by trading."""
    close = TradingClose(mint="mint-p1", reason="sold", time=START + 9)
    orders = [order("p1", 1, filled=50.0), order("p1", 2, filled=50.0)]
    [record], _ = resume_state(orders, {"p1": close})
    assert record.sold_out and record.closed is None and record.finished_at == START + 2.5


def test_a_later_position_on_a_mint_resumes_with_an_exit_of_its_own():
    """Two positions on one mint in a run, the first sold out, the later one half sold:
    each resumes with its own tranches, the later one's not counted to the first."""
    first = [order("p1", 1, filled=50.0), order("p1", 2, filled=50.0)]
    # opened once the first was sold out: its tranches number from 1 again
    later = [
        replace(order("p2", number, filled=filled), mint="mint-p1", sent_at=START + 10 + number)
        for number, filled in ((1, 50.0), (2, None))
    ]
    records, sent = resume_state([*first, *later])
    by_id = {r.position_id: r for r in records}
    assert set(by_id) == {"p1", "p2"} and {r.mint for r in records} == {"mint-p1"}
    assert by_id["p1"].sold_out and by_id["p1"].tokens_sold == 100.0
    assert by_id["p1"].finished_at is not None and not by_id["p1"].unconfirmed
    assert by_id["p2"].tokens_sold == 50.0 and not by_id["p2"].completed
    assert list(by_id["p2"].unconfirmed) == ["p2:exit:2"] and by_id["p2"].started_at == START
    assert sent == {"p1": 2, "p2": 2}


def finishing_first_read(store_class):
    """``store_class`` whose first read of the run under way finds it finished just
    before (as another replica's last change would)."""

    class Racing(store_class):
        raced = False

        async def active_run(self):
            if not self.raced:
                self.raced = True
                under_way = await super().active_run()
                await self.update_run(
                    under_way.run_id, time=START + 2, partitions=[0], withdraw=[BARRIER]
                )
            return await super().active_run()

    return Racing


async def test_a_run_begun_as_the_one_under_way_finishes_is_stored():
    await begun_as_the_last_finishes(finishing_first_read(MemoryExitStore)())


@pytest.mark.postgres
async def test_a_run_begun_as_the_one_under_way_finishes_is_stored_in_postgres(pg_pool):
    await begun_as_the_last_finishes(finishing_first_read(PostgresExitStore)(pg_pool))


async def begun_as_the_last_finishes(store) -> None:
    """A shutdown meets the run under way, which finishes before it is read: the run
    begun is one that is stored (its changes would find no run)."""
    last = RunRecord.new("last", START, START + 60)
    store.raced = True
    assert await store.begin_run(last) == last
    store.raced = False
    begun = await store.begin_run(RunRecord.new("next", START + 3, START + 63))
    assert (await store.get_run(last.run_id)).finished_at == START + 2
    assert begun.run_id != last.run_id
    assert await store.get_run(begun.run_id) == begun
    assert (await store.active_run()).run_id == begun.run_id


async def test_a_shutdown_request_applied_is_its_runs_over_or_not():
    await a_request_is_applied_once(MemoryExitStore())


@pytest.mark.postgres
async def test_a_shutdown_request_applied_is_its_runs_over_or_not_in_postgres(pg_pool):
    await a_request_is_applied_once(PostgresExitStore(pg_pool))


async def a_request_is_applied_once(store) -> None:
    """A request id begins or joins a run once: asked again, under way or over, it is that
    run's and begins none; another id joins the run under way, and begins the next once
    it is over."""
    first = await store.begin_run(RunRecord.new("first", START, START + 60), request_id="a")
    assert (await store.run_of_request("a")) == first
    assert await store.run_of_request("b") is None
    joined = await store.begin_run(RunRecord.new("joins", START + 1, START + 61), request_id="b")
    assert joined.run_id == first.run_id
    assert (await store.run_of_request("b")).run_id == first.run_id
    await store.update_run(first.run_id, time=START + 2, partitions=[0], withdraw=[BARRIER])
    again = await store.begin_run(RunRecord.new("again", START + 3, START + 63), request_id="a")
    assert again.run_id == first.run_id and again.finished_at == START + 2
    assert await store.active_run() is None, "a request asked again began a run"
    nxt = await store.begin_run(RunRecord.new("next", START + 4, START + 64), request_id="c")
    assert nxt.run_id != first.run_id and nxt.finished_at is None
    assert (await store.run_of_request("c")).run_id == nxt.run_id
    assert (await store.run_of_request("a")).run_id == first.run_id


async def test_a_request_is_forgotten_once_its_run_is_over_for_longer_than_it_is_kept():
    await requests_forgotten_once_their_runs_are_long_over(MemoryExitStore(requests_kept_s=3600))


@pytest.mark.postgres
async def test_a_request_is_forgotten_once_its_run_is_over_for_longer_than_it_is_kept_in_postgres(
    pg_pool,
):
    await requests_forgotten_once_their_runs_are_long_over(
        PostgresExitStore(pg_pool, requests_kept_s=3600)
    )


async def requests_forgotten_once_their_runs_are_long_over(store) -> None:
    """A run begun forgets the requests of runs over longer than an hour (kept) before it;
    a request of a run over since is remembered, and asked again begins no run."""
    old = await store.begin_run(RunRecord.new("old", START, START + 60), request_id="old")
    await store.update_run(old.run_id, time=START + 2, partitions=[0], withdraw=[BARRIER])
    recent = RunRecord.new("recent", START + 3000, START + 3060)
    recent = await store.begin_run(recent, request_id="recent")
    await store.update_run(recent.run_id, time=START + 3002, partitions=[0], withdraw=[BARRIER])
    nxt = await store.begin_run(RunRecord.new("next", START + 3700, START + 3760), request_id="n")
    assert await store.run_of_request("old") is None
    assert (await store.run_of_request("recent")).run_id == recent.run_id
    assert (await store.run_of_request("n")).run_id == nxt.run_id
    await store.update_run(nxt.run_id, time=START + 3702, partitions=[0], withdraw=[BARRIER])
    again = await store.begin_run(RunRecord.new("again", START + 3800, START + 3860),
                                  request_id="recent")  # fmt: skip
    assert again.run_id == recent.run_id and await store.active_run() is None


@pytest.mark.postgres
async def test_a_shutdown_request_applied_by_two_replicas_at_once_is_one_run(pg_pool):
    """Two replicas apply copies of one request at once (each with a run of its own to
    begin): one run begins, and both are told it."""
    stores = [PostgresExitStore(pg_pool) for _ in range(2)]
    begun = await asyncio.gather(
        *(
            store.begin_run(RunRecord.new(f"copy {n}", START, START + 60), request_id="r")
            for n, store in enumerate(stores)
        )
    )
    assert begun[0] == begun[1]
    assert (await stores[0].run_of_request("r")) == begun[0]
    async with pg_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM exit_runs") == 1
