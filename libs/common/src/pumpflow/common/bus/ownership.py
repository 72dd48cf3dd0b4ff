"""Partition ownership: the replicas of a service share its partitions between them.

- :func:`assign_partitions`: rendezvous (highest-random-weight) hashing with bounded
  load. Every (partition, replica) pair has a stable weight; pairs are taken by
  descending weight and a partition goes to the first replica that still has room
  (``partitions // n`` each, one more for ``partitions % n`` of them). A pure function
  of the partition count and the set of live replica ids, so every replica computes
  the same answer on its own, and a change of membership moves few partitions.
- :class:`ReplicaRegistry`: each replica heartbeats ``replicas:<service>:<replica>``
  in the StateStore with a TTL, with the partitions it holds and a token of its
  process; the live replicas are the keys that have not expired. A replica id is one
  live process's: the first subscription claims it (set only if absent) and, when
  another process's heartbeat is there, waits until it either changes (a live holder:
  :class:`ReplicaIdInUse`, the start fails) or expires (a crashed process, or our own
  restart within the TTL: the id is ours). A running replica whose id another process
  took meanwhile (it stalled past the TTL) leaves that heartbeat alone and is unhealthy,
  with the reason in ``describe()``, until the other's expires; leaving removes only
  our own heartbeat.
- :class:`PartitionBalancer`: consumes the partitions this replica owns for a
  service's partitioned subscriptions and, when membership changes, hands them over:
  it stops consuming the lost ones (their handlers in flight finish and are acked;
  the service checkpoints before it acks, so the next owner loads the state from the
  store), tells the service (``Subscription.on_revoked``: checkpoint and drop what
  only the owner may act on, such as timers), heartbeats that it no longer holds
  them, and consumes the gained ones. A gained partition is claimed only once no
  other live replica's heartbeat says it holds it, and the service is told first
  (``Subscription.on_assigned``: restore its state), so state the old owner wrote on
  leaving is what the new one loads, and timers never run on two replicas at once.
  Single-active-consumer keeps a queue to one active consumer meanwhile.
- :class:`BalancedBus`: the bus the runner hands a distributed service. It passes
  the :class:`EventBus` interface to the transport, except that a subscription to
  keyed events with ``partitions=None`` is balanced; critical and broadcast lanes stay
  with every replica (a group's shared ones, single-active, with one of them at a
  time). Services need no change. Transport specifics (``namespace``,
  ``delete_topology``) are the transport's: reach them through ``inner``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge

from pumpflow.common.bus.abc import DeadLetter, EventBus, Subscription
from pumpflow.common.bus.routing import resolve_types
from pumpflow.common.clock import Clock, TimerHandle
from pumpflow.common.events import Event
from pumpflow.common.state.abc import StateStore

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "replicas:"

OWNED = Gauge(
    "pumpflow_partitions_owned",
    "Partitions this replica consumes for the service.",
    ["service", "replica"],
)
LIVE_REPLICAS = Gauge(
    "pumpflow_partition_replicas",
    "Live replicas of the service, as this replica last saw them.",
    ["service", "replica"],
)
REBALANCES = Counter(
    "pumpflow_partition_rebalances",
    "Changes of the partitions this replica owns.",
    ["service", "replica"],
)
HEARTBEAT_FAILURES = Counter(
    "pumpflow_partition_heartbeat_failures",
    "Heartbeats or membership reads that failed (ownership kept as it was).",
    ["service", "replica"],
)


# ---------------------------------------------------------------------- assignment


def partition_weight(replica: str, partition: int) -> int:
    """Stable 64-bit weight of a (replica, partition) pair, the same in every process."""
    digest = hashlib.blake2b(f"{partition}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_partitions(partitions: int, replicas: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Each live replica's partitions: disjoint, covering all, sizes differing by one at most."""
    members = sorted(set(replicas))
    if not members:
        return {}
    base, extra = divmod(partitions, len(members))
    pairs = sorted(
        ((partition_weight(r, p), r, p) for r in members for p in range(partitions)),
        reverse=True,
    )
    owner: dict[int, str] = {}
    load = dict.fromkeys(members, 0)
    full = 0  # replicas that took one more than ``base``
    for _, replica, partition in pairs:
        if partition in owner:
            continue
        room = base + 1 if full < extra else base
        if load[replica] >= room:
            continue
        owner[partition] = replica
        load[replica] += 1
        if load[replica] == base + 1:
            full += 1
        if len(owner) == partitions:
            break
    out: dict[str, list[int]] = {r: [] for r in members}
    for partition in range(partitions):
        out[owner[partition]].append(partition)
    return {r: tuple(ps) for r, ps in out.items()}


