"""RabbitMQ transport (aio-pika): topic exchange, partition queues, critical lane, DLQ.

Topology under ``<ns>`` (the namespace):

- ``<ns>.events``: durable topic exchange; routing key ``<type>.v<major>.p<NN>``, or
  ``<type>.v<major>.bcast`` for keyless events.
- ``<ns>.<service>.p<NN>``: durable partition queues with single-active-consumer, so
  one replica at a time processes a partition, in order.
- ``<ns>.<service>.critical``: durable, single-active-consumer, bound to the keyed
  critical types (exit orders), consumed on the main connection, apart from the backlog
  of trades (see Connections).
- ``<ns>.<service>.bcast.<replica>`` and ``<ns>.<service>.critical.<replica>``: one
  pair per replica, bound to the keyless types it wants (``system.shutdown`` goes to
  the critical one), so every replica gets them; deleted with the replica, and with
  the connection consuming it, whose channel declares and binds it again on reconnecting
  (what was published meanwhile is lost to that replica).
- A group that takes its keyless events shared (``Subscription.shared_keyless``,
  trading's) has no such pair: ``<ns>.<service>.critical`` is bound to its critical
  types' ``.bcast`` keys too, and ``<ns>.<service>.bcast`` (durable,
  single-active-consumer, declared with the group, consumed on the bulk connection) to
  its ordinary ones', so one replica at a time gets them, in order, and what is
  published while none consumes waits there for the next.
- ``<ns>.dlx`` (direct) and ``<ns>.<service>.dlq``: every queue dead-letters into the
  service's DLQ. A message the service gives up on is published there by the bus with
  the reason in ``x-pumpflow-reason`` (a broker-side reject cannot carry one), and
  only then acked. A message the bus fails on (its letter's publish, say) is rejected,
  and the broker dead-letters it. Either letter is counted
  (``pumpflow_events_dead_lettered_total``) once stored: confirmed, or rejected. A
  redrive puts a letter back by the name of the service's queue it consumes it from
  (through the default exchange, so no other group gets a copy): the partition queue,
  the critical one, or a shared-keyless group's ``.bcast``; a keyless letter of a group
  without shared queues has none (see :meth:`EventBus.check_redeliverable`).

Connections: two robust connections (both reconnect, close with the bus and count in
:meth:`RabbitMQBus.is_healthy`). The main one carries publishing and its confirms,
declarations, dead letters and the critical lane's consumers (``.critical`` and
``.critical.<replica>``); the bulk one, opened with the first partition or broadcast
consumer, carries those. A connection is one TCP stream read in order: a delivery is
read only after every frame the broker wrote before it, and the partition queues keep
their prefetch (partitions x prefetch deliveries) in flight: a shared connection
would hold an exit order, and a publish's confirm, behind about that many trades.
Apart, the critical lane and the confirms wait only for their own traffic, and the
bulk consumers keep acking when the broker blocks a publishing connection.

Batches: ``publish_many`` puts a partition's consecutive events of one routing key in
one message (up to BATCH_EVENTS, BATCH_BYTES), its body the JSON array of their
envelopes, since the broker's work and the consumers' are per message far more than
per byte. The callers hand over what gathered while their previous publication was
confirmed (the feed's recorder, a keyed consumer's commit), so batches form as the
rate grows and a lone event goes alone, as soon as before. Consumers take a batch's
events in order as if delivered one by one: a malformed one is dead-lettered alone,
and a redelivered batch counts the delivery limit per event, so only the event its
consumer keeps dying on is dead-lettered. A consumer that stops (a release of its
partitions, ``stop_consuming``) finishes a batch it began, so a clean hand-over
redelivers nothing handled; one handed back or redelivered brings each event again. A
batch the bus rejects (its event's letter could not be stored) is dead-lettered whole
by the broker; its dead letters are read as one per event
(``pumpflow.common.bus.batches``), so each is listed and redriven.

Publishing is confirmed and keeps its order across a reconnection. Each publication
takes a ticket in the order it is first written. One whose confirm fails because the
connection or channel went away is held: it is written again once the channel is
back, and no publication with a later ticket is written while an earlier one is held.
So the channel carries the unconfirmed tail of the stream again in its first order
before anything new, and a key's events reach its queue in publish order. All the
confirms a lost channel owed fail together, before any reconnection can complete, so
every publication of that tail is held before the new channel takes a frame. The
earliest held publication waits for nothing but the channel, so nothing deadlocks. A
publication that gives up (PUBLISH_ATTEMPTS failed writes with the broker reachable,
or NACKED_ATTEMPTS nacks, each counted apart) fails every call begun before it and not
written yet, rather than let them overtake it; the callers publish again in order.

A nack comes on an open channel, after the publications written behind it: a queue
that refused one (its process restarting, or full) may take the next, so a nacked
publication written again would reach its queues after a later one of its key, and
consumers drop an older seq (trading's views, a keyed consumer of only some of the
publisher's types) or apply it late. So a publication is written only once every
earlier one of its line is confirmed or given up: a line is a partition of a lane
(``pNN``, ``critical.pNN``), where a key's events all go; keyless ones have none.
That is also all a nack holds back while the publication pauses before it is written
again: its line (a keyless one, with no line, holds every later one back, as a lost
channel's do); the other partitions go on.
A broker short of memory or disk (a resource alarm) blocks every connection that
publishes until it clears: nothing is refused or lost, the publications just wait, and
with them the work that publishes (a consumer acks only once its events are out). A
publication unsettled for UNCONFIRMED_WAIT_S counts as work waiting on RabbitMQ
(:data:`~pumpflow.common.dependencies.WAITS`) until it settles, so ``/readyz`` and
``pumpflow_dependency_waiting`` say so, whether the broker blocks, is away or does
not answer. The broker says when it blocks a connection and why (connection.blocked,
"low on memory"), kept until it unblocks it, so the control answers that cannot say a
publication is out (:meth:`RabbitMQBus.why_unconfirmed`) tell an alarm, with its
reason, from a broker that has not answered for so long.
Partitions still go side by side, and a partition's consecutive events of one routing
key share a message, so a call costs a confirm's round trip more for each further
message of one partition: where its routing key changes (a new token's create, then
its trade), or its run fills a message (BATCH_EVENTS, BATCH_BYTES).

Delivery limit: a message that kills its consumer's process is redelivered (the
broker marks it ``redelivered``). A redelivered message runs alone (nothing else of
its queue starts until it returned), and before its handler starts the bus counts
the attempt in its :class:`DeliveryJournal` (a service's: in Redis, one count for all
replicas, outliving any of them; ``pumpflow.common.bus.journal``); past
DELIVERY_LIMIT attempts it is dead-lettered instead of handled. While the journal's
store is away the redelivered message waits (its lane with it), since it cannot be
told from a poison one; a lane that stops meanwhile hands it back, uncounted. Running
alone keeps the count to the message the process died on: the healthy ones delivered
with it are counted only if it dies while they run.

Catching up (:meth:`RabbitMQBus.catch_up`): a mark, a bodyless message whose
``x-pumpflow-catch-up`` header is its id, goes straight to each of the group's shared
keyless queues by name (the default exchange), confirmed, naming the broker's direct
reply-to of the channel that put it (``reply_to``: ``amq.rabbitmq.reply-to``). Whichever
consumer the queue delivers it to (single-active: a replica that consumed it before, and
still does, gets it) takes it once every message before it returned and is settled, sends
the acks held back, answers the mark's id to its reply-to and then acks it; a connection
lost before the ack redelivers it, answered again. A mark is never handed to a handler.
The broker drops an answer to a channel gone (a replica that died catching up), so its
mark, reached later, is simply acked. A stopping consumer hands its mark back with the
rest; one that handed a message back hands its mark back too, behind it. The catch-up
returns once each mark is answered; its channel lost meanwhile, it raises
:class:`CatchUpInterrupted` (a transient failure of RabbitMQ), and is begun again. A mark
unanswered for ``catch_up_remark_s`` may be lost (a consumer of an older version, which
knows no marks, dead-letters it as malformed; an operator purged the queue): another
goes to the end of its queue, as exact a mark as the first, and either's answer will do.

Each consumed queue has its own channel, prefetch and worker. The worker starts its
messages' handlers in delivery order, up to ``Subscription.window`` at once (a window
of 1 runs inside the worker, a larger one as tasks; a subscription with a batch
handler gets the messages buffered, up to the window, in one task; the prefetch is at
least the window), and acks in delivery order only: a message is acked once it and every message
delivered before it returned. So the acks can be cumulative (``multiple=True``,
batched), which is safe because the channel carries only that queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic, Connection

from pumpflow.common.bus.abc import (
    DELIVERY_LIMIT,
    DeadLetter,
    EventBus,
    Subscription,
    notify_assigned,
)
from pumpflow.common.bus.batches import DEATH_HEADER, batch_body, batch_parts, letter_events
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
from pumpflow.common.bus.journal import DeliveryJournal, LocalDeliveryJournal
from pumpflow.common.bus.metrics import Series, record_dead_letter, series
from pumpflow.common.bus.routing import (
    DEFAULT_PARTITIONS,
    broadcast_queue,
    critical_queue,
    partition_queue,
    routing_key,
    routing_key_for,
)
from pumpflow.common.dependencies import RABBITMQ, WAITS
from pumpflow.common.events import (
    Event,
    EventValidationError,
    decode_event,
    encode_event,
    source_service,
)

log = logging.getLogger(__name__)

REASON_HEADER = "x-pumpflow-reason"
#: a catch-up's mark carries its id in this header (see Catching up)
MARK_HEADER = "x-pumpflow-catch-up"
#: the broker's direct reply-to: a mark names it, and the answer reaches the channel that
#: published the mark, or nothing once that channel is gone
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: backoff while the delivery journal's store is away
JOURNAL_RETRY_INITIAL_S = 0.2
JOURNAL_RETRY_MAX_S = 5.0
#: unacked handled messages per acknowledgement frame (acks are cumulative)
ACK_BATCH = 64
#: confirms outstanding at once in publish_many
PUBLISH_WINDOW = 128
#: failed writes a publication survives while the broker is reachable (waiting for a
#: reconnection counts none); a resend may duplicate, consumers drop the copy by seq
PUBLISH_ATTEMPTS = 3
#: nacks a publication survives: a crashed queue process takes seconds to come back
#: (the pauses grow to 1 s: about 25 s in all)
NACKED_ATTEMPTS = 30
#: the pause before a publication that failed is written again: this much a failure
#: so far, at most RESEND_PAUSE_MAX_S
RESEND_PAUSE_S = 0.1
RESEND_PAUSE_MAX_S = 1.0
#: longest pause while waiting for the publishing channel to reopen
REOPEN_POLL_S = 0.5
#: a lost connection's frame buffer is emptied until nothing came for this long
DISCARD_IDLE_S = 5.0
#: a publication unsettled this long waits on the broker (see Publishing): 20 times the
#: slowest confirms seen under load, well short of a minute of silence
UNCONFIRMED_WAIT_S = 5.0
_MAX_REASON = 2000
#: how long handled messages may wait for more to share their ack frame; a partition
#: gets 1/16 of the traffic (at 100 trade events/s, a message every 50-60 ms on each of
#: trading's), so a short linger acks nearly every message alone (0.6 ack frames a
#: delivery at 200 events/s over 16 partitions with 50 ms, 0.24 with 250 ms). A crash
#: redelivers what was held back; consumers drop the copies by seq
ACK_LINGER_S = 0.25
PERSISTENT = 2
#: events one message may carry, and their encoded size: a batch is handled as one
#: delivery, and a frame of the broker's default size (128 KiB) holds it
BATCH_EVENTS = 64
BATCH_BYTES = 96 * 1024
#: longest wait for dead letters handed back to show in their queue again
REQUEUE_WAIT_S = 2.0
#: longest wait for the broker to answer a consumer's cancel or its channel's close on a
#: stop: it answers in milliseconds, and a frozen one (a stopped host, a lost network
#: that keeps the socket open) never does, so a stop would wait for it for ever
CANCEL_WAIT_S = 2.0
#: a catch-up's mark unanswered this long is taken as lost and another is put: far above
#: a mark's way through a queue its consumer keeps up with, and a take-over waits no
#: longer than that for a mark an older version's consumer took
CATCH_UP_REMARK_S = 10.0
Properties = Basic.Properties


class PublishAbandoned(ConnectionError):
    """Not written: a publication before it gave up, and this one may not overtake it."""


class CatchUpInterrupted(ConnectionError):
    """A catch-up can no longer be answered: its channel was lost (the connection to
    RabbitMQ dropped), or the broker refused a mark. Waited out as RabbitMQ's failure:
    a catch-up begun again puts marks of its own."""

    transient_dependency = RABBITMQ


class BrokerRefused(ConnectionError):
    """RabbitMQ refused to open a connection: a login or a vhost of the AMQP URL, with
    the broker's reason and the setting to check."""

    #: waited out at start-up as every dependency is (the operator may create the vhost
    #: or user meanwhile, and a deployment may provision them after the broker starts),
    #: the reason shown in the wait's log lines and /readyz
    transient_dependency = RABBITMQ


