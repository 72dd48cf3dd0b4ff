"""TokenEventStore against a real Postgres (fresh schema per test)."""

from __future__ import annotations

import pytest

from pumpflow.common.events import Event, encode_payload, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import base58_key, trade_frame
from pumpflow.feed import reference_frames as ref

pytestmark = pytest.mark.postgres

A, B = base58_key("A"), base58_key("B")


def _event(raw: bytes, t: float, seq: int = 1) -> Event:
    """A token event as the feed makes it: received at its time."""
    return make_event(decode_frame(raw), source="feed/test", time=t, seq=seq, received_at=t)


async def test_write_is_idempotent_and_fills_tokens(pg_pool):
    store = TokenEventStore(pg_pool)
    events = [_event(ref.CREATE, 10.0), _event(ref.SELL, 11.0), _event(ref.MIGRATE, 12.0)]
    frames = [ref.CREATE, ref.SELL, ref.MIGRATE]
    assert await store.write(events, frames) == 3
    assert await store.write(events, frames) == 0  # same signatures: nothing new
    assert await store.count() == 3
    token = await pg_pool.fetchrow("SELECT * FROM tokens")
    assert token["mint"] == "8yZ1rj5nHbUFuCbnoowE6rHLZYiuTe1tbxEskgzUpump"
    assert token["name"] == "Cash Elon "
    assert token["creator"] == "HDypasvYsG5MuABAfaTf78FVYMmYedcbefZ7pxWEhVQV"
    assert token["created_at"] == 10.0 and token["is_mayhem_mode"] is True
    assert token["migrated_at"] is None  # the migrate frame is of another mint


async def test_migration_marks_the_token(pg_pool):
    store = TokenEventStore(pg_pool)
    create = _event(ref.CREATE, 1.0)
    migrate_raw = ref.MIGRATE.replace(
        b"DU8QWqR361yn4VQbRjYke4vdaKQYcfvDHsn2bx2cpump", create.key.encode()
    )
    await store.write([create], [ref.CREATE])
    await store.write([_event(migrate_raw, 99.5)], [migrate_raw])
    assert await pg_pool.fetchval("SELECT migrated_at FROM tokens") == 99.5


async def test_duplicates_inside_one_batch_are_stored_once(pg_pool):
    store = TokenEventStore(pg_pool)
    event = _event(ref.SELL, 5.0)
    assert await store.write([event, event, event], [ref.SELL] * 3) == 1


async def test_replay_reproduces_frames_and_payloads_byte_for_byte(pg_pool):
    store = TokenEventStore(pg_pool)
    frames = [ref.CREATE, ref.OLD_BUY, ref.SELL, ref.MIGRATE, trade_frame("m1", 1)]
    events = [_event(f, 100.0 + i, seq=i + 1) for i, f in enumerate(frames)]
    await store.write(events, frames)
    replayed = [s async for s in store.stream_stored(batch_size=2)]
    assert [s.frame for s in replayed] == frames
    assert [s.event for s in replayed] == events
    assert [encode_payload(s.event.data) for s in replayed] == [
        encode_payload(e.data) for e in events
    ]
    # the 1e-05 float survives (jsonb would have turned it into 0.00001)
    assert type(replayed[-1].event.data.solAmount) is float


async def test_events_without_frames_are_stored_from_their_payload(pg_pool):
    store = TokenEventStore(pg_pool)
    event = _event(ref.SELL, 3.0)
    await store.write([event])
    [again] = [e async for e in store.stream()]
    assert again == event


async def test_stream_filters_by_time_and_mint_in_time_order(pg_pool):
    store = TokenEventStore(pg_pool)
    events, frames = [], []
    # written out of time order, in two batches: the replay must sort by time
    for i in (5, 3, 9, 1, 7, 2, 8, 0, 6, 4):
        mint = "A" if i % 2 else "B"
        raw = trade_frame(mint, i)
        frames.append(raw)
        events.append(_event(raw, float(i)))
    await store.write(events[:5], frames[:5])
    await store.write(events[5:], frames[5:])
    times = [e.time async for e in store.stream(batch_size=3)]
    assert times == [float(i) for i in range(10)]
    only_a = [e async for e in store.stream(start=2.0, end=8.0, mints=[A])]
    assert [(e.key, e.time) for e in only_a] == [(A, 3.0), (A, 5.0), (A, 7.0)]
    assert [e async for e in store.stream(mints=[])] == []


async def test_last_seq_by_mint(pg_pool):
    store = TokenEventStore(pg_pool)
    events = [
        make_event(decode_frame(trade_frame(m, i)), source="feed/x", time=float(i), seq=s)
        for i, (m, s) in enumerate([("A", 1), ("A", 2), ("B", 1), ("A", 3)])
    ]
    await store.write(events)
    assert await store.last_seq_by_mint() == {A: 3, B: 1}
    assert await store.last_seq_by_mint(since=2.0) == {B: 1, A: 3}
    assert await store.last_seq_by_mint(since=3.0) == {A: 3}


async def test_outbox_position_starts_at_the_end_and_only_moves_forward(pg_pool):
    store = TokenEventStore(pg_pool)
    await store.write([_event(trade_frame("A", 1), 1.0)])
    first = await store.outbox_position("feed")
    assert first > 0  # history written before the publisher existed is not republished
    result = await store.write_batch([_event(trade_frame("A", 2), 2.0)])
    assert result.inserted == 1 and result.last_id > first
    await store.mark_published("feed", result.last_id)
    await store.mark_published("feed", first)  # stale mark: ignored
    assert await store.outbox_position("feed") == result.last_id
    pending = [s async for s in store.stream_stored(after_id=first, order="id")]
    assert [s.row_id for s in pending] == [result.last_id]


async def test_nul_escape_is_kept_in_the_frame(pg_pool):
    store = TokenEventStore(pg_pool)
    raw = ref.CREATE.replace(b'"Cash Elon "', b'"Cash\\u0000Elon"')
    event = _event(raw, 1.0)
    assert event.data.name == "Cash\x00Elon"
    assert await store.write([event], [raw]) == 1
    [stored] = [s async for s in store.stream_stored()]
    assert stored.frame == raw and stored.event.data.name == "Cash\x00Elon"


async def test_non_token_events_are_refused(pg_pool):
    from pumpflow.common.events import FeedSubscription

    store = TokenEventStore(pg_pool)
    command = make_event(FeedSubscription(action="subscribe", mints=("A",)), source="x", time=0)
    with pytest.raises(TypeError, match="not a token event"):
        await store.write([command])
