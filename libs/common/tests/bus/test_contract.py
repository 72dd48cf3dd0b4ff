"""The delivery contract of bus/abc.py, held against both transports.

Every test runs on the in-memory bus and on the real RabbitMQ broker (a unique
namespace each, deleted afterwards). Memory-only behaviour (synchronous mode) is at
the end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY, generate_latest

from pumpflow.common.bus import BusConfig, InMemoryBus, Subscription, create_bus, partition_of
from pumpflow.common.bus.abc import DELIVERY_LIMIT, NotRedeliverable
from pumpflow.common.bus.redrive import redrive
from pumpflow.common.dependencies import RABBITMQ as RABBITMQ_DEPENDENCY
from pumpflow.common.dependencies import WAITS, wait_out
from pumpflow.common.events import (
    Event,
    EventValidationError,
    ExitOrder,
    FeaturesUpdated,
    ModelDrift,
    SystemShutdown,
    TokenTrade,
    decode_event,
    encode_event,
    make_event,
)
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import RABBITMQ, BusHarness, eventually


def trade(mint: str, n: int = 0) -> TokenTrade:
    return TokenTrade(
        signature=f"sig-{mint}-{n}",
        mint=mint,
        traderPublicKey="trader",
        txType="buy",
        tokenAmount=1000 + n,
        newTokenBalance=1000 + n,
        bondingCurveKey="curve",
        vTokensInBondingCurve=1_000_000_000,
        vSolInBondingCurve=30,
        marketCapSol=30,
        solAmount=0.5,
    )


def trade_event(mint: str, seq: int, *, source: str = "feed/r1") -> Event:
    return make_event(trade(mint, seq), source=source, time=time.time(), seq=seq)


def features_event(mint: str, seq: int = 1) -> Event:
    payload = FeaturesUpdated(
        mint=mint, feature_set_version="fs1", source_seq=seq, names=("a",), values=(1.0,)
    )
    return make_event(payload, source="features/r1", time=time.time(), seq=seq)


def drift_event(feature: str) -> Event:
    """A keyless ordinary event: it goes to each replica's broadcast lane."""
    payload = ModelDrift(model_id="m1", version="1", feature=feature, state="drifting",
                         psi=0.5, threshold=0.2, observations=100)  # fmt: skip
    return make_event(payload, source="model/r1", time=time.time())


def shutdown_event() -> Event:
    return make_event(SystemShutdown(reason="test"), source="ops/r1", time=time.time())


def exit_order_event(mint: str, seq: int = 1) -> Event:
    payload = ExitOrder(order_id=f"o-{mint}", mint=mint, position_id="p1", token_amount=10.0)
    return make_event(payload, source="exit/r1", time=time.time(), seq=seq)


async def dead_letters_arriving(bus, service: str, within: float = 5.0) -> list:
    """Take a service's dead letters once the first ones have arrived (RabbitMQ routes
    them asynchronously); fail when none arrive in time."""
    return await eventually(
        lambda: bus.dead_letters(service),
        within=within,
        interval=0.02,
        what=f"a dead letter for {service}",
    )


def metric(name: str, service: str, event_type: str, lane: str) -> float:
    value = REGISTRY.get_sample_value(name, {"service": service, "type": event_type, "lane": lane})
    return value or 0.0


async def dead_lettered_once(service: str, event_type: str, lane: str) -> None:
    """Wait until one dead letter of the series is counted, and no more: RabbitMQ counts
    a letter once its publish is confirmed, which may come after the letter is read."""

    def dead() -> float:
        return metric("pumpflow_events_dead_lettered_total", service, event_type, lane)

    await eventually(lambda: dead() >= 1, within=5, what=f"a dead letter of {service} counted")
    assert dead() == 1


class Recorder:
    """A handler that records what it got (and can be slowed down or made to fail)."""

    def __init__(self, delay: float = 0.0, fail: Callable[[Event], bool] | None = None):
        self.events: list[Event] = []
        self.attempts: Counter[str] = Counter()
        self.delay = delay
        self.fail = fail

    async def __call__(self, event: Event) -> None:
        self.attempts[event.id] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None and self.fail(event):
            raise RuntimeError(f"cannot handle seq {event.seq}")
        self.events.append(event)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.events]

    def of_type(self, event_type: str) -> list[Event]:
        return [e for e in self.events if e.type == event_type]


# ------------------------------------------------------------------------ contract


async def test_publish_and_consume(bus, service):
    got = Recorder()
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    sent = [trade_event(f"mint{i % 3}", i // 3 + 1) for i in range(9)]
    for event in sent:
        await bus.publish(event)
    await eventually(lambda: len(got.events) == len(sent))
    by_id = {e.id: e for e in got.events}
    assert set(by_id) == {e.id for e in sent}
    for event in sent:
        assert by_id[event.id] == event
        assert isinstance(by_id[event.id].data, TokenTrade)
    assert metric("pumpflow_events_consumed_total", service, "token.trade", "partition") == 9


async def test_routing_by_pattern(bus, service):
    tokens, features = Recorder(), Recorder()
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=tokens))
    await bus.subscribe(
        Subscription(service=f"{service}_f", patterns=("features.updated",), handler=features)
    )
    await bus.publish(features_event("mintA"))
    await bus.publish(trade_event("mintA", 1))
    await eventually(lambda: len(tokens.events) == 1 and len(features.events) == 1)
    # the features event reached its subscriber first, so it would have reached us too
    await bus.drain(timeout=2)
    assert [e.type for e in tokens.events] == ["token.trade"]
    assert [e.type for e in features.events] == ["features.updated"]


async def test_order_per_key_under_concurrency(bus, service):
    async def jittery(event: Event) -> None:
        if random.random() < 0.2:
            await asyncio.sleep(0)
        got.append(event)

    got: list[Event] = []
    await bus.subscribe(Subscription(service=service, patterns=("token.trade",), handler=jittery))
    keys, per_key = [f"mint{i}" for i in range(12)], 25

    async def publish_key(key: str) -> None:
        for seq in range(1, per_key + 1):
            await bus.publish(trade_event(key, seq))

    await asyncio.gather(*(publish_key(k) for k in keys))
    await eventually(lambda: len(got) == len(keys) * per_key, within=20)
    for key in keys:
        assert [e.seq for e in got if e.key == key] == list(range(1, per_key + 1))


@pytest.mark.parametrize("window", [1, 4])
async def test_poison_message_is_dead_lettered_and_the_stream_goes_on(bus, service, window):
    got = Recorder(fail=lambda e: e.key == "mintP" and e.seq == 3)
    await bus.subscribe(
        Subscription(
            service=service, patterns=("token.*",), handler=got, max_attempts=2, window=window
        )
    )
    sent = [trade_event("mintP", seq) for seq in range(1, 7)]
    for event in sent:
        await bus.publish(event)
    await eventually(lambda: len(got.events) == 5)
    assert [e.seq for e in got.events] == [1, 2, 4, 5, 6]
    letters = await dead_letters_arriving(bus, service)
    assert got.attempts[sent[2].id] == 2
    assert len(letters) == 1
    letter = letters[0]
    assert "RuntimeError: cannot handle seq 3" in letter.reason
    assert "2 times" in letter.reason
    assert letter.event_type == "token.trade"
    assert letter.key == "mintP"
    assert decode_event(letter.body).id == sent[2].id
    await dead_lettered_once(service, "token.trade", "partition")
    assert await bus.dead_letters(service) == []  # read means removed


@pytest.mark.parametrize("window", [1, 4])
async def test_a_handler_cancelled_unfinished_gets_its_event_again_unacked(bus, service, window):
    """A handler whose work is cancelled (its worker died) did not handle the event."""
    handled: list[int] = []
    cancelled: list[int] = []

    def handler(event: Event):
        done = asyncio.get_running_loop().create_future()
        if event.seq == 2 and not cancelled:
            cancelled.append(event.seq)
            done.cancel()
        else:
            handled.append(event.seq)
            done.set_result(None)
        return done

    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=handler, window=window)
    )
    await bus.publish_many([trade_event("mintC", seq) for seq in range(1, 5)])
    # a message may carry several events (RabbitMQ's batches): those handled before the
    # cancelled one come again with it (at least once, dropped by seq downstream)
    await eventually(lambda: sorted(set(handled)) == [1, 2, 3, 4])
    assert cancelled == [2]
    assert await bus.dead_letters(service) == []


class BatchRecorder:
    """A batch handler recording each call into a Recorder's events (failing like it)."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.calls: list[list[int]] = []

    async def __call__(self, events) -> None:
        fail = self.recorder.fail
        if fail is not None and any(fail(e) for e in events):
            raise RuntimeError("a batch with a bad event")
        self.calls.append([e.seq for e in events])
        self.recorder.events.extend(events)


async def test_a_batch_handler_gets_the_ready_deliveries_in_order(harness, service):
    bus = await harness.bus()
    got = Recorder()
    batches = BatchRecorder(got)

    def subscription() -> Subscription:
        return Subscription(
            service=service, patterns=("token.*",), handler=got, batch_handler=batches, window=8
        )

    first = subscription()
    await bus.subscribe(first)
    await bus.unsubscribe(first)  # the queues stay: a backlog builds up
    sent = [trade_event("mintB", seq) for seq in range(1, 21)]
    await bus.publish_many(sent)
    await bus.subscribe(subscription())
    await eventually(lambda: len(got.events) == len(sent))
    assert [e.seq for e in got.events] == list(range(1, 21))
    assert got.attempts == Counter()  # nothing went one by one
    assert all(0 < len(call) <= 8 for call in batches.calls)
    if harness.transport == "memory":
        # a lane hands over all it has, up to the window
        assert batches.calls[:2] == [list(range(1, 9)), list(range(9, 17))]
    assert metric("pumpflow_events_consumed_total", service, "token.trade", "partition") == 20


async def test_a_failing_batch_is_handled_event_by_event(bus, service):
    """One bad event of a batch is dead-lettered alone; the others are handled once."""
    got = Recorder(fail=lambda e: e.seq == 3)
    await bus.subscribe(
        Subscription(
            service=service,
            patterns=("token.*",),
            handler=got,
            batch_handler=BatchRecorder(got),
            window=8,
            max_attempts=2,
        )
    )
    sent = [trade_event("mintF", seq) for seq in range(1, 7)]
    await bus.publish_many(sent)
    await eventually(lambda: len(got.events) == 5)
    # handlers of a window overlap: a later batch may finish while 3 is retried
    assert sorted(e.seq for e in got.events) == [1, 2, 4, 5, 6]
    letters = await dead_letters_arriving(bus, service)
    assert [decode_event(letter.body).id for letter in letters] == [sent[2].id]
    assert "2 times" in letters[0].reason
    assert got.attempts[sent[2].id] == 2


async def test_events_dead_lettered_in_one_message_are_listed_and_redriven_one_by_one(
    harness, service
):
    """Events published together reach the dead letters as a letter each, in order, with
    the reason, and a redrive puts each back. On RabbitMQ they share a message, which
    the broker dead-letters whole when the bus cannot store an event's letter itself."""
    bus = await harness.bus()
    if harness.transport == "rabbitmq":

        async def dlq_down(*args, **kwargs):
            raise ConnectionError("DLQ publish failed")

        bus._to_dlq = dlq_down
    fixed = False
    got = Recorder(fail=lambda e: not fixed)
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=got, max_attempts=1)
    )
    sent = [trade_event("mintD", seq) for seq in range(1, 6)]
    await bus.publish_many(sent)

    async def every_event_dead() -> list | None:
        letters = await bus.dead_letters(service, remove=False)
        return letters if len(letters) == len(sent) else None

    letters = await eventually(
        every_event_dead, within=5, interval=0.02, what="a dead letter for each event"
    )
    assert [decode_event(d.body).id for d in letters] == [e.id for e in sent]
    assert {(d.event_type, d.key) for d in letters} == {("token.trade", "mintD")}
    if harness.transport == "rabbitmq":
        assert all(d.reason.startswith("broker: rejected") for d in letters)
    else:
        assert all("cannot handle seq" in d.reason for d in letters)
    fixed = True
    count = await redrive(bus, service)
    assert (count.redriven, count.not_events) == (len(sent), 0)
    await eventually(lambda: len(got.events) == len(sent))
    assert [e.id for e in got.events] == [e.id for e in sent]
    assert all(e.redriven for e in got.events)
    assert await bus.dead_letters(service) == []


