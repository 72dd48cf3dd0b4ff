"""The test kit of pumpflow code and of code built on it.

- :func:`eventually`: a bounded poll for outcomes with nothing else to await.
- :class:`EventCollector`: a bus handler that records events; await n events of a type,
  or a predicate, and end negative checks with a :meth:`~EventCollector.barrier`.
- :class:`TokenEvents`: the feed's token events, valid and on the real curve;
  :func:`sample_payload` a valid payload of any type; :func:`partition_keys`;
  :func:`base58_key` keys and signatures that frames may carry.
- :class:`BusHarness`: started buses of either transport, torn down after the test.
- :class:`LosingStore`: the in-process state store, made to lose its contents.
- :func:`stack_env` / :class:`ProcessStack`: services as processes on the test's servers.
- :mod:`pumpflow.common.testing.trade_api`: a local fake of PumpPortal's trade API.
- :mod:`pumpflow.common.testing.plugin`: the pytest fixtures over all of these.

No pytest here (only in the plugin), so benchmarks and scripts may use the kit too.
"""

from pumpflow.common.testing.bus import MEMORY, RABBITMQ, TRANSPORTS, BusHarness
from pumpflow.common.testing.collector import EventCollector
from pumpflow.common.testing.factories import (
    START,
    FeatureUpdates,
    TokenEvents,
    base58_key,
    partition_keys,
    sample_payload,
    trade_frame,
)
from pumpflow.common.testing.processors import AppliedSeqs
from pumpflow.common.testing.servers import (
    AMQP_URL,
    POSTGRES_DSN,
    REDIS_URL,
    drop_schema,
    free_port,
    local_app,
    migrations_split_at_fills_altered,
    rabbitmq_vhost,
    schema_exists,
)
from pumpflow.common.testing.stack import (
    PUMPFLOW,
    ProcessStack,
    http_get,
    http_json,
    settings_env,
    stack_env,
)
from pumpflow.common.testing.stores import LosingStore
from pumpflow.common.testing.waiting import eventually

__all__ = [
    "AMQP_URL",
    "MEMORY",
    "POSTGRES_DSN",
    "PUMPFLOW",
    "RABBITMQ",
    "REDIS_URL",
    "START",
    "TRANSPORTS",
    "AppliedSeqs",
    "BusHarness",
    "EventCollector",
    "FeatureUpdates",
    "LosingStore",
    "ProcessStack",
    "TokenEvents",
    "base58_key",
    "drop_schema",
    "eventually",
    "free_port",
    "http_get",
    "http_json",
    "local_app",
    "migrations_split_at_fills_altered",
    "partition_keys",
    "rabbitmq_vhost",
    "sample_payload",
    "schema_exists",
    "settings_env",
    "stack_env",
    "trade_frame",
]
