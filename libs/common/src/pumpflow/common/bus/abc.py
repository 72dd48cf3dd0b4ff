"""Interfaces of the event bus. Transports (``memory``, ``rabbitmq``) implement these.

Delivery contract, the same for every transport (held by the shared contract tests):

- An event with a key goes to partition ``crc32(key) % partitions``; a consuming
  service has one queue per partition and gets each partition's messages in order.
- Keyless events are broadcast: every live subscriber (every replica) gets them, on
  queues of its own that go with it, so what is published while a replica does not
  consume (none runs, or its connection is down) is lost to it. A group subscribing
  with ``Subscription.shared_keyless`` takes them instead on queues shared by its
  replicas, as its keyed events (one replica at a time, declared with the group): what
  is published while none consumes waits there, in order, for the next.
- Critical event types (``Payload.CRITICAL``) travel on a lane of their own per
  service, so a backlog of ordinary events never delays them.
- The handler's return is the acknowledgement: a message is acked only after the
  handler returned. A handler that raises is retried up to ``max_attempts`` times,
  then the message is dead-lettered with the reason; the stream goes on. A handler
  that raises a transient failure of a dependency
  (:func:`pumpflow.common.dependencies.transient_dependency`) is retried with backoff
  until the dependency answers, its lane stalled meanwhile, without using an attempt;
  a lane that stops hands such a delivery back unacked.
- Window: up to ``Subscription.window`` handlers of one lane (a partition queue, the
  critical lane, a broadcast lane) run at once (returned ones waiting for
  their ack do not count). They start in delivery
  order, each running up to its first suspension before the next starts; acks go out
  in delivery order only (a message is acked once it and every message delivered
  before it on its lane returned), so a slow message holds back the acks behind it
  and a crash redelivers it and everything after it. Releasing partitions,
  unsubscribing, stopping and draining wait for every handler in flight. With the
  default window of 1 a lane is handled one message at a time. The in-memory bus's
  synchronous mode (tests and replays) runs each handler inside the ``publish`` that
  delivered it: publications made one after another are handled one at a time, in
  order, but two tasks publishing at once can have one lane's handlers overlap, the
  later one first if the earlier suspends (serialising them would deadlock services
  that answer each other inside a publication, as activity answers features).
- Batches: a subscription with a ``batch_handler`` and a window above 1 gets the
  deliveries a lane has ready (up to what the window leaves) as one call, in delivery
  order; its return acks them all. If it raises, each of them is handled alone by
  ``handler`` (with its retries and dead-lettering), so one bad message still costs
  only itself.
- Delivery is at least once: a redelivery after a crash or a publisher's retry
  reaches the handler again, and so does every event of a message that carried
  several (RabbitMQ's batches) when one of them is handed back. Consumers drop
  duplicates by the per-key ``seq`` they store with their state
  (``pumpflow.common.consumer``).
- Delivery limit: a message of a shared lane (a partition, the critical lane, a
  group's shared broadcast lane) whose handler was started more than
  :data:`DELIVERY_LIMIT` times and never returned (its consumer died or was stopped
  with it each time, as with a message that kills the process) is dead-lettered with a
  reason starting ``delivery limit:``, and its lane goes on.
- Catching up: :meth:`EventBus.catch_up` returns once every message the group's shared
  keyless queues (its critical lane, keyed critical events included, and its shared
  broadcast lane) held as it began is handled and acked, by whichever replica consumes
  them. A replica that must apply what waited for its group (a stop) before what queued
  behind it on its partitions subscribes with ``partitions=()``, catches up, then
  consumes its partitions (:meth:`EventBus.consume_partitions`). A mark put at the end
  of each of those lanes makes it exact: the lane's consumer takes the mark once every
  delivery before it returned and is acked, answers the replica that put it there, and
  never hands it to a handler (a mark whose replica is gone answers nobody).
- Ownership hook: a subscription's optional ``on_assigned(partitions)`` is awaited
  before the first delivery of those partitions, ``on_revoked(partitions)`` after
  their handlers in flight returned and before another replica may take them. A
  transport tells a subscription its fixed partitions (all of them for
  ``partitions=None``) when it subscribes; ``ownership.BalancedBus`` tells it each
  partition it gains or loses. A stateful service restores and drops the state of
  exactly those partitions there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pumpflow.common.events import Event

Handler = Callable[[Event], Awaitable[None]]
#: unsettled deliveries after which a message is dead-lettered (see the contract above)
DELIVERY_LIMIT = 10
#: takes a lane's ready deliveries at once, in delivery order
BatchHandler = Callable[[Sequence[Event]], Awaitable[None]]
#: told a sorted tuple of partitions (see the ownership hook above)
PartitionsCallback = Callable[[tuple[int, ...]], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """What one consuming service wants: event-type patterns and a handler."""

    #: consumer group: partition queues are ``<service>.p<NN>``
    service: str
    #: topic-style type patterns: ``token.*``, ``system.shutdown``, ``#``
    patterns: tuple[str, ...]
    handler: Handler
    #: schema major version the handler understands
    version: int = 1
    #: partitions this replica consumes; None means all of them, () none until
    #: ``EventBus.consume_partitions`` (its critical and shared lanes only)
    partitions: tuple[int, ...] | None = None
    #: attempts before a failing message is dead-lettered (waits for a dependency
    #: that fails for a while do not count)
    max_attempts: int = 3
    #: handlers of one lane running at once; started in delivery order, acked in it
    window: int = 1
    #: awaited with partitions this replica is about to consume (restore their state)
    on_assigned: PartitionsCallback | None = None
    #: awaited with partitions it stopped consuming, before they move on (drop state)
    on_revoked: PartitionsCallback | None = None
    #: with a window above 1: handles a lane's ready deliveries in one call
    batch_handler: BatchHandler | None = None
    #: keyless events on the group's shared queues (one replica gets each, and they wait
    #: for one), not on each replica's own; every replica of the group, and its
    #: declaration, must say the same
    shared_keyless: bool = False

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, not {self.window}")


async def notify_assigned(subscription: Subscription, partitions: int) -> None:
    """Tell ``subscription`` the partitions it consumes from subscribing on.

    Transports await this in ``subscribe`` before consuming. A subscription the
    balancer moves partitions for comes with ``partitions=()``: nothing to tell yet.
    """
    if subscription.on_assigned is None:
        return
    wanted = subscription.partitions
    owned = tuple(range(partitions)) if wanted is None else tuple(sorted(set(wanted)))
    if owned:
        await subscription.on_assigned(owned)


class NotRedeliverable(ValueError):
    """An event :meth:`EventBus.redeliver` cannot put back: no queue of its service holds
    events of its kind."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A message that could not be processed, kept with the reason."""

    service: str
    reason: str
    body: bytes
    event_type: str | None = None
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class EventPublisher(ABC):
    """Publishes events; returns only once the transport holds them safely."""

    @abstractmethod
    async def publish(self, event: Event) -> None:
        """Publish one event and wait for the transport to confirm it."""

    async def publish_many(self, events: Iterable[Event]) -> None:
        """Publish events in order; transports may pipeline the confirms."""
        for event in events:
            await self.publish(event)


