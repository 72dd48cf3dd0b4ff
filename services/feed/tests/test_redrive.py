"""A row the store refused goes back to Postgres and out on the bus once its cause is fixed.

Against real Postgres and RabbitMQ, through ``pumpflow dead-letters feed``: the
recorder dead-letters two refused trades; a redrive before the fix leaves both dead
with the store's reason; the column is widened (the fix of one of them); the letters,
moved to a file, are redriven twice: the fixed one is stored once with its seq, time
and frame and published once, the other stays refused, and the feed's outbox never
republishes the redriven row.

A redrive killed (``kill -9``) after its publication and before its record of it
leaves the letter dead; the next one publishes the event again, with its id and seq,
and a keyed consumer applies it once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import msgspec
import pytest

from pumpflow.common.clock import WallClock
from pumpflow.common.consumer import KeyedConsumerConfig, KeyedStatefulConsumer
from pumpflow.common.events import Event, encode_payload, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import AppliedSeqs, EventCollector, eventually
from pumpflow.feed import reference_frames as ref
from pumpflow.feed.dead_letters import DeadLetterQueue
from pumpflow.feed.recorder import Recorder, RecorderConfig

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

#: a real Solana key (44 characters), more than the narrowed column holds
LONG_TRADER = "3c6KJRkWtYoGHokK1x1YrYUsNUT672J3RHRgsodhC6KJ"
SHORT_TRADER = LONG_TRADER[:32]
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
FIXED, STILL_BAD = 2, 5


def trade(index: int) -> tuple[Event, bytes]:
    """Trade ``index`` of one mint (seq index + 1) and its frame; two of them are refused."""
    base = decode_frame(ref.SELL)
    signature = base.signature[:-2] + BASE58[index // 58] + BASE58[index % 58]
    trader = LONG_TRADER if index == FIXED else SHORT_TRADER
    payload = msgspec.structs.replace(base, signature=signature, traderPublicKey=trader)
    at = 1_700_000_000.25 + index
    event = make_event(payload, source="feed/t", time=at, seq=index + 1, received_at=at)
    return event, encode_payload(payload)


async def recording(pg_pool, bus) -> tuple[TokenEventStore, DeadLetterQueue, Recorder]:
    """The feed's store, dead letters and a started recorder (batches of 4) on ``bus``."""
    store = TokenEventStore(pg_pool)
    await store.outbox_position("feed")
    letters = DeadLetterQueue(bus, service="feed")
    letters.start()
    recorder = Recorder(store, publisher=bus, dead_letters=letters,
                        config=RecorderConfig(outbox="feed", batch_size=4))  # fmt: skip
    await recorder.start()
    return store, letters, recorder


