"""Leases in the shared StateStore: at most one holder at a time.

A lease is a key holding the holder's id with a TTL. Acquire sets it only if absent;
renew extends it only while it still holds our id; release deletes it only if it is
ours. A holder that stops renewing (crash, partition) loses the lease when the TTL runs
out, so a holder must stop acting before then: renew well inside the TTL and treat a
failed renewal as lost.

A store that cannot be reached is ridden out: the holder keeps acting until its lease
runs out by its own clock (counted from before its last successful renewal, so never
after the store's TTL), retrying meanwhile. A store that lost its contents (a restart
without persistence) lost the key too: a holder still within its lease creates it
again (nobody else holds it, or the key would be there), and a new holder acts only
once the store's contents (:meth:`StateStore.epoch`) are a TTL old, since a holder
from before the loss may hold the lease by its own clock until then. Together: at
most one holder acts at any time (docs/architecture.md, "One PumpPortal connection").

A :class:`LeaderLease` may hold its lease in several stores at once (Redis and
Postgres, :class:`~pumpflow.common.db.leases.PostgresLeaseStore`), so that an outage of
one does not end it. A candidate is elected only when it takes the lease in every
store; a leader keeps it while it renews it in any one (it retakes the others when
they come back). Why never two leaders: a candidate can take the lease in a store only
once the leader's claim there ran out, so it holds all of them only once the leader
renewed none for a TTL, and by then the leader, counting from before its last
renewal, has stepped down. A store that lost its contents may hide a claim, so the
settling wait applies to each such store (a durable one hides none). The price: while
one store is away, a leader that dies is replaced only once that store is back.

:class:`Lease` is one holder's handle on the key. :class:`LeaderLease` runs the
election around it for a single-writer role (the feed's PumpPortal connection, the
live executor): it campaigns until the lease is ours, renews it, and calls back when
it is won and when it is lost.

Leases are infrastructure: they time out on the wall clock, never on a market clock,
which runs faster (a simulated market) or jumps (a replay). The store's TTLs must run
on the wall clock too: Redis's do, and a MemoryStateStore's do when it is built on a
``WallClock()`` of speed 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from pumpflow.common.clock import Clock, WallClock

T = TypeVar("T")

log = logging.getLogger(__name__)

LEASE_PREFIX = "lease:"


class LeaseStore(Protocol):
    """What a lease needs of a store (a StateStore has it, and so has Postgres)."""

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool: ...

    async def extend_if_equal(self, key: str, value: bytes, ttl: float) -> bool: ...

    async def delete_if_equal(self, key: str, value: bytes) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def expires_in(self, key: str) -> float | None:
        """Seconds until ``key`` runs out (inf: never); None when missing."""
        ...

    async def epoch(self) -> tuple[bytes, float]:
        """An id of the store's current contents and their age in seconds (inf: never lost)."""
        ...


class Lease:
    """One holder's handle on the lease ``name``."""

    def __init__(
        self,
        store: LeaseStore,
        name: str,
        holder: str,
        ttl_s: float,
        clock: Clock | None = None,
    ):
        if ttl_s <= 0:
            raise ValueError("lease ttl_s must be > 0")
        if not holder:
            raise ValueError("lease holder must not be empty")
        self.store = store
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        #: the clock the store's TTLs follow (the wall, unless a test store runs on another)
        self._clock = clock or WallClock()
        self._key = LEASE_PREFIX + name
        self._value = holder.encode()
        #: when (clock time) the lease runs out unless renewed; None when not held
        self.expires_at: float | None = None
        #: renewals that found the key gone and created it again
        self.retaken = 0

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
        """Extend the lease if it is still ours; False (and not held) when lost.

        A key that is gone while we still hold the lease by our clock (a store that lost
        its contents) is created again: nobody else held it, or it would be there.
        """
        started = self._clock.now()
        # judged when the renewal began: a call that ends late ends late for everyone
        held = self.held
        if await self.store.extend_if_equal(self._key, self._value, self.ttl_s):
            # counted from before the call: the store's TTL started no earlier
            self.expires_at = started + self.ttl_s
            return True
        if held and await self.store.set_if_absent(self._key, self._value, self.ttl_s):
            self.expires_at = started + self.ttl_s
            self.retaken += 1
            log.warning("lease %s: its key was gone; %s holds it again", self.name, self.holder)
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

    async def expires_in(self) -> float | None:
        """Seconds until whoever holds the lease loses it unless renewed (None: nobody)."""
        return await self.store.expires_in(self._key)


#: a holder whose last renewal is older than this many renew intervals is late: the
#: renewer pauses an interval between renewals, and its store's answer and a busy loop
#: take a little longer
LATE_AFTER_INTERVALS = 1.5


