"""EventLog modes, and both transports logging publish and consume together."""

from __future__ import annotations

import logging
import time

import pytest

from pumpflow.common.bus import EventLog, InMemoryBus, Subscription
from pumpflow.common.events import SystemShutdown, make_event


def event(n: int):
    return make_event(
        SystemShutdown(reason="x"), source="ops/r1", time=time.time(), event_id=f"id-{n}"
    )


@pytest.fixture
def logger(caplog):
    caplog.set_level(logging.INFO, logger="test.events")
    return logging.getLogger("test.events")


def logged(caplog) -> list[tuple[str, str]]:
    return [(r.event_action, r.event_id) for r in caplog.records if r.name == "test.events"]


def test_none_logs_nothing(caplog, logger):
    log = EventLog("none", 1.0, logger=logger)
    log.published(event(1), routing_key="k")
    log.consumed(event(1), service="s", lane="partition", outcome="handled")
    assert not log.enabled
    assert logged(caplog) == []


def test_all_logs_publish_and_consume_with_context(caplog, logger):
    log = EventLog("all", 0.0, logger=logger)
    log.published(event(1), routing_key="system.shutdown.v1.bcast")
    log.consumed(event(1), service="exit", lane="critical", outcome="handled")
    assert logged(caplog) == [("published", "id-1"), ("consumed", "id-1")]
    consumed = caplog.records[-1]
    assert consumed.event_service == "exit"
    assert consumed.event_outcome == "handled"
    assert "type=system.shutdown" in consumed.getMessage()


def test_sampled_picks_by_event_id_consistently(caplog, logger):
    log = EventLog("sampled", 0.1, logger=logger)
    again = EventLog("sampled", 0.1, logger=logger)  # another process, same choice
    picked = [n for n in range(20_000) if log.selected(event(n))]
    assert 0.08 * 20_000 < len(picked) < 0.12 * 20_000
    assert picked == [n for n in range(20_000) if again.selected(event(n))]
    for n in range(200):
        log.published(event(n), routing_key="k")
        log.consumed(event(n), service="s", lane="broadcast", outcome="handled")
    records = logged(caplog)
    published = {i for action, i in records if action == "published"}
    consumed = {i for action, i in records if action == "consumed"}
    assert published == consumed == {f"id-{n}" for n in picked if n < 200}


def test_sample_rate_edges_and_bad_settings():
    assert not any(EventLog("sampled", 0.0).selected(event(n)) for n in range(1000))
    assert all(EventLog("sampled", 1.0).selected(event(n)) for n in range(1000))
    with pytest.raises(ValueError, match="mode"):
        EventLog("some", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate"):
        EventLog("sampled", 1.5)


async def test_bus_logs_each_publish_and_consume(caplog, logger):
    bus = InMemoryBus(synchronous=True, event_log=EventLog("all", logger=logger))

    async def handler(_):
        return None

    await bus.subscribe(Subscription(service="s", patterns=("system.*",), handler=handler))
    await bus.publish(event(7))
    assert logged(caplog) == [("published", "id-7"), ("consumed", "id-7")]
