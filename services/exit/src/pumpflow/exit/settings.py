"""Settings of the exit service (environment ``PUMPFLOW_*``).

Every ``pumpflow`` command reads this module (the check of the environment): the
methods import the parts they configure, which the fields do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from pumpflow.common.exit import (
    ExitRules,
    GracefulExitConfig,
    TakeProfitStep,
    TrailBand,
    check_take_profit,
    check_trailing,
)
from pumpflow.common.runtime.settings import CommonSettings

if TYPE_CHECKING:
    from pumpflow.common.consumer import KeyedConsumerConfig

#: (gain, share of the tokens bought) of each take-profit step, or (peak gain, giveback)
#: of each trailing band, as the settings give them (JSON lists of pairs)
Pairs = tuple[tuple[float, float], ...]


def take_profit_steps(pairs: Pairs) -> tuple[TakeProfitStep, ...]:
    return tuple(TakeProfitStep(gain=gain, fraction=share) for gain, share in pairs)


def trail_bands(pairs: Pairs) -> tuple[TrailBand, ...]:
    return tuple(TrailBand(peak_gain=peak, giveback=giveback) for peak, giveback in pairs)


def _ladder(pairs: Pairs) -> Pairs:
    """``pairs`` once the rules' check takes them as a ladder (its reason, if not)."""
    check_take_profit(take_profit_steps(pairs))
    return pairs


def _bands(pairs: Pairs) -> Pairs:
    """``pairs`` once the rules' check takes them as trailing bands (its reason, if not)."""
    check_trailing(trail_bands(pairs))
    return pairs


_RULES = ExitRules()
_GRACEFUL = GracefulExitConfig()


