"""Settings of the feed service.

PumpPortal's URL and key keep their own environment names (``PUMPPORTAL_WS_URL``,
``PUMPPORTAL_API_KEY``, ``PUMPPORTAL_API_KEY_FILE``); everything else is
``PUMPFLOW_FEED_*``. The key is a SecretStr: it never appears in a repr or a log.
The ``*_config`` methods build the frozen config object of each part of the feed; they
import that part themselves, as every ``pumpflow`` command reads this module (the check
of the environment) and the fields need none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, ValidationInfo, field_validator

from pumpflow.common.lease import LeaderLeaseConfig
from pumpflow.common.pumpportal import DEFAULT_WS_URL, MAX_KEYS_PER_MESSAGE, MAX_MESSAGES_PER_SECOND
from pumpflow.common.runtime.settings import DAY_S, MIN_KEEP_DAYS, PumpPortalKeySettings

#: the shortest period of the re-tests of a refused trade stream (feed_refused_retest_s):
#: a reconnect a minute, near the disconnects a busy connection sees anyway (about 24 an
#: hour)
MIN_REFUSED_RETEST_S = 60.0

if TYPE_CHECKING:
    from pumpflow.common.features.history import HistoryConfig
    from pumpflow.feed.manager import FeedManagerConfig
    from pumpflow.feed.recorder import RecorderConfig
    from pumpflow.feed.retention import RetentionConfig
    from pumpflow.feed.socket_feed import SocketFeedConfig


class FeedSettings(PumpPortalKeySettings):
    """Environment of the feed service."""

    service: str = Field("feed", description="service name; first part of event sources")
    pumpportal_ws_url: str = Field(
        DEFAULT_WS_URL,
        validation_alias=AliasChoices("PUMPPORTAL_WS_URL", "pumpportal_ws_url"),
        pattern=r"^wss?://",
        description="PumpPortal-protocol WebSocket URL (the real one or the simulator)",
    )
    feed_record: bool = Field(True, description="store every token event in Postgres")
    feed_subscribe_new_tokens: bool = Field(True, description="subscribe to token creations")
    feed_subscribe_migrations: bool = Field(True, description="subscribe to migrations")
    feed_auto_subscribe_trades: bool = Field(
        True, description="subscribe to the trades of every new token"
    )
    feed_ping_interval_s: float = Field(20.0, gt=0, description="keepalive ping interval")
    feed_ping_timeout_s: float = Field(10.0, gt=0, description="pong timeout")
    feed_open_timeout_s: float = Field(10.0, gt=0, description="connect/handshake timeout")
    feed_backoff_initial_s: float = Field(0.5, gt=0, description="first reconnect delay")
    feed_backoff_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    feed_max_keys_per_message: int = Field(
        MAX_KEYS_PER_MESSAGE,
        ge=1,
        le=MAX_KEYS_PER_MESSAGE,
        description="mints per subscribe message (PumpPortal allows 5,000)",
    )
    feed_max_messages_per_second: int = Field(
        # below the server's 200: our window is timed when we send, the server's when
        # it receives, and network jitter must not push a message over the limit
        int(MAX_MESSAGES_PER_SECOND * 0.9),
        ge=1,
        le=MAX_MESSAGES_PER_SECOND,
        description="subscribe messages per second (PumpPortal allows 200)",
    )
    feed_unsubscribe_grace_s: float = Field(
        10.0,
        ge=0,
        description=(
            "trades of a mint arriving this long after its unsubscribe are in flight; "
            "later ones, like those of mints never subscribed, are stored, not published"
        ),
    )
    feed_refused_retest_s: float = Field(
        300.0,
        ge=0,
        allow_inf_nan=False,
        description=(
            "while PumpPortal refuses the trade subscriptions (a key not funded with 0.02 "
            "SOL), reconnect this often (real seconds) to re-test the key: one funded "
            "meanwhile is heard on the new connection, and trading resumes (0: never; else "
            f"at least {MIN_REFUSED_RETEST_S:g}). 300 s: a reconnect every 5 minutes is "
            "half the disconnects a busy connection sees anyway (about 24 an hour), far "
            "from the ban of clients opening many, and a funded key trades within minutes"
        ),
    )
    feed_account_ttl_s: float = Field(
        300.0,
        gt=0,
        description=(
            "a wallet not announced for this long (feed.subscription accounts; trading "
            "announces its own every PUMPFLOW_TRADING_LIVE_ANNOUNCE_S) is unsubscribed"
        ),
    )
    feed_dedup_capacity: int = Field(200_000, ge=1, description="recent signatures remembered")
    feed_record_batch_size: int = Field(2_000, ge=1, description="events per Postgres write")
    feed_record_max_delay_s: float = Field(
        0.0, ge=0, description="extra wait to fill a write batch (0: write when the last ends)"
    )
    feed_record_max_pending: int = Field(
        100_000, ge=1, description="events held before the socket reader waits for Postgres"
    )
    feed_record_ready_max_pending: int = Field(
        50_000,
        ge=1,
        description=(
            "not ready once this many events wait to be stored (half the buffer: a burst's "
            "margin before the socket reader waits)"
        ),
    )
    feed_record_ready_max_age_s: float = Field(
        30.0,
        gt=0,
        description=(
            "not ready once the oldest event waiting to be stored is this old (longer than a "
            "Postgres restart and the retry backoff; a stuck or lagging store shows within it)"
        ),
    )
    feed_stop_flush_s: float = Field(
        20.0,
        ge=0,
        description=(
            "on stop, wait this long to store, publish and dead-letter what is pending; what "
            "is left is logged and the process exits non-zero (below the runtime's 30 s "
            "bound on a service's stop, so the feed says what it lost)"
        ),
    )
    feed_seq_restore_window_s: float | None = Field(
        1800.0,
        gt=0,
        description="a mint quiet this long leaves the per-mint seq table, and a start "
        "restores the seq of mints active this recently; a mint back later goes on above "
        "every stored seq (empty: every mint, kept for ever)",
    )
    feed_record_keep_days: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description=(
            "stored token events older than this many days are deleted by the lease holder "
            "every prune interval, with the tokens whose events all went (0, the default: "
            "kept for ever, as a start then warns; else at least 1, and above the seq "
            "restore window, whose events a start reads). At 25-60 trade events/s they take "
            "4.3-10.4 GB a day (docs/reliability.md): 7 keeps a week, 30-73 GB, enough "
            "history to train and backtest on (over 100,000 launches). Not deleted unless "
            "asked: the history is the user's, an upgrade must not take it. Events not yet "
            "published stay whatever their age; trading's ledger and the exit's records are "
            "never deleted"
        ),
    )
    feed_record_prune_interval_s: float = Field(
        3600.0, gt=0, description="how often the lease holder deletes events past the keep"
    )
    feed_record_prune_batch: int = Field(
        5_000,
        ge=1,
        description=(
            "events deleted per transaction (about 0.05 s each: the feed's writes go on between)"
        ),
    )

    feed_history_max_events: int = Field(
        1_000, ge=1, description="recent events held in memory per subscribed mint"
    )
    feed_history_max_age_s: float = Field(
        900.0, gt=0, description="recent events older than this (event time) leave memory"
    )
    feed_history_max_mints: int = Field(
        20_000, ge=1, description="subscribed mints whose recent events are held in memory"
    )
    feed_history_prune_interval_s: float = Field(
        30.0, gt=0, description="how often (clock time) old events leave memory"
    )

    feed_lease_ttl_s: float = Field(
        10.0,
        gt=0,
        description=(
            "TTL (wall-clock seconds) of the lease 'feed:pumpportal' that lets one replica "
            "hold the PumpPortal connection; renewed every ttl/3, a standby takes over "
            "within a TTL of a crash"
        ),
    )

    @field_validator("feed_refused_retest_s")
    @classmethod
    def _off_or_a_minute_apart(cls, value: float) -> float:
        # each re-test is a new connection: seconds (a typo for minutes) would reconnect
        # hundreds of times an hour
        if 0 < value < MIN_REFUSED_RETEST_S:
            raise ValueError(f"must be 0 (never) or at least {MIN_REFUSED_RETEST_S:g} s")
        return value

    @field_validator("feed_record_keep_days")
    @classmethod
    def _keep_a_day_and_the_seq_restore(cls, value: float, info: ValidationInfo) -> float:
        if value == 0:
            return value
        if value < MIN_KEEP_DAYS:
            raise ValueError(f"must be 0 (kept for ever) or at least {MIN_KEEP_DAYS:g} day")
        window = info.data.get("feed_seq_restore_window_s")
        if window is not None and value * DAY_S <= window:
            raise ValueError(f"must be above feed_seq_restore_window_s ({window:g} s)")
        return value

    def socket_config(self) -> SocketFeedConfig:
        from pumpflow.feed.socket_feed import SocketFeedConfig

        return SocketFeedConfig(
            url=self.pumpportal_ws_url,
            api_key=self.api_key(),
            service=self.service,
            subscribe_new_tokens=self.feed_subscribe_new_tokens,
            subscribe_migrations=self.feed_subscribe_migrations,
            auto_subscribe_trades=self.feed_auto_subscribe_trades,
            ping_interval_s=self.feed_ping_interval_s,
            ping_timeout_s=self.feed_ping_timeout_s,
            open_timeout_s=self.feed_open_timeout_s,
            backoff_initial_s=self.feed_backoff_initial_s,
            backoff_max_s=self.feed_backoff_max_s,
            max_keys_per_message=self.feed_max_keys_per_message,
            max_messages_per_second=self.feed_max_messages_per_second,
            unsubscribe_grace_s=self.feed_unsubscribe_grace_s,
            refused_retest_s=self.feed_refused_retest_s,
        )

    def recorder_config(self) -> RecorderConfig:
        from pumpflow.feed.recorder import RecorderConfig

        return RecorderConfig(
            outbox=self.service,
            batch_size=self.feed_record_batch_size,
            max_delay_s=self.feed_record_max_delay_s,
            max_pending=self.feed_record_max_pending,
            ready_max_pending=self.feed_record_ready_max_pending,
            ready_max_age_s=self.feed_record_ready_max_age_s,
        )

    def retention_config(self) -> RetentionConfig | None:
        """The retention of stored events; None: kept for ever (or none stored)."""
        from pumpflow.feed.retention import RetentionConfig

        if not self.feed_record or not self.feed_record_keep_days:
            return None
        return RetentionConfig(
            keep_s=self.feed_record_keep_days * DAY_S,
            every_s=self.feed_record_prune_interval_s,
            batch_size=self.feed_record_prune_batch,
        )

    def manager_config(self) -> FeedManagerConfig:
        from pumpflow.feed.manager import FeedManagerConfig

        return FeedManagerConfig(
            source=self.source,
            dedup_capacity=self.feed_dedup_capacity,
            seq_restore_window_s=self.feed_seq_restore_window_s,
        )

    def history_config(self) -> HistoryConfig:
        from pumpflow.common.features.history import HistoryConfig

        return HistoryConfig(
            max_events_per_token=self.feed_history_max_events,
            max_age_s=self.feed_history_max_age_s,
            max_tokens=self.feed_history_max_mints,
        )

    def lease_config(self, *, name: str, holder: str) -> LeaderLeaseConfig:
        return LeaderLeaseConfig(name=name, holder=holder, ttl_s=self.feed_lease_ttl_s)
