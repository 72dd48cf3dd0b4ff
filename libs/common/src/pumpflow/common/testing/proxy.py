"""A TCP proxy between a client and its server, for faults on the way between them.

The server stays up and well; what the client sees of it changes:

- :meth:`TcpProxy.freeze`: nothing passes either way and every connection stays open,
  as with a frozen host or a lost network (no reset, no answer); :meth:`thaw` lets the
  held bytes go on.
- :meth:`TcpProxy.lose_replies`: the next replies of the server are dropped, each
  with its connection: the request reached the server and was done there, the answer
  never reached the client. ``containing`` picks the replies by their bytes (a
  Postgres ``COMMIT``'s, after its transaction's other replies went through).

Run it on the event loop of the clients under test:

    async with TcpProxy(server_port) as proxy:
        client = Redis.from_url(proxy.url(redis_url))
        proxy.lose_replies(1)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self
from urllib.parse import urlsplit

from pumpflow.common.clock import first_of

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards every connection to ``127.0.0.1:<target_port>`` from a free port of its own."""

    def __init__(self, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        #: where clients connect, once started
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._replies_to_lose = 0
        self._lose_containing = b""
        #: replies dropped so far (each with its connection)
        self.lost_replies = 0
        #: the forwarding tasks, two a connection
        self._pumps: set[asyncio.Task] = set()

    def url(self, url: str) -> str:
        """``url`` (a server's URL or DSN, its user kept) with this proxy for its server."""
        parts = urlsplit(url)
        user, _, _ = parts.netloc.rpartition("@")
        server = f"{self.host}:{self.port}"
        return parts._replace(netloc=f"{user}@{server}" if user else server).geturl()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """Forward nothing more, either way; keep every connection open."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    def lose_replies(self, count: int = 1, *, containing: bytes = b"") -> None:
        """Drop the next ``count`` replies of the server that hold ``containing`` (any,
        by default), and the connection of each; the others pass."""
        self._replies_to_lose += count
        self._lose_containing = containing

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        try:
            server_in, server_out = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            _abort(client_out)
            return
        pumps = {
            asyncio.create_task(self._pump(client_in, server_out, reply=False)),
            asyncio.create_task(self._pump(server_in, client_out, reply=True)),
        }
        self._pumps |= pumps
        try:
            await first_of(*pumps)
        finally:
            self._pumps -= pumps
            _abort(client_out)
            _abort(server_out)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, reply: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(_CHUNK):
                await self._flowing.wait()
                if reply and self._replies_to_lose and self._lose_containing in data:
                    self._replies_to_lose -= 1
                    self.lost_replies += 1
                    return  # the connection goes with it
                sink.write(data)
                await sink.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    # a reset, not a graceful end: nothing held is flushed to either side
    writer.transport.abort()
