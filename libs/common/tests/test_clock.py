"""Clocks: replay timers in time order, cancel, advance; wall-clock timers fire."""

from __future__ import annotations

import asyncio
import time

import pytest

from pumpflow.common.clock import ReplayClock, WallClock, first_of
from pumpflow.common.testing import eventually


async def test_replay_timers_fire_in_time_order_with_ties_in_scheduling_order():
    clock = ReplayClock(start=100.0)
    fired: list[tuple[str, float]] = []

    def note(name):
        return lambda: fired.append((name, clock.now()))

    clock.call_at(105.0, note("c"))
    clock.call_at(102.0, note("a"))
    clock.call_later(5.0, note("d"))  # also 105, scheduled after c
    clock.call_at(103.5, note("b"))
    clock.call_at(200.0, note("late"))
    assert clock.pending_timers == 5
    assert clock.next_timer_at() == 102.0

    assert await clock.advance_to(105.0) == 4
    assert fired == [("a", 102.0), ("b", 103.5), ("c", 105.0), ("d", 105.0)]
    assert clock.now() == 105.0
    assert clock.pending_timers == 1
    assert clock.next_timer_at() == 200.0


async def test_cancelled_timers_never_fire():
    clock = ReplayClock()
    fired = []
    keep = clock.call_at(1.0, lambda: fired.append("keep"))
    drop = clock.call_at(0.5, lambda: fired.append("drop"))
    drop.cancel()
    assert clock.pending_timers == 1
    assert clock.next_timer_at() == 1.0
    assert await clock.advance(10.0) == 1
    assert fired == ["keep"]
    keep.cancel()  # cancelling a fired timer is harmless
    assert clock.next_timer_at() is None


async def test_advance_moves_time_and_never_backwards():
    clock = ReplayClock(start=50.0)
    assert await clock.advance(2.5) == 0
    assert clock.now() == 52.5
    await clock.advance_to(10.0)
    assert clock.now() == 52.5
    clock.set_sync(60.0)
    clock.set_sync(55.0)
    assert clock.now() == 60.0
    assert clock.monotonic() == 60.0


async def test_set_sync_defers_due_timers_to_the_next_advance():
    clock = ReplayClock(start=0.0)
    fired = []
    clock.call_at(1.0, lambda: fired.append(clock.now()))
    clock.set_sync(5.0)
    assert fired == []
    assert await clock.advance_to(5.0) == 1
    # time never goes backwards, so the late timer sees the current time
    assert fired == [5.0]


async def test_async_callbacks_are_awaited_and_may_schedule_more():
    clock = ReplayClock(start=0.0)
    fired = []

    async def tick():
        await asyncio.sleep(0)
        fired.append(clock.now())
        if clock.now() < 3.0:
            clock.call_later(1.0, tick)

    clock.call_at(1.0, tick)
    assert await clock.advance_to(10.0) == 3
    assert fired == [1.0, 2.0, 3.0]
    assert clock.now() == 10.0


async def test_call_later_never_schedules_in_the_past():
    clock = ReplayClock(start=7.0)
    handle = clock.call_later(-3.0, lambda: None)
    assert handle.when == 7.0
    assert await clock.advance(0.0) == 1


async def test_wall_clock_timers_fire_and_cancel():
    clock = WallClock()
    fired = asyncio.Event()
    async_fired = asyncio.Event()
    cancelled = []

    async def async_callback():
        await asyncio.sleep(0)
        async_fired.set()

    start = clock.now()
    clock.call_later(0.01, fired.set)
    clock.call_at(clock.now() + 0.01, async_callback)
    handle = clock.call_later(0.02, lambda: cancelled.append("fired"))
    handle.cancel()
    # timers fire in time order: once a later one fired, the cancelled one's time passed
    later = asyncio.Event()
    clock.call_later(0.03, later.set)
    await asyncio.wait_for(fired.wait(), 5)
    await asyncio.wait_for(async_fired.wait(), 5)
    await asyncio.wait_for(later.wait(), 5)
    assert cancelled == []
    assert clock.now() >= start
    assert clock.monotonic() <= clock.monotonic()


async def test_a_fast_wall_clock_runs_time_and_timers_at_its_speed():
    clock = WallClock(speed=1000.0)
    start = clock.now()
    fired: list[float] = []
    done = asyncio.Event()

    def record() -> None:
        fired.append(clock.now())
        done.set()

    clock.call_later(20.0, record)  # 20 clock seconds = 20 ms of wall time
    await asyncio.wait_for(done.wait(), timeout=5)
    assert fired[0] >= start + 20.0
    assert WallClock(speed=1.0).now() == pytest.approx(time.time(), abs=1.0)
    with pytest.raises(ValueError):
        WallClock(speed=0)


async def test_unawaited_replay_timers_run_their_effects_beside_the_caller():
    clock = ReplayClock(start=0.0, await_timers=False)
    release = asyncio.Event()
    done: list[float] = []

    async def slow() -> None:
        await release.wait()
        done.append(clock.now())

    clock.call_at(1.0, slow)
    clock.call_at(2.0, lambda: done.append(-clock.now()))
    assert await clock.advance_to(3.0) == 2
    assert done == [-2.0]  # the second timer did not wait for the first one's effects
    release.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert done == [-2.0, 3.0]


async def test_first_of_returns_with_the_first_wait_and_ends_the_others():
    first, never = asyncio.Event(), asyncio.Event()
    others: list[asyncio.Task] = []

    async def watched() -> None:
        others.append(asyncio.current_task())
        await never.wait()

    waiting = asyncio.create_task(first_of(first.wait(), watched()))
    await eventually(lambda: others, what="both waits begun")
    assert not waiting.done()
    first.set()
    await asyncio.wait_for(waiting, 5)
    assert others[0].cancelled()
