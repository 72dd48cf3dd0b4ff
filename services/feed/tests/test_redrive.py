"""A row the store refused goes back to Postgres and out on the bus once its cause is fixed.

Against real Postgres and RabbitMQ, through ``pumpflow dead-letters feed``: the
recorder dead-letters two refused trades; a redrive before the fix leaves both dead
with the store's reason; the column is widened (the fix of one of them); the letters,
moved to a file, are redriven twice: the fixed one is stored once with its seq, time
and frame and published once, the other stays refused, and the feed's outbox never
republishes the redriven row.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import msgspec
import pytest

from pumpflow.common.events import Event, encode_payload, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
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
    store = TokenEventStore(pg_pool)
    await store.outbox_position("feed")
    letters = DeadLetterQueue(bus, service="feed")
    letters.start()
    recorder = Recorder(store, publisher=bus, dead_letters=letters,
                        config=RecorderConfig(outbox="feed", batch_size=4))  # fmt: skip
    await recorder.start()
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
    assert "redrove 0 dead letter(s) of feed (2 matched, 2 refused again, left)" in early.stdout
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
    assert "redrove 1 dead letter(s) of feed (2 matched, 1 refused again, left)" in first.stdout
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
