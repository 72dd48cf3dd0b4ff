"""Transient failures of dependencies: one classification, one backoff, one record of waits.

A dependency (Redis, Postgres, RabbitMQ) that is restarting, loading its data, refusing
or dropping connections, not answering in time, or refusing writes until its operator
frees memory or disk (Redis at its maxmemory, Postgres out of disk) fails *for a
while*. Such a failure says nothing about the work that met it, so that work is waited
out: retried with a capped exponential backoff until the dependency answers again,
never counted against the work's attempts, never dead-lettered. Every other error is a
failure of the work itself (bad input, a bug) and goes the usual way (attempts, then the
dead-letter queue).

- :func:`transient_dependency` classifies an error: the name of the dependency it is a
  transient failure of, or None. It is the one place that knows which errors those are.
- :class:`Backoff`: the pauses between attempts (capped exponential).
- :data:`WAITS` (:class:`DependencyWaits`): what this process is waiting on right now,
  for readiness (``/readyz`` names the dependency) and metrics
  (``pumpflow_dependency_waits_total`` counts each wait, by dependency and waiter;
  ``pumpflow_dependency_waiting`` is the number of parties waiting on one now).
- :func:`wait_out`: run an action until it succeeds, waiting out transient failures.

A dependency that never answers (a frozen host, a network lost without a reset) fails
only by a bound on the wait: Postgres commands and Redis socket operations are bounded
(:mod:`pumpflow.common.timeouts`, the defaults of the
runtime's settings), and a timeout a client library raises is that dependency's
transient failure like any other.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS = "redis"
POSTGRES = "postgres"
RABBITMQ = "rabbitmq"
#: a connection-level failure whose library does not say which dependency it was
NETWORK = "network"


_LIBRARIES = {
    "redis": REDIS,
    "asyncpg": POSTGRES,
    "aiormq": RABBITMQ,
    "aio_pika": RABBITMQ,
    "pamqp": RABBITMQ,
}

#: Redis replies that mean "not now": a server starting, failing over, loading; or
#: refusing writes until its operator acts: at its maxmemory (OOM; the state it keeps
#: must not be evicted) or unable to save its snapshot (MISCONF, a full disk)
_REDIS_BUSY_REPLIES = (
    "LOADING", "BUSY ", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "READONLY", "OOM ", "MISCONF ",
)  # fmt: skip
_REDIS_TRANSIENT = {
    "ConnectionError",
    "TimeoutError",
    "BusyLoadingError",
    "MaxConnectionsError",
    # at its maxmemory; what a script's refusal says is not the reply's OOM text
    "OutOfMemoryError",
}
_POSTGRES_TRANSIENT = {
    "PostgresConnectionError",  # class 08 and every subclass: refused, dropped, failed
    "CannotConnectNowError",  # 57P03 the server is starting up or shutting down
    "AdminShutdownError",  # 57P01
    "CrashShutdownError",  # 57P02
    "TooManyConnectionsError",  # 53300
    "SerializationError",  # 40001, retrying the transaction is the remedy
    "DeadlockDetectedError",  # 40P01
    # class 53 and every subclass: out of disk (53100), memory, connections; the server
    # takes writes again once its operator frees them
    "InsufficientResourcesError",
    # 25006: a server that became a standby (a failover) takes no writes until it is
    # the primary again or the connection reaches the new one
    "ReadOnlySQLTransactionError",
}
_AMQP_TRANSIENT = {"AMQPConnectionError", "ChannelInvalidStateError", "ConnectionClosed"}
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EADDRNOTAVAIL,
    }
)
#: a host name that does not resolve now: a container stopped or being recreated (compose's
#: DNS forgets its name meanwhile), the resolver away; a name wrong from the start never
#: gets this far (the replica's start waits for it, not ready, its error in /readyz)
_RESOLUTION_ERRNOS = frozenset({socket.EAI_AGAIN, socket.EAI_NONAME})
#: how far down ``__cause__`` / ``__context__`` an error is looked through
_CHAIN_DEPTH = 8


class DependencyUnreachable(ConnectionError):
    """A connection to ``dependency`` that failed below its client library, which raised
    the socket's own error (asyncpg's ConnectionRefusedError when Postgres is down):
    named by the caller that knows where it connected (:func:`reaching`)."""

    def __init__(self, dependency: str, error: BaseException):
        self.dependency = dependency
        super().__init__(f"{dependency} unreachable: {type(error).__name__}: {error}")


@contextmanager
def reaching(dependency: str) -> Iterator[None]:
    """Name a connection failure of the block that names no dependency (``network``) as
    ``dependency``'s: what waits for it is then known to wait for that one (readiness
    tells a dependency a service needs from one it works without)."""
    try:
        yield
    except Exception as exc:
        if transient_dependency(exc) == NETWORK:
            raise DependencyUnreachable(dependency, exc) from exc
        raise


def transient_dependency(error: BaseException) -> str | None:
    """The dependency ``error`` is a transient failure of (``redis``, ``postgres``,
    ``rabbitmq``, ``network``), or None when it is a failure of the work itself.

    An error raised while handling a transient one (its ``__cause__`` or
    ``__context__``) is transient too: a wrapper does not make the outage the work's fault.
    An error class may say what it is with a class attribute ``transient_dependency``
    (a dependency's name, or None); a :class:`DependencyUnreachable` names its own.
    """
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < _CHAIN_DEPTH:
        if isinstance(current, DependencyUnreachable):
            return current.dependency
        for cls in type(current).__mro__:
            if "transient_dependency" in vars(cls):
                return vars(cls)["transient_dependency"]
        found = _classify(current)
        if found is not None:
            return found
        seen += 1
        current = current.__cause__ or current.__context__
    return None


def _classify(error: BaseException) -> str | None:
    if isinstance(error, asyncio.CancelledError):
        return None
    for cls in type(error).__mro__:
        library = _LIBRARIES.get(cls.__module__.partition(".")[0])
        if library is None:
            continue
        name = cls.__name__
        if library == REDIS:
            if name in _REDIS_TRANSIENT:
                return REDIS
            if name == "ResponseError" and str(error).upper().startswith(_REDIS_BUSY_REPLIES):
                return REDIS
        elif library == POSTGRES:
            if name in _POSTGRES_TRANSIENT:
                return POSTGRES
        elif name in _AMQP_TRANSIENT:
            return RABBITMQ
    if isinstance(error, TimeoutError):
        # a client library's own bound on a call raises asyncio's TimeoutError (asyncpg's
        # command and connect timeouts): the dependency is the library's it was raised in;
        # a caller's bound around the call (wait_for) raises it in the caller's code
        raised_in = _library_raising(error)
        if raised_in is not None:
            return raised_in
    if isinstance(error, ConnectionError | TimeoutError):
        return NETWORK
    if isinstance(error, socket.gaierror):
        return NETWORK if error.errno in _RESOLUTION_ERRNOS else None
    if isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS:
        return NETWORK
    return None


def _library_raising(error: BaseException) -> str | None:
    """The dependency of the client library whose code ``error`` was raised through."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        module = frame.f_globals.get("__name__") or ""
        library = _LIBRARIES.get(module.partition(".")[0])
        if library is not None:
            return library
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Pauses between attempts: ``initial_s``, doubling, at most ``max_s``."""

    initial_s: float = 0.05
    max_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("need 0 < initial_s <= max_s")

    def pauses(self) -> Iterator[float]:
        pause = self.initial_s
        while True:
            yield pause
            pause = min(pause * 2, self.max_s)


WAITS_TOTAL = Counter(
    "pumpflow_dependency_waits",
    "Pauses taken to wait out a transient failure of a dependency, by waiter.",
    ["dependency", "waiter"],
)
WAITING = Gauge(
    "pumpflow_dependency_waiting",
    "Parties of this process waiting on the dependency now (0: none).",
    ["dependency"],
)
# exported at 0 from the start, so a panel of a system that never waited reads 0
for _dependency in (REDIS, POSTGRES, RABBITMQ):
    WAITING.labels(_dependency)


@dataclass(slots=True)
class _Waiting:
    since: float
    parties: int
    error: str


class DependencyWaits:
    """What the process waits on now: dependency -> since when, how many, last error."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}

    @contextmanager
    def waiting(self, dependency: str) -> Iterator[None]:
        """Count one party waiting on ``dependency`` while the block runs."""
        found = self._waiting.get(dependency)
        if found is None:
            found = self._waiting[dependency] = _Waiting(time.time(), 0, "")
        found.parties += 1
        WAITING.labels(dependency).inc()
        try:
            yield
        finally:
            found.parties -= 1
            WAITING.labels(dependency).dec()
            if found.parties <= 0 and self._waiting.get(dependency) is found:
                del self._waiting[dependency]

    def waited(self, dependency: str, waiter: str, error: BaseException) -> None:
        """Count one pause taken by ``waiter`` on ``dependency`` because of ``error``."""
        WAITS_TOTAL.labels(dependency, waiter).inc()
        found = self._waiting.get(dependency)
        if found is not None:
            found.error = f"{type(error).__name__}: {error}"[:300]

    def describe(self) -> dict[str, dict[str, Any]]:
        """The dependencies waited on now, for readiness: {name: since, parties, error}."""
        return {
            name: {"since": w.since, "parties": w.parties, "error": w.error}
            for name, w in self._waiting.items()
        }

    def __bool__(self) -> bool:
        return bool(self._waiting)


#: the process's record of its waits
WAITS = DependencyWaits()

#: seconds between the error lines of work that keeps failing and is retried (the first
#: failure is logged at once): a failure that lasts (a key of the wrong kind in the
#: store) writes a line a minute, not one a pause
FAILURE_LOG_EVERY_S = 60.0


async def wait_out(
    action: Callable[[], Awaitable[T]],
    *,
    waiter: str,
    backoff: Backoff | None = None,
    what: str = "an action",
    retry_failures: bool = False,
    after_pause: Callable[[], None] | None = None,
    log_each: bool = False,
) -> T:
    """``action``'s result once it succeeds; transient failures are waited out.

    A failure that is not transient is raised at once, unless ``retry_failures``: work
    that no single input can be blamed for (a group commit of many keys) is retried
    then too, the first failure logged as an error, then one line a
    :data:`FAILURE_LOG_EVERY_S` while it fails. ``after_pause`` is called after each
    pause (to tell a watchdog the work is waiting, not hung). Cancelling the caller
    stops the wait. The first pause and the recovery are logged, the pauses between
    them counted; with ``log_each``, every pause is logged (a wait whose cause each
    failure names anew: who holds a lock).
    """
    try:
        # the usual case, without setting up a wait
        return await action()
    except Exception as exc:
        failure: Exception | None = exc
    with ExitStack() as waiting:
        pauses: Iterator[float] | None = None
        started = 0.0
        counted = False
        failed = 0
        logged = 0.0
        while True:
            try:
                if failure is not None:
                    raise failure
                result = await action()
            except Exception as exc:
                failure = None
                dependency = transient_dependency(exc)
                if pauses is None:
                    pauses = (backoff or Backoff()).pauses()
                    started = time.monotonic()
                if dependency is None:
                    if not retry_failures:
                        raise
                    failed += 1
                    now = time.monotonic()
                    if failed == 1:
                        logged = now
                        log.error("%s: %s failed, retrying: %r", waiter, what, exc)
                    elif now - logged >= FAILURE_LOG_EVERY_S:
                        logged = now
                        log.error(
                            "%s: %s still fails (%d tries in %.0f s), retrying: %r",
                            waiter, what, failed, now - started, exc,
                        )  # fmt: skip
                if dependency is not None:
                    first = not counted
                    if first:
                        counted = True
                        waiting.enter_context(WAITS.waiting(dependency))
                    if first or log_each:
                        log.warning(
                            "%s: %s waits for %s (%s: %s)",
                            waiter, what, dependency, type(exc).__name__, exc,
                        )  # fmt: skip
                    WAITS.waited(dependency, waiter, exc)
                await asyncio.sleep(next(pauses))
                if after_pause is not None:
                    after_pause()
                continue
            if pauses is not None:
                log.warning(
                    "%s: %s went through after %.1f s of waiting",
                    waiter, what, time.monotonic() - started,
                )  # fmt: skip
            return result
