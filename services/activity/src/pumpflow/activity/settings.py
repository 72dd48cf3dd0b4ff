"""Settings of the activity service (environment ``PUMPFLOW_*``).

Every ``pumpflow`` command reads this module (the check of the environment): the
methods import the parts they configure, which the fields do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from pumpflow.common.runtime.settings import CommonSettings

if TYPE_CHECKING:
    from pumpflow.common.activity import LifecycleThresholds
    from pumpflow.common.consumer import KeyedConsumerConfig


class ActivitySettings(CommonSettings):
    """Environment of the activity service."""

    service: str = Field("activity", description="service name; first part of event sources")
    activity_workers: int = Field(2, ge=1, le=64, description="token workers")
    #: a backlog's batches: a token's events of a window are folded, announced and
    #: checkpointed once, and the loop runs a lane's batch in one stretch that every
    #: other lane (the critical one too) waits behind; live, batches are one or two
    #: events whatever the window (docs/benchmarks.md, the embedded pipeline)
    activity_window: int = Field(
        128, ge=1, le=4096, description="deliveries per partition applied while storing"
    )
    activity_task_deadline_s: float = Field(
        10.0, gt=0, description="a token task running longer is hung"
    )
    activity_compact_after_s: float = Field(
        120.0, gt=0, description="a token idle this long is held as compact bytes"
    )
    activity_subscription_batch_s: float = Field(
        1.0, gt=0, description="feed (un)subscribe commands are batched over this long"
    )
    activity_subscription_batch_max: int = Field(
        1000, ge=1, le=5000, description="mints per feed command (PumpPortal allows 5000)"
    )
    activity_state_ttl_s: float = Field(
        6 * 3600.0, gt=0, description="TTL of a live token's record in the store"
    )
    activity_inactive_after_quiet_s: float = Field(
        180.0, gt=0, description="no trades this long makes a token inactive"
    )
    activity_decline_after_quiet_s: float = Field(
        60.0, gt=0, description="no trades this long makes an active token decline"
    )
    activity_new_max_age_s: float = Field(
        300.0, gt=0, description="a token never active this long after launch declines"
    )
    activity_declining_max_s: float = Field(
        300.0, gt=0, description="a token declining this long becomes inactive"
    )

    def thresholds(self) -> LifecycleThresholds:
        from pumpflow.common.activity import LifecycleThresholds

        return LifecycleThresholds(
            inactive_after_quiet_s=self.activity_inactive_after_quiet_s,
            decline_after_quiet_s=self.activity_decline_after_quiet_s,
            new_max_age_s=self.activity_new_max_age_s,
            declining_max_s=self.activity_declining_max_s,
        )

    def consumer_config(self, service: str) -> KeyedConsumerConfig:
        from pumpflow.common.activity import CONSUMES, MARKET_TYPES, PARTIAL_PUBLISHERS
        from pumpflow.common.consumer import KeyedConsumerConfig

        return KeyedConsumerConfig(
            service=service,
            patterns=CONSUMES,
            market_types=MARKET_TYPES,
            partial_publishers=PARTIAL_PUBLISHERS,
            workers=self.activity_workers,
            window=self.activity_window,
            task_deadline_s=self.activity_task_deadline_s,
            live_ttl_s=self.activity_state_ttl_s,
            compact_after_s=self.activity_compact_after_s,
        )
