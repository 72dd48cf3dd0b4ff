"""HTTP face of a service: health, readiness, Prometheus metrics and its own routes.

Served by uvicorn inside the service's event loop (:class:`HttpServer`), with
uvicorn's signal handling off: the runner owns SIGTERM. It serves from the first
moment of start-up: until the service runs, ``/readyz`` answers 503 naming the
dependencies awaited (``pumpflow.common.runtime.startup``) and the service's own
routes answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest

from pumpflow.common.bus.dispatch import hold, release
from pumpflow.common.bus.metrics import BUS_METRICS
from pumpflow.common.clock import Clock, ReplayClock
from pumpflow.common.dependencies import POSTGRES, REDIS, WAITS
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.startup import Startup

log = logging.getLogger(__name__)

#: a readiness check that takes longer than this counts as failed
CHECK_TIMEOUT_S = 2.0

SERVICE_INFO = Gauge(
    "pumpflow_service_info", "Running service replica (value 1).", ["service", "replica"]
)
SERVICE_READY = Gauge(
    "pumpflow_service_ready", "1 when /readyz passes (checked at each scrape), else 0.", ["service"]
)
SERVICE_STARTED = Gauge(
    "pumpflow_service_start_time_seconds", "Start time of the replica.", ["service"]
)

_bearer = HTTPBearer(auto_error=False)


class TokenError(Exception):
    """Raised by :func:`require_token`; answered with its status and reason."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def require_token(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Dependency guarding mutating endpoints with the configured bearer token."""
    expected = request.app.state.settings.api_token
    if not expected:
        raise TokenError(
            403,
            "mutating endpoints are disabled: a token must be configured (PUMPFLOW_API_TOKEN)",
        )
    given = credentials.credentials if credentials is not None else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise TokenError(401, "missing or wrong bearer token")


#: the longest reason an operator's request may give (it is stored and published)
REASON_MAX_CHARS = 500


def text_of(
    body: dict[str, Any] | None, name: str, default: Any, *, max_chars: int = REASON_MAX_CHARS
) -> Any:
    """The text field ``name`` of an operator's request body, ``default`` when it gives
    none (or an empty one); HTTPException 422 when it is not text of at most
    ``max_chars`` characters without NUL."""
    text = (body or {}).get(name)
    if text is None or text == "":
        return default
    if not isinstance(text, str):
        raise HTTPException(422, f"'{name}' must be text, got {text!r:.80}")
    if "\x00" in text or len(text) > max_chars:
        raise HTTPException(422, f"'{name}' must be at most {max_chars} characters, without NUL")
    return text


def reason_of(body: dict[str, Any] | None, default: str) -> str:
    """The ``reason`` of an operator's request body, ``default`` when it gives none;
    HTTPException 422 when it is not short text."""
    return text_of(body, "reason", default)


