"""A local fake of PumpPortal's trade API (``POST /api/trade?api-key=...``) on 127.0.0.1.

It answers as the reference says the real one does, in one of nine behaviours chosen
by :attr:`FakeTradeApi.behaviour`:

- ``success``: 200 ``{"signature": ..., "errors": []}``; the test then publishes the
  wallet's trade with that signature, as the token's stream would show it;
- ``error``: 400 ``{"errors": [...]}`` without a signature (the API refused);
- ``timeout``: no answer at all until the fake stops;
- ``silent``: 200 with a signature whose trade never shows (the transaction dropped).
- ``held``: 400 ``{"errors": ["Simulation failed"]}``, a refusal naming no cause,
  once the test calls :meth:`FakeTradeApi.answer` (the market moves meanwhile);
- ``slow``: 200 with a signature, once the test calls :meth:`FakeTradeApi.answer`
  (the transaction left at once: its trade may show on the stream before the answer);
- ``trickle``: 200 whose body comes a blank every 50 ms (each read well within a
  client's read timeout) until the fake stops: an answer that never ends;
- ``unsigned``: 200 ``{"errors": []}``, accepted with no signature (the transaction
  left or not: the reference documents no such answer);
- ``throttled``: 429 with a proxy's text body, no JSON (the rate limit: 25 requests/s).

Every request is kept (its body and its key) so tests see what was sent, and how often.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pumpflow.common.testing import base58_key
from pumpflow.common.testing.servers import local_app

Behaviour = Literal[
    "success", "error", "timeout", "silent", "held", "slow", "trickle", "unsigned", "throttled"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    body: dict[str, Any]
    api_key: str | None
    #: the signature answered, if any
    signature: str | None


@dataclass
class FakeTradeApi:
    behaviour: Behaviour = "success"
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _numbers: itertools.count = field(default_factory=itertools.count)
    _answer: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self) -> None:
        """Let the ``held`` and ``slow`` calls answer."""
        self._answer.set()

    async def trade(self, request: Request) -> Response:
        body = await request.json()
        api_key = request.query_params.get("api-key")
        behaviour = self.behaviour
        signature = None
        if behaviour in ("success", "silent", "slow"):
            signature = base58_key(f"fake-signature-{next(self._numbers)}", 88)
        self.requests.append(Received(body=body, api_key=api_key, signature=signature))
        if behaviour == "trickle":
            return StreamingResponse(self._trickle(), media_type="application/json")
        if behaviour == "timeout":
            await self._release.wait()
            return JSONResponse({"errors": ["released at shutdown"]}, status_code=503)
        if behaviour == "held":
            await self._answer.wait()
            return JSONResponse({"errors": ["Simulation failed"]}, status_code=400)
        if behaviour == "slow":
            await self._answer.wait()
        if behaviour == "throttled":
            return PlainTextResponse("Too Many Requests", status_code=429)
        if behaviour == "unsigned":
            return JSONResponse({"errors": []})
        if behaviour == "error":
            return JSONResponse(
                {"errors": ["Simulation failed: insufficient funds for the trade"]},
                status_code=400,
            )
        return JSONResponse({"signature": signature, "errors": []})

    async def _trickle(self) -> AsyncIterator[bytes]:
        while not self._release.is_set():
            yield b" "
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self._release.wait()
        yield b'{"errors": ["released at shutdown"]}'


@contextlib.asynccontextmanager
async def fake_trade_api(behaviour: Behaviour = "success") -> AsyncIterator[FakeTradeApi]:
    """The fake served on a free port of 127.0.0.1 for the block's duration."""
    fake = FakeTradeApi(behaviour=behaviour)
    app = Starlette(routes=[Route("/api/trade", fake.trade, methods=["POST"])])
    async with local_app(app) as base:
        fake.url = f"{base}/api/trade"
        try:
            yield fake
        finally:
            fake._release.set()
            fake._answer.set()