def _refusal(error: BaseException, url: str) -> BrokerRefused | None:
    """The broker's refusal ``error`` is, said with its reason; None for any other failure."""
    parsed = urlsplit(url)
    user = unquote(parsed.username or "guest")
    if isinstance(error, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerRefused(
            f"RabbitMQ refused the login of user {user!r}: {error}; check the AMQP URL's "
            "user and password (PUMPFLOW_AMQP_URL)"
        )
    if isinstance(error, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(error):
        # aiormq takes the broker's Connection.Close answering Connection.Open for a frame
        # it did not expect, and its message leaves the broker's reason out: the frame
        # itself is still a local of the call that read it
        reason = "closed by the broker while opening"
        for frame, _ in traceback.walk_tb(error.__traceback__):
            close = frame.f_locals.get("frame")
            if isinstance(close, Connection.Close):
                reason = close.reply_text
                break
        vhost = unquote(parsed.path[1:]) or "/"
        return BrokerRefused(
            f"RabbitMQ refused vhost {vhost!r} to user {user!r}: {reason}; check the AMQP "
            "URL's vhost and the user's permissions on it (PUMPFLOW_AMQP_URL)"
        )
    return None


class _Batch:
    """What the events of one batch message share."""

    __slots__ = ("begun", "settled")

    def __init__(self) -> None:
        #: a handler took one of its events: a stopping consumer takes the rest too, so a
        #: clean stop or hand-over redelivers nothing that was handled
        self.begun = False
        #: the message was handed back or rejected whole: its other events are not acked
        self.settled = False


class _Part:
    """One event of a batch message, handled as if it came alone (see Batches)."""

    __slots__ = ("batch", "body", "last", "message")

    def __init__(self, message: DeliveredMessage, body: bytes, batch: _Batch, last: bool):
        self.message = message
        self.body = body
        self.batch = batch
        #: the message's last event, whose settling acks the message
        self.last = last

    @property
    def redelivered(self) -> bool | None:
        return self.message.redelivered

    @property
    def routing_key(self) -> str | None:
        return self.message.routing_key


class _Mark:
    """A catch-up's mark delivered to a consumer (see Catching up): never a handler's."""

    __slots__ = ("handed_back", "message")

    def __init__(self, message: DeliveredMessage, handed_back: int):
        self.message = message
        #: its consumer's hand-backs when it came: one since puts a message back ahead of it
        self.handed_back = handed_back


class _Delivery:
    """A message (or an event of a batch) handed to a handler and not acked yet."""

    __slots__ = ("cancelled", "done", "failed", "message")

    def __init__(self, message: DeliveredMessage | _Part):
        if type(message) is _Part:
            message.batch.begun = True
        self.message = message
        self.done = False
        #: the bus failed on it: reject it (the broker dead-letters it), do not ack it
        self.failed = False
        #: its handler was cancelled before it finished: hand it back, never ack it
        self.cancelled = False


@dataclass(eq=False)
class _Consumer:
    """One consumed queue: its channel, local buffer, worker and lane dispatcher."""

    queue_name: str
    subscription: Subscription
    dispatcher: Dispatcher
    #: the partition of a partition queue's consumer
    partition: int | None = None
    channel: AbstractChannel | None = None
    queue: AbstractQueue | None = None
    tag: str | None = None
    buffer: deque[DeliveredMessage | _Part | _Mark] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    worker: asyncio.Task | None = None
    #: delivered to a handler and not acked yet, in delivery order
    in_flight: deque[_Delivery] = field(default_factory=deque)
    #: handlers running now (at most the subscription's window)
    running: int = 0
    #: handler tasks of a window above 1
    tasks: set[asyncio.Task] = field(default_factory=set)
    #: deliveries handed back to the queue so far (a catch-up's mark behind one goes too)
    handed_back: int = 0
    #: the last returned message not acked yet, and how many are behind it
    unacked: DeliveredMessage | None = None
    unacked_count: int = 0
    unacked_since: float = 0.0
    #: wakes the worker when the held ack is due
    ack_timer: asyncio.TimerHandle | None = None
    #: the channel underneath whose broker-sent cancels of this consumer are watched
    cancels_watched: object | None = None
    #: consuming again after the broker cancelled the consumer
    reconsuming: asyncio.Task | None = None
    #: the channel underneath its deliveries come on: closed from a lost connection until
    #: the reopened channel has declared and bound its queue again and consumes
    consuming_on: aiormq.abc.AbstractChannel | None = None


class RabbitMQBus(EventBus):
    """The bus over RabbitMQ with publisher confirms, manual acks and a DLQ per service."""

    durable = True

    def __init__(
        self,
        *,
        url: str,
        namespace: str,
        partitions: int = DEFAULT_PARTITIONS,
        prefetch: int = 256,
        source: str,
        event_log: EventLog | None = None,
        connect_attempts: int = 30,
        journal: DeliveryJournal | None = None,
        catch_up_remark_s: float = CATCH_UP_REMARK_S,
    ):
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.url = url
        self.namespace = namespace
        self.partitions = partitions
        self.prefetch = prefetch
        self.source = source
        self.event_log = event_log or EventLog("none")
        self.connect_attempts = max(1, connect_attempts)
        #: a catch-up's mark unanswered this long puts another (see Catching up)
        self.catch_up_remark_s = catch_up_remark_s
        #: attempts of redelivered messages (the delivery limit)
        self.journal: DeliveryJournal = journal or LocalDeliveryJournal.for_namespace(namespace)
        self.replica_id = uuid.uuid4().hex[:12]
        self._publisher = source_service(source)
        self._connection: AbstractRobustConnection | None = None
        #: carries the partition and broadcast consumers (see the module), opened with
        #: the first of them
        self._bulk_connection: AbstractRobustConnection | None = None
        self._bulk_lock = asyncio.Lock()
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._consumers: list[_Consumer] = []
        self._dlqs: dict[str, AbstractQueue] = {}
        self._queues: set[str] = set()
        #: consumer groups declared here, by service
        self._declared: dict[str, Bindings] = {}
        #: the groups declared or subscribed here that take their keyless events shared
        self._shared_keyless: set[str] = set()
        self._published: dict[tuple[str, bool], Series] = {}
        self._consuming = False
        self._replicas = 0
        # never hold back so many acks that the prefetch window closes
        self._ack_batch = max(1, min(ACK_BATCH, prefetch // 4))
        self._start_lock = asyncio.Lock()
        #: publication order: a ticket per publication, taken when it is first written
        self._tickets = itertools.count()
        #: tickets of publications whose channel went away, not written again yet
        self._held: set[int] = set()
        self._held_changed = asyncio.Event()
        #: publications given up so far; a call begun before one writes nothing more
        self._given_up = 0
        #: per line (a partition of one lane), its publications not settled yet, in
        #: ticket order, each [ticket, future woken when it is first]: only the first is
        #: written (see Publishing)
        self._lines: dict[str, deque[list]] = {}
        #: the AMQP connections whose loss is watched, and the tasks emptying lost ones
        self._watched: set[aiormq.abc.AbstractConnection] = set()
        self._discarding: set[asyncio.Task] = set()
        #: the publications unsettled past UNCONFIRMED_WAIT_S, by ticket: each a party
        #: waiting on RabbitMQ until it settles
        self._unconfirmed: dict[int, contextlib.ExitStack] = {}
        #: the publications not settled yet, by ticket (oldest first): each one's timer
        #: of UNCONFIRMED_WAIT_S, which says when it began
        self._unsettled_since: dict[int, asyncio.TimerHandle] = {}
        #: the connections the broker blocks (a resource alarm): its reason and since when;
        #: known only once a connection's blocks are recorded (see _record_blocks)
        self._blocked: dict[aiormq.abc.AbstractConnection, tuple[str, float]] = {}
        self._blocks_known = False
        #: marks of this bus's catch-ups not answered yet
        self._catching_up = 0

    # ---------------------------------------------------------------- names

    def _name(self, *parts: str) -> str:
        return ".".join((self.namespace, *parts))

    @property
    def exchange_name(self) -> str:
        return self._name("events")

    @property
    def dlx_name(self) -> str:
        return self._name("dlx")

    def dlq_name(self, service: str) -> str:
        return self._name(service, "dlq")

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        async with self._start_lock:
            connected = self._connection is not None and not self._connection.is_closed
            if connected and self._dlx is not None:
                return
            if not connected:
                self._connection = await self._connect()
            assert self._connection is not None
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await self._channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            self._dlx = await self._channel.declare_exchange(
                self.dlx_name, aio_pika.ExchangeType.DIRECT, durable=True
            )
            self._consuming = True

    async def _connect(self, purpose: str = "") -> AbstractRobustConnection:
        # connect_robust reconnects a connection it once had, but gives up on the first
        delay = 0.2
        name = f"{self.source} {purpose}" if purpose else self.source
        for attempt in range(1, self.connect_attempts + 1):
            try:
                return await aio_pika.connect_robust(
                    self.url,
                    client_properties={"connection_name": name},
                    reconnect_interval=1.0,
                )
            except (OSError, aiormq.exceptions.AMQPError) as exc:
                refused = _refusal(exc, self.url)
                if refused is not None:
                    # the same on every try: the caller's policy decides whether to wait
                    raise refused from exc
                if attempt == self.connect_attempts or not isinstance(
                    exc, OSError | aiormq.exceptions.AMQPConnectionError
                ):
                    raise
                log.warning(
                    "RabbitMQ not reachable (attempt %d/%d): %r; retrying in %.1fs",
                    attempt,
                    self.connect_attempts,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    async def stop_consuming(self) -> None:
        """Cancel every consumer; hand back delivered messages no handler has started."""
        self._consuming = False
        # all at once, so no queue starts a handler while another one winds down
        await asyncio.gather(*(self._stop_consumer(c) for c in self._consumers))

    async def _stop_consumer(self, consumer: _Consumer) -> None:
        consumer.stopping = True
        consumer.wakeup.set()
        if consumer.reconsuming is not None:
            consumer.reconsuming.cancel()
            await asyncio.gather(consumer.reconsuming, return_exceptions=True)
        # a handler waiting for a dependency hands its message back instead
        consumer.dispatcher.halt()
        # a closed channel's deliveries are the broker's again, and waiting for a robust
        # channel to reopen would never end once its connection is closed for good
        if (
            consumer.channel is not None
            and consumer.tag is not None
            and not consumer.channel.is_closed
        ):
            try:
                # a frozen broker never answers, and a connection down waits for its
                # reconnection: bounded, since the stop goes on without the answer (a
                # cancel given up on closes its channel, whose deliveries go back)
                async with asyncio.timeout(CANCEL_WAIT_S):
                    channel = await consumer.channel.get_underlay_channel()
                    await channel.basic_cancel(consumer.tag)
            except (
                aiormq.exceptions.AMQPError,
                ConnectionError,
                RuntimeError,
                TimeoutError,
            ) as exc:
                log.warning("cancelling consumer of %s: %r", consumer.queue_name, exc)
            consumer.tag = None
        if consumer.worker is not None:
            # not cancelled with a stop given up on: its handlers go on, for the drain
            await asyncio.wait({consumer.worker})
            consumer.worker = None
        await self._flush_ack(consumer)
        if consumer.buffer:
            # the rest goes back to the broker, which keeps it in its place in the queue
            last = consumer.buffer[-1]
            if type(last) is _Part or type(last) is _Mark:
                last = last.message
            consumer.buffer.clear()
            try:
                await last.channel.basic_nack(last.delivery_tag, multiple=True, requeue=True)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                pass  # channel gone: the broker requeues them itself

    async def close(self) -> None:
        await self.stop_consuming()
        await asyncio.gather(*(self._close_channel(c) for c in self._consumers))
        self._consumers.clear()
        self._dlqs.clear()
        # each waits for the broker's answer up to aiormq's bound: side by side
        await asyncio.gather(*(connection.close() for connection in self._connections()))
        self._connection = None
        self._bulk_connection = None
        self._channel = None
        self._exchange = None
        self._dlx = None

    @staticmethod
    async def _close_channel(consumer: _Consumer) -> None:
        """Close a consumer's channel, waiting up to CANCEL_WAIT_S for the broker's answer
        (the connection's close ends it all the same)."""
        channel = consumer.channel
        if channel is None or channel.is_closed:
            return
        try:
            async with asyncio.timeout(CANCEL_WAIT_S):
                await channel.close()
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
            log.warning("closing the channel of %s: %r", consumer.queue_name, exc)

    def _connections(self) -> list[AbstractRobustConnection]:
        """The bus's open connections: the main one, and the bulk lanes' once opened."""
        return [
            c
            for c in (self._connection, self._bulk_connection)
            if c is not None and not c.is_closed
        ]

    def is_healthy(self) -> bool:
        connection = self._connection
        if connection is None or connection.is_closed or not self._consuming:
            return False
        bulk = self._bulk_connection
        if bulk is not None and bulk.is_closed:
            return False
        if self._channel is None or self._channel.is_closed:
            return False
        # a reopened channel is open before it has restored its queues and consumes: what
        # is published to a replica's own queue meanwhile finds none
        return all(
            c.consuming_on is not None and not c.consuming_on.is_closed for c in self._consumers
        )

    def describe(self) -> dict[str, Any]:
        connection = self._connection
        return {
            "transport": "rabbitmq",
            "namespace": self.namespace,
            "healthy": self.is_healthy(),
            "connected": connection is not None and not connection.is_closed,
            "connections": len(self._connections()),
            "consuming": self._consuming,
            "partitions": self.partitions,
            "prefetch": self.prefetch,
            "queues_consumed": len(self._consumers),
            # delivered by the broker and not acked yet: buffered, being handled, or
            # handled with the ack held back (ACK_LINGER_S)
            "unacked": sum(
                len(c.buffer) + len(c.in_flight) + c.unacked_count for c in self._consumers
            ),
            # marks of its catch-ups not answered yet
            "catching_up": self._catching_up,
        }

    def why_unconfirmed(self) -> str:
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            why = "the connection to RabbitMQ is lost (reconnecting)"
        elif self._blocked:
            reason, since = min(self._blocked.values(), key=lambda blocked: blocked[1])
            why = (
                f"RabbitMQ blocks publishers: {reason} (a resource alarm, for "
                f"{time.monotonic() - since:.0f} s: they go on once its operator frees "
                "memory or disk)"
            )
        else:
            oldest = next(iter(self._unsettled_since.values()), None)
            waited = ""
            if oldest is not None:
                begun = oldest.when() - UNCONFIRMED_WAIT_S
                waited = f" for {asyncio.get_running_loop().time() - begun:.0f} s"
            if self._blocks_known:
                cause = (
                    "no resource alarm blocks publishers: the broker does not answer, or is slow to"
                )
            else:
                cause = "the broker blocks publishers, short of memory or disk, or does not answer"
            why = f"RabbitMQ has not confirmed it{waited} ({cause})"
        waiting = WAITS.describe().get(RABBITMQ)
        if waiting is not None:
            # what /readyz says: a publication unsettled past UNCONFIRMED_WAIT_S
            why += f"; /readyz names rabbitmq, waited on for {time.time() - waiting['since']:.0f} s"
        return why

    async def drain(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 (interface)
        """Wait until every delivered message is handled and acked, and stays so briefly."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._idle():
                        await asyncio.sleep(0.05)
                        if self._idle():
                            return True
                    await asyncio.sleep(0.01)
        except TimeoutError:
            return False

    def _idle(self) -> bool:
        # a stopped consumer's late deliveries are the broker's again once its channel
        # closes; its handlers in flight are still waited for
        return all(
            not c.in_flight and c.unacked is None and (c.stopping or not c.buffer)
            for c in self._consumers
        )

    async def delete_topology(self, *, services: Iterable[str] = ()) -> None:
        """Delete every exchange and queue this bus declared (tests clean up with it).

        ``services``: also delete the durable queues of these services (partitions,
        critical lane, shared broadcast lane, DLQ), for cleaning up after buses of
        another process. Replica queues need no cleanup: the broker deletes them with
        their consumer.
        """
        if self._channel is None or self._channel.is_closed:
            await self.start()
        assert self._channel is not None
        for consumer in self._consumers:
            await self._stop_consumer(consumer)
        names = set(self._queues)
        for service in services:
            names.update(self._name(partition_queue(service, p)) for p in range(self.partitions))
            names.update(
                self._name(queue) for queue in (critical_queue(service), broadcast_queue(service))
            )
            names.add(self.dlq_name(service))
        for name in sorted(names):
            await self._channel.queue_delete(name)
        for name in (self.exchange_name, self.dlx_name):
            await self._channel.exchange_delete(name)
        await self.journal.clear()
        self._queues.clear()
        self._dlqs.clear()

    # ---------------------------------------------------------------- publishing

    async def publish(self, event: Event) -> None:
        since = self._given_up
        body, key, lane = self._prepare(event)
        await self._send(body, key, event.id, since, _line(lane, key))

    async def publish_many(self, events: Iterable[Event]) -> None:
        """Publish in order with up to PUBLISH_WINDOW confirms outstanding at once."""
        since = self._given_up
        window = asyncio.Semaphore(PUBLISH_WINDOW)
        in_flight: set[asyncio.Task] = set()
        failures: list[BaseException] = []

        def settle(task: asyncio.Task) -> None:
            in_flight.discard(task)
            window.release()
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())

        try:
            for body, key, message_id, line in self._messages(events):
                await window.acquire()
                if failures:
                    break
                # tasks start in creation order and aiormq writes under a FIFO lock,
                # so the broker receives the messages in this order
                task = asyncio.create_task(self._send(body, key, message_id, since, line))
                in_flight.add(task)
                task.add_done_callback(settle)
            if in_flight:
                await asyncio.wait(set(in_flight))
        finally:
            for task in in_flight:
                task.cancel()
        if failures:
            raise failures[0]

    def _messages(self, events: Iterable[Event]) -> list[tuple[bytes, str, str | None, str | None]]:
        """The messages carrying ``events``: (body, routing key, message id, line) each, in
        order.

        A partition's consecutive events of one routing key share a message (a batch,
        see the module), so each queue receives its events in publish order; a critical
        or keyless event goes alone and ends every open batch (nothing published after
        it shares a message with events before it). The line of each is where it keeps
        its order (see Publishing).
        """
        groups: list[list] = []
        #: the batch still open for each partition: [routing key, bodies, first id, bytes,
        #: line]
        open_by_partition: dict[str, list] = {}
        for event in events:
            body, key, lane = self._prepare(event)
            if lane != PARTITION:
                groups.append([key, [body], event.id, len(body), _line(lane, key)])
                open_by_partition.clear()
                continue
            partition = key[key.rfind(".") + 1 :]
            group = open_by_partition.get(partition)
            if (
                group is not None
                and group[0] == key
                and len(group[1]) < BATCH_EVENTS
                and group[3] + len(body) <= BATCH_BYTES
            ):
                group[1].append(body)
                group[3] += len(body)
            else:
                group = [key, [body], event.id, len(body), partition]
                open_by_partition[partition] = group
                groups.append(group)
        return [
            (bodies[0], key, first_id, line)
            if len(bodies) == 1
            else (batch_body(bodies), key, None, line)
            for key, bodies, first_id, _, line in groups
        ]

    def _prepare(self, event: Event) -> tuple[bytes, str, str]:
        """The event's body, routing key, and lane (only a partition's events share a
        message)."""
        schema = check_publishable(event)
        keyless = event.key is None
        lane = BROADCAST if keyless else CRITICAL if schema.CRITICAL else PARTITION
        stats = self._published.get((event.type, keyless))
        if stats is None:
            stats = self._published[(event.type, keyless)] = series(
                self._publisher, event.type, publish_lane(schema, keyless=keyless)
            )
        stats.published += 1
        key = routing_key_for(event, self.partitions)
        if self.event_log.enabled:
            self.event_log.published(event, routing_key=key)
        return encode_event(event), key, lane

    async def _send(
        self, body: bytes, key: str, message_id: str | None, since: int, line: str | None
    ) -> None:
        # the envelope carries type and source; every property costs marshalling time
        properties = Properties(delivery_mode=PERSISTENT, message_id=message_id)
        await self._publish_to(self.exchange_name, body, key, properties, since=since, line=line)

    async def _publish_to(
        self,
        exchange: str,
        body: bytes,
        key: str,
        properties: Properties,
        *,
        since: int | None = None,
        line: str | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm; resend in order across a reconnection.

        ``since``: the give-ups counted when the caller's call began (see the module).
        ``line``: written only once every earlier publication of that line is settled.
        """
        if self._channel is None:
            raise RuntimeError("RabbitMQBus is not started")
        if since is None:
            since = self._given_up
        ticket = next(self._tickets)
        turn = self._join(line, ticket)
        # counted apart, each against its own bound: nacks come while a queue restarts
        # (seconds), failed writes while writes lose their channel; a publication
        # nacked a while must still give up on failed writes as soon as one never nacked
        nacks = failed_writes = 0
        slow = self._unsettled_since[ticket] = asyncio.get_running_loop().call_later(
            UNCONFIRMED_WAIT_S, self._unsettled, ticket, key
        )
        try:
            if turn is not None:
                await turn
            while True:
                channel = await self._writable(ticket, since)
                # written at once below (the lock is free between writes), so no later
                # ticket woken here can write first
                self._release(ticket)
                try:
                    # aio_pika.Message and Exchange.publish cost about as much as the whole
                    # AMQP exchange here; the channel underneath takes the frame directly
                    await channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=key,
                        properties=properties,
                        mandatory=False,
                        wait=False,
                    )
                    return
                except Exception as exc:
                    # a closed channel rejects its confirms with whatever closed it (a
                    # bare Exception, even); a nack means the queue's process failed to
                    # take it (a crashed queue restarts: seen with RabbitMQ 3.10), so it
                    # is written again; any other refusal on an open channel is final
                    if not channel.is_closed and not isinstance(
                        exc,
                        aiormq.exceptions.ChannelInvalidStateError
                        | aiormq.exceptions.DeliveryError
                        | ConnectionError,
                    ):
                        raise
                    nacked = isinstance(exc, aiormq.exceptions.DeliveryError)
                    if nacked:
                        nacks += 1
                        failures, limit = nacks, NACKED_ATTEMPTS
                    else:
                        failed_writes += 1
                        failures, limit = failed_writes, PUBLISH_ATTEMPTS
                    if failures >= limit:
                        self._given_up += 1
                        self._held_changed.set()
                        self._held_changed.clear()
                        raise
                    if line is None or channel.is_closed or not nacked:
                        # held before this task yields: no later ticket is written
                        # meanwhile. A nack holds its line alone (its later publications
                        # wait their turn behind it anyway): the other lines go on
                        self._held.add(ticket)
                    log.warning(
                        "publish to %s failed (%r); resending in order after reconnect",
                        key,
                        exc,
                    )
                    await asyncio.sleep(min(RESEND_PAUSE_S * failures, RESEND_PAUSE_MAX_S))
        finally:
            slow.cancel()
            del self._unsettled_since[ticket]
            waiting = self._unconfirmed.pop(ticket, None)
            if waiting is not None:
                waiting.close()
                if not self._unconfirmed:
                    log.info("publications to RabbitMQ settle again")
            self._release(ticket)
            if line is not None:
                self._leave(line, ticket)

    def _unsettled(self, ticket: int, key: str) -> None:
        """Count the publication ``ticket`` (to ``key``) as waiting on RabbitMQ: it has
        not settled for UNCONFIRMED_WAIT_S."""
        waiting = contextlib.ExitStack()
        waiting.enter_context(WAITS.waiting(RABBITMQ))
        WAITS.waited(
            RABBITMQ,
            self._publisher,
            TimeoutError(
                f"a publication to {key} unconfirmed for {UNCONFIRMED_WAIT_S:g} s: the "
                "broker blocks publishers (short of memory or disk) or does not answer"
            ),
        )
        if not self._unconfirmed:
            log.warning(
                "a publication to RabbitMQ (%s) unconfirmed for %g s: waiting for the "
                "broker (blocking publishers, short of memory or disk, or not answering)",
                key, UNCONFIRMED_WAIT_S,
            )  # fmt: skip
        self._unconfirmed[ticket] = waiting

    def _join(self, line: str | None, ticket: int) -> asyncio.Future | None:
        """Queue ``ticket`` on ``line``; a future done once it is first, None when it is."""
        if line is None:
            return None
        waiting = self._lines.get(line)
        if waiting is None:
            self._lines[line] = deque([[ticket, None]])
            return None
        turn = asyncio.get_running_loop().create_future()
        waiting.append([ticket, turn])
        return turn

    def _leave(self, line: str, ticket: int) -> None:
        """Take ``ticket`` off ``line`` (settled, given up or cancelled); wake the next."""
        waiting = self._lines[line]
        if waiting[0][0] != ticket:
            # not written yet: a call that failed or was cancelled while it waited
            for place, (queued, _) in enumerate(waiting):
                if queued == ticket:
                    del waiting[place]
                    break
            return
        waiting.popleft()
        if not waiting:
            del self._lines[line]
            return
        turn = waiting[0][1]
        if not turn.done():
            turn.set_result(None)

    async def _writable(self, ticket: int, since: int) -> aiormq.abc.AbstractChannel:
        """The open publishing channel, once ``ticket`` is next: no earlier one held."""
        while True:
            channel = await self._open_channel()
            if self._given_up != since:
                raise PublishAbandoned("an earlier publication gave up; publish again in order")
            if not self._held or min(self._held) >= ticket:
                return channel
            await self._held_changed.wait()

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        """The channel underneath, waiting out a reconnection; fails once the bus closed."""
        pause = 0.02
        while True:
            connection, robust = self._connection, self._channel
            if connection is None or connection.is_closed or robust is None:
                raise aiormq.exceptions.ChannelInvalidStateError("RabbitMQBus is closed")
            if connection.connected.is_set():
                with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
                    channel = await robust.get_underlay_channel()
                    if not channel.is_closed:
                        self._watch(channel.connection)
                        return channel
            # the connection is back before its channels are reopened
            await asyncio.sleep(pause)
            pause = min(pause * 2, REOPEN_POLL_S)

    def _watch(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Unblock the writers of ``connection`` once it is lost.

        Its frame buffer is bounded and nothing drains it after the loss, so a publish or
        an ack waiting for room there would wait forever, holding its channel's lock.
        Taking the dead frames out lets each go on to its failed confirm.
        """
        if connection in self._watched:
            return
        self._watched.add(connection)
        self._record_blocks(connection)
        queue = connection.write_queue

        def lost(_: asyncio.Future) -> None:
            self._watched.discard(connection)
            self._blocked.pop(connection, None)
            task = asyncio.ensure_future(_discard(queue))
            self._discarding.add(task)
            task.add_done_callback(self._discarding.discard)

        connection.closing.add_done_callback(lost)

    def _record_blocks(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Keep what the broker says of ``connection`` being blocked (connection.blocked,
        with its reason: "low on memory") until it unblocks it.

        aiormq handles those frames itself and only logs them, so its handlers of this
        connection are wrapped. Where they are not found, nothing is kept, and a blocked
        publication is said to be unconfirmed without the reason."""
        blocked = getattr(connection, "_Connection__handle_connection_blocked", None)
        unblocked = getattr(connection, "_Connection__handle_connection_unblocked", None)
        if blocked is None or unblocked is None:
            return
        self._blocks_known = True

        async def on_blocked(frame: Connection.Blocked) -> None:
            self._blocked[connection] = (frame.reason or "no reason given", time.monotonic())
            await blocked(frame)

        async def on_unblocked(frame: Connection.Unblocked) -> None:
            self._blocked.pop(connection, None)
            await unblocked(frame)

        connection._Connection__handle_connection_blocked = on_blocked  # type: ignore[attr-defined]
        connection._Connection__handle_connection_unblocked = on_unblocked  # type: ignore[attr-defined]

    def _release(self, ticket: int) -> None:
        if ticket in self._held:
            self._held.discard(ticket)
            self._held_changed.set()
            self._held_changed.clear()

    # ---------------------------------------------------------------- subscribing

    def _queue_arguments(self, service: str, *, single_active: bool) -> dict:
        arguments = {
            "x-dead-letter-exchange": self.dlx_name,
            "x-dead-letter-routing-key": service,
        }
        if single_active:
            arguments["x-single-active-consumer"] = True
        return arguments

    async def _declare_dlq(self, service: str) -> AbstractQueue:
        queue = self._dlqs.get(service)
        if queue is None:
            if self._channel is None:
                raise RuntimeError("RabbitMQBus is not started")
            name = self.dlq_name(service)
            queue = await self._channel.declare_queue(name, durable=True)
            await queue.bind(self.dlx_name, routing_key=service)
            self._queues.add(name)
            self._dlqs[service] = queue
        return queue

    async def declare(
        self,
        service: str,
        patterns: tuple[str, ...],
        *,
        version: int = 1,
        shared_keyless: bool = False,
    ) -> None:
        if self._channel is None:
            raise RuntimeError("start the bus before declaring")
        bindings = self._declared[service] = Bindings.of_patterns(
            patterns, version, shared_keyless=shared_keyless
        )
        await self._declare_shared(service, bindings)

    async def _declare_shared(
        self, service: str, bindings: Bindings
    ) -> list[tuple[str, str, int | None]]:
        """The service's durable queues and their bindings: (queue, lane, partition) each."""
        await self._declare_dlq(service)
        version = bindings.version
        shared_keyless = bindings.shared_keyless
        if shared_keyless:
            self._shared_keyless.add(service)
        plans: list[tuple[str, str, list[str], int | None]] = []
        for p in range(self.partitions):
            keys = [routing_key(t, version, p) for t in bindings.partition]
            plans.append((self._name(partition_queue(service, p)), PARTITION, keys, p))
        if bindings.critical:
            keys = [
                routing_key(t, version, p)
                for t in bindings.critical
                for p in range(self.partitions)
            ]
            if shared_keyless:
                keys += [routing_key(t, version, None) for t in bindings.critical]
            plans.append((self._name(critical_queue(service)), CRITICAL, keys, None))
        if shared_keyless and bindings.partition:
            keys = [routing_key(t, version, None) for t in bindings.partition]
            plans.append((self._name(broadcast_queue(service)), BROADCAST, keys, None))
        declared = []
        for name, lane, keys, partition in plans:
            await self._declare_bound(name, keys, service, shared=True)
            declared.append((name, lane, partition))
        return declared

    async def _declare_bound(
        self,
        name: str,
        keys: list[str],
        service: str,
        *,
        shared: bool,
        channel: AbstractChannel | None = None,
    ) -> AbstractQueue:
        """Declare the queue and bind it on ``channel`` (the main one by default), which
        declares and binds it again when it reopens."""
        channel = channel or self._channel
        assert channel is not None
        queue = await channel.declare_queue(
            name,
            durable=shared,
            auto_delete=not shared,
            arguments=self._queue_arguments(service, single_active=shared),
        )
        self._queues.add(name)
        for key in keys:
            await queue.bind(self.exchange_name, routing_key=key)
        return queue

    async def subscribe(self, subscription: Subscription) -> None:
        if self._channel is None:
            raise RuntimeError("start the bus before subscribing")
        await notify_assigned(subscription, self.partitions)
        service = subscription.service
        bindings = Bindings.of(subscription)
        check_declared(service, self._declared.get(service), bindings)
        version = bindings.version
        # each subscription is a replica, even several on one bus object
        self._replicas += 1
        replica = f"{self.replica_id}-{self._replicas}"
        wanted = subscription.partitions
        consumed: list[tuple[str, str, int | None]] = []
        for name, lane, partition in await self._declare_shared(service, bindings):
            # the critical lane and a shared broadcast lane are every partition's
            if partition is None or wanted is None or partition in wanted:
                consumed.append((name, lane, partition))
        own = []
        if bindings.partition and not bindings.shared_keyless:
            keys = [routing_key(t, version, None) for t in bindings.partition]
            own.append((self._name(broadcast_queue(service), replica), BROADCAST, keys))
        if bindings.critical and not bindings.shared_keyless:
            keys = [routing_key(t, version, None) for t in bindings.critical]
            own.append((self._name(critical_queue(service), replica), CRITICAL, keys))
        for name, lane, partition in consumed:
            await self._consume(name, lane, subscription, partition)
        for name, lane, keys in own:
            await self._consume(name, lane, subscription, own_keys=keys)

    async def consume_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        if not self._consuming:
            return
        held = {
            c.partition
            for c in self._consumers
            if c.subscription is subscription and c.partition is not None
        }
        wanted = sorted({p for p in partitions if 0 <= p < self.partitions} - held)
        service = subscription.service
        await asyncio.gather(
            *(
                self._consume(self._name(partition_queue(service, p)), PARTITION, subscription, p)
                for p in wanted
            )
        )

    async def release_partitions(
        self, subscription: Subscription, partitions: Iterable[int]
    ) -> None:
        released = set(partitions)
        mine = [
            c for c in self._consumers if c.subscription is subscription and c.partition in released
        ]
        await asyncio.gather(*(self._retire(c) for c in mine))

    async def _retire(self, consumer: _Consumer) -> None:
        """Stop a consumer, finish its message in flight, ack, close its channel."""
        if consumer in self._consumers:
            self._consumers.remove(consumer)
        await self._stop_consumer(consumer)
        await self._close_channel(consumer)

    async def _consume(
        self,
        name: str,
        lane: str,
        subscription: Subscription,
        partition: int | None = None,
        *,
        own_keys: list[str] | None = None,
    ) -> None:
        """Consume a queue; ``own_keys``: the replica's own queue, declared here bound to them."""
        connection = await self._connection_for(lane)
        consumer = _Consumer(
            queue_name=name,
            subscription=subscription,
            dispatcher=Dispatcher(
                service=subscription.service, lane=lane, event_log=self.event_log
            ),
            partition=partition,
        )
        consumer.channel = await connection.channel()
        # a smaller prefetch would never let the window fill
        prefetch = max(self.prefetch, subscription.window)
        await consumer.channel.set_qos(prefetch_count=prefetch)
        if own_keys is None:
            # passive: the queue exists; redeclaring with its arguments would be equivalent
            consumer.queue = await consumer.channel.get_queue(name, ensure=True)
        else:
            # the broker deletes it with the connection consuming it: declared and bound on
            # the consumer's channel, which declares and binds it again when it reopens (a
            # passive look for it would fail each reconnection of that connection)
            consumer.queue = await self._declare_bound(
                name, own_keys, subscription.service, shared=False, channel=consumer.channel
            )
        consumer.worker = asyncio.create_task(self._work(consumer), name=f"bus:{name}")
        await self._start_delivery(consumer)
        if isinstance(consumer.channel, AbstractRobustChannel):
            consumer.channel.reopen_callbacks.add(lambda _channel: self._resume_delivery(consumer))
        self._consumers.append(consumer)

    async def _connection_for(self, lane: str) -> AbstractRobustConnection:
        """The connection a lane's consumers take their channels on (see the module)."""
        if lane == CRITICAL:
            assert self._connection is not None
            return self._connection
        async with self._bulk_lock:
            connection = self._bulk_connection
            if connection is None or connection.is_closed:
                connection = self._bulk_connection = await self._connect("bulk")
            return connection

    async def _start_delivery(self, consumer: _Consumer) -> None:
        """basic.consume on the channel underneath.

        aio-pika wraps each delivery in an IncomingMessage and a task of its own, which
        costs a tenth of the client's CPU per message here; the worker needs only the
        body and the delivery tag. The price: restoring the consumer after a
        reconnection is ours (``_resume_delivery``), not RobustQueue's.
        """
        assert consumer.channel is not None
        channel = await consumer.channel.get_underlay_channel()
        self._watch(channel.connection)
        if consumer.cancels_watched is not channel:
            consumer.cancels_watched = channel

            def cancelled(frame: aiormq.spec.Basic.Cancel) -> None:
                if frame.consumer_tag == consumer.tag and not consumer.stopping:
                    consumer.reconsuming = asyncio.ensure_future(self._consume_again(consumer))

            channel.on_consumer_cancel_callbacks.add(cancelled)

            def lost(_: asyncio.Future) -> None:
                # what it delivered and no handler took is the broker's again, for the
                # queue's next consumer (another replica, maybe): never started here
                if consumer.consuming_on is channel:
                    consumer.buffer.clear()

            channel.closing.add_done_callback(lost)
        await self._basic_consume(consumer, channel)

    async def _basic_consume(
        self, consumer: _Consumer, channel: aiormq.abc.AbstractChannel
    ) -> None:
        async def on_delivery(message: DeliveredMessage) -> None:
            parts = batch_parts(message.body)
            if parts is None:
                headers = message.header.properties.headers
                if headers and MARK_HEADER in headers:
                    consumer.buffer.append(_Mark(message, consumer.handed_back))
                else:
                    consumer.buffer.append(message)
            else:
                batch = _Batch()
                last = len(parts) - 1
                consumer.buffer.extend(
                    _Part(message, body, batch, i == last) for i, body in enumerate(parts)
                )
            consumer.wakeup.set()

        ok = await channel.basic_consume(consumer.queue_name, on_delivery, no_ack=False)
        consumer.tag = ok.consumer_tag
        consumer.consuming_on = channel

    async def _consume_again(self, consumer: _Consumer) -> None:
        """Consume ``consumer``'s queue again once it is back, after the broker cancelled it.

        The broker cancels a consumer whose queue went away: a queue process that crashed
        and restarts from its durable contents (RabbitMQ 3.10's classic queues do, now and
        then, when a single-active consumer comes and goes), a failover, a deletion. The
        channel stays open: deliveries already taken are handled and acked as usual, and
        the queue delivers again what it did not see acked (consumers drop copies by seq).
        The queue's return is probed on a channel of its own, since a passive declare of
        a missing queue closes its channel.
        """
        log.warning("the broker cancelled the consumer of %s; consuming again once it is back",
                    consumer.queue_name)  # fmt: skip
        assert consumer.channel is not None
        connection = await self._connection_for(consumer.dispatcher.lane)
        pause = 0.05
        while not consumer.stopping:
            try:
                probe = await connection.channel()
                try:
                    await probe.get_queue(consumer.queue_name, ensure=True)
                finally:
                    if not probe.is_closed:
                        await probe.close()
                channel = await consumer.channel.get_underlay_channel()
                if channel is not consumer.cancels_watched:
                    return  # the channel was replaced meanwhile: its reopening consumed
                await self._basic_consume(consumer, channel)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                log.debug("the queue %s is not back yet: %r", consumer.queue_name, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            else:
                log.info("consumer of %s resumed after the broker cancelled it",
                         consumer.queue_name)  # fmt: skip
                return

    async def _resume_delivery(self, consumer: _Consumer) -> None:
        # deliveries of the lost channel are the broker's again; it redelivers them (the
        # acks of handlers still running on them go nowhere, and are logged)
        consumer.buffer.clear()
        consumer.unacked = None
        consumer.unacked_count = 0
        if consumer.stopping:
            return
        try:
            await self._start_delivery(consumer)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            log.exception("resuming the consumer of %s failed", consumer.queue_name)
        else:
            log.info("consumer of %s resumed after reconnecting", consumer.queue_name)

    async def catch_up(self, subscription: Subscription) -> None:
        if not subscription.shared_keyless:
            raise ValueError(
                f"{subscription.service} takes its keyless events on its replica's own "
                "queues, which held nothing before it subscribed: nothing to catch up with "
                "(Subscription.shared_keyless)"
            )
        if not any(c.subscription is subscription for c in self._consumers):
            raise ValueError(f"{subscription.service}: subscription is not subscribed")
        bindings = Bindings.of(subscription)
        service = subscription.service
        queues = [self._name(critical_queue(service))] if bindings.critical else []
        if bindings.partition:
            queues.append(self._name(broadcast_queue(service)))
        if not queues:
            return
        connection = self._connection
        if connection is None or connection.is_closed:
            raise RuntimeError("RabbitMQBus is not started")
        if not connection.connected.is_set():
            raise CatchUpInterrupted("the connection to RabbitMQ is lost (reconnecting)")
        try:
            robust = await connection.channel(publisher_confirms=True)
            channel = await robust.get_underlay_channel()
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise CatchUpInterrupted(f"no channel for a catch-up: {exc!r}") from exc
        loop = asyncio.get_running_loop()
        #: each mark put, by id: its queue (a queue may have several: see the re-marks)
        marks: dict[str, str] = {}
        unanswered = set(queues)
        all_answered = loop.create_future()

        async def answered(message: DeliveredMessage) -> None:
            queue = marks.get(_text((message.header.properties.headers or {}).get(MARK_HEADER)))
            if queue is not None:
                unanswered.discard(queue)
                if not unanswered and not all_answered.done():
                    all_answered.set_result(None)

        async def put_mark(queue: str) -> None:
            mark_id = uuid.uuid4().hex
            marks[mark_id] = queue
            properties = Properties(
                delivery_mode=PERSISTENT,
                message_id=mark_id,
                headers={MARK_HEADER: mark_id},
                reply_to=DIRECT_REPLY_TO,
            )
            confirmed = await channel.basic_publish(
                b"", exchange="", routing_key=queue, properties=properties
            )
            if not isinstance(confirmed, Basic.Ack):
                raise CatchUpInterrupted(f"the broker refused a catch-up's mark on {queue}")

        out = 0
        try:
            # the answers come only to the channel that put the marks, consuming them
            await channel.basic_consume(DIRECT_REPLY_TO, answered, no_ack=True)
            for queue in queues:
                await put_mark(queue)
                out += 1
                self._catching_up += 1
            while True:
                await asyncio.wait(
                    {all_answered, channel.closing},
                    timeout=self.catch_up_remark_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if all_answered.done():
                    break
                if channel.closing.done():
                    raise CatchUpInterrupted(
                        "the channel of a catch-up was lost before its marks were answered"
                    )
                # a consumer that does not know marks (an older version's, still holding
                # the queue) or a purge took it: another, behind all that came since, is
                # as exact
                for queue in sorted(unanswered):
                    log.warning("a catch-up's mark on %s is unanswered after %gs (still "
                                "behind what waited before it, or lost: taken by a consumer "
                                "that knows no marks, or purged): another goes to the end",
                                queue, self.catch_up_remark_s)  # fmt: skip
                    await put_mark(queue)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            if isinstance(exc, CatchUpInterrupted):
                raise
            raise CatchUpInterrupted(f"a catch-up failed: {exc!r}") from exc
        finally:
            self._catching_up -= out
            all_answered.cancel()
            if not robust.is_closed:
                with contextlib.suppress(
                    aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError
                ):
                    async with asyncio.timeout(CANCEL_WAIT_S):
                        await robust.close()

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop this replica's consumers of ``subscription``; unhandled messages go back."""
        mine = [c for c in self._consumers if c.subscription is subscription]
        await asyncio.gather(*(self._retire(c) for c in mine))

    # ---------------------------------------------------------------- consuming

    async def _work(self, consumer: _Consumer) -> None:
        buffer = consumer.buffer
        in_flight = consumer.in_flight
        window = consumer.subscription.window
        while True:
            consumer.wakeup.clear()
            if in_flight and in_flight[0].done:
                await self._settle(consumer)
            if consumer.stopping and not (buffer and _begun(buffer[0])):
                if not in_flight:
                    # the stop waiting for this may have given up: ack what was handled
                    await self._flush_ack(consumer)
                    return
            elif buffer and type(buffer[0]) is _Mark:
                if not in_flight:
                    # every message before it returned and is settled
                    await self._reach(consumer, buffer.popleft())
                    continue
            elif (
                buffer
                and consumer.running < window
                and not (consumer.running and buffer[0].redelivered)
            ):
                if (
                    window > 1
                    and consumer.subscription.batch_handler is not None
                    and not buffer[0].redelivered
                ):
                    # a redelivered message runs alone (see the delivery limit): not batched
                    batch = []
                    while buffer and len(batch) < window - consumer.running:
                        if (
                            type(buffer[0]) is _Mark
                            or buffer[0].redelivered
                            or (consumer.stopping and not _begun(buffer[0]))
                        ):
                            break
                        batch.append(_Delivery(buffer.popleft()))
                    in_flight.extend(batch)
                    consumer.running += len(batch)
                    task = asyncio.create_task(self._run_batch(consumer, batch))
                    consumer.tasks.add(task)
                    task.add_done_callback(consumer.tasks.discard)
                    continue
                delivery = _Delivery(buffer.popleft())
                in_flight.append(delivery)
                consumer.running += 1
                if window == 1 or delivery.message.redelivered:
                    # a redelivered message runs alone: see the delivery limit
                    await self._run(consumer, delivery)
                else:
                    # started in this order, each runs up to its first suspension in turn
                    task = asyncio.create_task(self._run(consumer, delivery))
                    consumer.tasks.add(task)
                    task.add_done_callback(consumer.tasks.discard)
                continue
            if consumer.unacked is not None and not consumer.wakeup.is_set():
                # one ack frame for a burst instead of one per message; one timer a
                # held ack, not a timeout around every wait for the next delivery
                remaining = consumer.unacked_since + ACK_LINGER_S - time.monotonic()
                if remaining <= 0:
                    await self._flush_ack(consumer)
                    continue
                if consumer.ack_timer is None:
                    loop = asyncio.get_running_loop()
                    consumer.ack_timer = loop.call_later(remaining, _ack_due, consumer)
            await consumer.wakeup.wait()

    async def _run(self, consumer: _Consumer, delivery: _Delivery) -> None:
        try:
            await self._handle(consumer, delivery.message)
        except asyncio.CancelledError:
            # not handled: it goes back to the queue, never acked
            delivery.cancelled = True
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # handler errors are caught by the dispatcher; a bus fault
            log.exception(
                "consumer of %s failed; the broker dead-letters the message",
                consumer.queue_name,
            )
            delivery.failed = True
        finally:
            delivery.done = True
            consumer.running -= 1
            consumer.wakeup.set()

    async def _run_batch(self, consumer: _Consumer, batch: list[_Delivery]) -> None:
        try:
            await self._handle_batch(consumer, [d.message for d in batch])
        except asyncio.CancelledError:
            for delivery in batch:
                delivery.cancelled = True
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:
            log.exception(
                "consumer of %s failed on a batch; the broker dead-letters its messages",
                consumer.queue_name,
            )
            for delivery in batch:
                delivery.failed = True
        finally:
            for delivery in batch:
                delivery.done = True
            consumer.running -= len(batch)
            consumer.wakeup.set()

    async def _settle(self, consumer: _Consumer) -> None:
        """Ack (or reject) the returned messages at the head of the window, in order."""
        in_flight = consumer.in_flight
        while in_flight and in_flight[0].done:
            delivery = in_flight.popleft()
            message = delivery.message
            if type(message) is _Part:
                message = await self._settle_part(consumer, delivery, message)
                if message is None:
                    continue
            elif delivery.failed or delivery.cancelled:
                # settle it before any ack covers it; a cumulative ack skips it afterwards
                await self._flush_ack(consumer)
                if delivery.failed:
                    await self._reject(consumer, message)
                else:
                    await self._hand_back(consumer, message)
                continue
            consumer.unacked = message
            consumer.unacked_count += 1
            if consumer.unacked_count == 1:
                consumer.unacked_since = time.monotonic()
        if (
            consumer.unacked_count >= self._ack_batch
            or time.monotonic() - consumer.unacked_since >= ACK_LINGER_S
        ):
            await self._flush_ack(consumer)

    async def _settle_part(
        self, consumer: _Consumer, delivery: _Delivery, part: _Part
    ) -> DeliveredMessage | None:
        """Settle one event of a batch; its message once it is due an ack, else None.

        The message is acked with its last event. An event handed back hands back the
        whole message (the events before it come again, at least once); one the bus
        failed on is dead-lettered alone, as the broker would a message of one.
        """
        batch = part.batch
        if batch.settled:
            return None
        message = part.message
        if delivery.failed and not await self._dead_letter_part(consumer, part):
            await self._flush_ack(consumer)
            await self._reject(consumer, message)
            self._drop_batch(consumer, batch)
            return None
        if delivery.cancelled:
            await self._flush_ack(consumer)
            await self._hand_back(consumer, message)
            self._drop_batch(consumer, batch)
            return None
        return message if part.last else None

    async def _dead_letter_part(self, consumer: _Consumer, part: _Part) -> bool:
        try:
            await self._to_dlq(
                consumer.subscription.service,
                part.body,
                "the bus failed on it (see the consumer's log)",
                consumer.dispatcher.lane,
                event_type=_type_of(part.routing_key),
                extra={"x-pumpflow-queue": consumer.queue_name},
            )
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("dead-lettering an event of %s lost: %r", consumer.queue_name, exc)
            return False
        return True

    @staticmethod
    def _drop_batch(consumer: _Consumer, batch: _Batch) -> None:
        """Forget the events of a message settled whole that no handler took yet."""
        batch.settled = True
        buffer = consumer.buffer
        if any(type(m) is _Part and m.batch is batch for m in buffer):
            kept = [m for m in buffer if not (type(m) is _Part and m.batch is batch)]
            buffer.clear()
            buffer.extend(kept)

    async def _flush_ack(self, consumer: _Consumer) -> None:
        message = consumer.unacked
        if message is None:
            return
        consumer.unacked = None
        consumer.unacked_count = 0
        if consumer.ack_timer is not None:
            consumer.ack_timer.cancel()
            consumer.ack_timer = None
        try:
            # not waiting for the socket's drain: the frame is queued in order on the
            # connection either way, and a lost one is redelivered and dropped by seq
            await message.channel.basic_ack(message.delivery_tag, multiple=True, wait=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # the channel went away: the broker redelivers, consumers dedupe by seq
            log.warning("ack on %s lost: %r", consumer.queue_name, exc)

    async def _hand_back(self, consumer: _Consumer, message: DeliveredMessage) -> None:
        """Return ``message`` to its queue unprocessed (its handler was cancelled)."""
        consumer.handed_back += 1
        try:
            await message.channel.basic_nack(message.delivery_tag, requeue=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # the channel went away: the broker redelivers the message anyway
            log.warning("returning a message to %s lost: %r", consumer.queue_name, exc)

    async def _reject(self, consumer: _Consumer, message: DeliveredMessage) -> None:
        """Hand ``message`` to the broker's dead-lettering (the queue's DLX, to the DLQ)."""
        try:
            await message.channel.basic_reject(message.delivery_tag, requeue=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # the channel went away: the broker redelivers the message instead
            log.warning("reject on %s lost: %r", consumer.queue_name, exc)
            return
        # one letter, however many events a batch's message holds
        record_dead_letter(
            consumer.subscription.service,
            _type_of(message.routing_key),
            consumer.dispatcher.lane,
        )

    async def _reach(self, consumer: _Consumer, mark: _Mark) -> None:
        """Answer a catch-up's mark ``consumer`` reached, every message before it settled,
        and ack it: the acks held back first, the answer before the mark's own, so a
        connection lost in between redelivers the mark, to be answered again."""
        message = mark.message
        await self._flush_ack(consumer)
        if consumer.handed_back != mark.handed_back:
            # a message before it went back to the queue, ahead of it: the mark follows
            await self._hand_back(consumer, message)
            return
        properties = message.header.properties
        mark_id = _text((properties.headers or {}).get(MARK_HEADER))
        try:
            if properties.reply_to:
                # to a channel gone (a replica that died catching up) the broker drops it
                await message.channel.basic_publish(
                    b"",
                    exchange="",
                    routing_key=properties.reply_to,
                    properties=Properties(headers={MARK_HEADER: mark_id}),
                )
            await message.channel.basic_ack(message.delivery_tag)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # the channel went away: the broker redelivers the mark, answered then
            log.warning("answering a catch-up's mark on %s lost: %r", consumer.queue_name, exc)
            return
        log.debug("%s: a catch-up's mark %s answered", consumer.queue_name, mark_id)

    async def _handle(self, consumer: _Consumer, message: DeliveredMessage | _Part) -> None:
        if not message.redelivered:
            await self._dispatch(consumer, message)
            return
        queue = consumer.queue_name
        message_id = _attempt_id(message)
        attempts = await self._count_attempt(consumer, message_id)
        if attempts > DELIVERY_LIMIT:
            reason = (
                f"delivery limit: started {attempts} times and never settled "
                "(its consumer died or stopped with it each time)"
            )
            log.error("%s: %s, dead-lettered", queue, reason)
            await self._to_dlq(
                consumer.subscription.service,
                message.body,
                reason,
                consumer.dispatcher.lane,
                event_type=_type_of(message.routing_key),
                extra={"x-pumpflow-queue": queue},
            )
        else:
            try:
                await self._dispatch(consumer, message)
            except HandedBack:
                # the lane stopped while it waited for a dependency: nothing died with it
                await self._forget_attempts(queue, message_id)
                raise
        # not reached when the handler was cancelled: that delivery ended unsettled
        await self._forget_attempts(queue, message_id)

    async def _count_attempt(self, consumer: _Consumer, message_id: str) -> int:
        """Count an attempt, waiting for the journal's store while it is away; raise
        :class:`HandedBack` if the lane stops meanwhile (nothing started, nothing died)."""
        queue = consumer.queue_name
        # one token for every try: a try whose reply was lost may have counted already
        token = uuid.uuid4().hex
        delay = JOURNAL_RETRY_INITIAL_S
        while True:
            try:
                return await self.journal.attempt(queue, message_id, token)
            except Exception as exc:  # the store is unwell; CancelledError passes
                log.warning("%s: counting a redelivery failed (%r); the message waits %.1f s",
                            queue, exc, delay)  # fmt: skip
                if await consumer.dispatcher.halted_within(delay):
                    raise HandedBack() from None
                delay = min(JOURNAL_RETRY_MAX_S, delay * 2)

    async def _forget_attempts(self, queue: str, message_id: str) -> None:
        try:
            await self.journal.settle(queue, message_id)
        except Exception as exc:
            # the message is handled; its count expires with its TTL
            log.warning("%s: forgetting a settled redelivery failed (%r)", queue, exc)

    async def _dispatch(self, consumer: _Consumer, message: DeliveredMessage) -> None:
        event = await self._decode(consumer, message)
        if event is None:
            return
        reason = await consumer.dispatcher.dispatch(event, consumer.subscription)
        if reason is not None:
            await self._handler_dead_letter(consumer, message.body, event, reason)

    async def _handle_batch(self, consumer: _Consumer, messages: list[DeliveredMessage]) -> None:
        bodies: dict[str, bytes] = {}
        events = []
        for message in messages:
            event = await self._decode(consumer, message)
            if event is not None:
                events.append(event)
                bodies[event.id] = message.body
        if not events:
            return
        for event, reason in await consumer.dispatcher.dispatch_batch(
            events, consumer.subscription
        ):
            await self._handler_dead_letter(consumer, bodies[event.id], event, reason)

    async def _decode(self, consumer: _Consumer, message: DeliveredMessage) -> Event | None:
        """The message's event; None when malformed (then it is dead-lettered here)."""
        try:
            return decode_event(message.body)
        except EventValidationError as exc:
            event_type = _type_of(message.routing_key)
            reason = consumer.dispatcher.malformed(exc, event_type)
            await self._to_dlq(
                consumer.subscription.service,
                message.body,
                reason,
                consumer.dispatcher.lane,
                event_type=event_type,
                extra={"x-pumpflow-queue": consumer.queue_name},
            )
            return None

    async def _handler_dead_letter(
        self, consumer: _Consumer, body: bytes, event: Event, reason: str
    ) -> None:
        await self._to_dlq(
            consumer.subscription.service,
            body,
            reason,
            consumer.dispatcher.lane,
            event_type=event.type,
            key=event.key,
            extra={
                "x-pumpflow-queue": consumer.queue_name,
                "x-pumpflow-lane": consumer.dispatcher.lane,
            },
        )

    # ---------------------------------------------------------------- dead letters

    async def _to_dlq(
        self,
        service: str,
        body: bytes,
        reason: str,
        lane: str,
        *,
        event_type: str | None = None,
        key: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Store a letter in ``service``'s DLQ; count it once the broker confirmed it
        (``lane``: where it came from, or INPUT), since one it did not take is
        dead-lettered again (rejected, or its message redelivered)."""
        await self._store_letter(service, body, reason, event_type=event_type, key=key, extra=extra)
        record_dead_letter(service, event_type, lane)

    async def _store_letter(
        self,
        service: str,
        body: bytes,
        reason: str,
        *,
        event_type: str | None = None,
        key: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """Publish a letter to ``service``'s DLQ, confirmed, without counting it."""
        await self._declare_dlq(service)
        # the reason, type and key given win over headers a letter carried before; the
        # broker's x-death does not pass, or a reader would take this letter for a batch
        # the broker dead-lettered whole
        headers = {k: v for k, v in (extra or {}).items() if k != DEATH_HEADER}
        headers[REASON_HEADER] = reason[:_MAX_REASON]
        if event_type is not None:
            headers["x-pumpflow-type"] = event_type
        if key is not None:
            headers["x-pumpflow-key"] = key
        properties = Properties(delivery_mode=PERSISTENT, headers=headers)
        await self._publish_to(self.dlx_name, body, service, properties)

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
        await self._to_dlq(
            service,
            body,
            reason,
            INPUT,
            event_type=event_type,
            key=key,
            extra=dict(headers or {}),
        )

    async def keeps_dead_letters_of(self, service: str) -> bool:
        if service in self._dlqs:
            return True
        if self._connection is None:
            raise RuntimeError("RabbitMQBus is not started")
        # a channel of its own: a passive declare of a missing queue closes it
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(self.dlq_name(service), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    async def dead_letters(
        self, service: str, limit: int = 100, *, remove: bool = True
    ) -> list[DeadLetter]:
        queue = await self._declare_dlq(service)
        letters: list[DeadLetter] = []
        held = []
        spare = None
        complete = False
        try:
            while len(letters) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                read = _letters(service, message)
                if letters and len(letters) + len(read) > limit:
                    # a message's letters go together: this one waits for the next read
                    spare = message
                    break
                held.append(message)
                letters.extend(read)
            complete = True
        finally:
            # a peek hands every message back; so does a read that failed half way,
            # since the caller never received what was read
            returned = 0
            for message in held:
                if not (remove and complete):
                    await message.nack(requeue=True)
                    returned += 1
                else:
                    await message.ack()
            if spare is not None:
                await spare.nack(requeue=True)
                returned += 1
            await self._until_requeued(service, returned)
        return letters

    async def _until_requeued(self, service: str, count: int) -> None:
        """Wait (briefly) until the DLQ counts ``count`` messages handed back.

        The broker requeues a nacked message after answering whatever comes next, so a
        read right after a peek could miss the letters the peek handed back.
        """
        if not count or self._channel is None:
            return
        deadline = time.monotonic() + REQUEUE_WAIT_S
        while time.monotonic() < deadline:
            declared = await self._channel.declare_queue(self.dlq_name(service), durable=True)
            if (declared.declaration_result.message_count or 0) >= count:
                return
            await asyncio.sleep(0.01)

    async def take_dead_letters(
        self, service: str, take: Callable[[DeadLetter], Awaitable[bool]]
    ) -> int:
        await self._declare_dlq(service)
        assert self._channel is not None
        # the count now: a letter refused again on the way lands behind them
        declared = await self._channel.declare_queue(self.dlq_name(service), durable=True)
        present = declared.declaration_result.message_count or 0
        kept = []
        read = offered = 0
        try:
            while read < present:
                message = await declared.get(no_ack=False, fail=False)
                if message is None:
                    break
                read += 1
                kept.append(message)
                letters = _letters(service, message)
                left = []
                for letter in letters:
                    offered += 1
                    if not await take(letter):
                        left.append(letter)
                if len(left) == len(letters):
                    continue
                # the events of a batch not taken stay dead, each a letter of its own
                # behind those offered (they were dead-lettered once: not counted again)
                for letter in left:
                    await self._store_letter(
                        service,
                        letter.body,
                        letter.reason,
                        event_type=letter.event_type,
                        key=letter.key,
                        extra=letter.headers,
                    )
                kept.pop()
                await message.ack()
        finally:
            # held unacked until here, so the broker puts them back in their place
            for message in kept:
                await message.nack(requeue=True)
            await self._until_requeued(service, len(kept))
        return offered

    def shares_keyless(self, service: str) -> bool:
        return service in self._shared_keyless

    async def redeliver(self, service: str, event: Event) -> None:
        self.check_redeliverable(service, event)
        lane, partition = redelivery_lane(event, self.partitions)
        if partition is not None:
            queue = partition_queue(service, partition)
        elif lane == BROADCAST:
            queue = broadcast_queue(service)
        else:
            queue = critical_queue(service)
        name = self._name(queue)
        if name not in self._queues:
            # as the service declares it, so a service not running yet finds it there
            assert self._channel is not None
            await self._channel.declare_queue(
                name, durable=True, arguments=self._queue_arguments(service, single_active=True)
            )
            self._queues.add(name)
        properties = Properties(delivery_mode=PERSISTENT, message_id=event.id)
        # the default exchange routes by queue name: no other service gets a copy
        await self._publish_to("", encode_event(event), name, properties)


def _line(lane: str, key: str) -> str | None:
    """The line a publication keeps its order on: its lane's partition (``<lane>.pNN``),
    a key's events all on one; None for a keyless event, which has no order to keep."""
    if lane == BROADCAST:
        return None
    partition = key[key.rfind(".") + 1 :]
    return partition if lane == PARTITION else f"{lane}.{partition}"


def _begun(message: DeliveredMessage | _Part) -> bool:
    """An event of a batch whose first events were taken already."""
    return type(message) is _Part and message.batch.begun


def _attempt_id(message: DeliveredMessage | _Part) -> str:
    """What the delivery limit counts a message's starts by: its id; an event of a batch
    by its body (the batch's id, which the client makes up, is its batch-mates' too)."""
    if type(message) is _Part:
        return hashlib.sha1(message.body).hexdigest()
    return message.header.properties.message_id or hashlib.sha1(message.body).hexdigest()


def _ack_due(consumer: _Consumer) -> None:
    consumer.ack_timer = None
    consumer.wakeup.set()


def _letters(service: str, message: AbstractIncomingMessage) -> list[DeadLetter]:
    """The letters of a DLQ message: one, or one per event of a batch the broker
    dead-lettered whole."""
    headers = {str(k): _text(v) for k, v in (message.headers or {}).items()}
    return letter_events(
        DeadLetter(
            service=service,
            reason=headers.get(REASON_HEADER) or _broker_reason(message),
            body=message.body,
            event_type=headers.get("x-pumpflow-type") or _type_of(message.routing_key),
            key=headers.get("x-pumpflow-key"),
            headers=headers,
        )
    )


async def _discard(queue: asyncio.Queue) -> None:
    """Empty a lost connection's frame buffer until no writer has put anything for a while."""
    while True:
        try:
            async with asyncio.timeout(DISCARD_IDLE_S):
                await queue.get()
        except TimeoutError:
            return


def _type_of(routing: str | None) -> str | None:
    """Event type of a routing key ``<type>.v<major>.<suffix>``."""
    if not routing:
        return None
    parts = routing.rsplit(".", 2)
    return parts[0] if len(parts) == 3 else None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _broker_reason(message: AbstractIncomingMessage) -> str:
    """Reason of a message the broker dead-lettered itself (x-death)."""
    deaths = (message.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]
        return f"broker: {_text(death.get('reason'))} from {_text(death.get('queue'))}"
    return "unknown"