async def test_input_dead_lettered_as_a_json_array_of_events_stays_one_letter(bus, service):
    """Only a message the broker dead-lettered from a queue is read as a batch: raw input
    (a frame that happens to be an array of envelopes) is kept as given."""
    frame = b"[" + b",".join(encode_event(trade_event("mintJ", seq)) for seq in (1, 2)) + b"]"
    await bus.dead_letter(frame, service=service, reason="bad frame")
    letters = await dead_letters_arriving(bus, service)
    assert [(d.body, d.reason) for d in letters] == [(frame, "bad frame")]


async def test_dead_letter_of_bad_input_is_kept_with_its_reason(bus, service):
    await bus.dead_letter(b"{not json", service=service, reason="bad frame", event_type="raw")
    letters = await dead_letters_arriving(bus, service)
    assert [(d.body, d.reason, d.event_type) for d in letters] == [
        (b"{not json", "bad frame", "raw")
    ]


async def test_dead_letters_can_be_peeked_without_removing_them(bus, service):
    for n in range(3):
        await bus.dead_letter(f"frame {n}".encode(), service=service, reason=f"bad {n}")

    async def two_peeked() -> list | None:
        peeked = await bus.dead_letters(service, limit=2, remove=False)
        return peeked if len(peeked) == 2 else None

    peeked = await eventually(two_peeked, within=5, interval=0.02, what="two dead letters")
    assert [d.body for d in peeked] == [b"frame 0", b"frame 1"]
    # a peek leaves them where they were: the next read gets them again, in order
    assert [d.reason for d in await bus.dead_letters(service, limit=2, remove=False)] == [
        "bad 0",
        "bad 1",
    ]
    taken = await bus.dead_letters(service, limit=10)
    assert [d.body for d in taken] == [b"frame 0", b"frame 1", b"frame 2"]
    assert await bus.dead_letters(service, remove=False) == []


async def test_publishing_a_wrong_payload_is_refused(bus, service):
    wrong = make_event(trade("mintW"), source="feed/r1", time=time.time(), seq=1)
    wrong = Event(
        **{**{f: getattr(wrong, f) for f in wrong.__struct_fields__}, "type": "token.created"}
    )
    with pytest.raises(EventValidationError):
        await bus.publish(wrong)
    unknown = Event(id="x", type="no.such", version=1, source="t/1", time=0.0, data=trade("m"))
    with pytest.raises(EventValidationError):
        await bus.publish(unknown)


async def test_every_copy_is_delivered_the_consumer_drops_duplicates(bus, service):
    got = Recorder()
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    first = trade_event("mintD", 1)
    await bus.publish(first)
    await bus.publish(first)  # a publisher retry after a lost confirm
    await bus.publish(trade_event("mintD", 1))  # another id, same seq
    await bus.publish(trade_event("mintD", 2))
    await eventually(lambda: len(got.events) == 4)
    assert [e.seq for e in got.events] == [1, 1, 1, 2]
    assert got.ids[:2] == [first.id, first.id]


@pytest.mark.parametrize("shared_keyless", [False, True])
async def test_critical_lane_overtakes_a_backlog(bus, service, shared_keyless):
    """Keyless critical events too, on the replica's own critical queue or the group's."""
    got = Recorder()

    async def handler(event: Event) -> None:
        if event.type == "token.trade":
            await asyncio.sleep(0.02)  # a slow consumer with a long backlog
        await got(event)

    await bus.subscribe(
        Subscription(
            service=service,
            patterns=("token.trade", "system.*", "exit.*"),
            handler=handler,
            shared_keyless=shared_keyless,
        )
    )
    backlog = 60
    await bus.publish_many(trade_event("mintC", seq) for seq in range(1, backlog + 1))
    await bus.publish(shutdown_event())
    await bus.publish(exit_order_event("mintC"))
    await eventually(
        lambda: got.of_type("system.shutdown") and got.of_type("exit.order"), within=10
    )
    # both critical events were handled while most of the backlog was still waiting
    assert len(got.of_type("token.trade")) < backlog // 2
    await eventually(lambda: len(got.of_type("token.trade")) == backlog, within=20)
    assert [e.seq for e in got.of_type("token.trade")] == list(range(1, backlog + 1))


