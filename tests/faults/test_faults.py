"""The fault suite: faults injected mid-stream into the pipeline as processes, then its ledger.

Each scenario runs the simulator, feed, features and activity as processes (and the
model where it asks for it), lets the market run, injects its fault, waits until every
stage moves events again (the recovery time, bounded by RECOVERY_BOUND_S), lets the
market run on, stops it and compares what the simulator sent, Postgres stored, the bus
carried and each consumer applied (:class:`~pumpflow.common.testing.faults.Ledger`).
Pass: nothing stored is lost downstream, nothing applied twice, every mint's events
carried and applied in order, each service back on its own, and frames lost at the
socket (in flight when it dropped, or read by a feed killed before it stored them) only
where the feed counted the interruption. With the model: every vector it scored
predicted once, in order.

Servers a scenario stops are the test's own (testing.instances); kill -9, socket and
hostile-frame scenarios use the shared ones. Scenarios marked ``fault`` are long and run
in CI's own step (``pytest -m fault``); the others run with every ``make test``.
Figures: PUMPFLOW_FAULT_REPORT=<file.jsonl> appends each scenario's (docs/reliability.md).
"""

from __future__ import annotations

import pytest

from pumpflow.common.testing.faults import MarketOptions

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

#: every service moves events again within this long after a fault ends
RECOVERY_BOUND_S = 60.0
#: events stored before the fault, and after the pipeline recovered
BEFORE, AFTER = 600, 600


def assert_recovered(recovery: float) -> None:
    assert recovery <= RECOVERY_BOUND_S, f"recovered after {recovery:.1f} s"


async def run(pipeline, fault, report, *, may_lose: bool = False, late: tuple[str, ...] = ()):
    """Start (``late`` services once the feed stored some events), let BEFORE events
    through, inject ``fault``, AFTER more, finish; the ledger."""
    await pipeline.start(late=late)
    await pipeline.until_recorded(BEFORE)
    recovery = await fault(pipeline)
    await pipeline.until_recorded(AFTER)
    ledger = await pipeline.finish()
    report(ledger)
    assert ledger.problems(may_lose=may_lose) == [], ledger.report()
    assert_recovered(recovery)
    return ledger


# ---------------------------------------------------------------- kill -9 of a service


@pytest.mark.fault
async def test_kill_9_features_loses_nothing_and_applies_nothing_twice(make_pipeline, report):
    pipeline = await make_pipeline()
    ledger = await run(pipeline, lambda p: p.kill_and_restart("features"), report)
    assert ledger.lost == 0


async def test_kill_9_activity_loses_nothing_and_applies_nothing_twice(make_pipeline, report):
    pipeline = await make_pipeline()
    await run(pipeline, lambda p: p.kill_and_restart("activity"), report)


async def test_consumers_started_after_the_feed_lose_nothing(make_pipeline, report):
    # their queues were declared by the feed's process as it connected (runtime.topology)
    pipeline = await make_pipeline()
    await run(pipeline, lambda p: p.flowing(), report, late=("features", "activity"))


@pytest.mark.fault
async def test_kill_9_feed_loses_only_what_it_had_not_stored_and_says_so(make_pipeline, report):
    pipeline = await make_pipeline()
    ledger = await run(pipeline, lambda p: p.kill_and_restart("feed"), report, may_lose=True)
    # what a killed feed had read and not stored is gone (PumpPortal keeps no history):
    # at most what arrives within its batch's write, counted in the ledger
    assert ledger.lost <= 500, ledger.report()


@pytest.mark.fault
async def test_kill_9_model_loses_no_prediction_and_publishes_none_twice(make_pipeline, report):
    """The model killed mid-stream scores on from its stored states: every vector its
    states count scored comes out once, in order, none within the scoring interval of
    its token's last (a vector scored before the kill and not stored is scored again,
    as part of whatever batch it comes in then: the ledger counts what was stored)."""
    pipeline = await make_pipeline(stages=("model",))
    ledger = await run(pipeline, lambda p: p.kill_and_restart("model"), report)
    predictions = ledger.predictions
    assert predictions["scored"] == predictions["predicted"] > 0, ledger.report()
    # the restarted process applied and scored on its own (not only what it restored)
    assert ledger.consumers["model"]["applied_metric"] > 0, ledger.report()


