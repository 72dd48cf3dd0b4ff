"""Plain (non-coroutine) tasks on the TokenMonitorThreadPool: run in order, results kept."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from pumpflow.common.workers import TokenMonitorThreadPool, WorkerPoolConfig


async def test_plain_tasks_run_in_token_order_and_let_other_tasks_run():
    pool = TokenMonitorThreadPool(WorkerPoolConfig(workers=1), registry=CollectorRegistry())
    await pool.start()
    ran: list[tuple[str, int]] = []
    other_ran_after: list[int] = []

    def task(token: str, i: int):
        def run() -> int:
            ran.append((token, i))
            return i * 10

        return run

    async def other() -> None:
        other_ran_after.append(len(ran))

    futures = [pool.submit(t, task(t, i)) for i in range(300) for t in ("a", "b")]
    side = asyncio.ensure_future(other())
    results = await asyncio.gather(*futures)
    assert results == [i * 10 for i in range(300) for _ in ("a", "b")]
    for token in ("a", "b"):
        assert [i for t, i in ran if t == token] == list(range(300))
    # one worker ran 600 plain tasks, yet the loop's other task ran before the last one
    await side
    assert other_ran_after and other_ran_after[0] < len(ran)
    await pool.stop()


async def test_a_failing_plain_task_fails_its_future_and_the_worker_is_replaced():
    pool = TokenMonitorThreadPool(WorkerPoolConfig(workers=1), registry=CollectorRegistry())
    await pool.start()

    def boom() -> None:
        raise ValueError("bad")

    failed = pool.submit("a", boom)
    after = pool.submit("a", lambda: "next")
    try:
        await failed
    except ValueError as exc:
        assert str(exc) == "bad"
    else:
        raise AssertionError("the failing task's future did not fail")
    assert await after == "next"
    assert pool.restarts == 1
    await pool.stop()
