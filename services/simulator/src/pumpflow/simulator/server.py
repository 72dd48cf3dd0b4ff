"""A WebSocket server that speaks PumpPortal's data protocol, fed by one shared market.

One broadcast clock drives the market; every connection sees the same frames, filtered
by what it subscribed to, with the same acks, errors and API-key gating as the real
``wss://pumpportal.fun/api/data``. Faults (drops without a close frame, malformed and
duplicated frames, extra latency) are injected on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import Counter, deque
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pumpflow.common import pumpportal
from pumpflow.simulator.faults import FaultConfig, malform
from pumpflow.simulator.market import Frame, Market

log = logging.getLogger(__name__)

PATH = urlsplit(pumpportal.DEFAULT_WS_URL).path
MAX_KEYS_PER_MESSAGE = pumpportal.MAX_KEYS_PER_MESSAGE
ACK_NEW_TOKEN = pumpportal.ACK_NEW_TOKEN
ACK_MIGRATION = pumpportal.ACK_MIGRATION
ACK_KEYS = pumpportal.ACK_KEYS
ACK_UNSUBSCRIBE_KEYS = pumpportal.ACK_UNSUBSCRIBED_KEYS
ACK_UNSUBSCRIBE_NEW_TOKEN = "Unsubscribed from token creation events."
API_KEY_REQUIRED = pumpportal.API_KEY_REQUIRED
ERROR_INVALID_JSON = "Invalid message: expected a JSON object with a 'method'."
ERROR_UNSUBSCRIBE_MIGRATION = "Method 'unsubscribeMigration' is not supported."
ERROR_TOO_MANY_KEYS = f"Too many keys in one message: at most {MAX_KEYS_PER_MESSAGE}."
ERROR_BAD_KEYS = "'keys' must be a list of strings."
MAX_MESSAGES_PER_SECOND = pumpportal.MAX_MESSAGES_PER_SECOND
ERROR_RATE_LIMITED = (
    f"Rate limit exceeded: at most {MAX_MESSAGES_PER_SECOND} messages per second."
)

#: queue bound per connection; a real-time client that falls this far behind is dropped
_QUEUE_LIMIT = 50_000
_FAST_QUEUE_LIMIT = 1_000
_encode = msgspec.json.Encoder().encode


def _control(**body: object) -> str:
    return json.dumps(body)


class _Client:
    """One connection: its subscriptions and its outgoing queue."""

    def __init__(self, ws: ServerConnection, *, funded: bool, queue_limit: int):
        self.ws = ws
        self.funded = funded
        self.new_tokens = False
        self.migrations = False
        self.mints: set[str] = set()
        self.accounts: set[str] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_limit)
        #: arrival times of the requests of the last second (the rate limit's window)
        self.recent: deque[float] = deque()

    def over_rate_limit(self, now: float) -> bool:
        """Count a request at ``now``; True when it is one too many for its second."""
        recent = self.recent
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) >= MAX_MESSAGES_PER_SECOND:
            return True
        recent.append(now)
        return False

    def wants(self, frame: Frame) -> bool:
        tx = frame["txType"]
        if tx == "create":
            return self.new_tokens or (self.funded and frame["traderPublicKey"] in self.accounts)
        if tx == "migrate":
            return self.migrations
        return self.funded and (
            frame["mint"] in self.mints or frame["traderPublicKey"] in self.accounts
        )


class SimulatorServer:
    """PumpPortal's data socket, served from a simulated market.

    ``speed`` is the time-scale factor: 1 is real time, 10 ten times faster, 0 as fast
    as the clients read (the market then waits while nobody is connected).
    """

    def __init__(
        self,
        *,
        market: Market,
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 1.0,
        faults: FaultConfig = FaultConfig(),
        require_api_key: bool = False,
    ):
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        self.market = market
        self.host = host
        self.port = port
        self.speed = speed
        self.faults = faults
        self.require_api_key = require_api_key
        #: what was sent: create, buy, sell, migrate, control, errors, malformed,
        #: duplicate, delayed; and connections, dropped
        self.counters: Counter[str] = Counter()
        self._clients: set[_Client] = set()
        self._server: Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._fault_rng = random.Random(faults.seed)
        self._has_clients = asyncio.Event()
        #: market time of the last frame broadcast
        self.market_time = 0.0

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    @property
    def connections(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        """Listen and start the market clock."""
        self._server = await serve(
            self._handle, self.host, self.port, process_request=self._check_path,
            ping_interval=20, ping_timeout=20, max_queue=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._broadcast(), name="sim-broadcast"))
        if self.faults.drop_every_s:
            self._tasks.append(asyncio.create_task(self._drop_loop(), name="sim-drops"))
        log.info("simulator listening on %s (speed %s)", self.url, self.speed)

    async def stop(self) -> None:
        """Stop the clock and close every connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def drop_connections(self) -> int:
        """Cut every connection without a close frame, as the live server does; return how many."""
        clients = list(self._clients)
        for client in clients:
            transport = client.ws.transport
            if transport is not None:
                transport.abort()
        self.counters["dropped"] += len(clients)
        return len(clients)

    # ------------------------------------------------------------------ connections

    def _check_path(self, connection: ServerConnection, request):
        if urlsplit(request.path).path != PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        key = (query.get(pumpportal.API_KEY_PARAM) or [""])[0]
        client = _Client(
            ws,
            funded=bool(key) or not self.require_api_key,
            # as fast as possible: a short queue so the market runs at the reader's pace
            queue_limit=_QUEUE_LIMIT if self.speed else _FAST_QUEUE_LIMIT,
        )
        self._clients.add(client)
        self._has_clients.set()
        self.counters["connections"] += 1
        writer = asyncio.create_task(self._write(client))
        try:
            async for message in ws:
                self._on_message(client, message)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            if not self._clients:
                self._has_clients.clear()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            # wake a broadcaster waiting for room in this queue (as-fast-as-possible mode)
            while not client.queue.empty():
                client.queue.get_nowait()

    def _reply(self, client: _Client, text: str, counter: str) -> None:
        self.counters[counter] += 1
        with contextlib.suppress(asyncio.QueueFull):
            client.queue.put_nowait(text)

    def _on_message(self, client: _Client, message: str | bytes) -> None:
        if client.over_rate_limit(asyncio.get_running_loop().time()):
            # the real service bans such clients; refusing the request is what a
            # client can observe and test against without waiting out a ban
            self._reply(client, _control(errors=ERROR_RATE_LIMITED), "rate_limited")
            return
        try:
            request = json.loads(message)
            method = request["method"]
        except (ValueError, TypeError, KeyError):
            self._reply(client, _control(errors=ERROR_INVALID_JSON), "errors")
            return
        if method == pumpportal.SUBSCRIBE_NEW_TOKEN:
            client.new_tokens = True
            self._reply(client, _control(message=ACK_NEW_TOKEN), "control")
        elif method == pumpportal.UNSUBSCRIBE_NEW_TOKEN:
            client.new_tokens = False
            self._reply(client, _control(message=ACK_UNSUBSCRIBE_NEW_TOKEN), "control")
        elif method == pumpportal.SUBSCRIBE_MIGRATION:
            client.migrations = True
            self._reply(client, _control(message=ACK_MIGRATION), "control")
        elif method == "unsubscribeMigration":
            self._reply(client, _control(errors=ERROR_UNSUBSCRIBE_MIGRATION), "errors")
        elif method in pumpportal.KEYED_METHODS:
            self._on_keys(client, method, request.get("keys"))
        else:
            self._reply(client, _control(errors=f"Unknown method: {method!r}."), "errors")

    def _on_keys(self, client: _Client, method: str, keys: object) -> None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            self._reply(client, _control(errors=ERROR_BAD_KEYS), "errors")
            return
        if len(keys) > MAX_KEYS_PER_MESSAGE:
            self._reply(client, _control(errors=ERROR_TOO_MANY_KEYS), "errors")
            return
        target = client.mints if method.endswith("TokenTrade") else client.accounts
        if method.startswith("unsubscribe"):
            target.difference_update(keys)
            self._reply(client, _control(message=ACK_UNSUBSCRIBE_KEYS), "control")
        elif not client.funded:
            self._reply(client, _control(message=API_KEY_REQUIRED), "control")
        else:
            target.update(keys)
            self._reply(client, _control(message=ACK_KEYS), "control")

    async def _write(self, client: _Client) -> None:
        faults, rng = self.faults, self._fault_rng
        queue = client.queue
        try:
            while True:
                text = await queue.get()
                if faults.delay_rate and rng.random() < faults.delay_rate:
                    self.counters["delayed"] += 1
                    await asyncio.sleep(rng.uniform(0.0, faults.delay_max_s))
                await client.ws.send(text)
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ market clock

    async def _broadcast(self) -> None:
        loop = asyncio.get_running_loop()
        speed = self.speed
        start = loop.time()
        faults, rng = self.faults, self._fault_rng
        sent = 0
        for t, frame in self.market.frames():
            self.market_time = t
            if speed:
                delay = start + t / speed - loop.time()
                if delay > 0.001:
                    await asyncio.sleep(delay)
                    sent = 0
            else:
                if not self._clients:
                    await self._has_clients.wait()
            sent += 1
            if sent >= 500:
                # behind the clock (or as fast as possible): let the writers run
                sent = 0
                await asyncio.sleep(0)
            text: str | None = None
            tx = frame["txType"]
            for client in tuple(self._clients):
                if not client.wants(frame):
                    continue
                if text is None:
                    text = _encode(frame).decode()
                out = text
                if faults.active:
                    if faults.malformed_rate and rng.random() < faults.malformed_rate:
                        kind, out = malform(frame, text, rng)
                        self.counters["malformed"] += 1
                        self.counters[f"malformed_{kind}"] += 1
                    elif faults.duplicate_rate and rng.random() < faults.duplicate_rate:
                        await self._put(client, text)
                        self.counters["duplicate"] += 1
                await self._put(client, out)
                self.counters[tx] += 1

    async def _put(self, client: _Client, text: str) -> None:
        if not self.speed:
            # as fast as the client reads; a client that leaves has its queue drained
            await client.queue.put(text)
            return
        try:
            client.queue.put_nowait(text)
        except asyncio.QueueFull:
            # a consumer this far behind is cut off, like on the real socket; it leaves
            # the broadcast now, not when its handler next runs (after up to 500 frames)
            log.warning("dropping a client %d frames behind", client.queue.qsize())
            self._clients.discard(client)
            transport = client.ws.transport
            if transport is not None:
                transport.abort()
            self.counters["dropped_slow"] += 1

    async def _drop_loop(self) -> None:
        every = self.faults.drop_every_s
        assert every is not None
        while True:
            await asyncio.sleep(every)
            await self.drop_connections()