@dataclass(frozen=True, slots=True)
class Claim:
    """The lease as its stores have it now."""

    #: who holds it, by the first store (None: nobody)
    holder: str | None
    #: seconds until it has run out in every store unless renewed (None: nobody holds
    #: it, or a store did not say)
    runs_out_in_s: float | None = None
    #: seconds since its holder last renewed it, if the holder has the TTL of this
    #: candidate's lease (the replicas of a service share it); None when not known
    renewed_s_ago: float | None = None
    #: the holder is later with its renewal than a holder that renews does get (dead,
    #: stopped or cut off from the stores): the lease runs out unless it comes back
    late: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaderLeaseConfig:
    """Which lease, who campaigns for it, and its timing (wall-clock seconds)."""

    name: str
    #: unique per candidate (replica and process): the value held in the key
    holder: str
    ttl_s: float = 10.0
    #: between renewals, and between a standby's attempts; None: a third of the TTL
    renew_interval_s: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.holder:
            raise ValueError("a leader lease needs a name and a holder")
        if self.ttl_s <= 0:
            raise ValueError("lease ttl_s must be > 0")
        if self.renew_interval_s is not None and not 0 < self.renew_interval_s < self.ttl_s:
            raise ValueError("lease renew_interval_s must be > 0 and below ttl_s")

    @property
    def interval_s(self) -> float:
        return self.ttl_s / 3 if self.renew_interval_s is None else self.renew_interval_s


Callback = Callable[[], Awaitable[None]]
Role = Literal["standby", "leader", "stopped"]