# ---------------------------------------------------------------- the socket


@pytest.mark.fault
async def test_socket_dropped_repeatedly_loses_only_frames_in_flight(make_pipeline, report):
    pipeline = await make_pipeline(market=MarketOptions(drop_every_s=4.0))

    async def drops(p) -> float:
        # the drops run all along; the pipeline must keep flowing between them
        return await p.flowing()

    ledger = await run(pipeline, drops, report, may_lose=True)
    assert ledger.feed_reported["reconnects"] >= 3, ledger.report()


# ---------------------------------------------------------------- hostile frames


async def _hostile(make_pipeline, report, kinds: tuple[str, ...] = ()):
    pipeline = await make_pipeline(market=MarketOptions(hostile_rate=0.03, hostile_kinds=kinds))
    ledger = await run(pipeline, lambda p: p.flowing(), report)
    hostile = sum(ledger.hostile_sent.values())
    assert hostile >= 20, ledger.report()
    # every hostile data frame, and every frame over the read limit, was counted invalid
    # (huge control frames within it are valid ones)
    data_frames = hostile - ledger.hostile_sent["huge_control"]
    assert ledger.feed_reported["invalid_frames"] >= data_frames, ledger.report()
    return ledger


async def test_hostile_frames_among_good_ones_lose_no_good_one(make_pipeline, report):
    await _hostile(make_pipeline, report)


@pytest.mark.fault
async def test_hostile_frames_with_oversize_ones_lose_no_good_one(make_pipeline, report):
    from pumpflow.simulator.faults import HOSTILE_KINDS

    ledger = await _hostile(make_pipeline, report, HOSTILE_KINDS)
    # a frame over the read limit is refused alone: the connection goes on
    assert ledger.hostile_sent["oversize"] >= 1, ledger.report()
    assert ledger.feed_reported["reconnects"] == 0, ledger.report()


# ---------------------------------------------------------------- the servers

OUTAGES = [
    pytest.param(
        server,
        seconds,
        id=f"{server}-{'restart' if seconds is None else 'stop30s'}",
    )
    for server in ("rabbitmq", "redis", "postgres")
    for seconds in (None, 30.0)
]


@pytest.mark.fault
@pytest.mark.parametrize(("server", "seconds"), OUTAGES)
async def test_server_outage_loses_nothing(make_pipeline, report, server, seconds):
    pipeline = await make_pipeline(own=(server,))
    await run(pipeline, lambda p: p.outage(server, seconds=seconds), report)


#: the services' bounds on a Redis operation and a Postgres command: short, so that a
#: frozen server is met, and named in /readyz, within seconds (a frozen broker is named
#: once a publication waits UNCONFIRMED_WAIT_S for its confirm)
FROZEN_SETTINGS = {"redis_socket_timeout_s": 1.0, "postgres_command_timeout_s": 2.0}


@pytest.mark.fault
@pytest.mark.parametrize("server", ["redis", "postgres", "rabbitmq"])
async def test_a_frozen_server_is_waited_for_and_loses_nothing(make_pipeline, report, server):
    """A frozen host or a network lost without a reset: the server answers nothing and
    drops no connection. The work that meets it fails within the services' bound, waits
    for it (named in /readyz) and goes on once it answers."""
    pipeline = await make_pipeline(proxied=(server,), **FROZEN_SETTINGS)
    await run(pipeline, lambda p: p.freeze(server), report)


@pytest.mark.fault
async def test_a_broker_alarm_blocking_publishers_is_waited_for_and_loses_nothing(
    make_pipeline, report
):
    """RabbitMQ short of memory or disk blocks every connection that publishes, and
    answers nothing: the services hold their work, say in /readyz that they wait for
    the broker, and go on once it clears."""
    pipeline = await make_pipeline(own=("rabbitmq",))
    await run(pipeline, lambda p: p.alarm(), report)
