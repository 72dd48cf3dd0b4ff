"""Start-up: every dependency waited for under one policy, and what is awaited shown.

A replica serves HTTP before it connects anything: ``/healthz`` says it is alive,
``/readyz`` that it is not ready and which dependency it waits for, with the last
error. Each dependency (RabbitMQ, Redis, Postgres) is tried at once and again after a
pause that doubles from :attr:`RetryPolicy.first_pause_s` up to
:attr:`RetryPolicy.max_pause_s`, forever or until :attr:`RetryPolicy.give_up_after_s`
(then the replica exits 1). All of them are awaited at the same time, so ``/readyz``
names every one that is missing. The runner cancels the wait on SIGTERM: a replica
that never started stops at once, with exit 0.

A dependency the service works on without is reached in the background
(:meth:`Startup.reach_in_background`): under the same pauses, never given up, shown
(``required: false``) but not waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pumpflow.common.runtime.service import ServiceContext
    from pumpflow.common.runtime.settings import CommonSettings

log = logging.getLogger("pumpflow.runtime")

T = TypeVar("T")

#: an error text kept for /readyz is cut to this many characters
_MAX_ERROR = 300


class DependencyUnavailable(RuntimeError):
    """A dependency stayed unreachable for longer than the policy waits."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long and how often a starting replica tries to reach a dependency."""

    first_pause_s: float = 0.2
    max_pause_s: float = 5.0
    #: None: try forever
    give_up_after_s: float | None = None
    #: one attempt that takes longer failed (a server that accepts and never answers)
    attempt_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.first_pause_s <= self.max_pause_s:
            raise ValueError("need 0 < first_pause_s <= max_pause_s")
        if self.give_up_after_s is not None and self.give_up_after_s <= 0:
            raise ValueError("give_up_after_s must be positive (None: forever)")
        if self.attempt_timeout_s <= 0:
            raise ValueError("attempt_timeout_s must be positive")

    @classmethod
    def of(cls, settings: CommonSettings) -> RetryPolicy:
        return cls(
            max_pause_s=settings.dependency_retry_max_s,
            first_pause_s=min(0.2, settings.dependency_retry_max_s),
            give_up_after_s=settings.dependency_wait_s,
        )


@dataclass(slots=True)
class _Waiting:
    since: float
    attempts: int = 0
    error: str | None = None


class Startup:
    """A replica's start-up: what it waits for until its service runs (then ``ctx``)."""

    def __init__(self, settings: CommonSettings, policy: RetryPolicy | None = None):
        self.settings = settings
        self.policy = policy or RetryPolicy.of(settings)
        #: the running service's context; None while starting
        self.ctx: ServiceContext | None = None
        self._waiting: dict[str, _Waiting] = {}
        #: dependencies reached in the background: readiness does not wait for them
        self._optional: set[str] = set()

    @classmethod
    def running(cls, ctx: ServiceContext) -> Startup:
        """The start-up of a service already running on ``ctx``."""
        startup = cls(ctx.settings)
        startup.ctx = ctx
        return startup

    @property
    def waiting_for(self) -> list[str]:
        """The dependencies not reached yet that the service cannot start without, by name."""
        return sorted(set(self._waiting) - self._optional)

    def checks(self) -> dict[str, dict[str, Any]]:
        """/readyz's checks of the dependencies not reached yet, by name."""
        now = time.monotonic()
        checks = {}
        for name, waiting in sorted(self._waiting.items()):
            checks[name] = {
                "ok": False,
                "waiting": True,
                "attempts": waiting.attempts,
                "waiting_s": round(now - waiting.since, 1),
                "error": waiting.error,
            }
            if name in self._optional:
                checks[name]["required"] = False
        return checks

    def reach_in_background(
        self, name: str, attempt: Callable[[], Awaitable[object]], *, bounded: bool = True
    ) -> asyncio.Task[object]:
        """Reach a dependency the service works on without: a task retrying ``attempt``
        under the policy's pauses, never giving up (a replica that is ready without it
        has nothing to exit for: exiting takes a working replica out, and its restart
        waits the same), shown in :meth:`checks` meanwhile, not in :attr:`waiting_for`."""
        self._optional.add(name)
        return asyncio.create_task(
            self.reach(name, attempt, give_up=False, bounded=bounded), name=f"reach {name}"
        )

    async def reach(
        self,
        name: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        give_up: bool = True,
        bounded: bool = True,
    ) -> T:
        """``attempt()``'s result once it succeeds, retried under the policy (``give_up``
        False: for ever, whatever the policy's :attr:`RetryPolicy.give_up_after_s`).

        ``bounded`` False: an attempt is not cut after the policy's
        :attr:`RetryPolicy.attempt_timeout_s`; it bounds its own waits on the dependency
        and may rightly take longer (a pool's opening applies the migrations)."""
        policy = self.policy
        give_up_after_s = policy.give_up_after_s if give_up else None
        waiting = self._waiting[name] = _Waiting(since=time.monotonic())
        pause = policy.first_pause_s
        try:
            while True:
                waiting.attempts += 1
                try:
                    if bounded:
                        async with asyncio.timeout(policy.attempt_timeout_s):
                            result = await attempt()
                    else:
                        result = await attempt()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    waiting.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
                    waited = time.monotonic() - waiting.since
                    if give_up_after_s is not None and waited >= give_up_after_s:
                        raise DependencyUnavailable(
                            f"{name} still unreachable after {waited:.0f} s "
                            f"(PUMPFLOW_DEPENDENCY_WAIT_S): {waiting.error}"
                        ) from exc
                    log.warning(
                        "waiting for %s (attempt %d, %.0f s so far): %s; next try in %.1f s",
                        name,
                        waiting.attempts,
                        waited,
                        waiting.error,
                        pause,
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, policy.max_pause_s)
                    continue
                if waiting.attempts > 1:
                    log.info("%s reached after %d attempts", name, waiting.attempts)
                return result
        finally:
            del self._waiting[name]