async def test_a_refused_row_is_stored_and_published_once_when_its_cause_is_fixed(
    tmp_path, pg_pool, rabbitmq_harness, process_stack
):
    # a column too narrow for a real key (a migration widens it), and a rule of the
    # store one row breaks for good
    await pg_pool.execute("ALTER TABLE token_events ALTER COLUMN trader TYPE varchar(32)")
    await pg_pool.execute(
        "ALTER TABLE token_events ADD CONSTRAINT not_this_one CHECK (signature <> "
        f"'{trade(STILL_BAD)[0].data.signature}')"
    )
    bus = await rabbitmq_harness.bus("feed/t", partitions=2)
    rabbitmq_harness.delete_after(["feed", "tap"])
    tap = await EventCollector("tap").attach(bus, "token.*")
    store, letters, recorder = await recording(pg_pool, bus)
    trades = [trade(i) for i in range(8)]
    for event, frame in trades:
        await recorder.add(event, frame)
    await recorder.flush()
    await letters.flush()
    assert recorder.rejected == 2 and await store.count() == 6
    await tap.wait_for(6)
    assert [e.seq for e in tap.events] == [1, 2, 4, 5, 7, 8]
    process_stack.configure(partitions=2)

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return process_stack.run("dead-letters", "feed", *argv)

    # before the fix: both stay dead, each with the store's reason of the attempt
    early = await asyncio.to_thread(cli, "--redrive")
    assert early.returncode == 1, early.stdout + early.stderr
    assert "redrove 0 dead letters of feed (2 matched, 2 refused again, left)" in early.stdout
    dead = await bus.dead_letters("feed", remove=False)
    assert sorted(letter.key for letter in dead) == [trades[0][0].key] * 2
    fixed, still_bad = sorted((letter.reason for letter in dead), key=lambda r: "seq 6" in r)
    assert f"seq {FIXED + 1})" in fixed
    assert "value too long for type character varying(32)" in fixed
    assert f"seq {STILL_BAD + 1})" in still_bad
    assert "CheckViolationError" in still_bad and "not_this_one" in still_bad
    assert await store.count() == 6

    saved = tmp_path / "dead.jsonl"
    moved = await asyncio.to_thread(cli, "--move", str(saved))
    assert moved.returncode == 0, moved.stderr
    await pg_pool.execute("ALTER TABLE token_events ALTER COLUMN trader TYPE text")  # the fix

    first = await asyncio.to_thread(cli, "--redrive-from", str(saved))
    assert first.returncode == 1, first.stdout + first.stderr  # one is refused still
    assert "redrove 1 dead letter of feed (2 matched, 1 refused again, left)" in first.stdout
    assert "refused token events: 1 stored, 1 published, 0 done before" in first.stdout
    assert "refused again: store refused token.trade" in first.stdout
    assert "not_this_one" in first.stdout
    fixed_event, fixed_frame = trades[FIXED]
    late = await tap.wait_for(1, key=fixed_event.key, where=lambda e: e.id == fixed_event.id)
    assert (late[0].seq, late[0].time, late[0].redriven) == (FIXED + 1, fixed_event.time, True)
    assert late[0].data == fixed_event.data

    again = await asyncio.to_thread(cli, "--redrive-from", str(saved))
    assert "refused token events: 0 stored, 0 published, 1 done before" in again.stdout
    await tap.barrier(bus, keys=[fixed_event.key])
    assert [e.seq for e in tap.events] == [1, 2, 4, 5, 7, 8, 3]  # published once, late

    rows = await pg_pool.fetch(
        "SELECT seq, event_time, frame, trader FROM token_events WHERE event_id = $1",
        fixed_event.id,
    )
    assert [tuple(row) for row in rows] == [
        (FIXED + 1, fixed_event.time, fixed_frame.decode(), LONG_TRADER)
    ]
    assert await store.count() == 7
    assert await bus.dead_letters("feed", remove=False) == []  # the file holds them
    assert len([json.loads(line) for line in saved.read_text().splitlines()]) == 2

    # a restarted feed republishes what follows its outbox position, never a redriven row
    assert await store.outbox_position("feed") < await pg_pool.fetchval(
        "SELECT id FROM token_events WHERE event_id = $1", fixed_event.id
    )
    restarted = Recorder(store, publisher=bus, config=RecorderConfig(outbox="feed"))
    assert await restarted.recover() == 0
    await tap.barrier(bus, keys=[fixed_event.key])
    assert len(tap.events) == 7
    await eventually(lambda: letters.pending == 0, what="dead letters confirmed")
    assert await recorder.close(5) == 0
    await letters.close(5)


#: the advisory lock that holds a redrive between its publication and its record of it
HOLD = 0x7EDE


