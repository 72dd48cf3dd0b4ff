"""In-memory transport: the RabbitMQ topology emulated with queues inside the process.

Each consuming service has one FIFO per partition and a critical lane, shared by its
replicas (a lane is served by the first replica that consumes it, like RabbitMQ's
single-active-consumer); each replica has its own broadcast and critical-broadcast
lanes for keyless events, which go with it. A group that takes its keyless events
shared (``Subscription.shared_keyless``) has no own lanes: its critical lane takes the
critical ones, and a shared broadcast lane the others, kept while no replica consumes
them as the partitions' events are. Every lane has its own worker task, so partitions run
concurrently. A lane starts its deliveries in order, up to the consumer's
``Subscription.window`` handlers at once (with a window of 1, inside the worker; above,
as tasks; a subscription with a batch handler gets all the lane has ready, up to the
window, in one task), and acks them in order: an event leaves the lane once it and every event
delivered before it returned.

Catching up (``InMemoryBus.catch_up``): a mark joins the end of the group's critical and
shared broadcast lanes; the lane's worker takes it once nothing before it runs (every
event before it acked), drops it and sets its future, which the catch-up awaits. A mark
blocks a batch: the events behind it wait for it.

Synchronous mode runs the handlers inside ``publish``, in publish order, with the
Event object itself (no encoding): deterministic and fast, for replays and tests.

The queues live in the bus object, so they do not outlive the process: a consumer
"restart" here is :meth:`InMemoryBus.unsubscribe` followed by a new ``subscribe`` on
the same bus, which picks up every event still queued; a crash is
:meth:`InMemoryBus.abandon`, which puts back what the replica did not ack.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pumpflow.common.bus.abc import (
    DELIVERY_LIMIT,
    DeadLetter,
    EventBus,
    Subscription,
    notify_assigned,
)
from pumpflow.common.bus.dispatch import (
    BROADCAST,
    CRITICAL,
    INPUT,
    PARTITION,
    Bindings,
    Dispatcher,
    HandedBack,
    check_declared,
    check_publishable,
    publish_lane,
    redelivery_lane,
)
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.metrics import Series, record_dead_letter, series
from pumpflow.common.bus.routing import DEFAULT_PARTITIONS, partition_of, routing_key_for
from pumpflow.common.clock import first_of
from pumpflow.common.events import Event, encode_event, source_service

log = logging.getLogger(__name__)


class _Delivery:
    """Events handed to a handler in one call (one, or a batch) and not acked yet.

    A batch is one delivery: its events start, return and go back together, so one
    object a batch rather than one an event.
    """

    __slots__ = ("abandoned", "done", "events", "task")

    def __init__(self, events: list[Event]):
        self.events = events
        self.done = False
        #: its replica was abandoned: the events went back to the queue
        self.abandoned = False
        #: the task running its handler, among its lane's tasks (None: run in the worker)
        self.task: asyncio.Task | None = None


class _Mark:
    """A catch-up's place in a shared lane: reached once every event before it is acked,
    never handed to a handler (see :meth:`InMemoryBus.catch_up`)."""

    __slots__ = ("reached",)

    def __init__(self, reached: asyncio.Future[None]):
        #: set once reached; one whose catch-up was given up (cancelled) is just dropped
        self.reached = reached


class _Wakeup:
    """What a lane's worker waits on: :class:`asyncio.Event` for its one waiter, without
    the list of waiters and the lookups (set once or more per delivery); a set wakes the
    waiter as the event's would, in the same turn of the loop."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future | None = None

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            # a worker cancelled for a new one may end after the new one began to wait
            if self._waiter is waiter:
                self._waiter = None


