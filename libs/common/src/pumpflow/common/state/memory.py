"""In-process StateStore for embedded runs, backtests and tests; TTLs follow the clock."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.state.abc import (
    EPOCH_MARKER,
    HashValue,
    StateStore,
    WriteBatch,
    WrongKind,
    plain_field,
)


def _as_bytes(value: HashValue) -> bytes:
    value = plain_field(value)
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()


class MemoryStateStore(StateStore):
    def __init__(self, clock: Clock | None = None):
        self._clock = clock or WallClock()
        self._values: dict[str, bytes | dict[str, HashValue] | set[str] | list[bytes]] = {}
        self._expiry: dict[str, float] = {}
        #: (deadline, key) of every TTL set; entries whose key got a new TTL are stale
        self._deadlines: list[tuple[float, str]] = []
        # the store lives and dies with its process, and so does everyone who uses it:
        # its contents are as old as anything that can use them
        self._epochs: dict[str, bytes] = {EPOCH_MARKER: b"-inf"}

    def _purge(self) -> None:
        """Drop keys whose TTL ran out, read or not, so a long run's memory stays bounded."""
        now = self._clock.now()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, key = heapq.heappop(deadlines)
            if self._expiry.get(key) == deadline:
                del self._expiry[key]
                self._values.pop(key, None)
        if len(deadlines) > 2 * len(self._expiry) + 1024:
            # keys whose TTL is refreshed often leave stale entries behind: rebuild
            self._deadlines = [(d, k) for k, d in self._expiry.items()]
            heapq.heapify(self._deadlines)

    def _alive(self, key: str) -> bool:
        deadline = self._expiry.get(key)
        if deadline is not None and deadline <= self._clock.now():
            self._values.pop(key, None)
            self._expiry.pop(key, None)
        return key in self._values

    def _set_ttl(self, key: str, ttl: float | None) -> None:
        if ttl is None:
            self._expiry.pop(key, None)
        else:
            deadline = self._expiry[key] = self._clock.now() + ttl
            heapq.heappush(self._deadlines, (deadline, key))

    async def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            value = self._values.get(key) if self._alive(key) else None
            out.append(value if isinstance(value, bytes) else None)
        return out

    async def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        self._purge()
        for key, value in items.items():
            self._values[key] = bytes(value)
            self._set_ttl(key, ttl)

    async def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._values.pop(key, None)
            self._expiry.pop(key, None)

    async def hset_many(
        self, items: Mapping[str, Mapping[str, HashValue]], ttl: float | None = None
    ) -> None:
        self._apply(WriteBatch.of_hashes(items, ttl))

    async def write(self, batch: WriteBatch) -> None:
        self._apply(batch)

    def _apply(self, batch: WriteBatch) -> None:
        # not a coroutine: atomic on the event loop
        self._purge()
        values = self._values
        for hashes in (batch.unset, batch.hashes):
            for key, fields in hashes.items():
                if not fields:
                    continue
                current = values.get(key)
                # a hash or nothing, the common case, needs no look at the key's expiry
                if key in batch.values or (
                    current is not None and not isinstance(current, dict) and self._alive(key)
                ):
                    kind = "value" if key in batch.values else _kind(current)
                    raise WrongKind(
                        f"{key} holds a {kind}, not a hash: nothing of the write is stored",
                        key=key,
                        kind=kind,
                    )
        for key, (value, ttl) in batch.values.items():
            values[key] = bytes(value)
            self._set_ttl(key, ttl)
        for key, names in batch.unset.items():
            current = values.get(key) if self._alive(key) else None
            if isinstance(current, dict):
                for name in names:
                    current.pop(name, None)
                if not current:
                    values.pop(key, None)
                    self._expiry.pop(key, None)
        for key, fields in batch.hashes.items():
            if not fields:
                continue
            current = values.get(key) if self._alive(key) else None
            if not isinstance(current, dict):
                current = values[key] = {}
            # fields stay as given; read as bytes (most are written more often than read)
            current.update(fields)
        for key, ttl in batch.expiries.items():
            if self._alive(key):
                self._set_ttl(key, ttl)

    async def append_bounded(
        self, items: Mapping[str, Sequence[bytes]], keep: int, ttl: float | None = None
    ) -> None:
        # no await inside: atomic on the event loop
        self._purge()
        values = self._values
        for key in items:
            current = values.get(key) if self._alive(key) else None
            if current is not None and not isinstance(current, list):
                kind = _kind(current)
                raise WrongKind(
                    f"{key} holds a {kind}, not a list: nothing of the append is stored",
                    key=key,
                    kind=kind,
                )
        for key, appended in items.items():
            if not appended:
                continue
            current = values.get(key) if self._alive(key) else None
            if current is None:
                current = values[key] = []
            current.extend(bytes(value) for value in appended)
            del current[: max(0, len(current) - keep)]
            if ttl is not None:
                self._set_ttl(key, ttl)

    async def lists(self, keys: Iterable[str]) -> list[list[bytes]]:
        out = []
        for key in keys:
            value = self._values.get(key) if self._alive(key) else None
            out.append(list(value) if isinstance(value, list) else [])
        return out

    async def hgetall(self, key: str) -> dict[str, bytes]:
        value = self._values.get(key) if self._alive(key) else None
        if not isinstance(value, dict):
            return {}
        return {name: _as_bytes(v) for name, v in value.items()}

    async def expire_many(self, keys: Iterable[str], ttl: float | None) -> None:
        self._purge()
        for key in keys:
            if self._alive(key):
                self._set_ttl(key, ttl)

    async def scan_keys(self, prefix: str) -> list[str]:
        return sorted(k for k in list(self._values) if k.startswith(prefix) and self._alive(k))

    # one event loop, no await inside: each of these runs atomically
    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        self._purge()
        if self._alive(key):
            return False
        self._values[key] = bytes(value)
        self._set_ttl(key, ttl)
        return True

    async def add_member(self, key: str, member: str, ttl: float) -> int:
        self._purge()
        current = self._values.get(key) if self._alive(key) else None
        if current is None:
            current = self._values[key] = set()
        elif not isinstance(current, set):
            kind = _kind(current)
            raise WrongKind(
                f"{key} holds a {kind}, not a set: nothing of the addition is stored",
                key=key,
                kind=kind,
            )
        current.add(member)
        self._set_ttl(key, ttl)
        return len(current)

    async def extend_if_equal(self, key: str, value: bytes, ttl: float) -> bool:
        if not self._alive(key) or self._values[key] != value:
            return False
        self._set_ttl(key, ttl)
        return True

    async def expires_in(self, key: str) -> float | None:
        if not self._alive(key):
            return None
        deadline = self._expiry.get(key)
        return math.inf if deadline is None else deadline - self._clock.now()

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        if not self._alive(key) or self._values[key] != value:
            return False
        del self._values[key]
        self._expiry.pop(key, None)
        return True

    async def epoch(self, marker: str = EPOCH_MARKER) -> tuple[bytes, float]:
        now = self._clock.now()
        written = self._epochs.setdefault(marker, repr(now).encode())
        return written, max(0.0, now - float(written))

    async def ping(self) -> bool:
        return True


def _kind(value: object) -> str:
    """What a key holding ``value`` holds, in the words of :class:`WrongKind`."""
    if isinstance(value, dict):
        return "hash"
    if isinstance(value, set):
        return "set"
    return "list" if isinstance(value, list) else "value"