async def test_a_redrive_killed_between_publishing_and_recording_it_is_applied_once(
    pg_pool, rabbitmq_harness, process_stack, namespace, redis_url
):
    await pg_pool.execute("ALTER TABLE token_events ALTER COLUMN trader TYPE varchar(32)")
    # the record of the publication waits for a lock the test holds: the window to kill in
    await pg_pool.execute(f"""
        CREATE FUNCTION hold_redrive_record() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_advisory_xact_lock({HOLD}); RETURN NEW; END $$;
        CREATE TRIGGER hold_redrive_record BEFORE UPDATE ON token_event_redrives
        FOR EACH ROW EXECUTE FUNCTION hold_redrive_record();
    """)  # fmt: skip
    bus = await rabbitmq_harness.bus("feed/t", partitions=2)
    rabbitmq_harness.delete_after(["feed", "tap", "seqs"])
    tap = await EventCollector("tap").attach(bus, "token.*")
    state = RedisStateStore(url=redis_url, namespace=namespace)
    consumer = KeyedStatefulConsumer(
        AppliedSeqs(),
        KeyedConsumerConfig(service="seqs", patterns=("token.trade",)),
        bus=bus,
        store=state,
        clock=WallClock(),
        source="seqs/t",
    )
    await consumer.start()
    store, letters, recorder = await recording(pg_pool, bus)
    trades = [trade(i) for i in range(4)]
    late, _ = trades[FIXED]
    mint = late.key

    async def applied() -> list[int]:
        await consumer.flush()
        return consumer.state(mint) or []

    async def dead() -> int:
        return len(await bus.dead_letters("feed", remove=False))

    async def published() -> bool | None:
        return await pg_pool.fetchval(
            "SELECT published FROM token_event_redrives WHERE event_id = $1", late.id
        )

    try:
        for event, frame in trades:
            await recorder.add(event, frame)
        await recorder.flush()
        await letters.flush()
        await eventually(lambda: _equals(applied(), [1, 2, 4]), 10, what="seqs 1, 2, 4")
        assert await dead() == 1
        await pg_pool.execute("ALTER TABLE token_events ALTER COLUMN trader TYPE text")  # the fix
        process_stack.configure(partitions=2)
        duplicates = consumer.metrics.counts()["duplicates"]

        async with pg_pool.acquire() as holder:
            await holder.execute("SELECT pg_advisory_lock($1)", HOLD)
            process_stack.pumpflow("redrive", "dead-letters", "feed", "--redrive")
            await tap.wait_for(1, key=mint, where=lambda e: e.id == late.id)
            waiting = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 "
                       "AND NOT granted")  # fmt: skip
            await eventually(lambda: holder.fetchval(waiting, HOLD), 10, what="the record held")
            await process_stack.stop("redrive", sig=signal.SIGKILL)
            # the dead process's session ends with it (Postgres would notice its socket later)
            await holder.execute(f"SELECT pg_terminate_backend(pid) FROM ({waiting}) AS w", HOLD)
            await holder.execute("DROP TRIGGER hold_redrive_record ON token_event_redrives")
            await holder.execute("SELECT pg_advisory_unlock($1)", HOLD)

        # killed between the steps: applied once, stored, recorded as not published, still dead
        await eventually(lambda: _equals(applied(), [1, 2, 4, 3]), 10, what="seq 3 applied")
        assert await published() is False
        await eventually(lambda: _equals(dead(), 1), 10, what="the letter back in the queue")

        again = await asyncio.to_thread(process_stack.run, "dead-letters", "feed", "--redrive")
        assert again.returncode == 0, again.stdout + again.stderr
        assert (
            "refused token events: 0 stored, 1 published (1 again after an interrupted "
            "redrive: consumers drop the copy by seq), 0 done before"
        ) in again.stdout
        copies = await tap.wait_for(2, key=mint, where=lambda e: e.id == late.id)
        assert {(e.seq, e.redriven) for e in copies} == {(FIXED + 1, True)}
        await eventually(
            lambda: consumer.metrics.counts()["duplicates"] > duplicates, 10, what="copy dropped"
        )
        assert await applied() == [1, 2, 4, 3]  # the copy dropped by its seq
        assert await published() is True and await dead() == 0
        assert await store.count() == 4
    finally:
        await recorder.close(5)
        await letters.close(5)
        await consumer.stop()
        await state.delete_many(await state.scan_keys(""))
        await state.close()


async def _equals(value, expected) -> bool:
    return await value == expected
