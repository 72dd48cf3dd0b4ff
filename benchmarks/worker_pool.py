"""TokenMonitorThreadPool benchmark: overhead per task and priority under a backlog.

1. Throughput: N trivial tasks over K tokens, awaited together; tasks/s and the pool's
   overhead per task (against awaiting the same coroutines directly).
2. Backlog: a deep queue of low-priority work, then urgent tokens' tasks; how long the
   urgent ones wait compared with the low ones (queue wait, from submit to start).

Run: .venv/bin/python benchmarks/worker_pool.py [--tasks 200000] [--workers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from prometheus_client import CollectorRegistry

from pumpflow.common.workers import TokenMonitorThreadPool, WorkerPoolConfig


async def noop() -> None:
    return None


async def throughput(tasks: int, tokens: int, workers: int) -> None:
    started = time.perf_counter()
    for _ in range(tasks):
        await noop()
    direct = time.perf_counter() - started

    pool = TokenMonitorThreadPool(
        WorkerPoolConfig(name="bench", workers=workers), registry=CollectorRegistry()
    )
    await pool.start()
    started = time.perf_counter()
    futures = [pool.submit(f"T{i % tokens}", noop, priority=i % 4) for i in range(tasks)]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await pool.stop()
    print(
        f"throughput: {tasks} tasks over {tokens} tokens, {workers} workers: "
        f"{tasks / elapsed:,.0f} tasks/s, {(elapsed - direct) / tasks * 1e6:.1f} us overhead/task"
    )


async def backlog(low: int, urgent: int, workers: int) -> None:
    pool = TokenMonitorThreadPool(
        WorkerPoolConfig(name="bench-backlog", workers=workers), registry=CollectorRegistry()
    )
    waits: dict[str, list[float]] = {"low": [], "urgent": []}

    def job(kind: str, submitted: float):
        async def run() -> None:
            waits[kind].append(time.perf_counter() - submitted)
            await asyncio.sleep(0)  # a monitor yields at least once (publish, store)

        return run

    await pool.start()
    futures = []
    for i in range(low):
        futures.append(pool.submit(f"L{i % 500}", job("low", time.perf_counter()), priority=1))
    for i in range(urgent):
        futures.append(pool.submit(f"U{i % 20}", job("urgent", time.perf_counter()), priority=4))
    await asyncio.gather(*futures)
    await pool.stop()

    def ms(values: list[float], q: float) -> str:
        values = sorted(values)
        return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.1f}"

    print(
        f"backlog: {low} low-priority tasks queued first, then {urgent} urgent ones "
        f"({workers} workers)\n"
        f"  urgent wait ms: median {statistics.median(waits['urgent']) * 1000:.1f}, "
        f"p99 {ms(waits['urgent'], 0.99)}\n"
        f"  low wait ms:    median {statistics.median(waits['low']) * 1000:.1f}, "
        f"p99 {ms(waits['low'], 0.99)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(throughput(args.tasks, args.tokens, args.workers))
    asyncio.run(backlog(args.tasks // 4, 2_000, args.workers))


if __name__ == "__main__":
    main()
