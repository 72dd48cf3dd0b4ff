"""Clocks: the only place domain code gets the time from.

``WallClock`` is for live runs; ``ReplayClock`` is driven by event time, so a replay
takes the same decisions as the live run it reproduces. Timers fire in time order.
:func:`first_of` waits for whichever of several waits ends first.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import time as _time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

TimerCallback = Callable[[], Awaitable[None] | None]


class TimerHandle:
    """A scheduled callback; cancel() stops it from firing."""

    __slots__ = ("_cancel_hook", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: TimerCallback, cancel_hook=None):
        self.when = when
        self.callback = callback
        self.cancelled = False
        self._cancel_hook = cancel_hook

    def cancel(self) -> None:
        self.cancelled = True
        if self._cancel_hook is not None:
            self._cancel_hook()
            self._cancel_hook = None

    def __lt__(self, other: TimerHandle) -> bool:
        return self.when < other.when


class Clock(ABC):
    """Time source with timers."""

    @abstractmethod
    def now(self) -> float:
        """Return the current time in epoch seconds."""

    @abstractmethod
    def call_at(self, when: float, callback: TimerCallback) -> TimerHandle:
        """Run ``callback`` at time ``when`` (epoch seconds)."""

    def call_later(self, delay: float, callback: TimerCallback) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds of this clock's time."""
        return self.call_at(self.now() + max(0.0, delay), callback)

    def monotonic(self) -> float:
        """Return a monotonic reading for measuring durations."""
        return self.now()


async def first_of(*waits: Awaitable[object]) -> None:
    """Return once the first of ``waits`` is done; cancel the others and let them end.

    What the first one raised or returned is dropped: the caller looks at what it waited
    for (a flag, the time) afterwards.
    """
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_callback(callback: TimerCallback) -> Awaitable[None] | None:
    result = callback()
    return result if inspect.isawaitable(result) else None


class WallClock(Clock):
    """The system clock; timers run on the running asyncio loop.

    ``speed`` above 1 runs time faster than the wall (a simulated market at 10x, say):
    ``now()`` starts at the wall time and advances ``speed`` seconds per real second,
    and timers fire after ``delay / speed`` real seconds.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"clock speed must be > 0, got {speed}")
        self.speed = float(speed)
        self._origin = _time.time()
        self._origin_monotonic = _time.monotonic()
        # the loop keeps only weak references to tasks: hold async callbacks until done
        self._running: set[asyncio.Future] = set()

    def now(self) -> float:
        if self.speed == 1.0:
            return _time.time()
        return self._origin + (_time.monotonic() - self._origin_monotonic) * self.speed

    def monotonic(self) -> float:
        return _time.monotonic() * self.speed

    def call_at(self, when: float, callback: TimerCallback) -> TimerHandle:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            if handle.cancelled:
                return
            pending = _run_callback(callback)
            if pending is not None:
                task = asyncio.ensure_future(pending)
                self._running.add(task)
                task.add_done_callback(self._running.discard)

        handle = TimerHandle(when, callback)
        loop_handle = loop.call_later(max(0.0, when - self.now()) / self.speed, fire)
        handle._cancel_hook = loop_handle.cancel
        return handle


class ReplayClock(Clock):
    """A clock that moves only when told to: by event time in replays, by tests.

    ``advance_to`` fires every due timer in time order (ties in scheduling order),
    setting ``now()`` to each timer's time while it runs. Time never goes backwards.
    A timer's async effects are awaited before the next timer fires, unless
    ``await_timers`` is False: then they run as a WallClock's do, beside whatever the
    caller does next (a replay of a backlog, not waiting on each timer in turn).
    """

    def __init__(self, start: float = 0.0, *, await_timers: bool = True):
        self._now = float(start)
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._counter = itertools.count()
        self.await_timers = await_timers
        # the loop keeps only weak references to tasks: hold async callbacks until done
        self._running: set[asyncio.Future] = set()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: TimerCallback) -> TimerHandle:
        handle = TimerHandle(float(when), callback)
        heapq.heappush(self._timers, (handle.when, next(self._counter), handle))
        return handle

    @property
    def pending_timers(self) -> int:
        return sum(1 for _, _, h in self._timers if not h.cancelled)

    def next_timer_at(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    async def advance_to(self, when: float) -> int:
        """Move time to ``when``, firing due timers; return how many fired."""
        fired = 0
        while self._timers and self._timers[0][0] <= when:
            due, _, handle = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self._now = max(self._now, due)
            pending = _run_callback(handle.callback)
            if pending is not None:
                if self.await_timers:
                    await pending
                else:
                    task = asyncio.ensure_future(pending)
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            fired += 1
        self._now = max(self._now, float(when))
        return fired

    async def advance(self, seconds: float) -> int:
        return await self.advance_to(self._now + seconds)

    def set_sync(self, when: float) -> None:
        """Move time forward without firing timers (for synchronous hot paths).

        Due timers fire on the next ``advance_to``.
        """
        self._now = max(self._now, float(when))