@pytest.mark.parametrize("window", [1, 8])
async def test_a_consumer_restarted_mid_stream_loses_nothing(harness, service, window):
    publisher = await harness.bus()
    consumer = await harness.bus()
    got = Recorder(delay=0.002 * window)  # the same pace whatever the window
    old = Subscription(service=service, patterns=("token.*",), handler=got, window=window)
    await consumer.subscribe(old)
    sent = [trade_event(f"mint{i % 5}", i // 5 + 1) for i in range(300)]
    # half before the restart, half after: however fast the consumer, the restart
    # comes before the end of the stream
    await publisher.publish_many(sent[:150])
    await eventually(lambda: len(got.events) >= 30)
    new = Subscription(service=service, patterns=("token.*",), handler=got, window=window)
    await harness.restart_consumer(consumer, old, new)
    await publisher.publish_many(sent[150:])
    await eventually(lambda: {e.id for e in got.events} >= {e.id for e in sent}, within=30)
    # at least once: anything handled twice was in flight during the restart
    assert set(got.ids) == {e.id for e in sent}
    for key in {e.key for e in sent}:
        seqs = [e.seq for e in got.events if e.key == key]
        assert sorted(set(seqs)) == list(range(1, 61))


async def test_a_declared_group_gets_what_was_published_before_it_subscribed(harness, service):
    publisher = await harness.bus()
    consumer = await harness.bus()
    await publisher.declare(service, ("token.*",))
    sent = [trade_event(f"mint{i % 4}", i // 4 + 1) for i in range(40)]
    await publisher.publish_many(sent)
    got = Recorder()
    await consumer.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    await eventually(lambda: len(got.events) >= len(sent))
    assert sorted(got.ids) == sorted(e.id for e in sent)
    for key in {e.key for e in sent}:
        assert [e.seq for e in got.events if e.key == key] == list(range(1, 11))


async def test_an_undeclared_group_misses_what_was_published_before_it_subscribed(harness, service):
    # the loss that declaring prevents: nothing holds what no queue was bound for
    publisher = await harness.bus()
    consumer = await harness.bus()
    await publisher.publish(trade_event("early", 1))
    got = Recorder()
    await consumer.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    await publisher.publish(trade_event("early", 2))
    await eventually(lambda: len(got.events) == 1)
    await publisher.publish(trade_event("early", 3))
    await eventually(lambda: len(got.events) == 2)
    assert [e.seq for e in got.events] == [2, 3]


async def test_subscribing_to_less_than_the_group_declares_is_refused(bus, service):
    await bus.declare(service, ("token.*",))
    narrow = Subscription(service=service, patterns=("token.trade",), handler=Recorder())
    with pytest.raises(ValueError, match=r"token\.created"):
        await bus.subscribe(narrow)
    wider = Subscription(service=service, patterns=("token.*", "features.*"), handler=Recorder())
    await bus.subscribe(wider)


async def test_broadcast_reaches_every_replica(harness, service):
    bus = await harness.bus()
    replicas = [Recorder(), Recorder(), Recorder()]
    for got in replicas:
        await bus.subscribe(
            Subscription(
                service=service, patterns=("system.shutdown", "feed.subscription"), handler=got
            )
        )
    shutdown = shutdown_event()
    await bus.publish(shutdown)
    await eventually(lambda: all(len(r.events) == 1 for r in replicas))
    assert all(r.ids == [shutdown.id] for r in replicas)


#: a group that takes its keyless events on shared queues: ordinary (model.drift) and
#: critical (system.shutdown) ones, besides keyed ones
SHARED = ("token.*", "model.drift", "system.shutdown")


def shared(service: str, handler) -> Subscription:
    return Subscription(service=service, patterns=SHARED, handler=handler, shared_keyless=True)


async def test_a_shared_keyless_group_gets_what_was_published_while_no_replica_consumed(
    harness, service
):
    """Keyless events wait in a shared-keyless group's queues while none of its replicas
    consumes (declared with the group, or left by the replica before): the next replica
    gets them, each lane in publish order."""
    publisher = await harness.bus()
    consumer = await harness.bus()
    await publisher.declare(service, SHARED, shared_keyless=True)
    early = [drift_event(f"f{i}") for i in range(5)]
    stops = [shutdown_event(), shutdown_event()]
    for event in (early[0], stops[0], *early[1:], stops[1]):
        await publisher.publish(event)
    first = Recorder()
    subscription = shared(service, first)
    await consumer.subscribe(subscription)
    await eventually(lambda: len(first.events) == 7, what="what waited for the group")
    assert first.of_type("model.drift") == early
    assert [e.id for e in first.of_type("system.shutdown")] == [e.id for e in stops]

    await eventually(lambda: harness.no_ack_held_back(consumer), what="the acks sent")
    await consumer.unsubscribe(subscription)
    late = [drift_event("g0"), shutdown_event(), drift_event("g1")]
    for event in late:
        await publisher.publish(event)
    second = Recorder()
    await consumer.subscribe(shared(service, second))
    await eventually(lambda: len(second.events) == 3, what="what waited for the next replica")
    assert sorted(second.ids) == sorted(e.id for e in late)
    assert [e.data.feature for e in second.of_type("model.drift")] == ["g0", "g1"]
    assert len(first.events) == 7


async def test_a_shared_keyless_event_goes_to_one_replica(harness, service):
    """With several replicas subscribed, each keyless event of a shared-keyless group
    reaches one of them (the one consuming the shared queue), not each."""
    bus = await harness.bus()
    replicas = [Recorder(), Recorder()]
    for got in replicas:
        other = await harness.bus()
        await other.subscribe(shared(service, got))
    sent = [drift_event("f1"), shutdown_event(), drift_event("f2"), shutdown_event()]
    for event in sent:
        await bus.publish(event)
    await eventually(lambda: sum(len(r.events) for r in replicas) >= len(sent))
    for other in harness.buses:
        await other.drain(timeout=2)
    assert sorted(replicas[0].ids + replicas[1].ids) == sorted(e.id for e in sent)


async def test_a_group_declared_shared_keyless_refuses_a_subscription_that_is_not(bus, service):
    """The group's keyless events are in its shared queues, or on each replica's own:
    a replica subscribing the other way would miss them or get them twice."""
    await bus.declare(service, SHARED, shared_keyless=True)
    with pytest.raises(ValueError, match="shared"):
        await bus.subscribe(Subscription(service=service, patterns=SHARED, handler=Recorder()))
    await bus.subscribe(shared(service, Recorder()))
    await bus.declare(f"{service}_own", SHARED)
    with pytest.raises(ValueError, match="shared"):
        await bus.subscribe(shared(f"{service}_own", Recorder()))


async def test_a_keyless_letter_of_a_shared_keyless_group_is_redriven_to_the_replica_consuming(
    harness, service
):
    """A keyless event a shared-keyless group dead-lettered goes back to its group's
    shared queue of its lane (the critical one for system.shutdown, the broadcast one for
    model.drift), redriven by a process that only declared the group: the replica
    consuming that queue gets it once, marked redriven, and the letter leaves."""
    fixed = False
    replicas = [Recorder(fail=lambda e: e.key is None and not fixed) for _ in range(2)]
    for got in replicas:
        consumer = await harness.bus()
        await consumer.subscribe(
            Subscription(
                service=service, patterns=SHARED, handler=got, shared_keyless=True, max_attempts=1
            )
        )
    publisher = await harness.bus()
    sent = [shutdown_event(), drift_event("f1")]
    for event in sent:
        await publisher.publish(event)

    async def both_dead() -> list | None:
        letters = await publisher.dead_letters(service, remove=False)
        return letters if len(letters) == len(sent) else None

    letters = await eventually(both_dead, within=5, interval=0.02, what="both letters")
    assert sorted(d.event_type for d in letters) == ["model.drift", "system.shutdown"]
    fixed = True
    operator = await harness.bus()
    await operator.declare(service, SHARED, shared_keyless=True)
    assert (await redrive(operator, service, dry_run=True)).redriven == len(sent)
    count = await redrive(operator, service)
    assert (count.redriven, count.keyless, count.keyless_reasons) == (len(sent), 0, [])
    first, second = replicas
    await eventually(lambda: len(first.events) == len(sent), what="both redriven")
    for each in harness.buses:
        assert await each.drain(timeout=2)
    assert sorted(first.ids) == sorted(e.id for e in sent)
    assert all(e.redriven for e in first.events)
    # the replica consuming the shared queues got each once; the other none
    assert all(first.attempts[e.id] == 2 for e in sent)
    assert second.attempts == Counter()
    assert await operator.dead_letters(service, remove=False) == []


async def test_a_keyless_letter_of_a_group_taking_them_on_each_replicas_own_queues_stays(
    bus, service
):
    """No queue of such a group holds its keyless events (each replica's own go with it),
    so a redrive leaves their letters, saying why, and they stay listed."""
    got = Recorder(fail=lambda e: e.key is None)
    await bus.declare(service, SHARED)
    await bus.subscribe(Subscription(service=service, patterns=SHARED, handler=got, max_attempts=1))
    stop = shutdown_event()
    await bus.publish(stop)
    [letter] = await eventually(
        lambda: bus.dead_letters(service, remove=False), within=5, interval=0.02
    )
    why = (
        f"system.shutdown is keyless and {service} takes its keyless events on each "
        "replica's own queues"
    )
    for dry_run in (True, False):
        count = await redrive(bus, service, dry_run=dry_run)
        assert (count.matched, count.redriven, count.keyless) == (1, 0, 1)
        [reason] = count.keyless_reasons
        assert reason.startswith(why) and "no queue of" in reason
        assert "1 keyless, left" in count.summary(service)
    with pytest.raises(NotRedeliverable, match=why):
        await bus.redeliver(service, decode_event(letter.body))
    [kept] = await bus.dead_letters(service, remove=False)
    assert decode_event(kept.body).id == stop.id
    assert got.attempts[stop.id] == 1
    assert await bus.drain(timeout=2)
    assert got.attempts[stop.id] == 1


#: a shared-keyless group with a keyed critical type too (exit orders share its critical
#: queue with its keyless critical ones)
CATCHING_UP = (*SHARED, "exit.order")


def catching_up(service: str, handler, *, window: int = 1) -> Subscription:
    """A replica of the group subscribing to its critical and shared lanes only (no
    partition yet), to catch up before it consumes its partitions."""

    async def each(events) -> None:
        for event in events:
            await handler(event)

    return Subscription(
        service=service,
        patterns=CATCHING_UP,
        handler=handler,
        batch_handler=each if window > 1 else None,
        window=window,
        partitions=(),
        shared_keyless=True,
    )


@pytest.mark.parametrize("window", [1, 4])
async def test_catch_up_returns_once_what_waited_in_the_shared_keyless_queues_is_handled(
    harness, service, window
):
    """A replica subscribed with no partition catches up: as ``catch_up`` returns, every
    keyless event and keyed critical one queued before it is handled and acked, none of
    the partitions' yet, and no mark reached the handler (nor the dead letters). Its
    partitions consumed then, their backlog follows."""
    publisher = await harness.bus()
    consumer = await harness.bus()
    await publisher.declare(service, CATCHING_UP, shared_keyless=True)
    waited = [
        drift_event("f0"),
        shutdown_event(),
        exit_order_event("mintE"),
        drift_event("f1"),
        shutdown_event(),
    ]
    backlog = [trade_event("mintB", seq) for seq in range(1, 4)]
    for event in (*waited[:2], backlog[0], *waited[2:], *backlog[1:]):
        await publisher.publish(event)
    # slow enough that nothing is handled yet as the subscription returns
    got = Recorder(delay=0.02)
    subscription = catching_up(service, got, window=window)
    await consumer.subscribe(subscription)
    await consumer.catch_up(subscription)
    assert sorted(got.ids) == sorted(e.id for e in waited)
    assert got.of_type("model.drift") == [waited[0], waited[3]]
    assert got.of_type("system.shutdown") == [waited[1], waited[4]]
    assert harness.no_ack_held_back(consumer)

    await consumer.consume_partitions(subscription, range(consumer.partitions))
    await eventually(lambda: len(got.events) == len(waited) + len(backlog), what="the backlog")
    assert got.ids[len(waited) :] == [e.id for e in backlog]
    assert await consumer.dead_letters(service) == []


async def test_catch_up_is_answered_by_the_replica_consuming_the_shared_queues(harness, service):
    """Single-active: the replica that consumed the group's shared queues first keeps them
    while it consumes (a predecessor still standing by). Another catching up meanwhile
    has its marks reached by it, once it has handled what was before them."""
    publisher = await harness.bus()
    await publisher.declare(service, CATCHING_UP, shared_keyless=True)
    gate = asyncio.Event()
    first, second = Recorder(), Recorder()

    async def held(event: Event) -> None:
        await gate.wait()
        await first(event)

    await (await harness.bus()).subscribe(catching_up(service, held))
    waited = [drift_event("f0"), shutdown_event(), exit_order_event("mintE"), drift_event("f1")]
    for event in waited:
        await publisher.publish(event)
    successor = await harness.bus()
    subscription = catching_up(service, second)
    await successor.subscribe(subscription)
    catching = asyncio.create_task(successor.catch_up(subscription))
    try:
        await eventually(lambda: successor.describe()["catching_up"] == 2, what="its marks")
        assert not catching.done()
        gate.set()
        await catching
    finally:
        gate.set()
        catching.cancel()
    assert sorted(first.ids) == sorted(e.id for e in waited)
    assert second.events == []


async def test_a_catch_up_mark_left_by_a_replica_that_died_is_dropped(harness, service):
    """A replica dies catching up, its marks queued behind events its handler never
    returned from. The next replica gets those again, drops the marks (its handler never
    sees them, nothing is dead-lettered), gets what came after them and catches up
    itself."""
    publisher = await harness.bus()
    consumer = await harness.bus()
    await publisher.declare(service, CATCHING_UP, shared_keyless=True)
    # one on the critical queue, one on the shared broadcast queue
    stuck = [shutdown_event(), drift_event("f0")]
    for event in stuck:
        await publisher.publish(event)
    gate = asyncio.Event()  # set at the end only, so the crashed bus can close
    started: list[str] = []

    async def never_returns(event: Event) -> None:
        started.append(event.id)
        await gate.wait()

    old = catching_up(service, never_returns)
    await consumer.subscribe(old)
    await eventually(lambda: len(started) == 2, what="the stuck handlers")
    dying = asyncio.create_task(consumer.catch_up(old))
    try:
        await eventually(lambda: consumer.describe()["catching_up"] == 2, what="its marks")
        later = [shutdown_event(), drift_event("f1")]
        for event in later:
            await publisher.publish(event)
        got = Recorder()
        new = catching_up(service, got)
        consumer = await harness.crash_consumer(consumer, old, new)
        await consumer.catch_up(new)
        assert got.of_type("system.shutdown") == [stuck[0], later[0]]
        assert got.of_type("model.drift") == [stuck[1], later[1]]
        assert len(got.events) == 4
        assert await consumer.dead_letters(service) == []
    finally:
        gate.set()
        dying.cancel()
        await asyncio.gather(dying, return_exceptions=True)


async def test_catch_up_refuses_a_replica_with_nothing_to_catch_up_with(bus, service):
    """Keyless events on a replica's own queues: nothing waited there before it
    subscribed. And a subscription not subscribed has no consumer to reach a mark."""
    own = Subscription(service=service, patterns=SHARED, handler=Recorder())
    await bus.subscribe(own)
    with pytest.raises(ValueError, match="shared_keyless"):
        await bus.catch_up(own)
    with pytest.raises(ValueError, match="not subscribed"):
        await bus.catch_up(catching_up(f"{service}_s", Recorder()))


async def test_replicas_split_partitions(harness, service):
    bus = await harness.bus(partitions=4)
    low, high = Recorder(), Recorder()
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=low, partitions=(0, 1))
    )
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=high, partitions=(2, 3))
    )
    sent = [trade_event(f"mint{i}", 1) for i in range(40)]
    await bus.publish_many(sent)
    await eventually(lambda: len(low.events) + len(high.events) == len(sent))
    await bus.drain(timeout=2)
    assert sorted(low.ids + high.ids) == sorted(e.id for e in sent)
    assert {partition_of(e.key, 4) for e in low.events} <= {0, 1}
    assert {partition_of(e.key, 4) for e in high.events} <= {2, 3}
    assert low.events and high.events


