"""TokenMonitorThreadPool: priority, per-token order, health, restarts, metrics."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.testing import eventually
from pumpflow.common.workers import (
    PoolClosed,
    TaskHung,
    TokenMonitorThreadPool,
    WorkerPoolConfig,
)


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, {"pool": "p", **labels}) or 0.0


def make_pool(workers: int = 1, **kw) -> tuple[TokenMonitorThreadPool, CollectorRegistry]:
    registry = CollectorRegistry()
    config = WorkerPoolConfig(name="p", workers=workers, **kw)
    return TokenMonitorThreadPool(config, registry=registry), registry


async def test_higher_priority_tokens_first_fifo_within_priority():
    pool, _ = make_pool(workers=1)
    ran: list[str] = []

    def job(label: str):
        async def run():
            ran.append(label)

        return run

    # queued before the workers start, so the order is the queue's alone
    for label, token, priority in [
        ("a1", "A", 1),
        ("b0", "B", 0),
        ("c3", "C", 3),
        ("d1", "D", 1),
        ("e3", "E", 3),
        ("a1-2", "A", 1),
    ]:
        pool.submit(token, job(label), priority=priority)
    await pool.start()
    assert await pool.join(2)
    # C and E (3) in submit order, then the 1s in submit order (A's second task was
    # submitted after D's), then B
    assert ran == ["c3", "e3", "a1", "d1", "a1-2", "b0"]
    await pool.stop()


async def test_a_later_urgent_task_lifts_its_token_but_never_overtakes_its_own_tasks():
    pool, _ = make_pool(workers=1)
    ran: list[str] = []

    def job(label: str):
        async def run():
            ran.append(label)

        return run

    pool.submit("X", job("x-low"), priority=0)
    pool.submit("Y", job("y-mid"), priority=2)
    pool.submit("X", job("x-urgent"), priority=4)
    pool.submit("Z", job("z-low"), priority=0)
    pool.set_priority("Z", 3)
    await pool.start()
    await pool.join(2)
    assert ran == ["x-low", "x-urgent", "z-low", "y-mid"]
    await pool.stop()


async def test_per_token_order_and_no_concurrency_within_a_token():
    pool, registry = make_pool(workers=4)
    await pool.start()
    rng = random.Random(7)
    running: set[str] = set()
    seen: dict[str, list[int]] = {}
    overlaps = 0
    max_busy = 0

    def job(token: str, i: int):
        async def run():
            nonlocal overlaps, max_busy
            if token in running:
                overlaps += 1
            running.add(token)
            max_busy = max(max_busy, pool.busy)
            await asyncio.sleep(rng.random() * 0.002)
            seen.setdefault(token, []).append(i)
            running.discard(token)

        return run

    futures = []
    for i in range(30):
        for t in range(12):
            futures.append(pool.submit(f"T{t}", job(f"T{t}", i), priority=rng.randint(0, 3)))
    await asyncio.gather(*futures)
    assert overlaps == 0
    assert all(seq == list(range(30)) for seq in seen.values()) and len(seen) == 12
    assert max_busy == 4  # the tokens did run in parallel across workers
    assert sample(registry, "pumpflow_worker_pool_tasks_total", outcome="ok") == 360
    # one task in 8 is timed
    assert sample(registry, "pumpflow_worker_pool_task_seconds_count") == 360 // 8
    assert sample(registry, "pumpflow_worker_pool_queue_depth") == 0
    assert sample(registry, "pumpflow_worker_pool_busy_workers") == 0
    await pool.stop()


async def test_failing_worker_is_detected_and_restarted():
    errors: list[tuple[str, BaseException]] = []
    registry = CollectorRegistry()
    pool = TokenMonitorThreadPool(
        WorkerPoolConfig(name="p", workers=2, health_interval_s=0.01),
        registry=registry,
        on_error=lambda token, exc: errors.append((token, exc)),
    )
    await pool.start()

    async def boom():
        raise ValueError("bad event")

    async def fine():
        return "ok"

    failed = pool.submit("A", boom)
    after = pool.submit("A", fine)  # the token goes on, in order
    with pytest.raises(ValueError, match="bad event"):
        await failed
    assert await after == "ok"
    await eventually(lambda: pool.restarts, what="the failed worker's replacement")
    health = pool.health()
    assert pool.restarts == 1 and health.alive == 2 and health.healthy
    assert health.tasks_failed == 1
    assert [(t, str(e)) for t, e in errors] == [("A", "bad event")]
    assert sample(registry, "pumpflow_worker_pool_restarts_total", reason="error") == 1
    assert sample(registry, "pumpflow_worker_pool_tasks_total", outcome="error") == 1
    # the replaced pool keeps working at full capacity
    results = await asyncio.gather(*(pool.submit(f"K{i}", fine) for i in range(10)))
    assert results == ["ok"] * 10
    await pool.stop()


async def test_hung_worker_is_detected_cancelled_and_replaced():
    pool, registry = make_pool(workers=1, task_deadline_s=0.1, health_interval_s=0.02)
    await pool.start()
    ran: list[str] = []
    ran_while_hung: list[str] = []
    hanging = asyncio.Event()

    async def hang():
        hanging.set()
        try:
            await asyncio.sleep(3600)  # a task that never returns by itself
        except asyncio.CancelledError:
            # the end of the hang (cancelled before the replacement starts): what ran so far
            ran_while_hung.extend(ran)
            raise

    async def mark(label: str):
        ran.append(label)

    stuck = pool.submit("H", hang)
    next_of_h = pool.submit("H", lambda: mark("h-next"))
    other = pool.submit("O", lambda: mark("other"), priority=-1)
    await hanging.wait()
    assert pool.busy == 1
    with pytest.raises(TaskHung):
        await stuck
    assert ran_while_hung == []  # the one worker was stuck until it was cancelled
    await asyncio.gather(next_of_h, other)
    assert ran == ["h-next", "other"]
    assert pool.restarts == 1
    assert sample(registry, "pumpflow_worker_pool_restarts_total", reason="hung") == 1
    assert sample(registry, "pumpflow_worker_pool_tasks_total", outcome="hung") == 1
    assert pool.health().healthy
    await pool.stop()


async def test_health_reports_a_hung_token_until_its_task_ends():
    pool, _ = make_pool(workers=1, task_deadline_s=0.05, health_interval_s=0.01)
    await pool.start()
    release = asyncio.Event()

    async def stubborn():
        # ignores the first cancellation, as badly written code may
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()

    fut = pool.submit("S", stubborn)
    await eventually(lambda: pool.health().hung_tokens, what="the hung token reported")
    health = pool.health()
    assert health.hung_tokens == ("S",) and not health.healthy
    assert health.alive == 1  # replaced already: capacity kept
    assert await pool.submit("other", lambda: asyncio.sleep(0, "done")) == "done"
    release.set()
    await fut  # it swallowed the cancellation and returned normally
    await eventually(lambda: pool.health().hung_tokens == (), what="the hung token cleared")
    await pool.stop()


async def test_queue_depth_and_busy_gauges_move_and_stop_cancels_pending():
    pool, registry = make_pool(workers=1)
    gate = asyncio.Event()
    waiting = asyncio.Event()

    async def wait_gate():
        waiting.set()
        await gate.wait()

    async def noop():
        return None

    await pool.start()
    first = pool.submit("A", wait_gate)
    queued = [pool.submit(f"B{i}", noop) for i in range(5)]
    await waiting.wait()
    assert sample(registry, "pumpflow_worker_pool_busy_workers") == 1
    assert sample(registry, "pumpflow_worker_pool_queue_depth") == 5
    assert sample(registry, "pumpflow_worker_pool_workers") == 1
    await pool.stop(drain=False)
    assert first.cancelled() and all(f.cancelled() for f in queued)
    assert sample(registry, "pumpflow_worker_pool_queue_depth") == 0
    with pytest.raises(PoolClosed):
        pool.submit("A", noop)


async def test_a_token_has_work_while_a_task_of_it_is_queued_or_running():
    pool, _ = make_pool(workers=1)
    gate = asyncio.Event()
    waiting = asyncio.Event()

    async def wait_gate():
        waiting.set()
        await gate.wait()

    async def noop():
        return None

    await pool.start()
    running = pool.submit("A", wait_gate)
    queued = pool.submit("B", noop)
    await waiting.wait()
    assert pool.has_work("A") and pool.pending("A") == 0
    assert pool.has_work("B") and not pool.has_work("C")
    gate.set()
    await asyncio.gather(running, queued)
    await pool.join(5)
    assert not pool.has_work("A") and not pool.has_work("B")
    await pool.stop()


def test_config_validation():
    with pytest.raises(ValueError):
        WorkerPoolConfig(workers=0)


async def test_join_returns_once_only_cancelled_tasks_were_left():
    pool, _ = make_pool(workers=1)
    gate = asyncio.Event()

    async def blocked():
        await gate.wait()

    async def never():
        raise AssertionError("a cancelled task must not run")

    await pool.start()
    first = pool.submit("A", blocked)
    pool.submit("B", never).cancel()
    gate.set()
    await first
    assert await pool.join(1.0)
    assert pool.queue_depth == 0
    await pool.stop()


def test_the_restarts_are_counted_from_0():
    """A counter child made at its first increment appears at 1, which increase() does
    not count: a pool's first worker restart would read 0 on the dashboard."""
    _, registry = make_pool()
    for reason in ("error", "hung"):
        labels = {"pool": "p", "reason": reason}
        assert registry.get_sample_value("pumpflow_worker_pool_restarts_total", labels) == 0