class ExitSettings(CommonSettings):
    """Environment of the exit service; the rules' and the graceful exit's parameters are
    argued in :mod:`pumpflow.common.exit.rules` and :mod:`pumpflow.common.exit.planner`."""

    service: str = Field("exit", description="service name; first part of event sources")
    exit_workers: int = Field(2, ge=1, le=64, description="position workers")
    exit_window: int = Field(
        64, ge=1, le=4096, description="deliveries per partition applied while storing"
    )
    exit_state_ttl_s: float = Field(
        6 * 3600.0, gt=0, description="TTL of a token's record in the store"
    )
    exit_slippage_pct: float = Field(
        10.0, gt=0, le=100, description="slippage limit of a rule's sale"
    )
    exit_take_profit: Annotated[Pairs, AfterValidator(_ladder)] = Field(
        tuple((step.gain, step.fraction) for step in _RULES.take_profit),
        description="take-profit ladder, a JSON list of [gain, share] steps by rising gain: "
        "at each gain over the entry (0.5: +50%) sell that share of the tokens bought "
        "(shares in (0, 1], all of them 1 at most; [] or empty: off). A position's steps "
        "that fired are kept by their place in the ladder: a replica started with another "
        "ladder takes an open position's first n steps as fired when its first n had, and "
        "sells the later ones' shares of the tokens bought as their gains are reached, "
        "never more than is left",
    )
    exit_trailing: Annotated[Pairs, AfterValidator(_bands)] = Field(
        tuple((band.peak_gain, band.giveback) for band in _RULES.trailing),
        description="trailing stop, a JSON list of [peak gain, giveback] bands by rising "
        "peak gain: the first band's gain arms it, and a fall of the giveback of the last "
        "band reached from the peak sells all (givebacks in (0, 1), none above the one "
        "before; [] or empty: off); a replica started with other bands applies them to an "
        "open position's peak at once",
    )
    exit_stop_loss: float | None = Field(
        _RULES.stop_loss,
        gt=0,
        lt=1,
        description="fall from the entry that sells all, in (0, 1) (0.3: -30%; empty: off)",
    )
    exit_max_hold_s: float | None = Field(
        _RULES.max_hold_s,
        gt=0,
        description="every position is sold after this long (empty: off)",
    )
    exit_stale_after_s: float | None = Field(
        _RULES.stale_after_s,
        gt=0,
        description="a position without the stale gain is sold after (empty: off)",
    )
    exit_stale_min_gain: float = Field(
        _RULES.stale_min_gain,
        gt=-1,
        description="gain over the entry a position needs after exit_stale_after_s to be "
        "kept (0.1: +10%)",
    )
    exit_decline_fraction: float | None = Field(
        _RULES.decline_fraction,
        gt=0,
        le=1,
        description="share of what is left sold when the token turns declining, again "
        "after each recovery to active (empty: off)",
    )
    exit_quiet_s: float | None = Field(
        _RULES.quiet_s,
        gt=0,
        description="a position whose token is silent this long is sold (empty: off)",
    )
    exit_refused_retry_s: float = Field(
        _RULES.refused_retry_s,
        gt=0,
        description="no rule sells for this long after a second refused sale in a row, "
        "doubling with each refusal after",
    )
    exit_refused_retry_max_s: float = Field(
        _RULES.refused_retry_max_s,
        gt=0,
        description="the longest wait after refused sales (exit_refused_retry_s at least)",
    )
    exit_deadline_s: float = Field(
        _GRACEFUL.deadline_s,
        gt=0,
        description="a graceful exit sells everything within this much clock time",
    )
    exit_max_tranche_impact: float = Field(
        _GRACEFUL.max_tranche_impact, gt=0, lt=1, description="price impact of one tranche"
    )
    exit_final_sweep_s: float = Field(
        _GRACEFUL.final_sweep_s,
        ge=0,
        description="before the deadline what is left goes whole (half the deadline at "
        "most: a longer sweep is cut to half of exit_deadline_s, so a short deadline keeps "
        "its tranches)",
    )
    exit_min_tranche_interval_s: float = Field(
        _GRACEFUL.min_tranche_interval_s, ge=0, description="between two tranches of a token"
    )
    exit_order_timeout_s: float = Field(
        30.0,
        gt=0,
        description="wall seconds a tranche waits for its outcome; then its tokens are "
        "unconfirmed, not offered again (an outcome that comes later still counts); a "
        "tranche without an outcome is asked again at most this often",
    )
    exit_run_poll_s: float = Field(
        1.0, gt=0, description="how often a replica looks for a graceful exit begun elsewhere"
    )
    exit_barrier_wait_s: float = Field(
        10.0,
        ge=0,
        description="clock seconds a graceful exit waits for trading's barrier (what it had "
        "in flight when it halted entries) before it ends on what it has seen",
    )
    exit_resume_wait_s: float = Field(
        10.0,
        ge=0,
        description="after a restart, wall seconds to wait for the outcomes of tranches sent",
    )
    exit_publish_wait_s: float = Field(
        2.0,
        gt=0,
        le=5.0,
        description="wall seconds an operator's request (POST /shutdown, /positions/{mint}/"
        "sell) waits for the broker to take its publication before it answers that it is "
        "accepted and not published yet (a broker blocking publishers, short of memory or "
        "disk, or not answering): it goes out once the broker takes it. At most 5, well "
        "inside the CLI's 10 s for an answer",
    )

    @field_validator("exit_refused_retry_max_s")
    @classmethod
    def _longest_wait_at_least_the_first(cls, value: float, info: ValidationInfo) -> float:
        first = info.data.get("exit_refused_retry_s")
        if first is not None and value < first:
            raise ValueError(f"must be at least exit_refused_retry_s ({first:g}), the first wait")
        return value

    def rules(self) -> ExitRules:
        return ExitRules(
            take_profit=take_profit_steps(self.exit_take_profit),
            trailing=trail_bands(self.exit_trailing),
            stop_loss=self.exit_stop_loss,
            max_hold_s=self.exit_max_hold_s,
            stale_after_s=self.exit_stale_after_s,
            stale_min_gain=self.exit_stale_min_gain,
            decline_fraction=self.exit_decline_fraction,
            quiet_s=self.exit_quiet_s,
            refused_retry_s=self.exit_refused_retry_s,
            refused_retry_max_s=self.exit_refused_retry_max_s,
        )

    def graceful(self) -> GracefulExitConfig:
        return GracefulExitConfig(
            deadline_s=self.exit_deadline_s,
            max_tranche_impact=self.exit_max_tranche_impact,
            final_sweep_s=min(self.exit_final_sweep_s, self.exit_deadline_s / 2),
            min_tranche_interval_s=self.exit_min_tranche_interval_s,
        )

    def consumer_config(self, service: str) -> KeyedConsumerConfig:
        from pumpflow.common.consumer import KeyedConsumerConfig
        from pumpflow.common.exit import CONSUMES, MARKET_TYPES, PARTIAL_PUBLISHERS

        return KeyedConsumerConfig(
            service=service,
            patterns=CONSUMES,
            market_types=MARKET_TYPES,
            partial_publishers=PARTIAL_PUBLISHERS,
            workers=self.exit_workers,
            window=self.exit_window,
            live_ttl_s=self.exit_state_ttl_s,
        )