async def test_replicas_of_all_partitions_handle_each_event_once(harness, service):
    bus = await harness.bus(partitions=4)
    first, second = Recorder(), Recorder()
    for got in (first, second):
        await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    sent = [trade_event(f"mint{i}", 1) for i in range(40)]
    await bus.publish_many(sent)
    await eventually(lambda: len(first.events) + len(second.events) == len(sent))
    await bus.drain(timeout=2)
    assert sorted(first.ids + second.ids) == sorted(e.id for e in sent)


async def test_stop_consuming_lets_in_flight_finish_and_takes_nothing_new(harness, bus, service):
    got = Recorder(delay=0.02)
    old = Subscription(service=service, patterns=("token.*",), handler=got)
    await bus.subscribe(old)
    for seq in range(1, 51):  # one message each: a stop finishes a batch it began
        await bus.publish(trade_event("mintT", seq))
    await eventually(lambda: len(got.events) >= 1)
    await bus.stop_consuming()
    assert await bus.drain(timeout=2)
    assert not bus.is_healthy()
    handled = len(got.events)
    assert handled < 50
    await bus.publish(trade_event("mintT", 51))  # publishing still works
    # the barrier: another consumer of the service takes what is queued, 51 last (one key,
    # one partition, in order); once it has 51, nothing is left that could reach `got`
    rest = Recorder()
    new = Subscription(service=service, patterns=("token.*",), handler=rest)
    resumed = await harness.restart_consumer(bus, old, new)
    await resumed.start()  # the memory bus is the stopped one: consume again
    await eventually(lambda: any(e.seq == 51 for e in rest.events))
    assert len(got.events) == handled
    assert sum(got.attempts.values()) == handled  # nothing was left half-done
    assert [e.seq for e in rest.events] == list(range(handled + 1, 52))  # the queue kept them


async def test_unsubscribe_stops_delivery_and_the_queue_keeps_the_rest(bus, service):
    first, second = Recorder(), Recorder()
    old = Subscription(service=service, patterns=("token.*",), handler=first)
    await bus.subscribe(old)
    await bus.publish(trade_event("mintU", 1))
    await eventually(lambda: len(first.events) == 1)
    await bus.unsubscribe(old)
    await bus.unsubscribe(old)  # not subscribed any more: nothing to do
    await bus.publish(trade_event("mintU", 2))
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=second))
    await eventually(lambda: len(second.events) == 1)
    assert [e.seq for e in first.events] == [1]
    assert [e.seq for e in second.events] == [2]


async def test_describe_names_the_transport_and_follows_its_health(harness, namespace):
    bus = await harness.bus()
    described = bus.describe()
    assert described["transport"] == harness.transport
    assert described["healthy"] is True
    if harness.transport == "rabbitmq":
        assert described["namespace"] == namespace
        assert "amqp" not in str(described)  # the URL carries the password
    await bus.stop_consuming()
    assert bus.describe()["healthy"] is False


# ------------------------------------------------------------------------ windows


def test_a_window_is_at_least_one():
    with pytest.raises(ValueError, match="window"):
        Subscription(service="s", patterns=("token.*",), handler=Recorder(), window=0)


async def test_handlers_of_a_window_overlap(bus, service):
    """Message 1's handler waits for message 2's to start: only a window lets it."""
    second_started = asyncio.Event()
    outcome: dict[int, str] = {}

    async def handler(event: Event) -> None:
        if event.seq == 1:
            try:
                async with asyncio.timeout(10):
                    await second_started.wait()
                outcome[1] = "overlapped"
            except TimeoutError:
                outcome[1] = "alone"
        else:
            second_started.set()
            outcome[event.seq] = "ran"

    await bus.subscribe(
        Subscription(
            service=service, patterns=("token.*",), handler=handler, window=2, max_attempts=1
        )
    )
    await bus.publish_many(trade_event("mintW", seq) for seq in (1, 2))
    await eventually(lambda: len(outcome) == 2, within=15)
    assert outcome == {1: "overlapped", 2: "ran"}


@pytest.mark.parametrize("window", [1, 4])
async def test_a_lane_runs_at_most_its_window_of_handlers(harness, service, window):
    """Queued up front, the messages could all start at once; exactly ``window`` do,
    even where the prefetch is smaller than the window."""
    bus = await harness.bus(prefetch=2)
    running, peak, done = 0, 0, []
    full = asyncio.Event()

    async def handler(event: Event) -> None:
        nonlocal running, peak
        running += 1
        try:
            peak = max(peak, running)
            if running == window:
                full.set()
            # the first ones wait for each other, so a window fills up before any returns
            async with asyncio.timeout(10):
                await full.wait()
            await asyncio.sleep(0.001)  # the work
        finally:
            running -= 1
        done.append(event.seq)

    key = "mintL"
    subscription = Subscription(
        service=service,
        patterns=("token.*",),
        handler=handler,
        window=window,
        partitions=(),
        max_attempts=1,  # a window that never fills is a failure, not a retry
    )
    await bus.subscribe(subscription)
    await bus.publish_many(trade_event(key, seq) for seq in range(1, 31))
    # the backlog waits in the queue until the partition is consumed
    await bus.consume_partitions(subscription, [partition_of(key, bus.partitions)])
    await eventually(lambda: len(done) == 30, within=20)
    assert peak == window
    if window == 1:
        assert done == list(range(1, 31))


async def test_a_window_starts_handlers_in_delivery_order(bus, service):
    started: list[int] = []
    finished: list[int] = []

    rng = random.Random(7)

    async def handler(event: Event) -> None:
        started.append(event.seq)  # before the first await: the order it was started in
        for _ in range(rng.randint(0, 5)):
            await asyncio.sleep(0)
        finished.append(event.seq)

    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=handler, window=8)
    )
    await bus.publish_many(trade_event("mintO", seq) for seq in range(1, 101))
    await eventually(lambda: len(finished) == 100, within=20)
    assert started == list(range(1, 101))
    assert finished != started  # they did overlap, or the order above proves nothing


async def test_a_window_acks_in_delivery_order_only(harness, service):
    """2..4 returned while 1 still runs: nothing is acked, so a crash hands all four on."""
    publisher = await harness.bus()
    consumer = await harness.bus()
    gate = asyncio.Event()
    returned: list[int] = []

    async def stuck_on_first(event: Event) -> None:
        if event.seq == 1:
            await gate.wait()
        returned.append(event.seq)

    old = Subscription(service=service, patterns=("token.*",), handler=stuck_on_first, window=4)
    await consumer.subscribe(old)
    await publisher.publish_many(trade_event("mintK", seq) for seq in range(1, 5))
    await eventually(lambda: returned == [2, 3, 4])
    # an ack the bus would send (RabbitMQ batches them) has gone out before the crash
    await eventually(lambda: harness.no_ack_held_back(consumer))
    got = Recorder()
    new = Subscription(service=service, patterns=("token.*",), handler=got, window=4)
    await harness.crash_consumer(consumer, old, new)
    try:
        await eventually(lambda: len(got.events) >= 4, within=10)
        assert [e.seq for e in got.events] == [1, 2, 3, 4]
    finally:
        gate.set()


@pytest.mark.parametrize("stop", ["unsubscribe", "release_partitions", "stop_consuming", "drain"])
async def test_stopping_waits_for_every_handler_in_flight(bus, service, stop):
    window = 3
    gate = asyncio.Event()
    full = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []

    async def handler(event: Event) -> None:
        started.append(event.seq)
        if len(started) == window:
            full.set()
        async with asyncio.timeout(10):
            await gate.wait()
        await asyncio.sleep(0.02 * event.seq)  # the work: they return one after the other
        finished.append(event.seq)

    key = "mintS"
    subscription = Subscription(
        service=service, patterns=("token.*",), handler=handler, window=window, partitions=()
    )
    await bus.subscribe(subscription)
    await bus.consume_partitions(subscription, [partition_of(key, bus.partitions)])
    for seq in range(1, 6):  # one message each: a stop finishes a batch it began
        await bus.publish(trade_event(key, seq))
    await asyncio.wait_for(full.wait(), 10)
    if stop == "release_partitions":
        stopping = bus.release_partitions(subscription, [partition_of(key, bus.partitions)])
    elif stop == "unsubscribe":
        stopping = bus.unsubscribe(subscription)
    elif stop == "stop_consuming":
        stopping = bus.stop_consuming()
    else:
        stopping = bus.drain(timeout=10)
    task = asyncio.create_task(stopping)
    for _ in range(10):  # the stop has begun before any handler may return
        await asyncio.sleep(0)
    assert not task.done()
    gate.set()
    await task
    if stop == "drain":
        assert task.result() is True
        assert finished == [1, 2, 3, 4, 5]
    else:
        # every handler started had returned; none was started after the stop
        assert started == [1, 2, 3]
        assert finished == [1, 2, 3]


