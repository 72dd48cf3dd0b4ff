"""Typed settings from the environment (prefix ``PUMPFLOW_``), frozen once read.

Each service extends :class:`CommonSettings` with its own fields. A bad value fails
at start-up with the variable's name and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting in the environment is missing or invalid."""


class CommonSettings(BaseSettings):
    """Settings every service reads. Environment: ``PUMPFLOW_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="PUMPFLOW_", frozen=True, extra="ignore")

    service: str = Field("pumpflow", description="service name; first part of event sources")
    replica: str = Field(
        default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}",
        description="replica id, unique per process",
    )
    transport: Literal["memory", "rabbitmq"] = Field("rabbitmq", description="bus transport")
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    postgres_dsn: str = Field("postgresql://postgres@127.0.0.1:5432/test", description="Postgres")
    namespace: str = Field(
        "pumpflow",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="prefix of exchanges, queues, Redis keys and the Postgres schema",
    )
    partitions: int = Field(16, ge=1, le=256, description="partitions of keyed events")
    prefetch: int = Field(256, ge=1, description="unacked messages per partition consumer")
    http_host: str = Field("127.0.0.1", description="health and metrics bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="health/metrics port (0: off)")
    api_token: str | None = Field(None, description="bearer token for mutating endpoints")
    log_level: str = Field("INFO", description="logging level")
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    event_log: Literal["none", "sampled", "all"] = Field("none", description="event audit log")
    event_log_sample_rate: float = Field(0.01, ge=0.0, le=1.0, description="share logged")
    drain_timeout_s: float = Field(10.0, gt=0, description="SIGTERM: time to drain handlers")
    dependency_retry_max_s: float = Field(
        5.0, gt=0, description="start-up: longest pause between tries to reach a dependency"
    )
    dependency_wait_s: float | None = Field(
        None,
        gt=0,
        description="start-up: exit 1 when RabbitMQ, Redis or Postgres is still unreachable "
        "after this long (unset: wait for it, serving /readyz as not ready)",
    )
    balance_partitions: bool = Field(
        True,
        description="replicas share partitions by rendezvous hashing over live replicas "
        "(rabbitmq); off: every replica consumes all, single-active-consumer picks one",
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="how often a replica heartbeats in Redis and rebalances"
    )
    heartbeat_ttl_s: float = Field(
        3.0, gt=0, description="a replica silent this long is dead; others take its partitions"
    )
    consumer_groups: str | None = Field(
        None,
        description="consumer groups the deployment runs, comma-separated (unset: all): "
        "their queues are declared as each process connects, so nothing published "
        "before a group starts is lost; a declared group must run, or its queues grow",
    )

    @field_validator("heartbeat_ttl_s")
    @classmethod
    def _ttl_above_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("heartbeat_interval_s")
        if interval is not None and value <= interval:
            raise ValueError(f"must be above heartbeat_interval_s ({interval})")
        return value

    @property
    def consumer_group_names(self) -> list[str] | None:
        """``consumer_groups`` as names (None: every group)."""
        if self.consumer_groups is None:
            return None
        return [name.strip() for name in self.consumer_groups.split(",") if name.strip()]

    @property
    def source(self) -> str:
        """Event source of this replica: ``<service>/<replica>``."""
        return f"{self.service}/{self.replica}"

    @classmethod
    def load(cls, **overrides):
        """Read the environment; raise SettingsError naming each bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls.variable_name(err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None

    @classmethod
    def variable_name(cls, loc: tuple) -> str:
        """The environment variable behind an error location (aliases are used as is)."""
        name = str(loc[0]) if loc else ""
        if name.isupper():  # an alias such as PUMPPORTAL_WS_URL, read without the prefix
            return name
        prefix = cls.model_config.get("env_prefix", "")
        return f"{prefix}{'_'.join(str(p) for p in loc).upper()}"


class PumpPortalKeySettings(CommonSettings):
    """Settings of a service that holds PumpPortal's API key (the feed, live trading).

    The key keeps PumpPortal's own environment names (``PUMPPORTAL_API_KEY``, or
    ``PUMPPORTAL_API_KEY_FILE`` for a mounted secret). It is a SecretStr: it never
    appears in a repr or a log.
    """

    model_config = SettingsConfigDict(
        env_prefix="PUMPFLOW_", frozen=True, extra="ignore", populate_by_name=True
    )

    pumpportal_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("PUMPPORTAL_API_KEY", "pumpportal_api_key"),
        description="PumpPortal API key (trade subscriptions, the trade API)",
    )
    pumpportal_api_key_file: Path | None = Field(
        None,
        validation_alias=AliasChoices("PUMPPORTAL_API_KEY_FILE", "pumpportal_api_key_file"),
        description="file holding the API key (a mounted secret)",
    )

    def api_key(self) -> str | None:
        """The key from the environment or the secret file; never log it."""
        if self.pumpportal_api_key is not None:
            key = self.pumpportal_api_key.get_secret_value().strip()
            return key or None
        if self.pumpportal_api_key_file is not None:
            try:
                key = self.pumpportal_api_key_file.read_text("utf-8").strip()
            except OSError as exc:
                raise SettingsError(
                    f"PUMPPORTAL_API_KEY_FILE: cannot read {self.pumpportal_api_key_file}: "
                    f"{exc.strerror}"
                ) from None
            return key or None
        return None
