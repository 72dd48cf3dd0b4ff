"""Settings of the model service (``PUMPFLOW_<NAME>``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationInfo, field_validator

from pumpflow.common.model.refit import RefitPolicy
from pumpflow.common.model.settings import DriftThresholds, ScoringPolicy
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.trading import EntryFilters

if TYPE_CHECKING:
    from pumpflow.common.consumer import KeyedConsumerConfig

_POLICY = ScoringPolicy()
_REFIT = RefitPolicy()
_DRIFT = DriftThresholds()


class ModelSettings(CommonSettings):
    """Settings of the model service.

    ``model_models`` (JSON, model id -> ONNX path, its card beside it) and ``model_arms``
    (JSON list of ``{"name", "model_id", "weight", "shadow"}``) are the serving at first
    start: once changed through the HTTP API, the serving stored in the state store wins
    (every replica follows it, and it outlives restarts).

    Live labels are stored (``model_store_labels``: Postgres when the run has a
    database, else in memory) and each served model is refitted on its newest stored
    labels when :class:`~pumpflow.common.model.refit.RefitPolicy` says so
    (``model_refit_*``, defaults argued there); a refit better on the held-out slice by
    more than ``model_refit_min_gain`` is swapped in, written to ``model_registry_dir``,
    stored with its refit (a replica lacking the file writes it from there) and made the
    serving of every replica. A model's refits but the newest ``model_refit_keep`` and
    the served ones are pruned after each refit.
    On by default: the policy's thresholds (20,000 new labels, 30 minutes apart) keep a
    short run from ever refitting, and a long one is what the refits are for.
    """

    model_models: dict[str, str] = Field(
        default_factory=dict,
        description="model id -> ONNX path (JSON); empty: the shipped default model as entry",
    )
    model_arms: list[dict[str, Any]] = Field(
        default_factory=list,
        description="A/B arms (JSON list of name, model_id, weight, shadow); empty: one "
        "live arm per model, named after its model id ('control' when there is one model), "
        "equal weights",
    )
    model_min_interval_s: float = Field(
        _POLICY.min_interval_s,
        ge=0,
        description="a token is scored at most once per this much event time",
    )
    model_label_interval_s: float = Field(
        _POLICY.label_interval_s,
        ge=0,
        description="a token's predictions are followed to their labels at most this often",
    )
    model_retire_ttl_s: float = Field(
        _POLICY.retire_ttl_s, gt=0, description="TTL of a retired token's record"
    )
    trading_min_score: float = Field(
        EntryFilters().min_score,
        ge=0,
        le=1,
        description="the score trading enters at, trading's own setting: live precision is "
        "measured there",
    )
    model_serving_refresh_s: float = Field(
        2.0, gt=0, description="how often a replica reads the shared serving (models, arms)"
    )
    model_monitor_s: float = Field(
        1.0,
        gt=0,
        description="how often drift transitions are published and the live figures exported",
    )
    model_live_read_s: float = Field(
        10.0,
        gt=0,
        description="how often a replica reads every replica's outcomes back for the live "
        "figures (it adds its own every monitor round; GET /models/{id}/performance answers "
        "from the last read, reading at once only with ?fresh=true): a read parses each "
        "model and arm's window, about 10 ms for 2,000 labels with redis-py's own parser, "
        "on the event loop that scores",
    )
    model_store_labels: bool = Field(
        True, description="store resolved live labels (Postgres when the run has a database)"
    )
    model_refit: bool = Field(
        True, description="refit served models on their stored live labels automatically"
    )
    model_refit_every_labels: int = Field(
        _REFIT.every_labels, ge=1, description="new stored labels of a model between refits"
    )
    model_refit_min_interval_s: float = Field(
        _REFIT.min_interval_s, ge=0, description="least event time between a model's refits"
    )
    model_refit_min_rows: int = Field(
        _REFIT.min_rows, ge=2, description="least stored labels of a model to refit it"
    )
    model_refit_window_rows: int = Field(
        _REFIT.window_rows, ge=2, description="the newest stored labels a refit uses"
    )
    model_refit_check_s: float = Field(
        _REFIT.check_s, gt=0, description="how often a refit being due is checked"
    )
    model_refit_min_gain: float = Field(
        _REFIT.min_gain,
        ge=0,
        description="least gain of a refit on the held-out slice to swap it in (AUC; a "
        "regressor: share of the serving RMSE)",
    )
    model_refit_keep: int = Field(
        _REFIT.keep_refits,
        ge=1,
        description="a model's newest refits kept (with their models) after each refit; "
        "older ones are deleted with the refitting replica's files, but those a serving names",
    )
    model_registry_dir: str = Field(
        "",
        description="where refitted models are written (a replica lacking one writes it "
        "here from the database); empty: pumpflow-<namespace>-models in the temporary "
        "directory",
    )
    model_drift_alert_psi: float = Field(
        _DRIFT.alert_psi, gt=0, description="PSI at or above which a feature is drifting"
    )
    model_drift_recover_psi: float = Field(
        _DRIFT.recover_psi,
        gt=0,
        description="PSI under which a drifting feature has recovered (below the alert's)",
    )
    model_drift_window: int = Field(
        _DRIFT.window, ge=1, description="the newest vectors a feature's PSI is computed on"
    )
    model_drift_min_observations: int = Field(
        _DRIFT.min_observations,
        ge=1,
        description="vectors seen before any feature is judged (at most the window)",
    )
    model_drift_check_every: int = Field(
        _DRIFT.check_every, ge=1, description="vectors between two computations of the PSI"
    )
    model_drift_warmup_s: float = Field(
        _DRIFT.warmup_s,
        ge=0,
        description="market seconds a fresh market is observed before any feature is judged "
        "(skipped when the tokens' ages show a running market; 0: none)",
    )
    model_workers: int = Field(4, ge=1, le=256, description="token workers")
    model_window: int = Field(
        256,
        ge=1,
        le=4096,
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

    @field_validator("model_drift_recover_psi")
    @classmethod
    def _recovers_below_the_alert(cls, value: float, info: ValidationInfo) -> float:
        alert = info.data.get("model_drift_alert_psi")
        if alert is not None and value >= alert:
            raise ValueError(f"must be below model_drift_alert_psi ({alert})")
        return value

    @field_validator("model_drift_min_observations")
    @classmethod
    def _judged_within_the_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("model_drift_window")
        if window is not None and value > window:
            raise ValueError(f"must be at most model_drift_window ({window})")
        return value

    def drift_thresholds(self) -> DriftThresholds:
        """The drift monitors' thresholds."""
        return DriftThresholds(
            alert_psi=self.model_drift_alert_psi,
            recover_psi=self.model_drift_recover_psi,
            window=self.model_drift_window,
            min_observations=self.model_drift_min_observations,
            check_every=self.model_drift_check_every,
            warmup_s=self.model_drift_warmup_s,
        )

    def refit_policy(self) -> RefitPolicy:
        return RefitPolicy(
            every_labels=self.model_refit_every_labels,
            min_interval_s=self.model_refit_min_interval_s,
            min_rows=self.model_refit_min_rows,
            window_rows=max(self.model_refit_window_rows, self.model_refit_min_rows),
            check_s=self.model_refit_check_s,
            min_gain=self.model_refit_min_gain,
            keep_refits=self.model_refit_keep,
        )

    def consumer_config(self, service: str) -> KeyedConsumerConfig:
        from pumpflow.common.consumer import KeyedConsumerConfig
        from pumpflow.common.model.processor import CONSUMES, MARKET_TYPES

        return KeyedConsumerConfig(
            service=service,
            patterns=CONSUMES,
            market_types=MARKET_TYPES,
            workers=self.model_workers,
            window=self.model_window,
            task_deadline_s=self.model_task_deadline_s,
            compact_after_s=self.model_compact_after_s,
        )