class _Lane:
    """One queue with its worker, delivering to ``consumer`` (shared or a replica's own)."""

    __slots__ = (
        "back",
        "consumer",
        "dispatcher",
        "group",
        "idle",
        "items",
        "marks",
        "partition",
        "returned",
        "running",
        "serving",
        "tasks",
        "unacked",
        "wakeup",
        "worker",
    )

    def __init__(self, group: _Group, dispatcher: Dispatcher, partition: int | None):
        self.group = group
        self.dispatcher = dispatcher
        self.partition = partition
        self.items: deque[Event | _Mark] = deque()
        #: catch-ups' marks among the items (none, nearly always: checked before a look)
        self.marks = 0
        #: delivered and not acked, in delivery order (a batch is one delivery)
        self.unacked: deque[_Delivery] = deque()
        #: event id -> deliveries that ended unsettled (a shared lane's delivery limit)
        self.returned: dict[str, int] = {}
        #: handlers running now, all of ``serving``
        self.running = 0
        self.serving: _Replica | None = None
        #: handler tasks of a window above 1
        self.tasks: set[asyncio.Task] = set()
        self.wakeup = _Wakeup()
        #: set while no handler runs
        self.idle = asyncio.Event()
        self.idle.set()
        self.worker: asyncio.Task | None = None
        #: the replica this lane delivers to now; None while nobody consumes it
        self.consumer: _Replica | None = None
        #: the deliveries handed back since the lane last started one, with the rank in
        #: delivery order of those unacked when the first of them came back (a start ends
        #: it: what it counts as waiting at the lane's front may have left it)
        self.back: tuple[dict[_Delivery, int], list[_Delivery]] | None = None

    def startable(self) -> _Replica | None:
        """The replica the next queued event may start on now, if any."""
        consumer = self.consumer
        if consumer is None or not self.items:
            return None
        if self.running == 0:
            return consumer
        # a new consumer waits until the previous one's handlers returned: order
        if self.serving is consumer and self.running < consumer.subscription.window:
            return consumer
        return None


@dataclass(eq=False)
class _Replica:
    subscription: Subscription
    #: its own lanes of keyless events, ordinary and critical (none where its group takes
    #: them shared), and the (type, version) each takes
    broadcast: _Lane | None
    critical_broadcast: _Lane | None
    broadcast_types: frozenset[tuple[str, int]]
    critical_types: frozenset[tuple[str, int]]
    #: lanes running this replica's handler now
    busy: set[_Lane] = field(default_factory=set)
    #: partitions it consumes; None means all of them
    owned: set[int] | None = None

    @property
    def own(self) -> list[_Lane]:
        return [lane for lane in (self.broadcast, self.critical_broadcast) if lane is not None]


class _Group:
    """A consuming service: its shared lanes, bindings and replicas."""

    def __init__(self, bus: InMemoryBus, service: str):
        self.service = service
        self.replicas: list[_Replica] = []
        #: bindings persist after a replica leaves, like durable queues' bindings
        self.partition_types: set[tuple[str, int]] = set()
        self.critical_types: set[tuple[str, int]] = set()
        self.partitions = [
            _Lane(self, bus.dispatcher(service, PARTITION), p) for p in range(bus.partitions)
        ]
        self.critical = _Lane(self, bus.dispatcher(service, CRITICAL), None)
        #: the shared lane of its ordinary keyless events, once it takes them shared (the
        #: critical ones go to ``critical``); None: they go to each replica's own lanes
        self.broadcast: _Lane | None = None
        self._bus = bus

    def share_keyless(self) -> None:
        """Take keyless events on the group's lanes from now on, as durable bindings do."""
        if self.broadcast is None:
            self.broadcast = _Lane(self, self._bus.dispatcher(self.service, BROADCAST), None)

    def shared(self) -> list[_Lane]:
        """The lanes its replicas share: partitions, critical, and the shared broadcast."""
        lanes = [*self.partitions, self.critical]
        if self.broadcast is not None:
            lanes.append(self.broadcast)
        return lanes

    def assign(self) -> None:
        """Give each shared lane to the first replica that consumes it: its consumer keeps
        it while it wants it (another replica claiming it waits for its release)."""
        for lane in self.shared():
            current = lane.consumer
            if current is not None and current in self.replicas and _wants(current, lane):
                continue
            lane.consumer = None
            for replica in self.replicas:
                if _wants(replica, lane):
                    lane.consumer = replica
                    break
            lane.wakeup.set()
        for replica in self.replicas:
            for lane in replica.own:
                lane.consumer = replica

    def lanes(self) -> list[_Lane]:
        return [*self.shared(), *(lane for r in self.replicas for lane in r.own)]


def _wants(replica: _Replica, lane: _Lane) -> bool:
    """Whether ``replica`` consumes the shared ``lane``."""
    wanted = replica.owned
    return lane.partition is None or wanted is None or lane.partition in wanted


