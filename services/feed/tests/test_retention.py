"""Pruning of old token events against a real Postgres (fresh schema per test)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import WallClock
from pumpflow.common.events import Event, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import base58_key, eventually, trade_frame
from pumpflow.feed import reference_frames as ref
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.recorder import Recorder, RecorderConfig
from pumpflow.feed.retention import Retention, RetentionConfig

pytestmark = pytest.mark.postgres

DAY = 86_400.0


def _create(mint: str) -> bytes:
    """The reference creation frame of token ``mint`` (a label)."""
    frame = re.sub(
        rb'"signature": "\w+"',
        b'"signature": "%s"' % base58_key(f"c-{mint}", 88).encode(),
        ref.CREATE,
    )
    return frame.replace(b"8yZ1rj5nHbUFuCbnoowE6rHLZYiuTe1tbxEskgzUpump", base58_key(mint).encode())


def _event(raw: bytes, t: float, seq: int | None, source: str = "feed/test") -> Event:
    return make_event(decode_frame(raw), source=source, time=t, seq=seq, received_at=t)


async def _store(
    store: TokenEventStore, frames_at: list[tuple[bytes, float]], source: str = "feed/test"
) -> int:
    """Store the frames numbered in order; return the last row id."""
    events = [_event(raw, t, seq, source) for seq, (raw, t) in enumerate(frames_at, start=1)]
    return (await store.write_batch(events, [raw for raw, _ in frames_at])).last_id


async def _mints(pool) -> list[str]:
    return [r["mint"] for r in await pool.fetch("SELECT mint FROM tokens ORDER BY mint")]


async def test_old_events_go_with_their_tokens_and_recent_ones_stay(pg_pool):
    store = TokenEventStore(pg_pool)
    now = 100 * DAY
    old, kept = base58_key("old"), base58_key("lives-on")
    last = await _store(store, [
        (_create("old"), now - 10 * DAY), (trade_frame("old", 1), now - 9 * DAY),
        (_create("lives-on"), now - 9 * DAY), (trade_frame("lives-on", 1), now - 1 * DAY),
        (trade_frame("lives-on", 2), now - 60.0),
    ])  # fmt: skip
    await store.mark_published("feed", last)
    pruned = await store.prune(now - 7 * DAY, batch_size=2)
    assert (pruned.events, pruned.tokens, pruned.held) == (3, 1, 0)
    left = [(s.event.key, s.event.time) async for s in store.stream_stored()]
    assert left == [(kept, now - 1 * DAY), (kept, now - 60.0)]
    # the token whose events all went is gone; one with events left keeps its row
    assert await _mints(pg_pool) == [kept]
    assert old not in await _mints(pg_pool)
    assert (await store.prune(now - 7 * DAY)).events == 0


async def test_nothing_at_or_past_its_publishers_outbox_position_goes(pg_pool):
    store = TokenEventStore(pg_pool)
    now = 100 * DAY
    published = await _store(store, [(trade_frame("a", i), now - 30 * DAY + i) for i in range(3)])
    # another publisher's rows, none of them published yet
    await _store(store, [(trade_frame("b", i), now - 25 * DAY + i) for i in range(2)], "trial/x")
    await store.mark_published("trial", 0)
    await _store(store, [(trade_frame("a", i), now - 20 * DAY + i) for i in range(3, 6)])
    await store.mark_published("feed", published)
    # a publisher that stopped long ago holds only its own rows (it has none)
    await store.mark_published("retired", 0)
    pruned = await store.prune(now)
    # of feed's published rows, all but the highest seq go
    assert (pruned.events, pruned.held) == (2, 6)
    rows = [(s.row_id, s.event.source) async for s in store.stream_stored(order="id")]
    assert rows[0] == (published, "feed/test") and len(rows) == 6
    await store.mark_published("trial", await store.last_row())
    assert (await store.prune(now)).events == 2


async def test_the_highest_seq_and_unpublished_redrives_stay(pg_pool):
    store = TokenEventStore(pg_pool)
    events = [_event(trade_frame("a", seq), float(seq), seq) for seq in (1, 3, 4)]
    await store.write_batch(events, [trade_frame("a", seq) for seq in (1, 3, 4)])
    # a refused seq stored later by its redrive, which has not published it yet
    redriven = _event(trade_frame("a", 2), 2.0, 2)
    await store.store_redriven(redriven, trade_frame("a", 2))
    await store.mark_published("feed", await store.last_row())
    assert (await store.prune(DAY)).events == 2
    left = [e.seq async for e in store.stream()]
    # the top seq is the floor a restarted feed numbers a returning mint above
    assert left == [2, 4] and await store.max_seq() == 4
    await store.mark_redrive_published(redriven.id)
    assert (await store.prune(DAY)).events == 1
    assert [e.seq async for e in store.stream()] == [4]


async def test_a_dry_run_deletes_nothing_and_says_what_would_go(pg_pool):
    store = TokenEventStore(pg_pool)
    now = 100 * DAY
    last = await _store(store, [
        (_create("old"), now - 10 * DAY), (trade_frame("old", 1), now - 9 * DAY),
        (trade_frame("new", 1), now - DAY), (trade_frame("new", 2), now),
    ])  # fmt: skip
    await store.mark_published("feed", last - 2)
    would = await store.prune(now - 7 * DAY, dry_run=True)
    assert (would.events, would.tokens, would.held) == (2, 1, 0)
    assert would.bytes > 0
    assert await store.count() == 4 and len(await _mints(pg_pool)) == 1
    assert (await store.prune(now - 7 * DAY)).events == 2


async def test_a_prune_while_the_feed_records_loses_no_new_event(pg_pool):
    store = TokenEventStore(pg_pool)
    now = 100 * DAY
    old = [(trade_frame("old", i), now - 30 * DAY + i) for i in range(20_000)]
    for start in range(0, len(old), 5_000):
        last = await store.write_batch(
            [_event(raw, t, None) for raw, t in old[start : start + 5_000]],
            [raw for raw, _ in old[start : start + 5_000]],
        )
    await store.mark_published("feed", last.last_id)
    recorder = Recorder(store, config=RecorderConfig(batch_size=50))
    await recorder.start()
    batches = []
    pruning = asyncio.create_task(store.prune(now - DAY, batch_size=500, on_batch=batches.append))
    new = []
    while not pruning.done():
        raw = trade_frame("new", len(new))
        new.append(raw)
        await recorder.add(_event(raw, now, len(new)), raw)
        await asyncio.sleep(0)  # the writer's and the prune's turns
    pruned = await pruning
    await recorder.flush()
    await recorder.close()
    assert pruned.events == 20_000 and len(batches) >= 40
    assert new and recorder.stored == len(new)
    stored = [s.frame async for s in store.stream_stored(order="id")]
    assert stored == new


async def test_a_failed_prune_is_counted_and_the_next_interval_prunes(pg_pool):
    store = TokenEventStore(pg_pool)
    now = time.time()
    await _store(store, [(trade_frame("a", i), now - 30 * DAY + i) for i in range(3)], "old/x")
    registry = CollectorRegistry()
    metrics = FeedMetrics(registry)
    await pg_pool.execute("ALTER TABLE token_events RENAME TO token_events_away")
    retention = Retention(
        store,
        RetentionConfig(keep_s=7 * DAY, every_s=0.05),
        clock=WallClock(),
        holds=lambda: True,
        metrics=metrics,
    )
    retention.start()
    try:
        await eventually(lambda: registry.get_sample_value("pumpflow_feed_prune_errors_total"))
        await pg_pool.execute("ALTER TABLE token_events_away RENAME TO token_events")
        pruned = {"table": "token_events"}
        # all but the highest seq
        await eventually(
            lambda: registry.get_sample_value("pumpflow_feed_pruned_total", pruned) == 2
        )
    finally:
        await retention.close()
    assert await store.count() == 1


async def test_autovacuum_frees_a_prunes_rows_after_a_twentieth_of_the_table(pg_pool):
    """Postgres reuses deleted rows' space once vacuumed: at its default (a fifth of the
    table dead) a week's keep would grow by a day and a half before the first reuse."""
    options = await pg_pool.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'token_events'::regclass"
    )
    assert "autovacuum_vacuum_scale_factor=0.05" in (options or [])


async def test_a_keep_longer_than_any_date_prunes_nothing_as_pumpflow_prune_does(pg_pool):
    """The bound is the epoch, as ``pumpflow prune --keep-days`` takes it: every event kept."""
    store = TokenEventStore(pg_pool)
    last = await _store(store, [(trade_frame("a", i), 10.0 + i) for i in range(3)])
    await store.mark_published("feed", last)
    retention = Retention(
        store, RetentionConfig(keep_s=1e8 * DAY), clock=WallClock(), holds=lambda: True,
        metrics=FeedMetrics(CollectorRegistry()),
    )  # fmt: skip
    pruned = await retention.prune()
    assert (pruned.events, pruned.held) == (0, 0)
    assert await store.count() == 3
