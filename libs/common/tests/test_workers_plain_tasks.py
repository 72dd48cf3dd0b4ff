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


async def test_run_now_runs_at_once_only_when_it_overtakes_nothing():
    registry = CollectorRegistry()
    pool = TokenMonitorThreadPool(WorkerPoolConfig(name="now", workers=1), registry=registry)
    await pool.start()
    ran: list[str] = []
    pool.run_now("a", lambda: ran.append("a1"))
    assert ran == ["a1"]  # nothing queued: run inside the call

    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()
        ran.append("a2")

    pool.post("a", slow)
    await asyncio.sleep(0)  # a2 is running
    pool.run_now("b", lambda: ran.append("b1"))  # b overtakes nothing: at once
    pool.run_now("a", lambda: ran.append("a3"))  # behind a2
    assert ran == ["a1", "b1"]
    pool.run_now("d", lambda: ran.append("d1"))  # a3 waits in the queue: d goes behind it
    assert ran == ["a1", "b1"]
    release.set()
    assert await pool.join(5.0)
    assert ran.index("a3") > ran.index("a2") and ran.index("d1") > ran.index("a3")

    async def rest() -> None:
        ran.append("e2")

    def first_part():
        ran.append("e1")
        return rest()  # what is left waits: the token's next task, before a later one

    pool.run_now("e", first_part)
    pool.run_now("e", lambda: ran.append("e3"))
    assert await pool.join(5.0)
    assert ran[-3:] == ["e1", "e2", "e3"]

    def fails() -> None:
        raise ValueError("boom")

    pool.run_now("f", fails)  # logged and counted, not raised
    assert pool.tasks_failed == 1
    assert (
        registry.get_sample_value(
            "pumpflow_worker_pool_tasks_total", {"pool": "now", "outcome": "error"}
        )
        == 1
    )
    await pool.stop()
    assert (
        registry.get_sample_value(
            "pumpflow_worker_pool_tasks_total", {"pool": "now", "outcome": "ok"}
        )
        == len(ran) - 1
    )  # e's two parts are one task
