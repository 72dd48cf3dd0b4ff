"""Retention: delete the stored token events older than the keep, on a schedule.

Only the replica that holds the feed's lease prunes, so replicas do not delete the same
rows at once; a prune running as the lease moves is still safe (what it keeps does not
depend on who runs it: ``TokenEventStore.prune``). Each prune deletes in batches of
their own transactions, so the recorder's writes go on between them. A failed prune
(Postgres away) is logged and counted, and tried again at the next interval: a disk
that fills slower than an interval loses nothing by the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pumpflow.common.clock import Clock
from pumpflow.common.runtime.settings import DAY_S, keep_bound
from pumpflow.common.storage import Pruned, TokenEventStore
from pumpflow.feed.metrics import FeedMetrics

log = logging.getLogger(__name__)
#: how soon a replica that takes the lease over prunes, if one is due
HOLDS_CHECK_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionConfig:
    """How long stored events are kept and how they are deleted."""

    keep_s: float
    every_s: float = 3600.0
    batch_size: int = 5_000

    def __post_init__(self) -> None:
        if self.keep_s <= 0 or self.every_s <= 0 or self.batch_size < 1:
            raise ValueError("keep_s and every_s must be > 0 and batch_size >= 1")


class Retention:
    """Prune at start and every ``every_s`` while ``holds()`` (the feed's lease)."""

    def __init__(
        self,
        store: TokenEventStore,
        config: RetentionConfig,
        *,
        clock: Clock,
        holds: Callable[[], bool],
        metrics: FeedMetrics,
    ):
        self.store = store
        self.config = config
        self._clock = clock
        self._holds = holds
        self.metrics = metrics
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="feed-retention")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        last: float | None = None
        while True:
            due = last is None or time.monotonic() - last >= self.config.every_s
            if due and self._holds():
                last = time.monotonic()
                try:
                    await self.prune()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.metrics.prune_errors.inc()
                    log.warning("feed: pruning the token events older than %g days failed "
                                "(%s: %.300s); tried again in %g s", self.config.keep_s / DAY_S,
                                type(exc).__name__, exc, self.config.every_s)  # fmt: skip
            await asyncio.sleep(min(self.config.every_s, HOLDS_CHECK_S))

    async def prune(self) -> Pruned:
        """Delete the events older than the keep; count and log what went."""
        before = keep_bound(self._clock.now(), self.config.keep_s)
        started = time.monotonic()
        pruned = await self.store.prune(
            before, batch_size=self.config.batch_size, on_batch=self._count
        )
        if pruned.events or pruned.held:
            log.info("feed: pruned %d token events and %d tokens older than %g days (about "
                     "%d MB, reused by new rows) in %.1f s; %d older kept (not yet published, "
                     "or the highest seq)",
                     pruned.events, pruned.tokens, self.config.keep_s / DAY_S,
                     pruned.bytes // 1_000_000, time.monotonic() - started,
                     pruned.held)  # fmt: skip
        return pruned

    def _count(self, batch: Pruned) -> None:
        self.metrics.pruned_events.inc(batch.events)
        self.metrics.pruned_tokens.inc(batch.tokens)
