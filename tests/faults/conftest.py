"""Fixtures of the fault suite: a pipeline of processes on the test's servers."""

from __future__ import annotations

import pytest_asyncio

from pumpflow.common.testing.faults import MarketOptions, Pipeline, Servers


@pytest_asyncio.fixture
async def pipeline_on_shared(
    request, pg_pool, redis_client, process_stack, namespace, amqp_url, redis_url, postgres_dsn
):
    """A pipeline on the shared servers (faults that leave the servers alone only).

    ``@pytest.mark.market(...)`` gives its MarketOptions. Asked for after the servers'
    fixtures, so the processes end before the schema goes.
    """
    marker = request.node.get_closest_marker("market")
    market = MarketOptions(**(marker.kwargs if marker else {}))
    servers = Servers(amqp_url=amqp_url, redis_url=redis_url, postgres_dsn=postgres_dsn)
    yield Pipeline(process_stack, servers=servers, namespace=namespace, market=market)