async def test_a_drain_when_consuming_stops_waits_for_running_handlers_only(bus, service):
    """A drain waiting for queued events when consuming stops ends once the handlers
    running return: what stays queued has nobody to handle it until consuming starts."""
    gate = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []

    async def handler(event: Event) -> None:
        started.append(event.seq)
        async with asyncio.timeout(10):
            await gate.wait()
        finished.append(event.seq)

    key = "mintD"
    subscription = Subscription(
        service=service, patterns=("token.*",), handler=handler, window=1, partitions=()
    )
    await bus.subscribe(subscription)
    await bus.consume_partitions(subscription, [partition_of(key, bus.partitions)])
    for seq in range(1, 4):
        await bus.publish(trade_event(key, seq))
    await eventually(lambda: started == [1], what="the first handler running")
    draining = asyncio.create_task(bus.drain(timeout=10))
    stopping = asyncio.create_task(bus.stop_consuming())
    for _ in range(10):  # both have begun before the handler may return
        await asyncio.sleep(0)
    assert not draining.done()
    gate.set()
    await asyncio.wait_for(stopping, 10)
    # well before the drain's own timeout: it waits for nothing that could still come
    assert await asyncio.wait_for(draining, 5) is True
    assert finished == [1]


@pytest.mark.parametrize("window", [1, 4])
async def test_a_stop_given_up_on_leaves_the_handlers_in_flight_to_the_drain(
    harness, bus, service, window
):
    """Shutdown bounds its wait for a stop: the handlers in flight go on (they are not
    cancelled with the wait), and the drain after it waits for them."""
    gate = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []

    async def handler(event: Event) -> None:
        started.append(event.seq)
        async with asyncio.timeout(10):
            await gate.wait()
        finished.append(event.seq)

    old = Subscription(service=service, patterns=("token.*",), handler=handler, window=window)
    await bus.subscribe(old)
    await bus.publish(trade_event("mintG", 1))
    await eventually(lambda: started == [1], what="the handler running")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bus.stop_consuming(), 0.1)
    assert not await bus.drain(timeout=0.2)  # it still runs
    gate.set()
    assert await bus.drain(timeout=5)
    assert finished == [1]
    # the barrier: the next consumer of the service gets 2, and nothing before it
    rest = Recorder()
    new = Subscription(service=service, patterns=("token.*",), handler=rest)
    resumed = await harness.restart_consumer(bus, old, new)
    await resumed.start()
    await resumed.publish(trade_event("mintG", 2))
    await eventually(lambda: [e.seq for e in rest.events] == [2])
    assert finished == [1]


async def test_deliveries_of_a_window_handed_back_come_again_in_their_order(bus, service):
    """Handlers of a window waiting for a dependency when their partition is released
    hand their events back (the first to wait is the first to return): the next
    consumer gets them in delivery order, before what was queued behind them."""

    class Away(RuntimeError):
        transient_dependency = "store"

    waiting: list[int] = []

    async def waits(event: Event) -> None:
        waiting.append(event.seq)
        raise Away("the store is away")

    key = "mintW"
    partition = partition_of(key, bus.partitions)
    first = Subscription(
        service=service, patterns=("token.*",), handler=waits, window=3, partitions=()
    )
    await bus.subscribe(first)
    await bus.consume_partitions(first, [partition])
    for seq in range(1, 6):  # one message each
        await bus.publish(trade_event(key, seq))
    await eventually(lambda: len(set(waiting)) == 3, what="a window of handlers waiting")
    await asyncio.wait_for(bus.release_partitions(first, [partition]), 10)
    got = Recorder()
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=got, partitions=(partition,))
    )
    await eventually(lambda: len(got.events) == 5, what="the five events handled")
    assert [e.seq for e in got.events] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------ RabbitMQ only


@pytest.mark.rabbitmq
async def test_rabbitmq_malformed_body_goes_to_the_dlq(namespace, amqp_url, service):
    import aio_pika

    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="test/1")
    await bus.start()
    try:
        got = Recorder()
        await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
        assert bus.is_healthy()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{namespace}.events")
            await exchange.publish(aio_pika.Message(b'{"id": 1}'), "token.trade.v1.p00")
        await bus.publish(trade_event("mintM", 1))
        await eventually(lambda: len(got.events) == 1)
        letters = await dead_letters_arriving(bus, service)
        assert len(letters) == 1
        assert letters[0].body == b'{"id": 1}'
        assert letters[0].reason.startswith("malformed:")
        assert letters[0].headers["x-pumpflow-queue"] == f"{namespace}.{service}.p00"
    finally:
        await bus.delete_topology()
        await bus.close()
    assert not bus.is_healthy()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_partitions_run_of_events_is_one_message(namespace, amqp_url, service):
    """publish_many batches a partition's consecutive events of one type; they arrive alone."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")
    await bus.start()
    try:
        got = Recorder()
        subscription = Subscription(service=service, patterns=("token.*",), handler=got)
        await bus.subscribe(subscription)
        await bus.unsubscribe(subscription)  # the queue stays: count what it holds
        sent = [trade_event("mintB", seq) for seq in range(1, 11)]
        await bus.publish_many(sent)
        assert bus._channel is not None
        channel = await bus._channel.get_underlay_channel()
        declared = await channel.queue_declare(f"{namespace}.{service}.p00", passive=True)
        assert declared.message_count == 1
        await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
        await eventually(lambda: len(got.events) == len(sent))
        assert [e.seq for e in got.events] == list(range(1, 11))
        assert got.attempts == Counter({e.id: 1 for e in sent})
    finally:
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_stop_finishes_the_batch_it_began(namespace, amqp_url, service):
    """A consumer stopped inside a batch handles its rest, so nothing handled comes again."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    def make_bus() -> RabbitMQBus:
        return RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")

    bus = make_bus()
    await bus.start()
    got = Recorder(delay=0.02)
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    sent = [trade_event("mintS", seq) for seq in range(1, 11)]
    await bus.publish_many(sent)  # one message: one key, one partition
    await eventually(lambda: len(got.events) >= 1)
    await bus.stop_consuming()
    assert await bus.drain(timeout=5)
    await bus.close()  # what it left unacked goes back to the queue
    assert [e.seq for e in got.events] == list(range(1, 11))
    assert got.attempts == Counter({e.id: 1 for e in sent})
    # the barrier: the next consumer gets 11 and nothing of the batch before it
    successor = make_bus()
    await successor.start()
    try:
        rest = Recorder()
        await successor.subscribe(
            Subscription(service=service, patterns=("token.*",), handler=rest)
        )
        await successor.publish(trade_event("mintS", 11))
        await eventually(lambda: any(e.seq == 11 for e in rest.events))
        assert [e.seq for e in rest.events] == [11]
    finally:
        await successor.delete_topology()
        await successor.close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("window", [1, 4])
async def test_rabbitmq_a_malformed_event_of_a_batch_is_dead_lettered_alone(
    namespace, amqp_url, service, window
):
    import aio_pika

    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.events import encode_event

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")
    await bus.start()
    try:
        got = Recorder()
        batches = BatchRecorder(got)
        await bus.subscribe(
            Subscription(
                service=service,
                patterns=("token.*",),
                handler=got,
                batch_handler=batches,
                window=window,
            )
        )
        good = [encode_event(trade_event("mintM", seq)) for seq in (1, 2)]
        body = b"[" + b",".join((good[0], b'{"id": 1}', good[1])) + b"]"
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{namespace}.events")
            await exchange.publish(aio_pika.Message(body), "token.trade.v1.p00")
        await eventually(lambda: len(got.events) == 2)
        assert [e.seq for e in got.events] == [1, 2]
        letters = await dead_letters_arriving(bus, service)
        assert [letter.body for letter in letters] == [b'{"id": 1}']
        assert letters[0].reason.startswith("malformed:")
    finally:
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("window", [1, 4])
async def test_rabbitmq_bus_fault_dead_letters_at_the_broker(namespace, amqp_url, service, window):
    """A message the bus fails on (its DLQ publish, say) is not covered by a later ack."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")
    await bus.start()
    try:

        async def dlq_down(*args, **kwargs):
            raise ConnectionError("DLQ publish failed")

        bus._to_dlq = dlq_down
        got = Recorder(fail=lambda e: e.seq == 1)
        await bus.subscribe(
            Subscription(
                service=service,
                patterns=("token.*",),
                handler=got,
                max_attempts=1,
                window=window,
            )
        )
        poison = trade_event("mintF", 1)
        await bus.publish(poison)
        await bus.publish(trade_event("mintF", 2))
        await eventually(lambda: len(got.events) == 1)
        assert await bus.drain(5.0)
        letters = await dead_letters_arriving(bus, service)
        assert [decode_event(d.body).id for d in letters] == [poison.id]
        assert letters[0].reason.startswith("broker: rejected")
        # the alert on dead letters hears of it, once
        await dead_lettered_once(service, "token.trade", "partition")
    finally:
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_batch_dead_lettered_whole_is_read_and_taken_event_by_event(
    namespace, amqp_url, service
):
    """A batch the broker dead-lettered gives its letters together (a read's limit does
    not split them); the events of it a taker leaves stay dead, each a letter of its own,
    with the batch's reason, and the letters behind it keep their place."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")
    await bus.start()
    try:

        async def dlq_down(*args, **kwargs):
            raise ConnectionError("DLQ publish failed")

        bus._to_dlq = dlq_down
        got = Recorder(fail=lambda e: e.seq == 2)
        await bus.subscribe(
            Subscription(service=service, patterns=("token.*",), handler=got, max_attempts=1)
        )
        sent = [trade_event("mintT", seq) for seq in range(1, 6)]
        await bus.publish_many(sent)  # one message: seq 2 fails it, seq 3 on are dropped
        await eventually(
            lambda: _equals(bus.dead_letters(service, limit=1, remove=False), 5),
            within=5, interval=0.02, what="the batch's letters",
        )  # fmt: skip
        del bus._to_dlq
        await bus.dead_letter(b"frame", service=service, reason="bad frame")
        peeked = await bus.dead_letters(service, limit=5, remove=False)
        assert [decode_event(d.body).seq for d in peeked] == [1, 2, 3, 4, 5]
        assert len(await bus.dead_letters(service, limit=6, remove=False)) == 6

        async def take_even(letter) -> bool:
            return letter.body != b"frame" and decode_event(letter.body).seq % 2 == 0

        assert await bus.take_dead_letters(service, take_even) == 6
        left = await bus.dead_letters(service, remove=False)
        assert left[0].body == b"frame"
        assert [decode_event(d.body).seq for d in left[1:]] == [1, 3, 5]
        assert all(d.reason.startswith("broker: rejected") for d in left[1:])
        assert {(d.event_type, d.key) for d in left[1:]} == {("token.trade", "mintT")}
        # stored by the bus, not the broker: never read as a batch again
        assert not any("x-death" in d.headers for d in left[1:])
        # stored again as letters of their own: a second taker sees them alone, once
        assert await bus.take_dead_letters(service, take_even) == 4
    finally:
        await bus.delete_topology()
        await bus.close()


