"""Settings of the features service (``PUMPFLOW_<NAME>``).

Every ``pumpflow`` command reads this module (the check of the environment): the
methods import the parts they configure, which the fields do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from pumpflow.common.runtime.settings import CommonSettings

if TYPE_CHECKING:
    from pumpflow.common.consumer import KeyedConsumerConfig


class FeaturesSettings(CommonSettings):
    """Settings of the features service."""

    features_inactive_ttl_s: float = Field(
        3600.0, gt=0, description="TTL of a retired token's features and checkpoint"
    )
    features_compact_after_s: float = Field(
        120.0, gt=0, description="a token idle this long is held as compact bytes"
    )
    features_workers: int = Field(8, ge=1, le=256, description="token workers")
    #: a backlog's batches: a token's events of a window are folded, announced and
    #: checkpointed once, and the loop runs a lane's batch in one stretch that every
    #: other lane (the critical one too) waits behind; live, batches are one or two
    #: events whatever the window (docs/benchmarks.md, the embedded pipeline)
    features_window: int = Field(
        128, ge=1, le=4096, description="deliveries per partition applied while storing"
    )
    features_task_deadline_s: float = Field(
        10.0, gt=0, description="a token task running longer is hung"
    )

    def consumer_config(self, service: str) -> KeyedConsumerConfig:
        from pumpflow.common.consumer import KeyedConsumerConfig
        from pumpflow.common.features.processor import CONSUMES, MARKET_TYPES

        return KeyedConsumerConfig(
            service=service,
            patterns=CONSUMES,
            market_types=MARKET_TYPES,
            workers=self.features_workers,
            window=self.features_window,
            task_deadline_s=self.features_task_deadline_s,
            compact_after_s=self.features_compact_after_s,
        )
