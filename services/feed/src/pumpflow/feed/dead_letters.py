"""Dead letters of the feed, sent off the socket reader's path.

A frame that fails validation must not cost the reader a broker round trip: one
awaited confirm per bad frame turned a flood of them into a 100-fold slowdown. The
reader ``offer``s the letter to a bounded queue and goes on; a task sends the queue
in batches, every confirm of a batch outstanding at once, and retries the failed
ones with backoff (a broker that is away is waited out, never a reason to drop).

The queue is bounded in letters and in bytes. When it is full, ``offer`` does not
wait: the letter is dropped, counted (``dropped``, a metric) and reported in the log,
because a reader that waits for the broker stops reading the socket, and the market
it would miss meanwhile is worth more than the bad frame. ``send`` (for a letter that
must not be dropped, such as a token event the store refused) waits for room and for
the letter's own confirm instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from pumpflow.feed.metrics import FeedMetrics

log = logging.getLogger(__name__)


class DeadLetterSink(Protocol):
    async def dead_letter(
        self,
        body: bytes,
        *,
        service: str,
        reason: str,
        event_type: str | None = None,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None: ...


class LogBudget:
    """At most ``limit`` log lines per ``window_s`` for one kind of message; the rest counted.

    ``allow`` says whether to log this one; ``take_suppressed`` returns how many were
    held back since the last line that was logged, so that line can say so.
    """

    __slots__ = ("_limit", "_logged", "_suppressed", "_window", "_window_start")

    def __init__(self, limit: int = 10, window_s: float = 10.0):
        if limit < 1 or window_s <= 0:
            raise ValueError("a log budget needs limit >= 1 and window_s > 0")
        self._limit = limit
        self._window = window_s
        self._window_start = -window_s
        self._logged = 0
        self._suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self._window:
            self._window_start = now
            self._logged = 0
        if self._logged < self._limit:
            self._logged += 1
            return True
        self._suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self._suppressed = self._suppressed, 0
        return count


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterConfig:
    """Bounds of the dead letters waiting for the broker, and how they are sent."""

    #: letters held while earlier ones are confirmed; a full queue drops (and counts) offers
    max_letters: int = 10_000
    #: bytes of letter bodies held (a flood of 4 MB frames must not hold gigabytes)
    max_bytes: int = 64 * 2**20
    #: letters sent together, with every confirm of the batch outstanding at once (the
    #: bus's publish window: the client scans every outstanding confirm on each ack)
    batch_size: int = 128
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0

    def __post_init__(self) -> None:
        if min(self.max_letters, self.max_bytes, self.batch_size) < 1:
            raise ValueError("dead letter bounds must be at least 1")
        if self.retry_initial_s <= 0 or self.retry_max_s <= 0:
            raise ValueError("dead letter retry delays must be positive")


@dataclass(slots=True)
class _Letter:
    body: bytes
    reason: str
    event_type: str | None
    #: set when the broker confirmed it (only for ``send``)
    sent: asyncio.Future | None = None
    key: str | None = None
    headers: Mapping[str, str] | None = None


class DeadLetterQueue:
    """Letters of one service, sent in confirmed batches by a task of their own."""

    def __init__(
        self,
        sink: DeadLetterSink,
        *,
        service: str,
        config: DeadLetterConfig | None = None,
        metrics: FeedMetrics | None = None,
    ):
        self.config = config = config or DeadLetterConfig()
        self.service = service
        self._sink = sink
        self.metrics = metrics or FeedMetrics(None)
        self._letters: deque[_Letter] = deque()
        self._batch: list[_Letter] = []
        self._bytes = 0
        self._inflight = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._drop_log = LogBudget(limit=1)
        self.sent = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Letters not confirmed yet (queued or being sent)."""
        return len(self._letters) + self._inflight

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._sender(), name=f"{self.service}-dead-letters")

    def offer(self, body: bytes, reason: str, event_type: str | None = None) -> bool:
        """Queue a letter without waiting; False if the queue was full (it is counted)."""
        if not self._has_room(len(body)):
            self._drop(reason)
            return False
        self._put(_Letter(body, reason, event_type))
        return True

    async def send(
        self,
        body: bytes,
        reason: str,
        event_type: str | None = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue a letter, waiting for room, and return once the broker confirmed it."""
        while not self._has_room(len(body)):
            self._space.clear()
            await self._space.wait()
        sent = asyncio.get_running_loop().create_future()
        letter = _Letter(body, reason, event_type, sent, key=key, headers=headers)
        self._put(letter)
        await asyncio.shield(letter.sent)

    async def flush(self) -> None:
        """Wait until every queued letter is confirmed."""
        if self._task is None and self._letters:
            raise RuntimeError("dead letter queue not started")
        await self._idle.wait()

    async def close(self, timeout_s: float | None = None) -> int:
        """Send what is queued (within ``timeout_s``), stop; return the letters left unsent."""
        if self._task is None:
            return self.pending
        try:
            async with asyncio.timeout(timeout_s):
                await self.flush()
        except TimeoutError:
            pass
        unsent = self.pending
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        for letter in (*self._batch, *self._letters):
            if letter.sent is not None:
                letter.sent.cancel()  # its sender is told: the letter was never confirmed
        if unsent:
            log.error("%s: %d dead letters not sent to the broker within %.1f s (lost)",
                      self.service, unsent, timeout_s)  # fmt: skip
        return unsent

    # ------------------------------------------------------------------ internals

    def _has_room(self, size: int) -> bool:
        config = self.config
        if not self._letters:
            return True  # a single letter larger than the byte bound still goes through
        return len(self._letters) < config.max_letters and self._bytes + size <= config.max_bytes

    def _put(self, letter: _Letter) -> None:
        self._letters.append(letter)
        self._bytes += len(letter.body)
        self._idle.clear()
        self._wake.set()
        self.metrics.dead_letters_pending.set(self.pending)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.metrics.dead_letters_dropped.inc()
        if self._drop_log.allow():
            log.warning(
                "%s: dead-letter queue full (%d letters, %d bytes waiting for the broker): "
                "a letter was dropped (%s); %d dropped so far",
                self.service, len(self._letters), self._bytes, reason[:200], self.dropped,
            )  # fmt: skip

    async def _sender(self) -> None:
        while True:
            if not self._letters:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            count = min(len(self._letters), self.config.batch_size)
            batch = self._batch = [self._letters.popleft() for _ in range(count)]
            self._inflight = count
            self._bytes -= sum(len(letter.body) for letter in batch)
            self._space.set()
            await self._send_batch(batch)
            self._batch = []
            self._inflight = 0
            self.sent += count
            self.metrics.dead_letters_sent.inc(count)
            self.metrics.dead_letters_pending.set(self.pending)

    async def _send_batch(self, batch: list[_Letter]) -> None:
        """Send a batch with every confirm outstanding; retry the failed ones until none fail."""
        delay = self.config.retry_initial_s
        sink, service = self._sink, self.service
        while batch:
            sends = [
                sink.dead_letter(
                    letter.body,
                    service=service,
                    reason=letter.reason,
                    event_type=letter.event_type,
                    key=letter.key,
                    headers=letter.headers,
                )
                for letter in batch
            ]
            results = await asyncio.gather(*sends, return_exceptions=True)
            failed: list[_Letter] = []
            error: BaseException | None = None
            for letter, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    failed.append(letter)
                    error = result
                elif letter.sent is not None and not letter.sent.done():
                    letter.sent.set_result(None)
            if failed:
                log.warning("%s: %d of %d dead letters not confirmed (%s: %s); retrying in "
                            "%.1f s", service, len(failed), len(batch), type(error).__name__,
                            error, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(self.config.retry_max_s, delay * 2)
            batch = failed