def owned_partitions(partitions: int, replicas: Iterable[str], replica: str) -> tuple[int, ...]:
    """The partitions ``replica`` owns among ``replicas`` (itself counted as live)."""
    return assign_partitions(partitions, {*replicas, replica})[replica]


# ---------------------------------------------------------------------- membership


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnershipConfig:
    """How often a replica heartbeats and how long its heartbeat keeps it alive."""

    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 3.0

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be above 0")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be above heartbeat_interval_s")


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    replica: str
    #: clock time of the first and of the latest heartbeat
    since: float
    at: float
    #: partitions the replica holds (consumes, or is still handing over)
    owned: tuple[int, ...] = ()
    #: the process's registry that wrote it: the same replica id from another is a conflict
    instance: str = ""


_decode_heartbeat = msgspec.json.Decoder(Heartbeat).decode


class ReplicaIdInUse(RuntimeError):
    """Another live process heartbeats this replica id of the service."""

    def __init__(self, service: str, replica: str):
        super().__init__(
            f"replica id {replica!r} of {service} is held by another live process "
            f"(heartbeat {REGISTRY_PREFIX}{service}:{replica}): "
            "give each process its own PUMPFLOW_REPLICA"
        )


class ReplicaRegistry:
    """Live replicas of one service, as heartbeat keys with a TTL in the StateStore."""

    def __init__(
        self, store: StateStore, clock: Clock, *, service: str, replica: str, ttl_s: float
    ):
        self.store = store
        self.clock = clock
        self.service = service
        self.replica = replica
        self.ttl_s = ttl_s
        self.prefix = f"{REGISTRY_PREFIX}{service}:"
        self.key = self.prefix + replica
        self.instance = uuid.uuid4().hex
        self._since: float | None = None
        #: the heartbeat last written, so that leaving removes only our own
        self._written: bytes | None = None

    def _beat(self, owned: Iterable[int]) -> bytes:
        now = self.clock.now()
        if self._since is None:
            self._since = now
        beat = Heartbeat(
            replica=self.replica,
            since=self._since,
            at=now,
            owned=tuple(sorted(owned)),
            instance=self.instance,
        )
        return msgspec.json.encode(beat)

    def _ours(self, raw: bytes) -> bool:
        try:
            return _decode_heartbeat(raw).instance == self.instance
        except msgspec.DecodeError:
            return False

    async def claim(self) -> None:
        """Take this replica id; :class:`ReplicaIdInUse` if another live process holds it.

        A heartbeat left by a process that is gone (a crash, a restart within the TTL)
        is waited out: it expires unchanged within ``ttl_s``, while a live holder's
        changes at its next heartbeat. The wait is on the wall, as the store's TTLs
        are, so a start on a replay clock cannot hang in it.
        """
        seen: bytes | None = None
        give_up = time.monotonic() + 2 * self.ttl_s
        while True:
            beat = self._beat(())
            if await self.store.set_if_absent(self.key, beat, ttl=self.ttl_s):
                self._written = beat
                return
            current = await self.store.get(self.key)
            if current is None:
                continue  # expired since
            if self._ours(current):
                return
            if (seen is not None and current != seen) or time.monotonic() >= give_up:
                raise ReplicaIdInUse(self.service, self.replica)
            seen = current
            await asyncio.sleep(self.ttl_s / 8)

    async def heartbeat(self, owned: Iterable[int] = ()) -> None:
        """Say this replica is alive for the next ``ttl_s`` seconds, holding ``owned``.

        :class:`ReplicaIdInUse` when another process heartbeats the id (it took it
        while ours had expired): its heartbeat is left alone.
        """
        current = await self.store.get(self.key)
        if current is not None and not self._ours(current):
            raise ReplicaIdInUse(self.service, self.replica)
        beat = self._beat(owned)
        await self.store.set(self.key, beat, ttl=self.ttl_s)
        self._written = beat

    async def live(self) -> list[str]:
        """Ids of the replicas whose heartbeat has not expired, sorted."""
        keys = await self.store.scan_keys(self.prefix)
        return sorted(k[len(self.prefix) :] for k in keys)

    async def members(self) -> dict[str, tuple[int, ...]]:
        """Live replicas and the partitions each says it holds."""
        keys = await self.store.scan_keys(self.prefix)
        out: dict[str, tuple[int, ...]] = {}
        for key, raw in zip(keys, await self.store.get_many(keys), strict=True):
            if raw is None:
                continue  # expired since the scan
            try:
                owned = _decode_heartbeat(raw).owned
            except msgspec.DecodeError:
                owned = ()  # an unreadable heartbeat still says the replica lives
            out[key[len(self.prefix) :]] = owned
        return out

    async def leave(self) -> None:
        """Remove this replica's heartbeat, so the others take its partitions at once.

        Only the heartbeat this registry wrote last goes: another process's (holding
        the id) stays, and so does one written since by a heartbeat whose reply was
        lost (it expires after ``ttl_s``).
        """
        self._since = None
        written, self._written = self._written, None
        if written is not None:
            await self.store.delete_if_equal(self.key, written)


