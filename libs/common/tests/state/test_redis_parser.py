"""The Redis store's replies are parsed by hiredis, the compiled parser. No server needed."""

from __future__ import annotations

from redis._parsers import _AsyncHiredisParser

from pumpflow.common.state.redis import RedisStateStore


async def test_the_stores_connections_parse_replies_with_hiredis():
    """hiredis is a dependency for this: redis-py takes it when installed, and a read of a
    1,000-entry hash or a 2,000-entry list then costs a tenth of the client's CPU."""
    store = RedisStateStore(url="redis://127.0.0.1:6379/0", namespace="unused")
    try:
        connection = store._client.connection_pool.make_connection()
        assert isinstance(connection._parser, _AsyncHiredisParser)
    finally:
        await store.close()
