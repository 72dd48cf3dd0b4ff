"""Fixtures shared by every test come from the test kit's plugin; this adds the repo's policy."""

from __future__ import annotations

import asyncio

import pytest

# namespace, amqp_url (a vhost per session), redis_url, postgres_dsn, pg_pool, redis_client,
# bus_harness, rabbitmq_harness, token_events, process_stack
pytest_plugins = ["pumpflow.common.testing.plugin"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        # a bound of its own (the fault suite's long scenarios) wins over the default
        if asyncio.iscoroutinefunction(getattr(item, "function", None)) and (
            item.get_closest_marker("timeout") is None
        ):
            item.add_marker(pytest.mark.timeout(120))


@pytest.fixture(scope="session", autouse=True)
def reports_dir(tmp_path_factory):
    """Reports that runs and backtests write unasked go to a temporary folder, not the
    checkout (subprocesses inherit it)."""
    import os

    path = tmp_path_factory.mktemp("reports")
    previous = os.environ.get("PUMPFLOW_REPORTS_DIR")
    os.environ["PUMPFLOW_REPORTS_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PUMPFLOW_REPORTS_DIR", None)
    else:
        os.environ["PUMPFLOW_REPORTS_DIR"] = previous
