"""Bounded waits for outcomes that other tasks or processes bring about."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    within: float = 30.0,
    *,
    what: str | None = None,
    details: Callable[[], str] | None = None,
    interval: float = 0.005,
) -> T:
    """Poll ``condition`` until it returns something truthy; return that.

    For outcomes that offer nothing to await but the outcome itself (a handler's
    side effect, a process's HTTP endpoint, a row in a table). ``condition`` may be
    async; wrap a blocking one as ``lambda: asyncio.to_thread(check)``. Events on a
    bus are better awaited with :class:`~pumpflow.common.testing.EventCollector`.

    Fails with an AssertionError naming ``what`` (and ``details()``, logs say) when
    the condition does not hold within ``within`` seconds. The limit only bounds a
    failure: a passing test goes on as soon as the condition holds.
    """
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            message = f"{what or 'condition'} not met within {within:g} s"
            if details is not None:
                message = f"{message}\n{details()}"
            raise AssertionError(message)
        await asyncio.sleep(interval)