# ---------------------------------------------------------------------- balancing


class PartitionBalancer:
    """Keeps this replica's partitioned subscriptions of one service on its partitions."""

    def __init__(
        self,
        bus: EventBus,
        registry: ReplicaRegistry,
        clock: Clock,
        *,
        interval_s: float,
    ):
        self.bus = bus
        self.registry = registry
        self.clock = clock
        self.interval_s = interval_s
        self.service = registry.service
        self.replica = registry.replica
        #: partitions consumed now, and the live replicas they were computed from
        self.owned: frozenset[int] = frozenset()
        self.replicas: tuple[str, ...] = ()
        #: partitions other live replicas say they hold, as of the last heartbeat
        self.held_elsewhere: frozenset[int] = frozenset()
        self.rebalances = 0
        #: False after a failed heartbeat, until one succeeds
        self.healthy = False
        #: why the last heartbeat failed, when another process holds our replica id
        self.error: str | None = None
        self._subscriptions: list[Subscription] = []
        self._lock = asyncio.Lock()
        self._timer: TimerHandle | None = None
        self._running = False
        self._labels = (self.service, self.replica)
        # from 0, so the first failed heartbeat shows as an increase
        HEARTBEAT_FAILURES.labels(*self._labels)
        REBALANCES.labels(*self._labels)

    @property
    def running(self) -> bool:
        """True from the first subscription until :meth:`stop`."""
        return self._running

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscriptions)

    async def add(self, subscription: Subscription) -> None:
        """Subscribe (consuming no partition yet), then consume the owned partitions.

        The first one claims the replica id: :class:`ReplicaIdInUse` when another live
        process holds it. A store that fails meanwhile leaves that to the heartbeats.
        """
        if not self._running:
            await self._claim()
        async with self._lock:
            await self.bus.subscribe(subscription)
            self._subscriptions.append(subscription)
            if self.owned:
                owned = tuple(sorted(self.owned))
                if subscription.on_assigned is not None:
                    await subscription.on_assigned(owned)
                await self.bus.consume_partitions(subscription, owned)
        if not self._running:
            self._running = True
            await self.rebalance()
            self._schedule()

    async def remove(self, subscription: Subscription) -> None:
        async with self._lock:
            if any(s is subscription for s in self._subscriptions):
                self._subscriptions = [s for s in self._subscriptions if s is not subscription]
                await self.bus.unsubscribe(subscription)

    async def rebalance(self) -> bool:
        """Heartbeat, read the live replicas, move partitions; True when ownership changed."""
        async with self._lock:
            replicas = await self._beat()
            if replicas is None:
                return False
            target = frozenset(owned_partitions(self.bus.partitions, replicas, self.replica))
            moved = await self._move_to(target)
            if moved:
                # others claim what we released as soon as they see it
                await self._beat(read=False)
            return moved

    async def _claim(self) -> None:
        try:
            await self.registry.claim()
        except ReplicaIdInUse:
            raise
        except Exception as exc:
            log.warning("%s/%s: claiming the replica id failed: %r", *self._labels, exc)

    async def _beat(self, *, read: bool = True) -> tuple[str, ...] | None:
        """Heartbeat and list the live replicas (None when the store fails)."""
        try:
            # a store that hangs must not outlive our own heartbeat
            async with asyncio.timeout(self.registry.ttl_s):
                await self.registry.heartbeat(self.owned)
                if not read:
                    return self.replicas
                members = await self.registry.members()
        except ReplicaIdInUse as exc:
            # consuming on meanwhile: single-active-consumer keeps each queue to one of us
            self.healthy = False
            HEARTBEAT_FAILURES.labels(*self._labels).inc()
            if self.error is None:
                log.error("%s", exc)
            self.error = str(exc)
            return None
        except Exception as exc:
            # keep what we consume: single-active-consumer still keeps each queue to
            # one consumer if the others take our partitions meanwhile
            self.healthy = False
            HEARTBEAT_FAILURES.labels(*self._labels).inc()
            log.warning("%s/%s: heartbeat failed: %r", self.service, self.replica, exc)
            return None
        self.healthy = True
        self.error = None
        self.held_elsewhere = frozenset(
            p for replica, owned in members.items() if replica != self.replica for p in owned
        )
        replicas = tuple(sorted({*members, self.replica}))
        LIVE_REPLICAS.labels(*self._labels).set(len(replicas))
        if replicas != self.replicas:
            log.info("%s/%s: live replicas %s", self.service, self.replica, ", ".join(replicas))
            self.replicas = replicas
        return replicas

    async def _move_to(self, target: frozenset[int]) -> bool:
        lost = self.owned - target
        # a partition its old owner still holds waits: that owner is still handing it
        # over (or is stalled, until its heartbeat expires)
        waiting = (target - self.owned) & self.held_elsewhere
        gained = target - self.owned - waiting
        if waiting:
            log.info(
                "%s/%s: partitions %s wait for their previous owner",
                self.service,
                self.replica,
                _span(waiting),
            )
        if not lost and not gained:
            return False
        if lost:
            await self._revoke(lost)
        if gained and not await self._assign(gained):
            gained = frozenset()
            if not lost:
                return False
        if gained:
            for subscription in self._subscriptions:
                await self.bus.consume_partitions(subscription, sorted(gained))
            self.owned |= gained
        self.rebalances += 1
        REBALANCES.labels(*self._labels).inc()
        OWNED.labels(*self._labels).set(len(self.owned))
        log.info(
            "%s/%s: partitions +%s -%s, now %s (%d of %d, %d replicas)",
            self.service,
            self.replica,
            _span(gained),
            _span(lost),
            _span(self.owned),
            len(self.owned),
            self.bus.partitions,
            len(self.replicas),
        )
        return True

    async def _revoke(self, lost: frozenset[int]) -> None:
        """Stop consuming ``lost`` and tell the service, before anyone else may take them."""
        partitions = tuple(sorted(lost))
        # their handlers in flight finish and ack; the rest of their queue waits for
        # the next owner, who loads the state from the store
        for subscription in self._subscriptions:
            await self.bus.release_partitions(subscription, partitions)
        for subscription in self._subscriptions:
            if subscription.on_revoked is None:
                continue
            try:
                await subscription.on_revoked(partitions)
            except Exception:
                # the partitions are released already; the next owner gets the state
                # the service stored so far
                log.exception("%s/%s: on_revoked%s failed", self.service, self.replica, _span(lost))
        self.owned -= lost

    async def _assign(self, gained: frozenset[int]) -> bool:
        """Tell the service it is about to consume ``gained``; False if it failed to get ready."""
        partitions = tuple(sorted(gained))
        for subscription in self._subscriptions:
            if subscription.on_assigned is None:
                continue
            try:
                await subscription.on_assigned(partitions)
            except Exception:
                # consuming without the state would start the tokens over: retry later
                log.exception(
                    "%s/%s: on_assigned%s failed; retrying",
                    self.service,
                    self.replica,
                    _span(gained),
                )
                return False
        return True

    def _schedule(self) -> None:
        if self._running:
            self._timer = self.clock.call_later(self.interval_s, self._tick)

    async def _tick(self) -> None:
        if not self._running:
            return
        # the next tick is due on time even while this one waits for a hand-over
        self._schedule()
        try:
            if self._lock.locked():
                # handlers in flight on a released partition can take long: keep the
                # heartbeat alive meanwhile, or the others would take us for dead
                await self._beat()
            else:
                await self.rebalance()
        except Exception:
            log.exception("%s/%s: rebalancing failed; retrying", self.service, self.replica)

    def pause(self) -> None:
        """Stop rebalancing (the heartbeat stays until it expires or :meth:`stop`)."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def stop(self, *, leave: bool = True) -> None:
        """Stop heartbeating; ``leave`` hands the partitions back so others take over at once.

        Leaving revokes every partition held (released at the bus, ``on_revoked``
        told) before the heartbeat goes, so the next owners load what the service
        stored on revoke. ``leave=False`` is what a crash looks like to the others:
        they take over when the heartbeat expires.
        """
        self.pause()
        async with self._lock:  # a rebalance in progress completes first
            if leave and self.owned:
                try:
                    await self._revoke(self.owned)
                except Exception:
                    log.exception("%s/%s: handing back failed", self.service, self.replica)
        if leave:
            try:
                await self.registry.leave()
            except Exception as exc:
                log.warning("%s/%s: leaving failed: %r", self.service, self.replica, exc)
        OWNED.labels(*self._labels).set(0)

    def describe(self) -> dict[str, Any]:
        described = {
            "replica": self.replica,
            "owned": sorted(self.owned),
            "replicas": list(self.replicas),
            "rebalances": self.rebalances,
            "healthy": self.healthy,
        }
        if self.error is not None:
            described["error"] = self.error
        return described


def _span(partitions: Iterable[int]) -> str:
    return "[" + ",".join(str(p) for p in sorted(partitions)) + "]"


def balanced(subscription: Subscription) -> bool:
    """True when the balancer should share the subscription's partitions between replicas.

    Subscriptions that name their partitions keep them; those that want no keyed
    event (commands to the feed, say) have nothing in their partition queues.
    """
    if subscription.partitions is not None:
        return False
    schemas = resolve_types(subscription.patterns, subscription.version)
    return any(s.KEY_FIELD is not None and not s.CRITICAL for s in schemas)


class BalancedBus(EventBus):
    """A transport whose partitioned subscriptions are shared with the other replicas."""

    def __init__(
        self,
        bus: EventBus,
        *,
        store: StateStore,
        clock: Clock,
        replica: str,
        config: OwnershipConfig | None = None,
    ):
        self.inner = bus
        self.partitions = bus.partitions
        self.durable = bus.durable
        self.store = store
        self.clock = clock
        self.replica = replica
        self.config = config or OwnershipConfig()
        self.balancers: dict[str, PartitionBalancer] = {}
        #: (the service's subscription, the one the transport got) per balanced one
        self._balanced: list[tuple[Subscription, Subscription]] = []

    def balancer(self, service: str) -> PartitionBalancer:
        found = self.balancers.get(service)
        if found is None:
            registry = ReplicaRegistry(
                self.store,
                self.clock,
                service=service,
                replica=self.replica,
                ttl_s=self.config.heartbeat_ttl_s,
            )
            found = self.balancers[service] = PartitionBalancer(
                self.inner, registry, self.clock, interval_s=self.config.heartbeat_interval_s
            )
        return found

    def ownership(self) -> dict[str, dict[str, Any]]:
        """Per balanced service: owned partitions, live replicas, rebalances."""
        return {service: b.describe() for service, b in self.balancers.items()}

    # ---------------------------------------------------------------- subscribing

    async def declare(
        self,
        service: str,
        patterns: tuple[str, ...],
        *,
        version: int = 1,
        shared_keyless: bool = False,
    ) -> None:
        await self.inner.declare(service, patterns, version=version, shared_keyless=shared_keyless)

    async def subscribe(self, subscription: Subscription) -> None:
        if not balanced(subscription):
            await self.inner.subscribe(subscription)
            return
        inner = replace(subscription, partitions=())
        self._balanced.append((subscription, inner))
        await self.balancer(subscription.service).add(inner)

    async def unsubscribe(self, subscription: Subscription) -> None:
        for pair in self._balanced:
            if pair[0] is subscription:
                self._balanced.remove(pair)
                await self.balancer(subscription.service).remove(pair[1])
                return
        await self.inner.unsubscribe(subscription)

    async def consume_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        await self.inner.consume_partitions(subscription, partitions)

    async def release_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        await self.inner.release_partitions(subscription, partitions)

    async def catch_up(self, subscription: Subscription) -> None:
        # a balanced one consumes its partitions as the balancer gives them meanwhile:
        # only one naming its partitions (none until it caught up) takes them after
        for outer, inner in self._balanced:
            if outer is subscription:
                subscription = inner
                break
        await self.inner.catch_up(subscription)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.inner.start()

    async def halt(self) -> None:
        """Stop heartbeating without leaving (what a crash looks like to the others)."""
        for balancer in self.balancers.values():
            await balancer.stop(leave=False)

    async def stop_consuming(self) -> None:
        # consumers stop and their handlers finish first; then each balancer revokes its
        # partitions (the service stores what it holds) and leaves, and only then may
        # the others claim them
        for balancer in self.balancers.values():
            balancer.pause()
        await self.inner.stop_consuming()
        for balancer in self.balancers.values():
            await balancer.stop(leave=True)

    async def close(self) -> None:
        for balancer in self.balancers.values():
            if balancer.running:
                await balancer.stop(leave=True)
        await self.inner.close()

    async def drain(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 (interface)
        return await self.inner.drain(timeout)

    def is_healthy(self) -> bool:
        return self.inner.is_healthy()

    def describe(self) -> dict[str, Any]:
        """The transport's description, with ``ownership`` per balanced service."""
        return {**self.inner.describe(), "ownership": self.ownership()}

    # ---------------------------------------------------------------- passing through

    async def publish(self, event: Event) -> None:
        await self.inner.publish(event)

    async def publish_many(self, events: Iterable[Event]) -> None:
        await self.inner.publish_many(events)

    async def dead_letter(
        self,
        body: bytes,
        *,
        service: str,
        reason: str,
        event_type: str | None = None,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        await self.inner.dead_letter(
            body, service=service, reason=reason, event_type=event_type, key=key, headers=headers
        )

    async def dead_letters(
        self, service: str, limit: int = 100, *, remove: bool = True
    ) -> list[DeadLetter]:
        return await self.inner.dead_letters(service, limit, remove=remove)

    async def keeps_dead_letters_of(self, service: str) -> bool:
        return await self.inner.keeps_dead_letters_of(service)

    async def take_dead_letters(
        self, service: str, take: Callable[[DeadLetter], Awaitable[bool]]
    ) -> int:
        return await self.inner.take_dead_letters(service, take)

    def shares_keyless(self, service: str) -> bool:
        return self.inner.shares_keyless(service)

    async def redeliver(self, service: str, event: Event) -> None:
        await self.inner.redeliver(service, event)