class LeaderLease:
    """Campaign for a lease; call ``on_elected`` when it is ours and ``on_lost`` when not.

    - ``start`` makes one attempt before it returns (a sole candidate leads at once;
      ``on_elected`` has returned by then, unless the store's contents are younger than
      the TTL: then it runs in the background once they are a TTL old, ``settling``
      meanwhile), then campaigns and renews in the background.
    - The leader renews every ``interval_s``. A renewal refused (another holds the key),
      or not done before the lease runs out (a stalled loop, a store that does not
      answer), loses the lease: ``on_lost`` is awaited and the candidate stands by.
      A renewal that fails with an error is retried while the lease lasts.
    - ``on_elected`` is cancelled if the lease is lost while it runs; if it raises,
      ``on_lost`` undoes what it started and the lease is released.
    - ``on_renewed`` (optional) runs after each renewal: checkpoint what a successor
      needs. ``on_resign`` (optional) runs in ``stop`` while the lease is still held and
      renewed: stop the guarded work and flush it before the lease is released.

    Callbacks must not raise to signal anything but a failure; their errors are logged.
    """

    def __init__(
        self,
        store: LeaseStore | Sequence[LeaseStore],
        config: LeaderLeaseConfig,
        *,
        on_elected: Callback,
        on_lost: Callback,
        on_renewed: Callback | None = None,
        on_resign: Callback | None = None,
    ):
        self.config = config
        stores = list(store) if isinstance(store, Sequence) else [store]
        if not stores:
            raise ValueError("a leader lease needs a store")
        #: the lease in each store; held in all to be elected, in any one to lead on
        self.leases = [Lease(s, config.name, config.holder, config.ttl_s) for s in stores]
        self.lease = self.leases[0]
        #: per store: renewed in the last round (for the log when that changes)
        self._renewed_in = [True] * len(stores)
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._on_renewed = on_renewed
        self._on_resign = on_resign
        self._role: Role = "standby"
        self._stopping = False
        #: time.monotonic() at which the lease runs out unless renewed (while leader)
        self._deadline = 0.0
        self._campaign: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None
        self._electing: asyncio.Task | None = None
        self._standing_by = asyncio.Event()
        self._standing_by.set()
        #: elected, waiting out the TTL of a store that lost its contents before acting
        self.settling = False
        self.elections = 0
        self.renewals = 0
        self.losses = 0

    @property
    def store(self) -> LeaseStore:
        """The first store (where a leader keeps what its successor needs)."""
        return self.lease.store

    @property
    def holder(self) -> str:
        return self.config.holder

    @property
    def role(self) -> Role:
        return self._role

    @property
    def is_leader(self) -> bool:
        return self._role == "leader"

    @property
    def holds(self) -> bool:
        """Whether the lease is this candidate's by its own clock: it leads and its
        deadline has not passed. A process that stalled wakes past its deadline before a
        renewal tells it it lost the lease, and another may hold it by then."""
        return self._role == "leader" and time.monotonic() < self._deadline

    async def current_holder(self) -> str | None:
        """Who holds the lease now, by the store (None: nobody)."""
        return await self.lease.current_holder()

    async def claim(self) -> Claim:
        """Who holds the lease now, when it runs out unless renewed, and whether its
        holder is late with the renewal (a store's error is raised)."""
        holder = await self.lease.current_holder()
        if holder is None:
            return Claim(None)
        answers = await asyncio.gather(*(lease.expires_in() for lease in self.leases))
        held = [left for left in answers if left is not None]
        if not held:
            return Claim(holder)
        # a candidate takes over once the claim ran out in every store
        left = max(held)
        ago = max(0.0, self.config.ttl_s - left)
        late = ago > self.config.interval_s * LATE_AFTER_INTERVALS
        return Claim(holder, runs_out_in_s=left, renewed_s_ago=ago, late=late)

    async def start(self) -> bool:
        """Try once now, then campaign in the background; True when leading already."""
        if self._campaign is not None or self._role == "stopped":
            raise RuntimeError(f"lease {self.config.name}: started already")
        settle = 0.0
        if await self._acquire():
            settle = await self._settling_time()
            if not settle:
                await self._lead(0.0)
        # elected but settling: the campaign leads first, so a start never waits a TTL
        self._campaign = asyncio.create_task(
            self._run(settle), name=f"lease:{self.config.name}:{self.holder}"
        )
        return self.is_leader

    async def stop(self) -> None:
        """Stop campaigning; a leader runs ``on_resign``, then releases the lease."""
        if self._role == "stopped":
            return
        self._stopping = True
        await _cancel(self._campaign)
        self._campaign = None
        await _cancel(self._electing)
        if self.is_leader and self._on_resign is not None:
            # still renewed meanwhile: a long flush must not let a successor start early
            await self._call("on_resign", self._on_resign)
        renewer = self._renewer
        if renewer is not None:
            if self.is_leader:
                await _cancel(renewer)
            else:
                # it is stepping down: let on_lost finish
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            self._renewer = None
        if self.is_leader:
            await self._release()
        self._role = "stopped"
        self._standing_by.set()

    async def step_down(self, reason: str) -> None:
        """Stand by now, as when the lease is lost (``on_lost`` awaited), and campaign on:
        the guarded work learnt that another took over before a renewal could tell."""
        await self._step_down(reason)

    # ------------------------------------------------------------------ internals

    async def _acquire(self) -> bool:
        """Take the lease in every store, or in none (what was taken is given back)."""
        started = time.monotonic()
        deadline = started + self.config.ttl_s
        taken: list[Lease] = []
        try:
            for lease in self.leases:
                left = deadline - time.monotonic()
                if left <= 0 or not await _within(lease.acquire, left):
                    break
                taken.append(lease)
        except Exception as exc:
            log.warning("lease %s: acquire by %s failed: %s: %s",
                        self.config.name, self.holder, type(exc).__name__, exc)  # fmt: skip
        if len(taken) < len(self.leases):
            for lease in taken:
                # a leader that holds the other stores retakes this one as it renews
                with contextlib.suppress(Exception):
                    await _within(lease.release, max(0.1, self.config.interval_s))
            return False
        self._deadline = deadline
        self._renewed_in = [True] * len(self.leases)
        if time.monotonic() >= self._deadline:
            return False  # the answer came too late to act on: it may have run out already
        return True

    async def _lead(self, settle: float) -> None:
        """Lead: renew in the background and run ``on_elected`` in ``settle`` seconds."""
        self._role = "leader"
        self._standing_by.clear()
        self.elections += 1
        log.info("lease %s: %s elected", self.config.name, self.holder)
        self._renewer = asyncio.create_task(
            self._renew(), name=f"lease-renew:{self.config.name}:{self.holder}"
        )
        self._electing = asyncio.ensure_future(self._settle_then_act(settle))
        try:
            await self._electing
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            # the lease was lost while it ran: on_lost cleans up
        except Exception:
            log.exception("lease %s: on_elected of %s failed: stepping down",
                          self.config.name, self.holder)  # fmt: skip
            await self._step_down("on_elected failed", release=True)
        finally:
            self._electing = None

    async def _settle_then_act(self, wait: float) -> None:
        """Run ``on_elected`` once no holder from before the store lost its contents can
        still hold the lease by its own clock (renewing meanwhile)."""
        if wait > 0:
            log.warning(
                "lease %s: the store's contents are younger than the lease's TTL; %s waits "
                "%.1f s before acting (a holder from before may hold it by its clock until then)",
                self.config.name, self.holder, wait,
            )  # fmt: skip
            self.settling = True
            try:
                await asyncio.sleep(wait)
            finally:
                self.settling = False
        await self._on_elected()

    async def _settling_time(self) -> float:
        """How long to wait before acting: the TTL less the age of the youngest store's
        contents (a store that lost them may have lost a holder's claim with them)."""
        # bounded inside the lease just acquired, whose renewals start after
        left = max(0.0, self._deadline - time.monotonic()) / 2
        ages = await asyncio.gather(
            *(_within(lease.store.epoch, left) for lease in self.leases),
            return_exceptions=True,
        )
        wait = 0.0
        for age in ages:
            if isinstance(age, BaseException):
                log.warning("lease %s: a store's epoch is unknown (%s: %s); waiting a full TTL",
                            self.config.name, type(age).__name__, age)  # fmt: skip
                return self.config.ttl_s
            wait = max(wait, self.config.ttl_s - age[1])
        return wait

    async def _run(self, settle: float) -> None:
        if settle:
            await self._lead(settle)
        while True:
            await self._standing_by.wait()
            await asyncio.sleep(self.config.interval_s)
            if not self._stopping and await self._acquire():
                await self._lead(await self._settling_time())

    async def _renew(self) -> None:
        interval = self.config.interval_s
        try:
            while True:
                left = self._deadline - time.monotonic()
                await asyncio.sleep(max(0.0, min(interval, left / 2)))
                reason = await self._renew_once()
                if reason is not None:
                    await self._step_down(reason)
                    return
                self.renewals += 1
                if self._on_renewed is not None and not self._stopping:
                    await self._call("on_renewed", self._on_renewed)
        finally:
            if self._renewer is asyncio.current_task():
                self._renewer = None

    async def _renew_once(self) -> str | None:
        """Renew before the deadline in every store that answers; return why the lease
        was lost, or None when renewed in one store at least."""
        while True:
            started = time.monotonic()
            left = self._deadline - started
            if left <= 0:
                return "it ran out before it was renewed"
            results = await asyncio.gather(
                *(_within(functools.partial(_renew_in, lease), left) for lease in self.leases),
                return_exceptions=True,
            )
            self._note_stores(results)
            if any(r is True for r in results):
                self._deadline = started + self.config.ttl_s
                return None
            if all(r is False for r in results):
                return "another holds it"
            if time.monotonic() >= self._deadline:
                return "no store answered before it ran out"
            await asyncio.sleep(min(self.config.interval_s / 4, max(0.0, left) / 2))

    def _note_stores(self, results: list[bool | BaseException]) -> None:
        """Log each store's renewal when it changes (failed, refused, renewed again)."""
        for i, result in enumerate(results):
            renewed = result is True
            if renewed == self._renewed_in[i]:
                continue
            self._renewed_in[i] = renewed
            store = type(self.leases[i].store).__name__
            if renewed:
                log.info("lease %s: %s renews it in %s again",
                         self.config.name, self.holder, store)  # fmt: skip
            else:
                why = "another holds it there" if result is False else f"{result!r}"
                log.warning("lease %s: renewal by %s in %s failed (%s)",
                            self.config.name, self.holder, store, why)  # fmt: skip

    async def _step_down(self, reason: str, *, release: bool = False) -> None:
        if self._role != "leader":
            return
        self._role = "standby"
        self.losses += 1
        current = asyncio.current_task()
        if self._electing is not None and self._electing is not current:
            self._electing.cancel()  # _lead, which awaits it, sees the cancellation
        if self._renewer is not None and self._renewer is not current:
            renewer, self._renewer = self._renewer, None
            await _cancel(renewer)
        log.warning("lease %s lost by %s: %s", self.config.name, self.holder, reason)
        await self._call("on_lost", self._on_lost)
        if release:
            await self._release()
        if not self._stopping:
            self._standing_by.set()

    async def _release(self) -> None:
        """Give the lease up in every store, so another can take it at once."""
        for lease in self.leases:
            try:
                await _within(lease.release, self.config.ttl_s)
            except Exception as exc:
                log.warning(
                    "lease %s: release by %s in %s failed (it runs out within %g s): %r",
                    self.config.name, self.holder, type(lease.store).__name__,
                    self.config.ttl_s, exc,
                )  # fmt: skip

    async def _call(self, what: str, callback: Callback) -> None:
        try:
            await callback()
        except Exception:
            log.exception("lease %s: %s of %s failed", self.config.name, what, self.holder)


async def _within(call: Callable[[], Awaitable[T]], seconds: float) -> T:
    """``call()``'s result within ``seconds``, the call made only as this starts: one of
    several gathered, cancelled before it starts, leaves no coroutine never awaited."""
    async with asyncio.timeout(seconds):
        return await call()


async def _renew_in(lease: Lease) -> bool:
    """Renew ``lease`` in its store, or take it there again once it ran out there (the
    leader still holds it in another store, and nobody holds it in this one)."""
    return await (lease.renew() if lease.held else lease.acquire())


async def _cancel(task: asyncio.Task | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