async def _check(name: str, probe) -> tuple[str, dict[str, Any]]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            outcome = await probe()
    except TimeoutError:
        return name, {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S} s"}
    except Exception as exc:
        return name, {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    details = {"ok": bool(outcome), "ms": round((time.perf_counter() - started) * 1000, 2)}
    return name, details


def listed(rows: list[Any], limit: int) -> dict[str, Any]:
    """A list view of ``rows``, read with ``limit + 1``: the first ``limit`` and whether
    the store holds more (a count cut at the limit would pass for the whole)."""
    return {"count": min(len(rows), limit), "more": len(rows) > limit, "orders": rows[:limit]}


def _waits_check(checks: dict[str, dict[str, Any]], optional: frozenset[str]) -> set[str]:
    """Add what the process waits on now (:data:`WAITS`) to ``checks``; return its
    dependencies.

    Work stalls on a dependency that fails for a while: alive, not ready, unless the
    service works on without it. Starting, what the start-up's attempt waits on says
    why it takes long (a migration waiting for a lock names who holds it).
    """
    waiting = WAITS.describe()
    if waiting:
        checks["dependencies"] = {"ok": set(waiting) <= optional, "waiting_on": waiting}
    return set(waiting)


async def readiness(
    service: Service, ctx: ServiceContext, connecting: dict[str, dict[str, Any]] | None = None
) -> tuple[bool, dict[str, Any], list[str]]:
    """Run the checks of the service's dependencies; return (ready, details, degraded).

    A dependency the service works without (``Service.optional_dependencies``) is
    checked and shown (``required: false``), and named in ``degraded`` while it is away
    or waited for, but leaves the service ready. ``connecting``: the start-up's checks
    of those still being reached in the background (``Startup.checks``), added to theirs.
    """
    optional = service.optional_dependencies

    async def store() -> bool:
        return ctx.store is not None and await ctx.store.ping()

    async def postgres() -> bool:
        if ctx.db is None:
            return False
        return await ctx.db.fetchval("SELECT 1") == 1

    #: check name -> (probe, the dependency it checks)
    probes = {}
    if service.needs_store:
        probes["store"] = (store, REDIS)
    if service.needs_db:
        probes["postgres"] = (postgres, POSTGRES)
    checks: dict[str, dict[str, Any]] = {}
    try:
        bus = ctx.bus.describe()
        # which partitions this replica consumes, when replicas share them
        ownership = bus.pop("ownership", {})
        checks["bus"] = {**bus, "ok": bool(bus.get("healthy"))}
        for name, owned in ownership.items():
            checks[f"partitions:{name}"] = {**owned, "ok": bool(owned.get("healthy"))}
    except Exception as exc:
        checks["bus"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    checks.update(await asyncio.gather(*(_check(n, p) for n, (p, _) in probes.items())))
    degraded = set()
    for name, (_, dependency) in probes.items():
        if dependency in (connecting or {}):
            checks[name] = {**checks[name], **connecting[dependency]}
        if dependency in optional:
            checks[name]["required"] = False
            if not checks[name]["ok"]:
                degraded.add(dependency)
    waiting = _waits_check(checks, optional)
    degraded |= set(waiting) & optional
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            status = await service.status()
        service_ok = status.get("ready", True) is not False
        checks["service"] = {**status, "ok": service_ok}
    except Exception as exc:
        checks["service"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    ready = all(c["ok"] for c in checks.values() if c.get("required", True))
    return ready, checks, sorted(degraded)


def create_app(service: Service, ctx: ServiceContext | Startup) -> FastAPI:
    """The service's FastAPI app: /healthz, /readyz, /metrics and the service's router.

    ``ctx``: the running service's context, or the start-up that will hold it.
    """
    startup = ctx if isinstance(ctx, Startup) else Startup.running(ctx)
    settings = startup.settings
    app = FastAPI(title=f"pumpflow {settings.service}", docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.startup = startup
    app.state.service = service
    SERVICE_INFO.labels(settings.service, settings.replica).set(1)
    SERVICE_STARTED.labels(settings.service).set(time.time())

    @app.exception_handler(TokenError)
    async def token_error(request: Request, exc: TokenError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"alive": True, "service": settings.service, "replica": settings.replica}

    async def ready_now() -> dict[str, Any]:
        """/readyz's body, the ready gauge set to it."""
        running = startup.ctx
        if running is None:
            SERVICE_READY.labels(settings.service).set(0)
            checks = startup.checks()
            _waits_check(checks, service.optional_dependencies)
            return {
                "ready": False,
                "service": settings.service,
                "starting": True,
                "waiting_for": startup.waiting_for,
                "checks": checks,
            }
        ready, checks, degraded = await readiness(service, running, startup.checks())
        SERVICE_READY.labels(settings.service).set(1 if ready else 0)
        return {"ready": ready, "service": settings.service, "degraded": degraded, "checks": checks}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = await ready_now()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # a scrape may be all that asks: the gauge says what /readyz would say now
        await ready_now()
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    def started() -> None:
        if startup.ctx is None:
            awaited = ", ".join(startup.waiting_for) or "the service to start"
            raise HTTPException(503, f"{settings.service} is starting: waiting for {awaited}")

    # one move of a replay clock at a time: its timers fire in order
    moving = asyncio.Lock()

    def running_clock() -> Clock:
        started()
        return startup.ctx.clock

    @app.get("/clock")
    async def clock() -> dict[str, Any]:
        return clock_view(running_clock())

    @app.post("/clock", dependencies=[Depends(require_token)])
    async def step_clock(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        """A lock-step driver's step: ``{"to": epoch}`` moves the replay clock (the due
        timers fire, their effects published before the answer); ``{"hold": true}``
        holds this service's deliveries until ``{"hold": false}``."""
        replay = running_clock()
        if not isinstance(replay, ReplayClock):
            raise HTTPException(409, "on the wall clock: set PUMPFLOW_REPLAY_CLOCK_START")
        to, held = body.get("to"), body.get("hold")
        if to is not None and (
            not isinstance(to, int | float) or isinstance(to, bool) or not math.isfinite(to)
        ):
            # NaN would move nothing, infinity would fire the periodic timers for ever
            raise HTTPException(422, f"'to' must be a time in epoch seconds, got {to!r}")
        if held is not None and not isinstance(held, bool):
            raise HTTPException(422, f"'hold' must be true or false, got {held!r}")
        if held is True:
            hold(settings.service)
        elif held is False:
            release(settings.service)
        fired = 0
        if to is not None:
            async with moving:
                fired = await replay.advance_to(float(to))
        return {**clock_view(replay), "fired": fired}

    router = service.router()
    if router is not None:
        app.include_router(router, dependencies=[Depends(started)])
    return app


def clock_view(clock: Clock) -> dict[str, Any]:
    """The service's time, its next timer on a replay clock, and its bus counters.

    What a lock-step driver needs: once every process's events of a type are consumed
    by every group that takes the type, as often as all processes published it, and no
    timer is due, nothing more happens until the clock moves or an event comes.
    """
    replay = isinstance(clock, ReplayClock)
    return {
        "now": clock.now(),
        "replay": replay,
        "next_timer_at": clock.next_timer_at() if replay else None,
        "events": BUS_METRICS.counts(),
    }


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, as asyncio's
    ``create_server`` binds them; bound here so that a port in use is an OSError to
    report, where uvicorn would log it and exit the process."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # a port of 0: the first address takes any, the others the same one
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the runner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A uvicorn server running as a task of the current event loop."""

    def __init__(self, app: FastAPI, *, host: str, port: int):
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, lifespan="off", access_log=False
        )
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start serving; raise OSError naming the address if it cannot be bound."""
        config = self._server.config
        try:
            sockets = _bind(config.host, config.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OSError(
                exc.errno, f"cannot serve HTTP on {config.host}:{config.port}: {reason}"
            ) from None
        self._task = asyncio.create_task(self._serve(sockets), name="http")
        while not self._server.started:
            if self._task.done():
                await self._task  # re-raise the start-up failure
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def _serve(self, sockets: list[socket.socket]) -> None:
        try:
            await self._server.serve(sockets=sockets)
        except SystemExit as exc:
            # uvicorn exits the process when its start-up fails (the sockets are bound
            # already, so not for the address); a service reports it instead
            raise RuntimeError(f"HTTP server failed to start (exit {exc.code})") from None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 in tests)."""
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self._server.config.port

    @property
    def task(self) -> asyncio.Task | None:
        return self._task

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._task = None
