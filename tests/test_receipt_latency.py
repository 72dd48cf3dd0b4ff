"""Receipt-to-decision latency: the frame's receipt time travels down the causal chain
(token event -> features.updated -> model.prediction -> trading's decision), and trading
observes decision time minus that receipt in ``pumpflow_receipt_to_decision_seconds``."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event, decode_event, encode_event, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import EventCollector, eventually, free_port, http_get
from pumpflow.common.trading import PositionBook, RiskManager, TradingEngine
from pumpflow.features.service import FeaturesService
from pumpflow.model.service import ModelService
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

START = 1_700_000_000.0
HISTOGRAM = "pumpflow_receipt_to_decision_seconds"


def delay_of(index: int) -> float:
    """How long after its receipt the pipeline gets to frame ``index``: 0 to 24 ms."""
    return (index % 7) * 0.004


def histogram(registry: CollectorRegistry) -> tuple[float, float]:
    """(count, sum) of the receipt-to-decision histogram."""
    count = registry.get_sample_value(f"{HISTOGRAM}_count")
    total = registry.get_sample_value(f"{HISTOGRAM}_sum")
    return count or 0.0, total or 0.0


def test_the_receipt_time_is_kept_on_the_wire_and_handed_on_by_what_it_causes():
    frame = make_event(_prediction_payload(), source="feed/x", time=5.0, received_at=4.5)
    assert decode_event(encode_event(frame)).received_at == 4.5
    caused = make_event(_prediction_payload(), source="model/x", time=6.0, cause=frame)
    assert (caused.causation_id, caused.received_at) == (frame.id, 4.5)
    # an event without a receipt time is encoded as before (the field is left out)
    plain = make_event(_prediction_payload(), source="model/x", time=6.0)
    assert b"received_at" not in encode_event(plain)
    assert decode_event(encode_event(plain)).received_at is None


def _prediction_payload():
    from pumpflow.common.events import ModelPrediction

    return ModelPrediction(mint="m", model_id="m1", arm="a", feature_set_version="v", score=0.9)


def test_the_engine_measures_a_decision_from_the_receipt_on_its_clock():
    clock = ReplayClock(100.0)
    book = PositionBook()
    engine = TradingEngine(None, book, RiskManager(10.0, 0.02, 5, positions=book), clock=clock)
    received = make_event(_prediction_payload(), source="model/x", time=99.9, received_at=99.97)
    engine.process(received)
    assert engine.last_latency_s == pytest.approx(0.03)
    engine.process(make_event(_prediction_payload(), source="model/x", time=99.9))
    assert engine.last_latency_s is None


@pytest.mark.slow
async def test_each_decision_observes_its_frames_receipt_to_decision_time():
    clock = ReplayClock(START)
    frames = list(
        market_events(Market(MarketConfig(seed=11)), 90.0, start_epoch=START, source="feed/sim")
    )
    registry = CollectorRegistry()
    trading = TradingService(
        TradingSettings.load(service="trading", transport="memory", trading_min_score=0.0),
        registry=registry,
    )
    async with run_embedded(
        [FeaturesService, ActivityService, ModelService, trading], clock=clock, synchronous=True
    ) as system:
        seen = await EventCollector("seen").attach(
            system.bus, "features.updated", "model.prediction", "order.requested"
        )
        received: dict[str, tuple[float, float]] = {}

        async def replay() -> None:
            for index, frame in enumerate(frames):
                # received a little after its event time (a time the frame would carry),
                # so a latency taken from event times would differ; handled ``delay`` later
                receipt = frame.time + 0.003 * (index % 3)
                frame = make_event(
                    frame.data, source=frame.source, time=frame.time, seq=frame.seq,
                    received_at=receipt,
                )  # fmt: skip
                await clock.advance_to(receipt + delay_of(index))
                # the clock never steps back: a frame close behind a later one waits longer
                received[frame.id] = (receipt, clock.now() - receipt)
                await system.bus.publish(frame)
                # every consequence is decided before the clock moves on
                await system.drain()

        # bounds a hang only
        await asyncio.wait_for(replay(), 240.0)

    by_id: dict[str, Event] = {e.id: e for e in seen.of()}
    decided = [p for p in seen.of("model.prediction") if not p.data.shadow]
    assert len(decided) > 20, seen.summary()

    def frame_of(event: Event) -> str:
        """The token event a chain began with, by causation ids."""
        while event.causation_id in by_id:
            event = by_id[event.causation_id]
        assert event.causation_id in received, f"{event.type} caused by no frame"
        return event.causation_id

    expected = []
    for prediction in decided:
        receipt, delay = received[frame_of(prediction)]
        # the receipt travelled with the chain, hop by hop
        assert prediction.received_at == receipt
        assert by_id[prediction.causation_id].received_at == receipt
        expected.append(delay)
    count, total = histogram(registry)
    assert count == len(decided)
    assert total == pytest.approx(sum(expected), abs=1e-6)
    assert max(expected) > min(expected)  # delays that differ, so a mix-up would show

    # an order is a decision's event: stamped at the decision, carrying the receipt
    orders = seen.of("order.requested")
    assert orders, "trading_min_score=0 enters where the filters allow"
    for order in orders:
        receipt, delay = received[frame_of(order)]
        assert order.received_at == receipt
        assert order.time - receipt == pytest.approx(delay, abs=1e-9)


PIPELINE = ("feed", "features", "activity", "model", "trading")


def samples(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
async def test_a_process_run_exports_the_latency_of_its_decisions(
    pg_pool, redis_client, process_stack
):
    """Simulator, feed, features, activity, model and trading as processes: trading's
    /metrics counts the decisions, each measured from the feed's receipt of its frame."""
    sim_port = free_port()
    ports = {service: free_port() for service in PIPELINE}
    process_stack.configure(PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{sim_port}/api/data")
    process_stack.pumpflow(
        "simulator", "sim", "serve", "--port", str(sim_port), "--speed", "10",
        "--seed", "5", "--rate", "120",
    )  # fmt: skip
    for service in PIPELINE:
        process_stack.serve(service, http_port=ports[service])

    def decided() -> str | None:
        status, text = http_get(f"http://127.0.0.1:{ports['trading']}/metrics")
        count = samples(text, f"{HISTOGRAM}_count") if status == 200 else None
        return text if count else None

    text = await eventually(
        lambda: asyncio.to_thread(decided),
        120,
        what="decisions measured on trading's /metrics",
        details=process_stack.logs,
        interval=0.5,
    )
    count = samples(text, f"{HISTOGRAM}_count")
    total = samples(text, f"{HISTOGRAM}_sum")
    assert count and total is not None
    # from the feed's receipt, through RabbitMQ and three services: positive, and
    # within the minute the stack has been running
    assert 0 < total / count < 60
    assert samples(text, f'{HISTOGRAM}_bucket{{le="+Inf"}}') == count
    codes = await process_stack.stop_all([*PIPELINE, "simulator"])
    assert codes == dict.fromkeys([*PIPELINE, "simulator"], 0), process_stack.logs()
