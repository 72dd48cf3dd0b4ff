"""Delivery attempts of redelivered messages, counted where every replica sees them.

A message that kills its consumer's process comes back to whichever replica consumes
its queue next, on this host or another. Its count of attempts has to outlive the
process that died with it and be one count for all replicas, or a message that
crashes replica A, then B, then A again is never counted past the limit. So a
service process counts in the shared state store (:class:`SharedDeliveryJournal`,
Redis through ``StateStore.add_member``), each count with a TTL: a count is needed
while its message goes round, and one left behind (its settle lost) expires instead
of piling up.

A count is the set of its message's starts, each named by a token of its own, not a
number added to: a count whose reply was lost (stored, the connection gone before the
answer) is made again with the same token and counts once. Added to, that start would
count twice, and the message be dead-lettered one start early.

A bus given no shared store (a command-line tool, a test's bus) counts in files
under the host's temporary directory (:class:`LocalDeliveryJournal`): that outlives
the process, not the host.

Only redelivered messages are journaled: a fresh one has no history.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

#: how long a count outlives its last attempt: far longer than any restart between
#: two deliveries of a message, short enough that counts whose settle was lost go
JOURNAL_TTL_S = 24 * 3600.0
#: the prefix of the counts' keys in the shared store (a set of start tokens each)
JOURNAL_PREFIX = "delivery-starts:"


class DeliveryJournal(Protocol):
    """How often each redelivered message was started and never settled, per queue."""

    async def attempt(self, queue: str, message_id: str, token: str) -> int:
        """Count the start ``token`` of ``message_id`` on ``queue``; return the count.

        ``token`` names this start alone: counting it again (its reply was lost) leaves
        the count as it is.
        """
        ...

    async def settle(self, queue: str, message_id: str) -> None:
        """Forget a message that was handled (or dead-lettered)."""
        ...

    async def clear(self) -> None:
        """Forget every count (the bus's topology is being deleted)."""
        ...


class JournalStore(Protocol):
    """The part of a ``StateStore`` a shared journal uses."""

    async def add_member(self, key: str, member: str, ttl: float) -> int: ...

    async def delete_many(self, keys: Iterable[str]) -> None: ...

    async def scan_keys(self, prefix: str) -> list[str]: ...


def _write_synced(path: Path, text: str) -> None:
    # a few bytes to the page cache and a sync: short enough for the event loop
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _entry(queue: str, message_id: str) -> str:
    return hashlib.sha1(f"{queue}\0{message_id}".encode()).hexdigest()


class SharedDeliveryJournal:
    """Counts in a store every replica shares (Redis), each with a TTL."""

    def __init__(self, store: JournalStore, *, ttl_s: float = JOURNAL_TTL_S):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.store = store
        self.ttl_s = ttl_s

    async def attempt(self, queue: str, message_id: str, token: str) -> int:
        key = JOURNAL_PREFIX + _entry(queue, message_id)
        return await self.store.add_member(key, token, self.ttl_s)

    async def settle(self, queue: str, message_id: str) -> None:
        await self.store.delete_many([JOURNAL_PREFIX + _entry(queue, message_id)])

    async def clear(self) -> None:
        await self.store.delete_many(await self.store.scan_keys(JOURNAL_PREFIX))


class LocalDeliveryJournal:
    """One small file per message under way, its starts' tokens a line each (written and
    synced before its handler starts, removed once it is settled): the count survives
    the process, on this host."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    @classmethod
    def for_namespace(cls, namespace: str) -> LocalDeliveryJournal:
        """The journal under the temporary directory, one per namespace."""
        return cls(Path(tempfile.gettempdir()) / "pumpflow-delivery-starts" / namespace)

    def _path(self, queue: str, message_id: str) -> Path:
        return self.directory / _entry(queue, message_id)

    async def attempt(self, queue: str, message_id: str, token: str) -> int:
        path = self._path(queue, message_id)
        try:
            tokens = path.read_text().split()
        except FileNotFoundError:
            tokens = []
        if token not in tokens:
            tokens.append(token)
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_synced(path, "\n".join(tokens))
        return len(tokens)

    async def settle(self, queue: str, message_id: str) -> None:
        self._path(queue, message_id).unlink(missing_ok=True)

    async def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