async def _equals(letters, count: int) -> bool:
    return len(await letters) == count


@pytest.mark.rabbitmq
async def test_rabbitmq_a_message_past_the_limit_the_bus_rejects_is_counted(
    namespace, amqp_url, service, monkeypatch
):
    """Past the delivery limit the bus's own dead letter fails (its DLQ publish): the
    message is rejected, dead-lettered by the broker, and counted as every letter is."""
    from pumpflow.common.bus.rabbitmq import PublishAbandoned, RabbitMQBus
    from pumpflow.common.testing import BusHarness

    stored = RabbitMQBus._to_dlq
    failures = 0

    async def fails_once(self, *args, **kwargs):
        nonlocal failures
        if not failures:
            failures += 1
            raise PublishAbandoned("the DLQ publish gave up")
        await stored(self, *args, **kwargs)

    monkeypatch.setattr(RabbitMQBus, "_to_dlq", fails_once)
    harness = BusHarness("rabbitmq", namespace=namespace, amqp_url=amqp_url)
    try:
        publisher = await harness.bus()
        consumer = await harness.bus()
        poison = trade_event("mintR", 1)
        deliveries = 0
        over = asyncio.Event()  # set at the end only, so the crashed buses can close

        async def dies_on_poison(event: Event) -> None:
            nonlocal deliveries
            deliveries += 1
            await over.wait()  # its consumer dies with it before this returns

        def subscription() -> Subscription:
            return Subscription(service=service, patterns=("token.*",), handler=dies_on_poison)

        current = subscription()
        await consumer.subscribe(current)
        await publisher.publish(poison)

        async def crash() -> None:
            nonlocal consumer, current
            fresh = subscription()
            consumer = await harness.crash_consumer(consumer, current, fresh)
            current = fresh

        try:
            crashes, letters = await crash_until_dead_lettered(
                publisher, service, lambda: deliveries, crash
            )
            assert crashes == DELIVERY_LIMIT + 1
            assert failures == 1
            assert [decode_event(letter.body).id for letter in letters] == [poison.id]
            assert letters[0].reason.startswith("broker: rejected")
            await dead_lettered_once(service, "token.trade", "partition")
        finally:
            over.set()
    finally:
        await harness.teardown()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_dead_letter_stored_on_its_second_try_is_counted_once(
    namespace, amqp_url, service
):
    """A caller's dead letter whose publish failed is given again (the keyed consumer
    waits the broker out): one letter, one count."""
    from pumpflow.common.bus.rabbitmq import PublishAbandoned, RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")
    await bus.start()
    try:
        publish_to = bus._publish_to
        failed = False

        async def fails_once(*args, **kwargs):
            nonlocal failed
            if not failed:
                failed = True
                raise PublishAbandoned("the DLQ publish gave up")
            await publish_to(*args, **kwargs)

        bus._publish_to = fails_once
        refused = trade_event("mintI", 1)
        for attempt in range(2):
            try:
                await bus.dead_letter(
                    encode_event(refused),
                    service=service,
                    reason="invalid",
                    event_type=refused.type,
                )
            except PublishAbandoned:
                assert attempt == 0
        letters = await dead_letters_arriving(bus, service)
        assert [letter.reason for letter in letters] == ["invalid"]
        await dead_lettered_once(service, "token.trade", "input")
    finally:
        await bus.delete_topology()
        await bus.close()


# ------------------------------------------------------------------------ memory: sync mode


async def test_sync_mode_dispatches_inline_in_publish_order(service):
    bus = InMemoryBus(partitions=4, synchronous=True)
    await bus.start()
    seen: list[tuple[str, int | None]] = []

    async def features(event: Event) -> None:
        seen.append((event.type, event.seq))
        # a handler that publishes: the event is handled before this publish returns
        await bus.publish(features_event(event.key, event.seq))

    async def model(event: Event) -> None:
        seen.append((event.type, event.seq))

    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=features))
    await bus.subscribe(
        Subscription(service=f"{service}_m", patterns=("features.*",), handler=model)
    )
    for i in range(1, 4):
        await bus.publish(trade_event(f"mint{i}", i))
        assert seen[-1] == ("features.updated", i)
    assert seen == [
        ("token.trade", 1),
        ("features.updated", 1),
        ("token.trade", 2),
        ("features.updated", 2),
        ("token.trade", 3),
        ("features.updated", 3),
    ]


async def test_sync_mode_catches_up_before_the_partitions(service):
    """Synchronous: what waited in the shared lanes is handled as the replica subscribes
    with no partition, the catch-up returns at once, and the partitions' backlog waits
    for them to be consumed."""
    bus = InMemoryBus(partitions=2, synchronous=True)
    await bus.start()
    await bus.declare(service, CATCHING_UP, shared_keyless=True)
    waited = [drift_event("f0"), shutdown_event(), exit_order_event("mintE")]
    backlog = trade_event("mintB", 1)
    for event in (waited[0], backlog, *waited[1:]):
        await bus.publish(event)
    got = Recorder()
    subscription = catching_up(service, got)
    await bus.subscribe(subscription)
    await bus.catch_up(subscription)
    assert sorted(got.ids) == sorted(e.id for e in waited)
    await bus.consume_partitions(subscription, range(bus.partitions))
    assert got.ids[-1] == backlog.id
    assert bus.describe()["catching_up"] == 0


async def test_sync_mode_retries_and_dead_letters_without_waiting(service):
    bus = InMemoryBus(partitions=2, synchronous=True)
    got = Recorder(fail=lambda e: e.seq == 2)
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=got, max_attempts=3)
    )
    started = time.perf_counter()
    for seq in (1, 2, 3):
        await bus.publish(trade_event("mintS", seq))
    assert time.perf_counter() - started < 0.05  # no backoff sleeps in replays
    assert [e.seq for e in got.events] == [1, 3]
    letters = await bus.dead_letters(service)
    assert [decode_event(d.body).seq for d in letters] == [2]
    assert max(got.attempts.values()) == 3


async def test_sync_mode_validates_like_the_wire(service):
    bus = InMemoryBus(synchronous=True)
    event = trade_event("mintV", 1)
    bad = Event(**{**{f: getattr(event, f) for f in event.__struct_fields__}, "data": {"mint": 1}})
    with pytest.raises(EventValidationError):
        await bus.publish(bad)


async def test_memory_queues_wait_for_a_consumer(service):
    bus = InMemoryBus(partitions=2)
    await bus.start()
    got = Recorder()
    first = Subscription(service=service, patterns=("token.*",), handler=got)
    await bus.subscribe(first)
    await bus.unsubscribe(first)
    await bus.publish(trade_event("mintQ", 1))
    assert not await bus.drain(timeout=0.1)  # bound queue, nobody consuming
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    assert await bus.drain(timeout=2)
    assert [e.seq for e in got.events] == [1]
    await bus.close()


async def test_memory_drain_waits_for_what_is_queued_while_a_batch_runs_and_what_it_publishes(
    service,
):
    """drain returns only once everything is handled: events queued while a batch runs
    (the bus pending all along) and what the batch handler publishes as it ends, for
    another service, are waited for too."""
    bus = InMemoryBus(partitions=2)
    await bus.start()
    gate = asyncio.Event()
    started = asyncio.Event()
    calls: list[list[int]] = []
    features = Recorder()

    async def batches(events) -> None:
        calls.append([e.seq for e in events])
        started.set()
        await gate.wait()
        for event in events:
            await bus.publish(features_event(event.key, event.seq))

    async def alone(event: Event) -> None:
        await batches([event])

    await bus.subscribe(
        Subscription(
            service=service, patterns=("token.*",), handler=alone, batch_handler=batches, window=4
        )
    )
    await bus.subscribe(
        Subscription(service=f"{service}_f", patterns=("features.*",), handler=features)
    )
    for seq in range(1, 5):
        await bus.publish(trade_event("mintD", seq))
    await asyncio.wait_for(started.wait(), 10)
    for seq in range(5, 8):  # queued behind the batch running
        await bus.publish(trade_event("mintD", seq))
    draining = asyncio.ensure_future(bus.drain(timeout=10))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not draining.done()
    gate.set()
    assert await draining
    # returned with everything handled, not before
    assert [seq for call in calls for seq in call] == list(range(1, 8))
    assert sorted(e.seq for e in features.events) == list(range(1, 8))
    assert bus.describe()["pending"] == 0
    await bus.close()


async def test_memory_drain_waits_for_events_handed_back_until_they_are_handled(service):
    """Events handed back (their partition released while their handlers waited for a
    dependency) are queued still: drain returns once the next consumer handled them."""

    class Away(RuntimeError):
        transient_dependency = "store"

    bus = InMemoryBus(partitions=2)
    await bus.start()
    calls: list[int] = []

    async def waits(event: Event) -> None:
        calls.append(event.seq)
        raise Away("the store is away")

    key = "mintH"
    partition = partition_of(key, bus.partitions)
    first = Subscription(service=service, patterns=("token.*",), handler=waits, window=2)
    await bus.subscribe(first)
    for seq in (1, 2, 3):
        await bus.publish(trade_event(key, seq))
    await eventually(lambda: len(calls) == 2, what="two handlers waiting for the store")
    draining = asyncio.ensure_future(bus.drain(timeout=10))
    await asyncio.wait_for(bus.release_partitions(first, [partition]), 10)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not draining.done() and bus.describe()["pending"] == 3
    got = Recorder()
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=got, partitions=(partition,))
    )
    assert await draining
    assert sorted(e.seq for e in got.events) == [1, 2, 3]
    assert bus.describe()["pending"] == 0
    await bus.close()


