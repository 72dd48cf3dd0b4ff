"""Send at most N messages in any window of one second."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    """Admit at most ``rate`` acquisitions in any ``window`` seconds.

    A token bucket of capacity ``rate`` lets a full burst follow a second of steady
    sending, up to twice the rate within one second; PumpPortal bans by the second,
    so this keeps the exact times of the last ``rate`` sends instead.
    """

    def __init__(
        self,
        rate: int,
        window: float = 1.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        if rate < 1:
            raise ValueError("rate must be at least 1")
        self.rate = rate
        self.window = window
        self._sent: deque[float] = deque(maxlen=rate)
        self._monotonic = monotonic
        self._lock = asyncio.Lock()

    def delay(self) -> float:
        """Seconds to wait before the next send is allowed (0 when allowed now)."""
        if len(self._sent) < self.rate:
            return 0.0
        return max(0.0, self._sent[0] + self.window - self._monotonic())

    async def acquire(self) -> None:
        async with self._lock:
            wait = self.delay()
            if wait > 0:
                # the oldest of the last `rate` sends leaves the window exactly then
                await asyncio.sleep(wait)
            self._sent.append(self._monotonic())
