"""A WebSocket server that speaks PumpPortal's data protocol, fed by one shared market.

One broadcast clock drives the market; every connection sees the same frames, filtered
by what it subscribed to, with the same acks, errors and API-key gating as the real
``wss://pumpportal.fun/api/data``. Faults (drops without a close frame, malformed and
duplicated frames, extra latency) are injected on request.

API-key gating: the trade subscriptions (of tokens and of wallets) of a key whose wallet
holds under 0.02 SOL (``unfunded_keys``; no key at all with ``require_api_key``) are
answered with PumpPortal's notice and stream nothing. :meth:`SimulatorServer.fund` funds
or drains a key's wallet while its connections stay: their next trade subscriptions are
acknowledged (the refused ones are not subscribed: a client subscribes them again), or
refused and their trades stop at once. ``fund_after_s`` funds every wallet that many real
seconds after the start (``pumpflow-sim serve --fund-after``): an operator's drill of a
key funded while the feed runs, with no code of theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import Counter, deque
from collections.abc import Iterable
from http import HTTPStatus
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pumpflow.common import pumpportal
from pumpflow.simulator.faults import FaultConfig, hostile, malform
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
ERROR_RATE_LIMITED = f"Rate limit exceeded: at most {MAX_MESSAGES_PER_SECOND} messages per second."
#: columns of the sent log, one line per data frame a connection's socket took
SENT_LOG_COLUMNS = ("connection", "kind", "tx_type", "mint", "signature")

#: queue bound per connection; a real-time client that falls this far behind is dropped
_QUEUE_LIMIT = 50_000
_FAST_QUEUE_LIMIT = 1_000
_encode = msgspec.json.Encoder().encode


def _control(**body: object) -> str:
    return json.dumps(body)


class _Client:
    """One connection: its subscriptions and its outgoing queue."""

    def __init__(
        self, ws: ServerConnection, *, number: int, key: str, funded: bool, queue_limit: int
    ):
        self.ws = ws
        self.number = number
        #: its API key ("": none)
        self.key = key
        self.funded = funded
        self.new_tokens = False
        self.migrations = False
        self.mints: set[str] = set()
        self.accounts: set[str] = set()
        #: (text, its sent-log line: "" for data frames without a log, None for control)
        self.queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue(maxsize=queue_limit)
        #: arrival times of the requests of the last second (the rate limit's window)
        self.recent: deque[float] = deque()
        #: replies waiting for room in a full queue, in order, and the task queueing them
        self.replies: deque[str] = deque()
        self.replier: asyncio.Task | None = None

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

    def wants_twice(self, frame: Frame) -> bool:
        """True for a trade both a token and an account subscription of this client take."""
        return (
            self.funded
            and frame["txType"] in ("buy", "sell")
            and frame["mint"] in self.mints
            and frame["traderPublicKey"] in self.accounts
        )


class SimulatorServer:
    """PumpPortal's data socket, served from a simulated market.

    ``speed`` is the time-scale factor: 1 is real time, 10 ten times faster, 0 as fast
    as the clients read (the market then waits while nobody is connected).

    ``per_subscription``: a trade that a client's token and account subscriptions both
    take is sent once for each, as a server streaming each subscription on its own
    would (PumpPortal's documentation does not say which it does: a client must take
    either). ``inject`` sends a frame of the test's (the live wallet's trade) now, to
    every client that wants it, as the market's would be.

    ``require_api_key``: a connection without a key is not funded; ``unfunded_keys``:
    keys whose wallet holds under 0.02 SOL (see the module for both, and :meth:`fund`);
    ``fund_after_s``: every wallet funded that many real seconds after :meth:`start`.
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
        unfunded_keys: Iterable[str] = (),
        fund_after_s: float | None = None,
        sent_log: str | Path | None = None,
        per_subscription: bool = False,
    ):
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        if fund_after_s is not None and not 0 <= fund_after_s < float("inf"):
            raise ValueError(f"fund_after_s must be a finite 0 or more, got {fund_after_s}")
        self.market = market
        self.host = host
        self.port = port
        self.speed = speed
        self.faults = faults
        self.require_api_key = require_api_key
        #: keys (""; none) funded or drained since the start, over their default
        self._funding: dict[str, bool] = dict.fromkeys(unfunded_keys, False)
        self.fund_after_s = fund_after_s
        self.per_subscription = per_subscription
        #: what was sent: create, buy, sell, migrate, control, errors, malformed,
        #: duplicate, delayed, hostile (and hostile_<kind>); connections, dropped;
        #: undelivered (data frames queued for a connection that ended first),
        #: unconnected (market frames while no client was connected, after the first)
        self.counters: Counter[str] = Counter()
        #: with a path: one line (SENT_LOG_COLUMNS, tab-separated) per data frame written
        #: to a connection, so a test can tell what a client was sent from what it kept
        self.sent_log_path = None if sent_log is None else Path(sent_log)
        self._sent_log: IO[str] | None = None
        self._hostile_serial = 0
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
        if self.sent_log_path is not None:
            self._sent_log = self.sent_log_path.open("a", buffering=1 << 16)
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._check_path,
            ping_interval=20,
            ping_timeout=20,
            max_queue=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._broadcast(), name="sim-broadcast"))
        if self.faults.drop_every_s:
            self._tasks.append(asyncio.create_task(self._drop_loop(), name="sim-drops"))
        if self.fund_after_s is not None:
            self._tasks.append(asyncio.create_task(self._fund_later(), name="sim-funding"))
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
        if self._sent_log is not None:
            self._sent_log.close()
            self._sent_log = None

    def is_funded(self, key: str) -> bool:
        """Whether the trade subscriptions of a connection with ``key`` ("": none) are
        taken: its wallet holds 0.02 SOL."""
        return self._funding.get(key, bool(key) or not self.require_api_key)

    def fund(self, key: str = "", *, funded: bool = True) -> None:
        """Fund the wallet of ``key`` ("": the connections without one), or drain it
        (``funded`` false): its connections' next trade subscriptions are acknowledged,
        or refused and their trades stop at once."""
        self._funding[key] = funded
        for client in self._clients:
            if client.key == key:
                client.funded = funded

    async def _fund_later(self) -> None:
        await asyncio.sleep(self.fund_after_s)
        unfunded = sorted(k for k in {"", *self._funding} if not self.is_funded(k))
        for key in unfunded:
            self.fund(key)
        said = ", ".join(repr(k) if k else "connections without a key" for k in unfunded)
        log.info("simulator: wallets funded after %gs: %s", self.fund_after_s, said or "none")

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
        self.counters["connections"] += 1
        client = _Client(
            ws,
            number=self.counters["connections"],
            key=key,
            funded=self.is_funded(key),
            # as fast as possible: a short queue so the market runs at the reader's pace
            queue_limit=_QUEUE_LIMIT if self.speed else _FAST_QUEUE_LIMIT,
        )
        self._clients.add(client)
        self._has_clients.set()
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
            if client.replier is not None:
                client.replier.cancel()
            # wake a broadcaster waiting for room in this queue (as-fast-as-possible mode)
            self._discard(client)

    def _reply(self, client: _Client, text: str, counter: str) -> None:
        self.counters[counter] += 1
        if not client.replies and not client.queue.full():
            client.queue.put_nowait((text, None))
            return
        # the live server answers every request: a reader behind the market gets its
        # replies once its queue has room, after the frames queued before them
        client.replies.append(text)
        if client.replier is None:
            client.replier = asyncio.create_task(self._queue_replies(client))

    async def _queue_replies(self, client: _Client) -> None:
        while client.replies:
            await client.queue.put((client.replies[0], None))
            client.replies.popleft()
        client.replier = None

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
                text, note = await queue.get()
                if faults.delay_rate and rng.random() < faults.delay_rate:
                    self.counters["delayed"] += 1
                    await asyncio.sleep(rng.uniform(0.0, faults.delay_max_s))
                await client.ws.send(text)
                if note and self._sent_log is not None:
                    self._sent_log.write(f"{client.number}\t{note}\n")
        except ConnectionClosed:
            pass

    def _discard(self, client: _Client) -> None:
        """Empty the queue of a connection that ended, counting the data frames it lost."""
        while not client.queue.empty():
            if client.queue.get_nowait()[1] is not None:
                self.counters["undelivered"] += 1

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
            if not self._clients and self.counters["connections"]:
                # what the market said while nobody listened, once someone had (a client
                # that came back can tell how much it missed)
                self.counters["unconnected"] += 1
            for client in tuple(self._clients):
                if not client.wants(frame):
                    continue
                if text is None:
                    text = _encode(frame).decode()
                out = text
                what = "frame"
                if faults.active:
                    if faults.malformed_rate and rng.random() < faults.malformed_rate:
                        kind, out = malform(frame, text, rng)
                        what = f"malformed_{kind}"
                        self.counters["malformed"] += 1
                        self.counters[what] += 1
                    elif faults.duplicate_rate and rng.random() < faults.duplicate_rate:
                        await self._put(client, text, self._note("duplicate", frame))
                        self.counters["duplicate"] += 1
                await self._put(client, out, self._note(what, frame))
                self.counters[tx] += 1
                if self.per_subscription and client.wants_twice(frame):
                    await self._put(client, text, self._note("account", frame))
                    self.counters["account_copy"] += 1
                if faults.hostile_rate and rng.random() < faults.hostile_rate:
                    self._hostile_serial += 1
                    serial = self._hostile_serial
                    kind, bad = hostile(frame, serial, rng, faults.hostile_classes)
                    self.counters["hostile"] += 1
                    self.counters[f"hostile_{kind}"] += 1
                    await self._put(client, bad, f"hostile_{kind}\t-\t-\thostile{serial}")

    async def inject(self, frame: Frame) -> int:
        """Send ``frame`` now to every client that wants it, without faults; return how
        many copies went out."""
        text = _encode(frame).decode()
        sent = 0
        for client in tuple(self._clients):
            if not client.wants(frame):
                continue
            copies = 2 if self.per_subscription and client.wants_twice(frame) else 1
            for _ in range(copies):
                await self._put(client, text, self._note("injected", frame))
                sent += 1
        self.counters["injected"] += sent
        return sent

    def _note(self, kind: str, frame: Frame) -> str:
        """The sent-log line of a data frame ("" without a sent log; None marks control)."""
        if self._sent_log is None:
            return ""
        return f"{kind}\t{frame['txType']}\t{frame['mint']}\t{frame['signature']}"

    async def _put(self, client: _Client, text: str, note: str) -> None:
        if not self.speed:
            # as fast as the client reads; a client that leaves has its queue drained
            await client.queue.put((text, note))
            return
        try:
            client.queue.put_nowait((text, note))
        except asyncio.QueueFull:
            # a consumer this far behind is cut off, like on the real socket; it leaves
            # the broadcast now, not when its handler next runs (after up to 500 frames)
            log.warning("dropping a client %d frames behind", client.queue.qsize())
            self.counters["undelivered"] += 1
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