class EventSubscriber(ABC):
    """Delivers events to handlers."""

    @abstractmethod
    async def declare(
        self,
        service: str,
        patterns: tuple[str, ...],
        *,
        version: int = 1,
        shared_keyless: bool = False,
    ) -> None:
        """Declare ``service``'s shared queues for ``patterns``, without consuming them
        (``shared_keyless``: its keyless events' too, see ``Subscription``).

        What is published from then on waits there for the service's first replica. A
        broker routes a message only to the queues bound when it is published, so a
        consumer group that starts after its publisher loses what came before unless
        its queues were declared first (see :mod:`pumpflow.common.runtime.topology`).
        A subscription of the group must then say ``shared_keyless`` as declared.
        """

    @abstractmethod
    async def subscribe(self, subscription: Subscription) -> None:
        """Declare the service's queues and start delivering to its handler."""

    @abstractmethod
    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription`` (this replica of the service only).

        Returns once its handlers in flight returned and their messages are acked;
        deliveries no handler started stay in the service's queues for the next
        consumer (the replica's own broadcast queues go with it, and what they held).
        A subscription not subscribed is ignored.
        """


class EventBus(EventPublisher, EventSubscriber):
    """A transport: publisher and subscriber with a lifecycle and a dead-letter store."""

    #: number of partitions keyed events are spread over (shared setting)
    partitions: int
    #: whether events wait outside this process for a consumer that is away (a
    #: broker's durable queues): a replica that stops leaves its work to the next
    durable: bool = False

    @abstractmethod
    async def start(self) -> None:
        """Connect; idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish, then disconnect."""

    async def stop_consuming(self) -> None:
        """Take no new deliveries (in-flight ones go on); publishing still works.

        Called on SIGTERM before :meth:`drain`, so a drain is not fed forever. Transports
        whose ``drain`` already ends on its own may keep the default, which does nothing.
        """

    async def consume_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        """Also consume these partition queues for ``subscription`` (subscribed before).

        Partitions it consumes already are left as they are. Used to move partitions
        between replicas (``bus.ownership``); with single-active-consumer a queue
        another replica still holds waits until that replica releases it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot move partitions")

    @abstractmethod
    async def catch_up(self, subscription: Subscription) -> None:
        """Return once every message that waited in the group's shared keyless queues as
        this call began is handled and acked (see Catching up above).

        ``subscription`` is subscribed, with ``shared_keyless``; a subscription not
        subscribed, or taking its keyless events on its replica's own queues (which held
        nothing before it subscribed), is refused (ValueError). Whichever replica of the
        group consumes those queues takes the marks (single-active: the one that consumed
        them first, a predecessor still standing by). A transport that can no longer be
        answered (its connection lost) raises a transient failure of its dependency
        (:func:`~pumpflow.common.dependencies.transient_dependency`): call it again.
        """

    async def release_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        """Stop consuming these partition queues for ``subscription``.

        Returns once the handlers in flight on them returned and their messages are
        acked; deliveries no handler started go back to the queue in their place, for
        whichever consumer the queue goes to next.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot move partitions")

    @abstractmethod
    async def drain(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 (interface)
        """Wait until every delivered message is handled; True when idle in time."""

    @abstractmethod
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
        """Store input that cannot be processed (a malformed frame, say) with its reason.

        ``headers`` travel with the letter (what a redrive needs besides the body).
        """

    @abstractmethod
    async def dead_letters(
        self, service: str, limit: int = 100, *, remove: bool = True
    ) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters of a service, oldest first.

        A letter is one event (or one piece of raw input): a message of several events
        dead-lettered whole gives a letter per event, in order, each with its reason
        (``pumpflow.common.bus.batches``). Its letters are returned together, so the
        first message's may exceed ``limit``. With ``remove`` they leave the store;
        without, they stay where they were (a peek), so a caller can save them before
        removing them.
        """

    async def keeps_dead_letters_of(self, service: str) -> bool:
        """Whether the bus keeps a store of ``service``'s dead letters: it has one once the
        service consumed or dead-lettered. Asking creates none."""
        return True

    @abstractmethod
    async def take_dead_letters(
        self, service: str, take: Callable[[DeadLetter], Awaitable[bool]]
    ) -> int:
        """Offer each dead letter ``service`` holds now to ``take``, oldest first, once.

        A letter ``take`` returns True for leaves the store after ``take`` returned; the
        others (and any it raised on) stay in their place. The letters of a message of
        several events (see :meth:`dead_letters`) are offered in order; those not taken
        when others of it were stay as letters of their own, behind those offered.
        Letters arriving meanwhile wait for the next call. Returns how many were offered.
        """

    @abstractmethod
    async def redeliver(self, service: str, event: Event) -> None:
        """Deliver ``event`` again to ``service`` alone, on the lane it consumes it from.

        For putting dead letters back: the service's partition queue of the event's
        key (its critical lane for a critical type), confirmed like a publish; a
        service not consuming yet finds it there. A keyless event goes to the group's
        shared queue of its lane (critical or broadcast) where the group takes them
        shared (:meth:`shares_keyless`); elsewhere it is refused
        (:class:`NotRedeliverable`, see :meth:`check_redeliverable`).
        """

    @abstractmethod
    def shares_keyless(self, service: str) -> bool:
        """Whether ``service``'s group takes its keyless events on queues its replicas
        share, as declared or subscribed on this bus (``shared_keyless``)."""

    def check_redeliverable(self, service: str, event: Event) -> None:
        """Raise :class:`NotRedeliverable` where :meth:`redeliver` refuses ``event``: a
        keyless one of a group taking them on each replica's own queues, since none of
        the group's holds them (a replica's go with it)."""
        if event.key is None and not self.shares_keyless(service):
            raise NotRedeliverable(
                f"{event.type} is keyless and {service} takes its keyless events on each "
                "replica's own queues, which go with their replica: no queue of "
                f"{service} holds them to put it back on (a group taking them on queues "
                "its replicas share, shared_keyless, has one)"
            )

    def why_unconfirmed(self) -> str:
        """Why a publication under way for a while is not confirmed yet, in words (for
        an operator's request answered before its publication settles)."""
        return "the bus has not taken it"

    @abstractmethod
    def is_healthy(self) -> bool:
        """True while connected and consuming."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """State for readiness and operators, JSON-serialisable and free of secrets.

        At least ``transport`` (its name) and ``healthy`` (:meth:`is_healthy`), and
        ``namespace`` for a transport that has one. A bus that shares partitions
        between replicas adds ``ownership``: per service, what it owns and whether its
        heartbeat works (``healthy``).
        """
