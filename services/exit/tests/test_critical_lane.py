"""Exit orders travel on the critical lane: with a backlog of trades queued for
trading's consumer group, an exit order published after them reaches the group's
consumer before the backlog is drained, and before its deadline."""

from __future__ import annotations

import pytest

from pumpflow.common.testing.backlog import exit_order_through_backlog
from pumpflow.common.testing.plugin import bus_harness_fixture

PARTITIONS = 4
harness = bus_harness_fixture(partitions=PARTITIONS)


def assert_overtook(run) -> None:
    assert run.trades_before < run.backlog, "the exit order waited for the whole backlog"
    assert run.arrived_at <= run.deadline


@pytest.mark.parametrize("backlog", [5_000])
async def test_an_exit_order_overtakes_a_trade_backlog(harness, backlog):
    bus = await harness.bus(partitions=PARTITIONS)
    harness.delete_after(["trading"])
    # trades handled at 5 ms each: the backlog outlasts RabbitMQ's subscription settling
    run = await exit_order_through_backlog(bus, backlog, partitions=PARTITIONS, trade_work_s=0.005)
    assert_overtook(run)


@pytest.mark.slow
async def test_an_exit_order_overtakes_50000_queued_trades(harness):
    bus = await harness.bus(partitions=PARTITIONS)
    harness.delete_after(["trading"])
    run = await exit_order_through_backlog(bus, 50_000, partitions=PARTITIONS)
    assert_overtook(run)
    # most of what was still queued when the order was published was still queued when
    # it got through (how much the consumer handled before the publish is the setup's pace)
    queued_at_publish = run.backlog - (run.trades_before - run.trades_in_between)
    assert run.trades_in_between < queued_at_publish // 2, run
