"""DeadLetterQueue: bounded, sent in batches by its own task, never silent about a drop."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.testing import eventually
from pumpflow.feed.dead_letters import DeadLetterConfig, DeadLetterQueue, LogBudget
from pumpflow.feed.metrics import FeedMetrics


class Broker:
    """A dead-letter sink that confirms once ``gate`` is set, failing the first ``failures``."""

    def __init__(self, *, failures: int = 0) -> None:
        self.gate = asyncio.Event()
        self.failures = failures
        self.letters: list[tuple[bytes, str, str | None]] = []
        self.concurrent = 0
        self.most_concurrent = 0

    async def dead_letter(self, body, *, service, reason, event_type=None, **_) -> None:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await self.gate.wait()
            if self.failures:
                self.failures -= 1
                raise ConnectionError("broker restarting")
            self.letters.append((body, reason, event_type))
        finally:
            self.concurrent -= 1


async def test_a_full_queue_drops_offers_without_waiting_and_counts_them(caplog):
    broker = Broker()
    metrics = FeedMetrics(CollectorRegistry())
    queue = DeadLetterQueue(broker, service="feed", metrics=metrics,
                            config=DeadLetterConfig(max_letters=100, batch_size=10))  # fmt: skip
    queue.start()
    caplog.set_level(logging.WARNING)
    offered = [queue.offer(b"bad %d" % i, "not JSON") for i in range(300)]
    assert offered.count(True) == 100 and queue.dropped == 200
    # the sender takes one batch of 10 to the silent broker: room for 10 more
    await eventually(lambda: broker.concurrent == 10)
    offered = [queue.offer(b"late %d" % i, "not JSON") for i in range(15)]
    assert offered.count(True) == 10 and queue.dropped == 205
    assert metrics.dead_letters_dropped._value.get() == 205
    drops = [r for r in caplog.records if "dead-letter queue full" in r.getMessage()]
    assert len(drops) == 1  # one line, not 205
    broker.gate.set()
    await queue.flush()
    assert [body for body, _, _ in broker.letters] == [b"bad %d" % i for i in range(100)] + [
        b"late %d" % i for i in range(10)
    ]
    assert broker.most_concurrent == 10  # a batch's confirms are awaited together
    assert await queue.close(1.0) == 0


async def test_the_byte_bound_holds_too():
    broker = Broker()
    queue = DeadLetterQueue(broker, service="feed",
                            config=DeadLetterConfig(max_bytes=10_000, batch_size=1))  # fmt: skip
    queue.start()
    assert queue.offer(b"x" * 4_000_000, "too large")  # alone it goes through
    await eventually(lambda: broker.concurrent == 1)  # the sender holds it
    assert queue.offer(b"y" * 6_000, "r") and not queue.offer(b"z" * 6_000, "r")
    assert queue.dropped == 1
    broker.gate.set()
    await queue.flush()
    assert [len(body) for body, _, _ in broker.letters] == [4_000_000, 6_000]


async def test_send_waits_for_its_confirm_and_failures_are_retried_not_dropped():
    broker = Broker(failures=3)
    queue = DeadLetterQueue(broker, service="feed",
                            config=DeadLetterConfig(retry_initial_s=0.01))  # fmt: skip
    queue.start()
    sent = asyncio.create_task(queue.send(b"refused row", "store refused it", "token.trade"))
    await eventually(lambda: broker.concurrent == 1)
    assert not sent.done()  # no confirm yet
    broker.gate.set()
    await asyncio.wait_for(sent, 5)
    assert broker.letters == [(b"refused row", "store refused it", "token.trade")]
    assert queue.dropped == 0 and queue.sent == 1
    await queue.close(1.0)


async def test_close_reports_what_it_could_not_send(caplog):
    broker = Broker()  # never confirms
    queue = DeadLetterQueue(broker, service="feed")
    queue.start()
    queue.offer(b"a", "r")
    queue.offer(b"b", "r")
    caplog.set_level(logging.ERROR)
    assert await queue.close(0.05) == 2
    assert "2 dead letters not sent" in caplog.text


async def test_letters_reach_the_bus_with_their_reason():
    bus = InMemoryBus(partitions=2, synchronous=True, source="feed/t")
    await bus.start()
    queue = DeadLetterQueue(bus, service="feed")
    queue.start()
    for i in range(600):
        queue.offer(b"frame %d" % i, f"reason {i}")
    await queue.flush()
    letters = await bus.dead_letters("feed", limit=1000)
    assert [(letter.body, letter.reason) for letter in letters] == [
        (b"frame %d" % i, f"reason {i}") for i in range(600)
    ]
    await queue.close(1.0)
    await bus.close()


def test_log_budget_counts_what_it_holds_back():
    budget = LogBudget(limit=2, window_s=60)
    assert [budget.allow() for _ in range(5)] == [True, True, False, False, False]
    assert budget.take_suppressed() == 3 and budget.take_suppressed() == 0
    with pytest.raises(ValueError):
        LogBudget(limit=0)
