"""Transactions that hold a row other replicas wait for.

A replica's write is fenced by a row it reads shared (trading's holder, the feed's
writer) or locks (a graceful exit's run): a replica taking over, or another writing the
same row, waits for that transaction to end. Should the process that opened it stall
(frozen, paused, its host hung with the connection still open), nothing would end it
until the process woke or the kernel's keepalive dropped the connection, two hours by
default. So such a transaction is ended by the server once it sits idle
:data:`HOLDING_IDLE_LIMIT_S`: its statements follow one another within turns of its
event loop, so only a process stalled that long meets the limit, and its write fails
as after any lost connection (retried, then refused by the fence).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

#: seconds a holding transaction may sit idle before the server ends it: far beyond a
#: turn of a busy event loop (milliseconds), and the longest a take-over waits for a
#: stalled predecessor
HOLDING_IDLE_LIMIT_S = 10.0


def bound_idle_sql() -> str:
    """The statement that ends the transaction it runs in once idle past the limit."""
    return f"SET LOCAL idle_in_transaction_session_timeout = {int(HOLDING_IDLE_LIMIT_S * 1000)}"


@contextlib.asynccontextmanager
async def holding_transaction(conn: Any) -> AsyncIterator[Any]:
    """Run a transaction on ``conn`` the server ends once it sits idle past the limit.

    One round trip opens it with its limit (``BEGIN`` and ``SET LOCAL`` in one simple
    query), as ``conn.transaction()`` opens a plain one.
    """
    await conn.execute(f"BEGIN; {bound_idle_sql()}")
    try:
        yield conn
    except BaseException:
        # the server may have ended the session: its error is not the one to raise
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")
