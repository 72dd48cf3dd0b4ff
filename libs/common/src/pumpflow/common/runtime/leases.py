"""The stores a service's leader lease lives in, chosen from its context."""

from __future__ import annotations

import logging

from pumpflow.common.clock import WallClock
from pumpflow.common.db.leases import PostgresLeaseStore
from pumpflow.common.lease import LeaseStore
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore

log = logging.getLogger(__name__)


def lease_stores(ctx: ServiceContext) -> list[LeaseStore]:
    """The stores a lease of ``ctx``'s service lives in.

    A lease times out on the wall clock. The shared store's TTLs do too when the run's
    clock is the wall (Redis, or the embedded store on a WallClock of speed 1). On a
    market clock (a simulated market at speed, a replay) the embedded store's TTLs
    follow that clock and would end the lease early; such a run is one process with
    one replica of each service, so its lease stays in a store of its own.

    Beside a shared store the lease is held in Postgres too, when the service has a
    database: an outage of Redis longer than the lease's TTL then leaves the holder in
    place (the lease lasts while either store renews it; see :mod:`pumpflow.common.lease`).
    """
    clock = ctx.clock
    if ctx.store is not None and isinstance(clock, WallClock) and clock.speed == 1.0:
        if ctx.db is None:
            return [ctx.store]
        return [ctx.store, PostgresLeaseStore(ctx.db)]
    if ctx.store is None:
        # a bare context (tests, tools): nobody else can hold the lease here
        log.info("%s without a shared state store: its lease is not shared", ctx.settings.service)
    return [MemoryStateStore(WallClock())]
