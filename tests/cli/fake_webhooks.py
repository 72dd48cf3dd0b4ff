"""Local fakes on 127.0.0.1 for ``pumpflow notify``: Prometheus' alerts endpoint, a
Telegram Bot API and a Discord webhook, one real HTTP server recording every request.

- ``GET /api/v1/alerts`` answers :attr:`FakeWebhooks.alerts_answer` (JSON, or bytes
  sent as they are) with :attr:`FakeWebhooks.alerts_status`;
- ``POST /bot<token>/sendMessage`` (Telegram) and ``POST /api/webhooks/<id>/<token>``
  (Discord) answer the next status of :attr:`FakeWebhooks.failures` while any is left
  (a 429 with ``retry_after``), then 200 / 204 as the real ones do.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pumpflow.common.testing.servers import local_app


@dataclass(frozen=True, slots=True, kw_only=True)
class Posted:
    kind: str
    path: str
    body: dict[str, Any]
    status: int


def alert(name: str, *, severity: str = "critical", state: str = "firing", **labels: str) -> dict:
    """An alert as Prometheus' /api/v1/alerts lists it."""
    return {
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": {"summary": f"{name} summary", "description": f"{name} <details>"},
        "state": state,
        "activeAt": "2026-12-02T07:00:00Z",
        "value": "1e+00",
    }


def answer(*alerts: dict) -> dict:
    return {"status": "success", "data": {"alerts": list(alerts)}}


@dataclass
class FakeWebhooks:
    alerts_answer: Any = field(default_factory=answer)
    alerts_status: int = 200
    #: statuses the next posts get (then success)
    failures: list[int] = field(default_factory=list)
    posted: list[Posted] = field(default_factory=list)
    polls: int = 0
    base: str = ""

    def of(self, kind: str, *, ok: bool = True) -> list[Posted]:
        return [p for p in self.posted if p.kind == kind and (p.status < 300 or not ok)]

    async def alerts(self, request: Request) -> Response:
        self.polls += 1
        if isinstance(self.alerts_answer, bytes):
            return Response(self.alerts_answer, status_code=self.alerts_status)
        return JSONResponse(self.alerts_answer, status_code=self.alerts_status)

    async def telegram(self, request: Request) -> Response:
        status = await self._record("telegram", request, ok=200)
        if status == 429:
            body = {"ok": False, "error_code": 429, "parameters": {"retry_after": 0.2}}
            return JSONResponse(body, status_code=429)
        return JSONResponse({"ok": status == 200, "result": {}}, status_code=status)

    async def discord(self, request: Request) -> Response:
        status = await self._record("discord", request, ok=204)
        if status == 429:
            return JSONResponse({"retry_after": 0.2, "global": False}, status_code=429)
        return Response(status_code=status)

    async def _record(self, kind: str, request: Request, *, ok: int) -> int:
        status = self.failures.pop(0) if self.failures else ok
        self.posted.append(
            Posted(kind=kind, path=request.url.path, body=await request.json(), status=status)
        )
        return status


@contextlib.asynccontextmanager
async def fake_webhooks() -> AsyncIterator[FakeWebhooks]:
    """The fakes served on a free port of 127.0.0.1 for the block's duration."""
    fake = FakeWebhooks()
    app = Starlette(
        routes=[
            Route("/api/v1/alerts", fake.alerts, methods=["GET"]),
            Route("/bot{token}/sendMessage", fake.telegram, methods=["POST"]),
            Route("/api/webhooks/{id}/{token}", fake.discord, methods=["POST"]),
        ]
    )
    async with local_app(app) as base:
        fake.base = base
        yield fake