async def test_memory_a_replica_abandoned_mid_release_leaves_its_events_in_delivery_order(
    service,
):
    """A replica crashes while its partition is released: one handler had handed its
    event back (it waited for a dependency), the others still ran. Every event goes back
    in delivery order, those handed back among those it never acked."""

    class Away(RuntimeError):
        transient_dependency = "store"

    bus = InMemoryBus(partitions=2)
    await bus.start()
    gate = asyncio.Event()
    started: list[int] = []

    async def handler(event: Event) -> None:
        started.append(event.seq)
        if event.seq == 2:
            raise Away("the store is away")
        await gate.wait()  # never set: ends by the crash

    key = "mintA"
    partition = partition_of(key, bus.partitions)
    first = Subscription(service=service, patterns=("token.*",), handler=handler, window=3)
    await bus.subscribe(first)
    for seq in range(1, 6):
        await bus.publish(trade_event(key, seq))
    await eventually(lambda: len(started) == 3, what="a window of handlers running")
    releasing = asyncio.ensure_future(bus.release_partitions(first, [partition]))
    lane = bus._groups[service].partitions[partition]
    await eventually(lambda: [e.seq for e in lane.items] == [2, 4, 5], what="2 handed back")
    assert not releasing.done()  # 1 and 3 run still
    await bus.abandon(first)
    await asyncio.wait_for(releasing, 10)
    got = Recorder()
    await bus.subscribe(
        Subscription(service=service, patterns=("token.*",), handler=got, partitions=(partition,))
    )
    assert await bus.drain(timeout=10)
    assert [e.seq for e in got.events] == [1, 2, 3, 4, 5]
    await bus.close()


@pytest.mark.parametrize("synchronous", [True, False])
async def test_a_keyless_event_handed_back_to_a_replica_leaving_goes_with_its_own_queue(
    service, synchronous
):
    """A replica's handler waits for a dependency on a keyless event (its own copy, on its
    own lane) when the replica unsubscribes: the event is handed back, unhandled, and goes
    with the replica's own queue, as RabbitMQ deletes it with its consumer; nothing is
    left in flight for the bus to wait for (a drain timed out on it)."""

    class Away(RuntimeError):
        transient_dependency = "store"

    bus = InMemoryBus(partitions=2, synchronous=synchronous)
    await bus.start()
    calls: list[str] = []

    async def handler(event: Event) -> None:
        calls.append(event.id)
        raise Away("the store is away")

    critical = ("system.shutdown",)
    subscription = Subscription(service=service, patterns=critical, handler=handler)
    await bus.subscribe(subscription)
    shutdown = make_event(SystemShutdown(reason="test"), source="cli/t", time=time.time())
    publishing = asyncio.ensure_future(bus.publish(shutdown))
    await eventually(lambda: calls, what="the handler waiting for its dependency")
    await asyncio.wait_for(bus.unsubscribe(subscription), 10.0)
    await asyncio.wait_for(publishing, 10.0)
    assert await bus.drain(timeout=2.0)
    assert await bus.dead_letters(service) == []
    # handed back once, not started again and again on the lane of a replica gone
    assert calls == [shutdown.id]
    await bus.close()


# ------------------------------------------------------------------------ factory, metrics


def test_create_bus_picks_the_transport():
    memory = create_bus(BusConfig(transport="memory", source="s/1", partitions=8, event_log="all"))
    assert isinstance(memory, InMemoryBus)
    assert memory.partitions == 8
    assert memory.event_log.mode == "all"
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    config = BusConfig(
        transport="rabbitmq",
        source="s/1",
        amqp_url="amqp://u:secret@host:5672/",
        namespace="abc",
        prefetch=7,
    )
    rabbit = create_bus(config)
    assert isinstance(rabbit, RabbitMQBus)
    assert (rabbit.url, rabbit.exchange_name, rabbit.prefetch) == (config.amqp_url, "abc.events", 7)
    assert "secret" not in repr(config)
    with pytest.raises(ValueError, match="unknown bus transport"):
        create_bus(BusConfig(transport="kafka", source="s/1"))  # type: ignore[arg-type]


async def test_metrics_are_exposed_with_low_cardinality_labels(service):
    bus = InMemoryBus(partitions=2, synchronous=True, source=f"{service}_pub/r1")
    got = Recorder()
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
    await bus.publish(trade_event("mintX", 1))
    labels = {"service": service, "type": "token.trade", "lane": "partition"}
    published = {**labels, "service": f"{service}_pub"}
    assert REGISTRY.get_sample_value("pumpflow_events_published_total", published) == 1
    assert REGISTRY.get_sample_value("pumpflow_handler_seconds_count", labels) == 1
    age = REGISTRY.get_sample_value("pumpflow_event_age_seconds_bucket", {**labels, "le": "+Inf"})
    assert age == 1
    text = generate_latest().decode()
    assert "# TYPE pumpflow_events_consumed_total counter" in text
    assert "mintX" not in text


@pytest.mark.rabbitmq
async def test_rabbitmq_consumer_survives_a_dropped_connection(namespace, amqp_url, service):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, prefetch=4, source="test/1")
    await bus.start()
    try:
        got = Recorder()
        await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=got))
        await bus.publish_many(trade_event("mintR", seq) for seq in range(1, 11))
        await eventually(lambda: len(got.events) == 10)
        # the AMQP connections underneath (publishing, consuming) die as on a network
        # failure; aio-pika reconnects each
        assert len(bus._connections()) == 2
        for connection in bus._connections():
            lost = connection.transport.connection
            await lost.close(ConnectionError("simulated network failure"))
            await eventually(
                lambda c=connection, lost=lost: (
                    getattr(c.transport, "connection", lost) is not lost
                ),
                within=20,
            )
            await connection.ready()
        for seq in range(11, 21):
            await bus.publish(trade_event("mintR", seq))
        await eventually(lambda: len(got.events) >= 20, within=20)
        assert sorted({e.seq for e in got.events}) == list(range(1, 21))
    finally:
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_what_a_lost_connection_delivered_is_not_started_on_it_after_the_loss(
    namespace, amqp_url, service
):
    """A lost channel's deliveries no handler took are the broker's again: the queue's
    next consumer gets them, and the replica that lost them does not run them too."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    holder = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/1")
    standby = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="test/2")
    await holder.start()
    await standby.start()
    held: list[int] = []
    release = asyncio.Event()

    async def holding(event: Event) -> None:
        held.append(event.seq)
        if event.seq == 1:
            await release.wait()

    try:
        await holder.subscribe(
            Subscription(service=service, patterns=("token.*",), handler=holding)
        )
        took_over = Recorder()
        await standby.subscribe(
            Subscription(service=service, patterns=("token.*",), handler=took_over)
        )
        for seq in range(1, 6):  # one message each
            await standby.publish(trade_event("mintL", seq))
        # the holder runs 1 and has 2..5 delivered, waiting for it
        await eventually(lambda: held == [1] and holder.describe()["unacked"] == 5)
        bulk = holder._bulk_connection
        lost = bulk.transport.connection
        await lost.close(ConnectionError("simulated network failure"))
        # the broker took 1..5 back and gave them to the next consumer of the queue
        await eventually(lambda: [e.seq for e in took_over.events] == [1, 2, 3, 4, 5])
        release.set()
        await eventually(lambda: getattr(bulk.transport, "connection", lost) is not lost, within=20)
        await eventually(holder.is_healthy, within=20, what="the holder healthy again")
        assert await holder.drain(timeout=5)
        assert held == [1]
    finally:
        release.set()
        await standby.close()
        await holder.delete_topology()
        await holder.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_replicas_broadcast_lane_outlives_the_loss_of_its_connection(
    namespace, amqp_url, service
):
    """The broker deletes a replica's own queue with the connection that consumed it."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="test/1")
    await bus.start()
    try:
        got = Recorder()
        await bus.subscribe(
            Subscription(service=service, patterns=("token.*", "model.drift"), handler=got)
        )
        await bus.publish(trade_event("mintB", 1))
        await bus.publish(drift_event("f1"))
        await eventually(lambda: len(got.events) == 2)
        # the consumers' connection alone dies, as on a network failure
        bulk = bus._bulk_connection
        lost = bulk.transport.connection
        await lost.close(ConnectionError("simulated network failure"))
        await eventually(lambda: getattr(bulk.transport, "connection", lost) is not lost, within=20)
        await eventually(bus.is_healthy, within=20, what="the bus healthy again")
        await bus.publish(trade_event("mintB", 2))
        await bus.publish(drift_event("f2"))
        # its queue, deleted with the connection, is declared and bound again with it
        await eventually(
            lambda: [e.data.feature for e in got.of_type("model.drift")] == ["f1", "f2"],
            within=20,
            what="the broadcast after the loss",
        )
        assert bus.is_healthy()
        assert sorted({e.seq for e in got.of_type("token.trade")}) == [1, 2]
    finally:
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_catch_up_whose_connection_is_lost_is_waited_out(
    namespace, amqp_url, service
):
    """The main connection (the catch-up's channel, the critical lane's consumer) dies
    while a catch-up waits for its mark, behind a stop whose handler has not returned:
    the catch-up fails as RabbitMQ's transient failure, and waited out it is begun again
    once the connection is back, returning only once the stop is handled."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="test/1")
    await bus.start()
    gate = asyncio.Event()
    handled: list[str] = []

    async def held(event: Event) -> None:
        await gate.wait()
        handled.append(event.id)

    catching = None
    try:
        await bus.declare(service, CATCHING_UP, shared_keyless=True)
        stop = shutdown_event()
        await bus.publish(stop)
        subscription = catching_up(service, held)
        await bus.subscribe(subscription)
        catching = asyncio.create_task(
            wait_out(lambda: bus.catch_up(subscription), waiter="test", what="catching up")
        )
        await eventually(lambda: bus.describe()["catching_up"] == 2, what="its marks")
        main = bus._connection
        lost = main.transport.connection
        await lost.close(ConnectionError("simulated network failure"))
        await eventually(lambda: RABBITMQ_DEPENDENCY in WAITS.describe(), what="the wait")
        await eventually(bus.is_healthy, within=20, what="the bus healthy again")
        # begun again: its marks wait behind the stop, delivered again
        await eventually(lambda: bus.describe()["catching_up"] == 2, what="its new marks")
        assert not catching.done() and handled == []
        gate.set()
        await catching
        assert stop.id in handled
        assert await bus.dead_letters(service) == []
    finally:
        gate.set()
        if catching is not None:
            catching.cancel()
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_catch_up_mark_taken_by_a_consumer_that_knows_no_marks_is_put_again(
    namespace, amqp_url, service
):
    """An older version's replica still holds the group's shared queues (single-active)
    and takes the marks as any message, answering none: the catch-up puts another at the
    end every ``catch_up_remark_s``, and returns once the queues are the replica's own and
    a mark is answered, instead of waiting for ever."""
    import aio_pika

    from pumpflow.common.bus.rabbitmq import MARK_HEADER, RabbitMQBus
    from pumpflow.common.bus.routing import broadcast_queue, critical_queue

    bus = RabbitMQBus(
        url=amqp_url, namespace=namespace, partitions=2, source="test/1", catch_up_remark_s=0.2
    )
    await bus.start()
    older = await aio_pika.connect(amqp_url)
    catching = None
    try:
        await bus.declare(service, CATCHING_UP, shared_keyless=True)
        channel = await older.channel()
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            taken.append(message)
            await message.ack()

        consumers = []
        for name in (critical_queue(service), broadcast_queue(service)):
            queue = await channel.get_queue(bus._name(name), ensure=False)
            consumers.append((queue, await queue.consume(take)))
        got = Recorder()
        subscription = catching_up(service, got)
        await bus.subscribe(subscription)
        catching = asyncio.create_task(bus.catch_up(subscription))
        marked = lambda: [m for m in taken if MARK_HEADER in (m.headers or {})]  # noqa: E731
        await eventually(lambda: len(marked()) >= 4, what="marks put again, taken and lost")
        assert not catching.done()
        for queue, tag in consumers:
            await queue.cancel(tag)
        stop = shutdown_event()
        await bus.publish(stop)
        await asyncio.wait_for(catching, 30)
        await eventually(lambda: got.ids == [stop.id], what="the stop, to the replica")
        assert await bus.dead_letters(service) == []
    finally:
        if catching is not None:
            catching.cancel()
        await older.close()
        await bus.delete_topology()
        await bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_critical_lane_is_not_read_behind_the_partitions(
    namespace, amqp_url, service
):
    """A connection is read in order: the critical lane's deliveries, and the publishing
    channel's confirms, share none with the partitions' prefetched deliveries."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="test/1")
    await bus.start()
    try:
        await bus.subscribe(
            Subscription(service=service, patterns=("token.*", "exit.*"), handler=Recorder())
        )
        by_lane: dict[str, set] = {}
        for consumer in bus._consumers:
            channel = await consumer.channel.get_underlay_channel()
            by_lane.setdefault(consumer.dispatcher.lane, set()).add(channel.connection)
        publishing = (await bus._channel.get_underlay_channel()).connection
        assert sorted(by_lane) == ["broadcast", "critical", "partition"]
        assert by_lane["critical"] == {publishing}
        assert publishing not in by_lane["partition"] | by_lane["broadcast"]
        assert bus.is_healthy()
    finally:
        await bus.delete_topology()
        await bus.close()
    assert not bus._connections()


