"""Settings of the model service (``PUMPFLOW_<NAME>``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pumpflow.common.consumer import KeyedConsumerConfig
from pumpflow.common.model.processor import CONSUMES, ScoringPolicy
from pumpflow.common.runtime.settings import CommonSettings

_POLICY = ScoringPolicy()


class ModelSettings(CommonSettings):
    """Settings of the model service.

    ``model_models`` (JSON, model id -> ONNX path, its card beside it) and ``model_arms``
    (JSON list of ``{"name", "model_id", "weight", "shadow"}``) are the serving at first
    start: once changed through the HTTP API, the serving stored in the state store wins
    (every replica follows it, and it outlives restarts).
    """

    model_models: dict[str, str] = Field(
        default_factory=dict,
        description="model id -> ONNX path (JSON); empty: the shipped default model as entry",
    )
    model_arms: list[dict[str, Any]] = Field(
        default_factory=list,
        description="A/B arms (JSON list of name, model_id, weight, shadow); empty: one "
        "arm 'control' per model, equal weights",
    )
    model_min_interval_s: float = Field(
        _POLICY.min_interval_s, ge=0,
        description="a token is scored at most once per this much event time",
    )
    model_label_interval_s: float = Field(
        _POLICY.label_interval_s, ge=0,
        description="a token's predictions are followed to their labels at most this often",
    )
    model_retire_ttl_s: float = Field(
        _POLICY.retire_ttl_s, gt=0, description="TTL of a retired token's record"
    )
    model_serving_refresh_s: float = Field(
        2.0, gt=0, description="how often a replica reads the shared serving (models, arms)"
    )
    model_monitor_s: float = Field(
        1.0, gt=0,
        description="how often drift transitions are published and labels due are counted",
    )
    model_workers: int = Field(4, ge=1, le=256, description="token workers")
    model_window: int = Field(
        256, ge=1, le=4096,
        description="deliveries per partition taken at once (the batch scored in one call)",
    )
    model_task_deadline_s: float = Field(
        10.0, gt=0, description="a token task running longer is hung"
    )
    model_compact_after_s: float = Field(
        120.0, gt=0, description="a token idle this long is held as bytes"
    )

    def policy(self) -> ScoringPolicy:
        return ScoringPolicy(
            min_interval_s=self.model_min_interval_s,
            retire_ttl_s=self.model_retire_ttl_s,
            label_interval_s=self.model_label_interval_s,
        )

    def consumer_config(self, service: str) -> KeyedConsumerConfig:
        return KeyedConsumerConfig(
            service=service,
            patterns=CONSUMES,
            workers=self.model_workers,
            window=self.model_window,
            task_deadline_s=self.model_task_deadline_s,
            compact_after_s=self.model_compact_after_s,
        )