def _dead_letter(lane: _Lane, event: Event, reason: str) -> DeadLetter:
    return DeadLetter(
        service=lane.group.service,
        reason=reason,
        body=encode_event(event),
        event_type=event.type,
        key=event.key,
        headers={"x-pumpflow-reason": reason, "x-pumpflow-lane": lane.dispatcher.lane},
    )


def _left(lane: _Lane, delivery: _Delivery) -> None:
    """A handler task of ``lane`` ends: it leaves the lane's tasks itself (a done callback
    would take a turn of the event loop per delivery; the delivery knows its task, which
    ``asyncio.current_task`` would look up again). One cancelled before it ran never gets
    here: only :meth:`InMemoryBus._halt` cancels them, and it empties the set."""
    if delivery.task is not None:
        lane.tasks.discard(delivery.task)


def _put_back(lane: _Lane, delivery: _Delivery) -> None:
    """Return an unacked delivery's events to the front of its lane, behind those handed
    back before it that were delivered before it: in delivery order, as the broker
    requeues in place."""
    back = lane.back
    if back is None:
        # the first to come back since the lane last started a delivery
        back = lane.back = ({d: rank for rank, d in enumerate(lane.unacked)}, [])
    ranks, handed = back
    lane.unacked.remove(delivery)
    rank = ranks[delivery]
    behind = sum(len(d.events) for d in handed if ranks[d] < rank)
    handed.append(delivery)
    items = lane.items
    items.rotate(-behind)
    items.extendleft(reversed(delivery.events))
    items.rotate(behind)


def _returned(lane: _Lane, event: Event) -> None:
    """Count a delivery of ``event`` that ended unsettled (shared lanes have a limit)."""
    group = lane.group
    if lane.partition is not None or lane is group.critical or lane is group.broadcast:
        lane.returned[event.id] = lane.returned.get(event.id, 0) + 1