@pytest.mark.rabbitmq
async def test_rabbitmq_delete_topology_of_another_process(namespace, amqp_url, service):
    import aiormq

    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    owner = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="test/1")
    await owner.start()
    await owner.subscribe(
        Subscription(
            service=service,
            patterns=("token.*", "exit.*", "model.drift"),
            handler=Recorder(),
            shared_keyless=True,
        )
    )
    await owner.publish(trade_event("mintZ", 1))  # queues that hold messages go too
    await owner.close()
    cleanup = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="test/2")
    await cleanup.delete_topology(services=[service])
    try:
        channel = await cleanup._connection.channel()
        durable = ("p00", "p01", "critical", "bcast", "dlq")
        for name in (f"{service}.{queue}" for queue in durable):
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(f"{namespace}.{name}", passive=True)
            channel = await cleanup._connection.channel()
    finally:
        await cleanup.close()


async def crash_until_dead_lettered(publisher, service, delivered, crash):
    """Each time the poison is delivered again (``delivered()`` counts its deliveries),
    ``crash()`` the consumer that took it, until the poison is dead-lettered; the
    crashes and the dead letters."""
    letters: list = []
    crashes = 0

    async def back_or_dead_lettered() -> bool:
        if delivered() > crashes:
            return True
        letters[:] = await publisher.dead_letters(service, remove=False)
        return bool(letters)

    while True:
        await eventually(back_or_dead_lettered, within=30, interval=0.05)
        if letters:
            return crashes, letters
        assert crashes <= DELIVERY_LIMIT, "the poison came back past the delivery limit"
        crashes += 1
        await crash()


@pytest.mark.parametrize(("window", "batched"), [(1, False), (4, False), (4, True)])
async def test_a_message_that_kills_its_consumer_every_time_ends_in_the_dlq(
    harness, service, window, batched
):
    """Its consumer dies with it at each delivery (as a process it crashes would). After
    the delivery limit it is dead-lettered, and only it: the events behind it go on."""
    publisher = await harness.bus()
    consumer = await harness.bus()
    key = "mintP"
    poison = trade_event(key, 2)
    sent = [trade_event(key, 1), poison, *(trade_event(key, seq) for seq in range(3, 7))]
    got = Recorder()
    deliveries = 0
    over = asyncio.Event()  # set at the end only, so the crashed buses can close

    async def dies_on_poison(event: Event) -> None:
        nonlocal deliveries
        if event.id == poison.id:
            deliveries += 1
            await over.wait()  # its consumer dies with it before this returns
            return
        await got(event)

    async def dies_on_poison_in_a_batch(events: list[Event]) -> None:
        for event in events:
            await dies_on_poison(event)

    def subscription() -> Subscription:
        return Subscription(
            service=service,
            patterns=("token.*",),
            handler=dies_on_poison,
            window=window,
            batch_handler=dies_on_poison_in_a_batch if batched else None,
        )

    current = subscription()
    await consumer.subscribe(current)
    await publisher.publish_many(sent)

    async def crash() -> None:
        nonlocal consumer, current
        fresh = subscription()
        consumer = await harness.crash_consumer(consumer, current, fresh)
        current = fresh

    try:
        crashes, letters = await crash_until_dead_lettered(
            publisher, service, lambda: deliveries, crash
        )
        assert deliveries == crashes == DELIVERY_LIMIT + 1
        assert [decode_event(letter.body).id for letter in letters] == [poison.id]
        assert letters[0].reason.startswith(f"delivery limit: started {crashes} times")
        # the events behind it were not counted with it: handled, none dead-lettered
        await eventually(lambda: {e.seq for e in got.events} == {1, 3, 4, 5, 6}, within=10)
        assert [e.seq for e in got.events][-4:] == [3, 4, 5, 6]
        assert len(await publisher.dead_letters(service, remove=False)) == 1
        # the alert on dead letters hears of it, once
        await dead_lettered_once(service, "token.trade", "partition")
    finally:
        over.set()


async def test_a_message_that_kills_one_replica_after_another_is_counted_once_for_all(
    harness, service
):
    """Two replicas consume the service at all times; the one the poison reaches dies
    with it and a new one joins. The replicas share one count (RabbitMQ: each counts in
    a journal of its own over the store they share), so after the delivery limit it
    is dead-lettered, however many replicas it went through."""
    publisher = await harness.bus()
    poison = trade_event("mintQ", 1)
    deliveries: list[str] = []
    over = asyncio.Event()  # set at the end only, so the crashed buses can close

    def replica(name: str) -> Subscription:
        async def dies_on_poison(event: Event) -> None:
            if event.id == poison.id:
                deliveries.append(name)
                await over.wait()  # its replica dies with it before this returns

        return Subscription(service=service, patterns=("token.*",), handler=dies_on_poison)

    replicas = {}
    for name in ("r0", "r1"):
        bus = await harness.bus()
        replicas[name] = (bus, replica(name))
        await bus.subscribe(replicas[name][1])
    await publisher.publish(poison)

    async def crash() -> None:
        bus, dying = replicas.pop(deliveries[-1])
        name = f"r{len(deliveries) + 1}"
        fresh = replica(name)
        replicas[name] = (await harness.crash_consumer(bus, dying, fresh), fresh)

    try:
        crashes, letters = await crash_until_dead_lettered(
            publisher, service, lambda: len(deliveries), crash
        )
        assert len(deliveries) == crashes == DELIVERY_LIMIT + 1
        assert len(set(deliveries)) == len(deliveries)  # a replica of its own each time
        assert [decode_event(letter.body).id for letter in letters] == [poison.id]
        assert letters[0].reason.startswith(f"delivery limit: started {crashes} times")
        await dead_lettered_once(service, "token.trade", "partition")
    finally:
        over.set()


class AwayStore(MemoryStateStore):
    """The delivery journals' store, failing as a store that went away while ``away``."""

    away = False

    async def add_member(self, key: str, member: str, ttl: float) -> int:
        if self.away:
            raise ConnectionError("the journal's store is away")
        return await super().add_member(key, member, ttl)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("stop", ["release_partitions", "unsubscribe", "stop_consuming"])
async def test_rabbitmq_a_redelivery_waiting_for_its_count_goes_back_when_its_lane_stops(
    namespace, amqp_url, service, stop
):
    """While the journal's store is away a redelivered message waits for its count (its
    lane with it); a lane that stops meanwhile hands it back, uncounted, at once."""
    harness = BusHarness(RABBITMQ, namespace=namespace, amqp_url=amqp_url, partitions=1)
    store = harness.journal_store = AwayStore()
    release = asyncio.Event()
    started: list[int] = []

    async def blocks(event: Event) -> None:
        started.append(event.seq)
        await release.wait()

    try:
        crashed = await harness.bus()
        await crashed.subscribe(
            Subscription(service=service, patterns=("token.*",), handler=blocks)
        )
        await crashed.publish(trade_event("mintJ", 1))
        await eventually(lambda: started == [1])
        # its process dies with it: the broker delivers it again, marked redelivered
        for connection in crashed._connections():
            await connection.close()
        store.away = True
        waiting = await harness.bus()
        stopped = Subscription(service=service, patterns=("token.*",), handler=Recorder())
        await waiting.subscribe(stopped)
        await eventually(lambda: waiting.describe()["unacked"] == 1)
        async with asyncio.timeout(5):
            if stop == "release_partitions":
                await waiting.release_partitions(stopped, [0])
            elif stop == "unsubscribe":
                await waiting.unsubscribe(stopped)
            else:
                await waiting.stop_consuming()
        store.away = False
        got = Recorder()
        await (await harness.bus()).subscribe(
            Subscription(service=service, patterns=("token.*",), handler=got)
        )
        await eventually(lambda: [e.seq for e in got.events] == [1])
    finally:
        release.set()
        await harness.teardown()
