"""A named lease in the shared StateStore: at most one holder at a time.

The lease is a key holding the holder's id with a TTL. Acquire sets it only if absent;
renew extends it only while it still holds our id; release deletes it only if it is
ours. A holder that stops renewing (crash, partition) loses the lease when the TTL runs
out, so a holder must stop acting before then: renew well inside the TTL and treat a
failed renewal as lost.
"""

from __future__ import annotations

from pumpflow.common.clock import Clock
from pumpflow.common.state.abc import StateStore

LEASE_PREFIX = "lease:"


class Lease:
    """One holder's handle on the lease ``name``."""

    def __init__(self, store: StateStore, name: str, holder: str, ttl_s: float, clock: Clock):
        if ttl_s <= 0:
            raise ValueError("lease ttl_s must be > 0")
        if not holder:
            raise ValueError("lease holder must not be empty")
        self.store = store
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self._clock = clock
        self._key = LEASE_PREFIX + name
        self._value = holder.encode()
        #: when (clock time) the lease runs out unless renewed; None when not held
        self.expires_at: float | None = None

    @property
    def held(self) -> bool:
        """True while we believe we hold it: acquired or renewed, and not yet run out."""
        return self.expires_at is not None and self._clock.now() < self.expires_at

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (renew it if we do); True when ours."""
        started = self._clock.now()
        if await self.store.set_if_absent(self._key, self._value, self.ttl_s):
            self.expires_at = started + self.ttl_s
            return True
        return await self.renew()

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and not held) when lost."""
        started = self._clock.now()
        if await self.store.extend_if_equal(self._key, self._value, self.ttl_s):
            # counted from before the call: the store's TTL started no earlier
            self.expires_at = started + self.ttl_s
            return True
        self.expires_at = None
        return False

    async def release(self) -> bool:
        """Give the lease up if it is ours, so another can take it at once."""
        self.expires_at = None
        return await self.store.delete_if_equal(self._key, self._value)

    async def current_holder(self) -> str | None:
        """Who holds the lease now (None: nobody)."""
        value = await self.store.get(self._key)
        return value.decode() if value is not None else None
