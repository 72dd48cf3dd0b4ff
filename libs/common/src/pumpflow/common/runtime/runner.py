"""Run one service as its own process: serve HTTP, connect, start, stop cleanly on SIGTERM.

Start-up: HTTP first (``/healthz`` alive, ``/readyz`` not ready, naming what it waits
for), then RabbitMQ, Redis and Postgres (those the service needs) are awaited together
under one retry policy (``pumpflow.common.runtime.startup``), then the service starts.
SIGTERM during start-up ends it at once with exit 0; a dependency still unreachable
after ``dependency_wait_s`` (unset: never) exits 1.

A service whose Postgres is optional (``needs_db`` with ``postgres`` among its
``optional_dependencies``: features, which reads the feed's stored events only to
rebuild a token without a record) starts without it: its ``ctx.db`` is a
:class:`~pumpflow.common.db.pool.BackgroundPool` opened meanwhile under the same pauses
(never given up), shown in ``/readyz`` (``required: false``, waiting, ``degraded``);
until it opens, a use of it fails as Postgres away does, so a rebuild waits for it.
Opening it still applies the missing migrations, as every service's pool does, but no
longer before the start: the schema is the feed's and ``pumpflow migrate``'s, and such
a service needs none of it to start or to work on the tokens it holds; what reads the
schema comes after the opening, so an upgrade in place that rolls features first
(docs/reliability.md, "Upgrading": each service applies the missing migrations) still
never has it read a schema older than its code.

Shutdown order on SIGTERM/SIGINT: ``service.stopping()`` (it still holds its
partitions), stop taking deliveries, drain the handlers in flight (up to
``drain_timeout_s``), ``service.stop()`` (it may still publish, say an exit order or a
checkpoint), stop HTTP, then close the bus, the store and the pool.
A drain that gives up on a handler, or a stop that fails or overruns, exits 1. The
whole shutdown has ``shutdown_timeout_s``: each step gets its own bound or what is left
of it, whichever is shorter (a broker away can hold every step that publishes).

Over RabbitMQ the service gets a :class:`~pumpflow.common.bus.ownership.BalancedBus`
(unless ``balance_partitions`` is off): its replicas share the partitions, and on
SIGTERM this replica first leaves, so the others take its partitions over. A process
given the replica id of another live one exits 1, saying so in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

from pumpflow.common.bus.ownership import ReplicaIdInUse
from pumpflow.common.clock import Clock, ReplayClock, WallClock
from pumpflow.common.dependencies import POSTGRES
from pumpflow.common.runtime.logging import configure_logging, redacted_settings
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings, SettingsError
from pumpflow.common.runtime.startup import DependencyUnavailable, Startup

if TYPE_CHECKING:
    import asyncpg

    from pumpflow.common.runtime.http import HttpServer
    from pumpflow.common.state.redis import RedisStateStore

log = logging.getLogger("pumpflow.runtime")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: upper bound for each close step, so one stuck connection cannot hang the exit
_CLOSE_TIMEOUT_S = 10.0


#: what a step still gets once the shutdown's time is up: a close that is quick goes on
_PAST_DEADLINE_S = 0.1
#: the share of the shutdown's time kept for the closes after the service's stop: a
#: stop that took it all would leave each close a moment, and its line would blame it
_CLOSES_SHARE = 0.2


class _Deadline:
    """When the shutdown has to be over, and its work before the closes."""

    def __init__(self, total_s: float):
        self._end = time.monotonic() + total_s
        self._work_end = self._end - total_s * _CLOSES_SHARE

    def limit(self, step_s: float, *, closing: bool = False) -> float:
        """``step_s``, or what is left of the shutdown's time (less the closes' share,
        unless ``closing``) if that is shorter."""
        end = self._end if closing else self._work_end
        return max(min(step_s, end - time.monotonic()), _PAST_DEADLINE_S)


async def _bounded(what: str, awaitable, limit_s: float = _CLOSE_TIMEOUT_S) -> bool:
    try:
        async with asyncio.timeout(limit_s):
            await awaitable
    except TimeoutError:
        log.warning("shutdown: %s took longer than %.1f s", what, limit_s)
        return False
    except Exception:
        log.exception("shutdown: %s failed", what)
        return False
    return True


def _install_signal_handlers(stop: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()
    installed = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: already stopping", sig.name)
            return
        log.info("%s received: stopping", sig.name)
        stop.set()

    for sig in _STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without signals
        installed.append(sig)
    return installed


async def run_service(
    service_cls: type[Service],
    settings: CommonSettings | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``service_cls`` until SIGTERM/SIGINT (or ``stop`` is set); return the exit code."""
    if settings is None:
        try:
            settings = service_cls.settings_class.load(service=service_cls.name)
        except SettingsError as exc:
            print(f"pumpflow {service_cls.name}: {exc}", file=sys.stderr)
            return EXIT_BAD_SETTINGS
    try:
        configure_logging(settings)
    except ValueError as exc:
        print(f"pumpflow {service_cls.name}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    log.info("starting %s", settings.service, extra={"settings": redacted_settings(settings)})
    try:
        service: Service = service_cls(settings)
    except SettingsError as exc:
        # settings each valid alone that the service cannot run with together
        print(f"pumpflow {service_cls.name}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS

    stop = stop or asyncio.Event()
    installed = _install_signal_handlers(stop)
    clock = service_clock(settings)
    startup = Startup(settings)
    wired = _Wired()
    bus = None
    http: HttpServer | None = None
    started = False
    exit_code = EXIT_OK
    try:
        if settings.http_port:
            from pumpflow.common.runtime.http import HttpServer, create_app

            http = HttpServer(
                create_app(service, startup), host=settings.http_host, port=settings.http_port
            )
            try:
                await http.start()
            except OSError as exc:
                raise _Refused(f"{exc.strerror} (PUMPFLOW_HTTP_HOST, PUMPFLOW_HTTP_PORT)") from None
            log.info("serving HTTP on %s:%d", settings.http_host, http.port)
        connecting = asyncio.create_task(_connect(service_cls, settings, clock, startup, wired))
        try:
            ctx = await _unless_stopped(connecting, stop, http, startup)
        finally:
            bus = wired.bus
        if ctx is not None:
            # a stop from here on waits for the start, then stops the service as usual
            await service.start(ctx)
            started = True
            startup.ctx = ctx
            log.info("%s running", settings.service)
            await _wait(stop, http)
    except (_Refused, DependencyUnavailable, ReplicaIdInUse) as exc:
        log.error("%s cannot start: %s", settings.service, exc)
        exit_code = EXIT_FAILED
    except Exception:
        log.exception("%s failed", settings.service)
        exit_code = EXIT_FAILED
    finally:
        for task in wired.background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store, db, balance_store = wired.store, wired.db, wired.balance_store
        deadline = _Deadline(settings.shutdown_timeout_s)
        limit = deadline.limit

        def close_limit() -> float:
            return limit(_CLOSE_TIMEOUT_S, closing=True)

        if started:
            try:
                service.stopping()
            except Exception:
                log.exception("%s: noting what the stop leaves failed", settings.service)
        if bus is not None:
            await _bounded("stop consuming", bus.stop_consuming(), limit(_CLOSE_TIMEOUT_S))
            # handlers cut short are handled again elsewhere, or lost: the exit code says so
            if started and not await _drain(bus, limit(settings.drain_timeout_s)):
                exit_code = EXIT_FAILED
        if started:
            # a stop that fails or overruns may have lost work: the exit code says so
            stopping = service.stop()
            if not await _bounded("service stop", stopping, limit(max(_CLOSE_TIMEOUT_S, 30.0))):
                exit_code = EXIT_FAILED
        if http is not None:
            await _bounded("HTTP stop", http.stop(), close_limit())
        if bus is not None:
            await _bounded("bus close", bus.close(), close_limit())
        if store is not None:
            await _bounded("store close", store.close(), close_limit())
        if balance_store is not None:
            await _bounded("heartbeat store close", balance_store.close(), close_limit())
        if db is not None:
            await _bounded("pool close", db.close(), close_limit())
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
        log.info("%s stopped (exit %d)", settings.service, exit_code)
    return exit_code


class _Refused(Exception):
    """A start the operator's settings refuse (an address in use): said in one line, as a
    dependency unreachable past ``dependency_wait_s`` is."""


class _Wired:
    """What start-up connected so far, for the shutdown to close."""

    bus = None
    store = None
    db = None
    balance_store = None

    def __init__(self) -> None:
        #: what goes on connecting while the service runs (an optional dependency)
        self.background: list[asyncio.Task] = []


def redis_store(settings: CommonSettings) -> RedisStateStore:
    """The service's Redis store (it connects on first use), its calls bounded."""
    from pumpflow.common.state.redis import RedisStateStore

    return RedisStateStore(
        url=settings.redis_url,
        namespace=settings.namespace,
        socket_timeout=settings.redis_socket_timeout_s,
    )


async def warn_if_evicting(store: RedisStateStore) -> None:
    """Warn if Redis evicts keys at its maxmemory: the services' state, records, leases
    and delivery counts live there, and one evicted is lost (a token rebuilt from
    Postgres at best, a lease held twice at worst). A write refused at the limit
    (``noeviction``) is waited out instead, named in ``/readyz``."""
    policy = await store.eviction_policy()
    if policy is not None:
        log.warning(
            "Redis evicts keys at its maxmemory (maxmemory-policy %s): pumpflow's state "
            "must not be evicted; set maxmemory-policy noeviction (writes refused at the "
            "limit are waited for) or give Redis the memory it needs", policy,
        )  # fmt: skip


async def open_pool(settings: CommonSettings) -> asyncpg.Pool:
    """The service's Postgres pool on its migrated schema, its commands bounded, its
    connections named after the replica (``pumpflow <service>/<replica>``)."""
    from pumpflow.common.db.pool import create_pool

    return await create_pool(
        settings.postgres_dsn,
        settings.namespace,
        command_timeout=settings.postgres_command_timeout_s,
        application_name=f"pumpflow {settings.source}",
    )


def service_clock(settings: CommonSettings) -> Clock:
    """The wall, or a replay clock from ``replay_clock_start`` (moved by ``POST /clock``)."""
    if settings.replay_clock_start is None:
        return WallClock()
    log.warning("on a replay clock from %.3f: time moves only by POST /clock",
                settings.replay_clock_start)  # fmt: skip
    return ReplayClock(settings.replay_clock_start)


async def _connect(
    service_cls: type[Service],
    settings: CommonSettings,
    clock: Clock,
    startup: Startup,
    wired: _Wired,
) -> ServiceContext:
    """Reach every dependency the service needs, all at once; return its context."""
    from dataclasses import replace

    from pumpflow.common.bus.factory import create_bus
    from pumpflow.common.runtime.topology import declare_groups, groups_of
    from pumpflow.common.runtime.wiring import bus_config

    balanced = settings.transport == "rabbitmq" and settings.balance_partitions
    journal = None
    if service_cls.needs_store or settings.transport == "rabbitmq":
        from pumpflow.common.bus.journal import SharedDeliveryJournal

        # connects on first use: a service that needs no store touches Redis only for
        # heartbeats and the delivery counts of redelivered messages
        store = redis_store(settings)
        if service_cls.needs_store:
            wired.store = store
        else:
            wired.balance_store = store
        if settings.transport == "rabbitmq":
            # one count per message for every replica, outliving each of them
            journal = SharedDeliveryJournal(store)
    # one try per attempt: the start-up policy owns the retrying
    bus = wired.bus = create_bus(replace(bus_config(settings), connect_attempts=1), journal=journal)
    groups = groups_of(settings.consumer_group_names)

    async def start_bus() -> None:
        await bus.start()
        # before the service starts: nothing it publishes may precede its consumers' queues
        await declare_groups(bus, groups)

    reaching = [startup.reach(settings.transport, start_bus)]
    if service_cls.needs_store or balanced:
        store = wired.store or wired.balance_store

        async def ping() -> None:
            await store.reach()
            await warn_if_evicting(store)

        reaching.append(startup.reach("redis", ping))
    if service_cls.needs_db:
        from pumpflow.common.db.pool import BackgroundPool

        # the opening not cut by the start-up's bound on an attempt: it applies the
        # migrations, which take as long as their rows do and retry their lock waits
        # (each bounded, readiness naming who blocks them) until the locks are free;
        # cut, a long one would start over at every attempt, never done. Its
        # connections and its pool's commands are bounded (postgres_command_timeout_s)
        if POSTGRES in service_cls.optional_dependencies:
            pending = wired.db = BackgroundPool()

            async def open_pending() -> None:
                pending.opened(await open_pool(settings))

            wired.background.append(
                startup.reach_in_background(POSTGRES, open_pending, bounded=False)
            )
        else:

            async def connect() -> None:
                wired.db = await open_pool(settings)

            reaching.append(startup.reach(POSTGRES, connect, bounded=False))
    await asyncio.gather(*reaching)
    if balanced:
        # heartbeats are infrastructure: on the wall, whatever the service's clock
        bus, _ = _balanced(bus, settings, wired.store or wired.balance_store, WallClock())
        wired.bus = bus
    return ServiceContext(settings=settings, bus=bus, clock=clock, store=wired.store, db=wired.db)


async def _unless_stopped(
    connecting: asyncio.Task[ServiceContext],
    stop: asyncio.Event,
    http: HttpServer | None,
    startup: Startup,
) -> ServiceContext | None:
    """The context ``connecting`` returns, or None if a stop came first.

    A stop cancels it, wherever it waits; its failure (or the HTTP server's) is raised.
    """
    try:
        await _wait(stop, http, also=connecting)
    finally:
        if not connecting.done():
            log.info("stopping while waiting for %s", ", ".join(startup.waiting_for) or "nothing")
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    if connecting.cancelled():
        return None
    return connecting.result()


def _balanced(bus, settings: CommonSettings, store, clock):
    """Wrap the bus so replicas share partitions; return it and a store it opened, if any.

    Heartbeats go to the service's Redis store, or to one of their own (it connects on
    first use, so a service without keyed subscriptions never touches Redis).
    """
    from pumpflow.common.bus.ownership import BalancedBus
    from pumpflow.common.runtime.wiring import ownership_config

    own_store = None
    if store is None:
        store = own_store = redis_store(settings)
    wrapped = BalancedBus(
        bus,
        store=store,
        clock=clock,
        replica=settings.replica,
        config=ownership_config(settings),
    )
    return wrapped, own_store


async def _drain(bus, limit_s: float) -> bool:
    """Wait for the handlers in flight; whether they all returned."""
    try:
        async with asyncio.timeout(limit_s + 1.0):
            drained = await bus.drain(limit_s)
    except Exception:
        log.exception("shutdown: drain failed")
        return False
    if drained:
        log.info("shutdown: in-flight handlers drained")
    else:
        log.warning("shutdown: handlers still in flight after %.1f s", limit_s)
    return bool(drained)


async def _wait(
    stop: asyncio.Event, http: HttpServer | None, *, also: asyncio.Task | None = None
) -> None:
    """Wait for the stop signal (or ``also`` to end); a crashed HTTP server is a failure."""
    waiter = asyncio.create_task(stop.wait())
    watched = {waiter}
    if also is not None:
        watched.add(also)
    if http is not None and http.task is not None:
        watched.add(http.task)
    try:
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    if waiter not in done and (also is None or also not in done):
        failure = http.task.exception() if http is not None and http.task is not None else None
        raise RuntimeError(f"the HTTP server stopped unexpectedly: {failure!r}")


def main(service_cls: type[Service]) -> None:
    """Process entry: run the service and exit with its code."""
    sys.exit(asyncio.run(run_service(service_cls)))