class InMemoryBus(EventBus):
    """The bus inside one process; same routing and delivery contract as RabbitMQ."""

    def __init__(
        self,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        synchronous: bool = False,
        source: str = "memory",
        event_log: EventLog | None = None,
    ):
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.partitions = partitions
        self.synchronous = synchronous
        self.source = source
        self.event_log = event_log or EventLog("none")
        self._groups: dict[str, _Group] = {}
        #: consumer groups declared before subscribing, by service
        self._declared: dict[str, Bindings] = {}
        self._dead: dict[str, deque[DeadLetter]] = {}
        #: (type, version) -> [(group, critical?)]; rebuilt when bindings change
        self._routes: dict[tuple[str, int], list[tuple[_Group, bool]]] = {}
        self._published: dict[tuple[str, bool], Series] = {}
        self._publisher = source_service(source)
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        #: False after stop_consuming/close: workers take nothing new, publish still queues
        self._consuming = True
        #: set while consuming is stopped: a drain waiting for the queues waits no more
        self._stopped = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if not self._started or not self._consuming:
            self._started = True
            self._consuming = True
            self._stopped.clear()
            for group in self._groups.values():
                for lane in group.lanes():
                    lane.dispatcher.resume()
                await self._resume(group)

    def dispatcher(self, service: str, lane: str) -> Dispatcher:
        # synchronous replays must not sleep between retries
        backoff = 0.0 if self.synchronous else 0.05
        return Dispatcher(
            service=service, lane=lane, event_log=self.event_log, retry_backoff=backoff
        )

    async def stop_consuming(self) -> None:
        """Stop the workers once the handlers they started returned; queued events stay."""
        self._consuming = False
        self._stopped.set()
        workers = []
        for group in self._groups.values():
            for lane in group.lanes():
                lane.wakeup.set()
                # a handler waiting for a dependency hands its event back instead
                lane.dispatcher.halt()
                if lane.worker is not None:
                    workers.append(lane.worker)
                    lane.worker = None
        if workers:
            # not cancelled with a stop given up on: their handlers go on, for the drain
            await asyncio.wait(workers)

    async def close(self) -> None:
        await self.stop_consuming()
        self._started = False

    def is_healthy(self) -> bool:
        return self._started and self._consuming

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "memory",
            "healthy": self.is_healthy(),
            "synchronous": self.synchronous,
            "partitions": self.partitions,
            "services": sorted(self._groups),
            "pending": self._pending,
            # catch-ups' marks not reached yet
            "catching_up": sum(
                lane.marks for group in self._groups.values() for lane in group.shared()
            ),
        }

    async def drain(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 (interface)
        """Wait until everything queued is handled; once consuming stopped (before the wait
        or during it), until what is running returned."""
        try:
            async with asyncio.timeout(timeout):
                if self._consuming and not self._idle.is_set():
                    # consuming may stop meanwhile: what is queued then waits for nobody
                    await first_of(self._idle.wait(), self._stopped.wait())
                if not self._consuming:
                    for group in self._groups.values():
                        for lane in group.lanes():
                            await lane.idle.wait()
        except TimeoutError:
            return False
        return True

    def drop_unconsumed(self) -> dict[str, dict[str, int]]:
        """Unbind the groups no replica consumes (their services stopped for good, at the
        end of an embedded run) and drop what is queued for them: nothing would ever take
        it, and a drain would wait for it to its timeout; what is published for them from
        now on goes nowhere. The groups unbound, each with what was dropped (event type ->
        count)."""
        dropped: dict[str, dict[str, int]] = {}
        for service, group in self._groups.items():
            if group.replicas:
                continue
            counts: dict[str, int] = {}
            for lane in group.lanes():
                for event in lane.items:
                    if type(event) is not _Mark:
                        counts[event.type] = counts.get(event.type, 0) + 1
                self._settle(len(lane.items))
                lane.items.clear()
                lane.marks = 0
                lane.returned.clear()
            if counts or group.partition_types or group.critical_types:
                group.partition_types.clear()
                group.critical_types.clear()
                self._declared.pop(service, None)
                dropped[service] = counts
        self._routes.clear()
        return dropped

    # ---------------------------------------------------------------- subscribing

    async def declare(
        self,
        service: str,
        patterns: tuple[str, ...],
        *,
        version: int = 1,
        shared_keyless: bool = False,
    ) -> None:
        bindings = self._declared[service] = Bindings.of_patterns(
            patterns, version, shared_keyless=shared_keyless
        )
        self._bind(service, bindings)

    def _bind(self, service: str, bindings: Bindings) -> _Group:
        group = self._groups.get(service)
        if group is None:
            group = self._groups[service] = _Group(self, service)
        version = bindings.version
        group.partition_types.update((t, version) for t in bindings.partition)
        group.critical_types.update((t, version) for t in bindings.critical)
        if bindings.shared_keyless:
            group.share_keyless()
        self._routes.clear()
        return group

    async def subscribe(self, subscription: Subscription) -> None:
        await notify_assigned(subscription, self.partitions)
        bindings = Bindings.of(subscription)
        check_declared(subscription.service, self._declared.get(subscription.service), bindings)
        version = bindings.version
        group = self._bind(subscription.service, bindings)
        service = subscription.service
        own = not bindings.shared_keyless
        replica = _Replica(
            subscription=subscription,
            broadcast=_Lane(group, self.dispatcher(service, BROADCAST), None) if own else None,
            critical_broadcast=(
                _Lane(group, self.dispatcher(service, CRITICAL), None) if own else None
            ),
            broadcast_types=frozenset((t, version) for t in bindings.partition if own),
            critical_types=frozenset((t, version) for t in bindings.critical if own),
            owned=None if subscription.partitions is None else set(subscription.partitions),
        )
        group.replicas.append(replica)
        group.assign()
        await self._resume(group)

    def _detach(self, subscription: Subscription) -> tuple[_Group, _Replica] | None:
        """Take the subscription's replica out of its group (lanes go to the others)."""
        group = self._groups.get(subscription.service)
        if group is None:
            return None
        replica = next((r for r in group.replicas if r.subscription is subscription), None)
        if replica is None:
            return None
        group.replicas.remove(replica)
        group.assign()
        self._routes.clear()
        return group, replica

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a replica once its running handlers returned; its queued events stay."""
        detached = self._detach(subscription)
        if detached is None:
            return
        _, replica = detached
        self._drop_own(replica)
        await self._hand_back_waiting(list(replica.busy), replica)
        # and what its handlers handed back meanwhile (waiting for a dependency)
        self._drop_own(replica)
        for lane in replica.own:
            if lane.worker is not None:
                lane.worker.cancel()
                lane.worker = None

    def _drop_own(self, replica: _Replica) -> None:
        """Empty a leaving replica's own queues: they go with it, as RabbitMQ deletes
        them with their consumer; what they held is not anyone else's (each replica has
        its copy of a keyless event). Nothing starts there any more: a handler handing its
        event back would have it start again at once, for ever."""
        for lane in replica.own:
            lane.consumer = None
            self._settle(len(lane.items))
            lane.items.clear()
            lane.wakeup.set()

    async def abandon(self, subscription: Subscription) -> None:
        """Drop a replica the way a crash drops it (queued mode; for tests of crashes).

        Its handlers in flight are cancelled, and every event it did not ack, returned
        or not, goes back to the front of its lane in delivery order, for the next
        consumer; its own broadcast lanes go with it.
        """
        detached = self._detach(subscription)
        if detached is None:
            return
        group, replica = detached
        stopped: list[asyncio.Task] = []
        for lane in group.shared():
            if lane.serving is replica:
                # the worker too: with a window of 1 the handler runs inside it
                stopped.extend(self._halt(lane))
                for delivery in lane.unacked:
                    if not delivery.done:
                        for event in delivery.events:
                            _returned(lane, event)
                # in delivery order, among any its handlers handed back before
                for delivery in list(lane.unacked):
                    _put_back(lane, delivery)
        for lane in replica.own:
            stopped.extend(self._halt(lane))
            self._settle(len(lane.items) + sum(len(d.events) for d in lane.unacked))
            lane.items.clear()
            lane.unacked.clear()
        if stopped:
            await asyncio.gather(*stopped, return_exceptions=True)
        await self._resume(group)

    @staticmethod
    async def _hand_back_waiting(lanes: list[_Lane], replica: _Replica) -> None:
        """Wait until ``lanes`` no longer run handlers of ``replica``; those waiting for a
        dependency hand their events back meanwhile."""
        for lane in lanes:
            lane.dispatcher.halt()
        try:
            for lane in lanes:
                while lane in replica.busy:
                    await lane.idle.wait()
        finally:
            for lane in lanes:
                lane.dispatcher.resume()

    @staticmethod
    def _halt(lane: _Lane) -> list[asyncio.Task]:
        """Cancel a lane's worker and handlers; their deliveries stay unacked."""
        for delivery in lane.unacked:
            delivery.abandoned = True
        tasks = [*lane.tasks, *([lane.worker] if lane.worker is not None else [])]
        for task in tasks:
            task.cancel()
        lane.tasks.clear()
        lane.worker = None
        if lane.serving is not None:
            lane.serving.busy.discard(lane)
        lane.serving = None
        lane.running = 0
        lane.idle.set()
        return tasks

    def _replica(self, subscription: Subscription) -> tuple[_Group, _Replica]:
        group = self._groups.get(subscription.service)
        found = (
            None
            if group is None
            else next((r for r in group.replicas if r.subscription is subscription), None)
        )
        if found is None:
            raise ValueError(f"{subscription.service}: subscription is not subscribed")
        return group, found

    async def consume_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        group, replica = self._replica(subscription)
        if replica.owned is None:
            return
        replica.owned.update(partitions)
        group.assign()
        await self._resume(group)

    async def release_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        group, replica = self._replica(subscription)
        released = set(partitions)
        if replica.owned is None:
            replica.owned = set(range(self.partitions))
        replica.owned -= released
        group.assign()
        # the lane's next event goes to its next consumer, after those in flight
        await self._hand_back_waiting(
            [group.partitions[p] for p in released if 0 <= p < self.partitions], replica
        )
        await self._resume(group)

    async def catch_up(self, subscription: Subscription) -> None:
        if not subscription.shared_keyless:
            raise ValueError(
                f"{subscription.service} takes its keyless events on its replica's own lanes, "
                "which held nothing before it subscribed: nothing to catch up with "
                "(Subscription.shared_keyless)"
            )
        group, _ = self._replica(subscription)
        bindings = Bindings.of(subscription)
        lanes = [group.critical] if bindings.critical else []
        if bindings.partition and group.broadcast is not None:
            lanes.append(group.broadcast)
        loop = asyncio.get_running_loop()
        marks = [_Mark(loop.create_future()) for _ in lanes]
        for lane, mark in zip(lanes, marks, strict=True):
            lane.marks += 1
            self._enqueue(lane, mark)
        # queued mode: the workers take them; synchronous: taken here, what is before first
        await self._resume(group)
        await asyncio.gather(*(mark.reached for mark in marks))

    def _reach(self, lane: _Lane) -> None:
        """Take the mark at the front of ``lane``: its catch-up goes on."""
        mark = lane.items.popleft()
        assert type(mark) is _Mark
        lane.marks -= 1
        self._settle(1)
        if mark.reached.done():
            log.debug("%s: a catch-up's mark given up on was dropped", lane.group.service)
        else:
            mark.reached.set_result(None)

    async def _resume(self, group: _Group) -> None:
        if not self._consuming:
            return
        if self.synchronous:
            # events that waited for a consumer are delivered now, in order per lane
            for lane in group.lanes():
                while lane.items and lane.consumer is not None:
                    if lane.marks and type(lane.items[0]) is _Mark:
                        if lane.running:
                            await lane.idle.wait()
                        else:
                            self._reach(lane)
                        continue
                    replica = lane.consumer
                    await self._run(lane, replica, self._start(lane, replica))
            return
        for lane in group.lanes():
            if lane.worker is None and self._consuming:
                lane.worker = asyncio.create_task(
                    self._work(lane), name=f"bus:{group.service}:{self._lane_name(lane)}"
                )
            lane.wakeup.set()

    @staticmethod
    def _lane_name(lane: _Lane) -> str:
        if lane.partition is not None:
            return f"p{lane.partition:02d}"
        return lane.dispatcher.lane

    # ---------------------------------------------------------------- publishing

    async def publish(self, event: Event) -> None:
        schema = check_publishable(event)
        ident = (event.type, event.version)
        routes = self._routes.get(ident)
        if routes is None:
            routes = self._routes[ident] = self._route(ident)
        key = event.key
        stats = self._published.get((event.type, key is None))
        if stats is None:
            lane = publish_lane(schema, keyless=key is None)
            stats = self._published[(event.type, key is None)] = series(
                self._publisher, event.type, lane
            )
        stats.published += 1
        if self.event_log.enabled:
            self.event_log.published(event, routing_key=routing_key_for(event, self.partitions))
        if not routes:
            return
        for group, critical in routes:
            if key is None:
                if group.broadcast is not None:
                    # the group's shared lanes: one replica gets it, or the next one
                    await self._offer(group.critical if critical else group.broadcast, event)
                    continue
                for replica in group.replicas:
                    if critical and ident in replica.critical_types:
                        await self._offer(replica.critical_broadcast, event)
                    elif not critical and ident in replica.broadcast_types:
                        await self._offer(replica.broadcast, event)
            elif critical:
                await self._offer(group.critical, event)
            else:
                lane = group.partitions[partition_of(key, self.partitions)]
                consumer = lane.consumer
                if self.synchronous and consumer is not None and not lane.items and self._consuming:
                    # the hot path of replays, kept inline
                    reason = await lane.dispatcher.dispatch(event, consumer.subscription)
                    if reason is not None:
                        self._store_dead(_dead_letter(lane, event, reason), lane.dispatcher.lane)
                else:
                    self._enqueue(lane, event)

    def _route(self, ident: tuple[str, int]) -> list[tuple[_Group, bool]]:
        routes = []
        for group in self._groups.values():
            if ident in group.critical_types:
                routes.append((group, True))
            elif ident in group.partition_types:
                routes.append((group, False))
        return routes

    async def _offer(self, lane: _Lane, event: Event) -> None:
        if self.synchronous and lane.consumer is not None and not lane.items and self._consuming:
            replica = lane.consumer
            self._enqueue(lane, event)
            await self._run(lane, replica, self._start(lane, replica))
        else:
            self._enqueue(lane, event)

    def _enqueue(self, lane: _Lane, event: Event) -> None:
        lane.items.append(event)
        if not self._pending:
            # set exactly while nothing is pending (see _settle): cleared once, not per event
            self._idle.clear()
        self._pending += 1
        lane.wakeup.set()

    def _settle(self, count: int) -> None:
        self._pending -= count
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    # ---------------------------------------------------------------- consuming

    def _start(self, lane: _Lane, replica: _Replica) -> _Delivery:
        """Take the lane's next event for ``replica``'s handler."""
        delivery = _Delivery([lane.items.popleft()])
        lane.unacked.append(delivery)
        lane.back = None
        if lane.running == 0:
            lane.serving = replica
            replica.busy.add(lane)
            lane.idle.clear()
        lane.running += 1
        return delivery

    def _start_batch(self, lane: _Lane, replica: _Replica) -> _Delivery:
        """Take as many of the lane's events as ``replica``'s window leaves room for, up to
        one that came back (it runs alone: see the delivery limit)."""
        room = replica.subscription.window - lane.running
        items = lane.items
        returned = lane.returned
        if returned or lane.marks:
            # a batch ends at a mark, which waits for the events before it
            events = []
            while (
                items
                and len(events) < room
                and type(items[0]) is not _Mark
                and items[0].id not in returned
            ):
                events.append(items.popleft())
        elif room >= len(items):
            events = list(items)
            items.clear()
        else:
            take = items.popleft
            events = [take() for _ in range(room)]
        batch = _Delivery(events)
        lane.unacked.append(batch)
        lane.back = None
        if lane.running == 0:
            lane.serving = replica
            replica.busy.add(lane)
            lane.idle.clear()
        lane.running += len(events)
        return batch

    async def _run_batch(self, lane: _Lane, replica: _Replica, batch: _Delivery) -> None:
        try:
            dead = await lane.dispatcher.dispatch_batch(batch.events, replica.subscription)
            for event, reason in dead:
                self._store_dead(_dead_letter(lane, event, reason), lane.dispatcher.lane)
        except HandedBack:
            # the lane stopped while the batch waited for a dependency: nothing died with
            # it, so the delivery limit does not count it
            if not batch.abandoned:
                self._hand_back(lane, batch, unsettled=False)
        except asyncio.CancelledError:
            if self._hand_back_cancelled(lane, batch):
                raise
        except Exception:  # the dispatcher catches handler errors; this is a bus bug
            log.exception("in-memory bus lane %s failed on a batch", lane.group.service)
        finally:
            if not batch.abandoned:
                self._finish(lane, batch)
            _left(lane, batch)

    async def _run(self, lane: _Lane, replica: _Replica, delivery: _Delivery) -> None:
        event = delivery.events[0]
        try:
            if lane.returned and lane.returned.get(event.id, 0) > DELIVERY_LIMIT:
                returns = lane.returned[event.id]
                reason = (
                    f"delivery limit: started {returns} times and never settled "
                    "(its consumer died or stopped with it each time)"
                )
                self._store_dead(_dead_letter(lane, event, reason), lane.dispatcher.lane)
                return
            reason = await lane.dispatcher.dispatch(event, replica.subscription)
            if reason is not None:
                self._store_dead(_dead_letter(lane, event, reason), lane.dispatcher.lane)
        except HandedBack:
            # returned in order (the lane stopped while it waited for a dependency):
            # nothing died with it, so the delivery limit does not count it
            if not delivery.abandoned:
                self._hand_back(lane, delivery, unsettled=False)
        except asyncio.CancelledError:
            if self._hand_back_cancelled(lane, delivery):
                raise
        except Exception:  # the dispatcher catches handler errors; this is a bus bug
            log.exception("in-memory bus lane %s failed on %s", lane.group.service, event.id)
        finally:
            if not delivery.abandoned:
                if lane.returned:
                    lane.returned.pop(event.id, None)
                self._finish(lane, delivery)
            _left(lane, delivery)

    def _hand_back_cancelled(self, lane: _Lane, delivery: _Delivery) -> bool:
        """Hand back what a cancelled handler left unfinished; True if the lane itself was
        cancelled (the cancellation goes on), False if only the handler was."""
        if not delivery.abandoned:
            self._hand_back(lane, delivery)
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    def _hand_back(self, lane: _Lane, delivery: _Delivery, *, unsettled: bool = True) -> None:
        """A handler ended unfinished (cancelled): its events go back, never acked."""
        _put_back(lane, delivery)
        if unsettled:
            for event in delivery.events:
                _returned(lane, event)
        # returned as far as the window goes; acks of the others are not held back by it
        self._finish(lane, delivery)
        delivery.abandoned = True

    def _finish(self, lane: _Lane, delivery: _Delivery) -> None:
        """Record a returned handler; ack every returned delivery not behind a running one."""
        delivery.done = True
        lane.running -= len(delivery.events)
        unacked = lane.unacked
        acked = 0
        while unacked and unacked[0].done:
            acked += len(unacked.popleft().events)
        if acked:
            self._settle(acked)
        if lane.running == 0:
            if lane.serving is not None:
                lane.serving.busy.discard(lane)
            lane.serving = None
            lane.idle.set()
        if lane.items:
            # room for what waits; an empty lane's worker is woken by the next event
            lane.wakeup.set()

    async def _work(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._consuming and (replica := lane.startable()) is None:
                lane.wakeup.clear()
                await lane.wakeup.wait()
            if not self._consuming:
                break
            if lane.marks and type(lane.items[0]) is _Mark:
                # reached once every event before it returned (and so was acked)
                if lane.running:
                    await lane.idle.wait()
                else:
                    self._reach(lane)
                continue
            subscription = replica.subscription
            came_back = bool(lane.returned) and lane.items[0].id in lane.returned
            if came_back and lane.running:
                # a delivery that came back runs alone (as on RabbitMQ): the others first
                while lane.running:
                    await lane.idle.wait()
                continue
            if subscription.window > 1 and subscription.batch_handler is not None and not came_back:
                batch = self._start_batch(lane, replica)
                # the loop's own create_task: asyncio.create_task is a Python call more
                batch.task = loop.create_task(self._run_batch(lane, replica, batch))
                lane.tasks.add(batch.task)
                continue
            delivery = self._start(lane, replica)
            if subscription.window == 1 or came_back:
                await self._run(lane, replica, delivery)
            else:
                # started in this order, each runs up to its first suspension in turn
                delivery.task = loop.create_task(self._run(lane, replica, delivery))
                lane.tasks.add(delivery.task)
        while lane.running:
            await lane.idle.wait()

    def shares_keyless(self, service: str) -> bool:
        group = self._groups.get(service)
        return group is not None and group.broadcast is not None

    async def redeliver(self, service: str, event: Event) -> None:
        self.check_redeliverable(service, event)
        lane, partition = redelivery_lane(event, self.partitions)
        group = self._groups.get(service)
        if group is None:
            # kept for the service's first subscription, as its durable queue would
            group = self._groups[service] = _Group(self, service)
        if partition is not None:
            target = group.partitions[partition]
        elif lane == BROADCAST:
            # the group takes its keyless events shared (checked above): it has the lane
            assert group.broadcast is not None
            target = group.broadcast
        else:
            target = group.critical
        await self._offer(target, event)

    # ---------------------------------------------------------------- dead letters

    def _store_dead(self, letter: DeadLetter, lane: str) -> None:
        """Keep ``letter`` and count it (``lane``: where it came from, or INPUT)."""
        record_dead_letter(letter.service, letter.event_type, lane)
        self._dead.setdefault(letter.service, deque()).append(letter)

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
        self._store_dead(
            DeadLetter(
                service=service,
                reason=reason,
                body=body,
                event_type=event_type,
                key=key,
                headers=dict(headers or {}),
            ),
            INPUT,
        )

    async def take_dead_letters(
        self, service: str, take: Callable[[DeadLetter], Awaitable[bool]]
    ) -> int:
        stored = self._dead.get(service)
        if not stored:
            return 0
        kept: list[DeadLetter] = []
        offered = 0
        try:
            # those there now: a letter refused again on the way lands behind them
            for _ in range(len(stored)):
                letter = stored.popleft()
                offered += 1
                kept.append(letter)
                if await take(letter):
                    kept.pop()
        finally:
            stored.extendleft(reversed(kept))
        return offered

    async def dead_letters(
        self, service: str, limit: int = 100, *, remove: bool = True
    ) -> list[DeadLetter]:
        stored = self._dead.get(service)
        if not stored:
            return []
        if not remove:
            return list(itertools.islice(stored, limit))
        out: list[DeadLetter] = []
        while stored and len(out) < limit:
            out.append(stored.popleft())
        return out
