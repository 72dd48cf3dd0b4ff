"""FeaturesProcessor: a token's features, one event at a time, as a keyed processor.

Per mint, the state is the FeatureManager's :class:`TokenState`. Each token.created /
token.trade is folded in and announced as ``features.updated`` (the values in
``manager.names`` order, ``source_seq`` the token event's seq). A ``features.updated``
is a snapshot: of a token's events delivered together (``Effects.more``) only the last
is announced, with every one of them folded in (the windows moved once), so a backlog
costs one vector per token per batch and consumers get the latest. A ``token.lifecycle``
event sets the token's processing priority, and retires it when it turns inactive or
graduated; ``token.migrated`` retires it too. A retired token's record (and its
stored vector) expire after ``retire_ttl_s``. A late trade of it (a straggler, a
graduate's trade on its new pool) is folded in and announced, and lets it go again
with a fresh TTL: activity retires such a token again without a lifecycle event. A
lifecycle state past the retirement (revived) keeps it.
"""

from __future__ import annotations

import msgspec

from pumpflow.common.events import Event, FeaturesUpdated
from pumpflow.common.features.inputs import TradeInput, trade_input
from pumpflow.common.features.manager import FeatureManager
from pumpflow.common.features.state import TokenState, decode_snapshot, encode_snapshot
from pumpflow.common.keyed import Effects, InvalidInput, StaleState

#: lifecycle states that retire a token here
RETIRING = ("inactive", "graduated")
#: event types the processor takes
CONSUMES = ("token.created", "token.trade", "token.migrated", "token.lifecycle")
#: the types whose time is the tokens' market (the keyed consumer's ``market_types``):
#: the feed's; activity's lifecycle follows from them
MARKET_TYPES = ("token.created", "token.trade", "token.migrated")
#: bytes of the feature-set version in front of each encoded state
_VERSION_BYTES = 16
#: lamports a token's bought or sold total may reach: checkpoints and the batch path
#: hold them as 64-bit integers
MAX_LAMPORTS = 2**63 - 1


class FeaturesProcessor:
    """Fold token events into per-token feature state; emit ``features.updated``."""

    def __init__(self, manager: FeatureManager, *, retire_ttl_s: float):
        if retire_ttl_s <= 0:
            raise ValueError("retire_ttl_s must be positive")
        self.manager = manager
        self.retire_ttl_s = retire_ttl_s
        self._tag = manager.version.encode()[:_VERSION_BYTES]

    def initial(self, key: str) -> TokenState:
        return TokenState(self.manager.layout)

    def apply(self, state: TokenState, event: Event, effects: Effects) -> TokenState:
        kind = event.type
        if kind == "token.lifecycle":
            lifecycle = event.data
            retiring = lifecycle.state in RETIRING
            if retiring:
                effects.retire(self.retire_ttl_s)
            else:
                effects.set_priority(lifecycle.priority)
            self._mark_retired(state, retiring)
            return state
        if kind == "token.migrated":
            effects.retire(self.retire_ttl_s)
            self._mark_retired(state, True)
            return state
        trade = trade_input(event.data, event.time)
        reason = invalid_reason(trade)
        if reason is not None:
            raise InvalidInput(reason)
        if (state.total_buy if trade.is_buy else state.total_sell) + trade.lamports > MAX_LAMPORTS:
            # folded in, the state could not be stored: every commit with it would fail
            raise InvalidInput(f"{trade.lamports} lamports take the token's total past 64 bits")
        seq = event.seq or 0
        if state.retired:
            effects.retire(self.retire_ttl_s)
        if effects.more:
            # the key's next event of this batch moves the windows and announces
            state.fold(trade)
            state.seq = seq
            return state
        state.apply(trade)
        state.seq = seq
        manager = self.manager
        effects.emit(
            FeaturesUpdated(
                mint=effects.key,
                feature_set_version=manager.version,
                source_seq=seq,
                names=manager.names,
                values=tuple(manager.values(state)),
            ),
            time=event.time,
        )
        return state

    @staticmethod
    def _mark_retired(state: TokenState, retired: bool) -> None:
        if state.retired != retired:
            state.retired = retired
            state.encoded = None  # a change that leaves n_events and seq as they were

    def fire(self, state: TokenState, effects: Effects) -> TokenState:
        return state

    def encode(self, state: TokenState) -> bytes:
        # a commit that only moved the key's tracking (a lifecycle event, say) reuses the
        # bytes: a state changes only by a trade (n_events) or by shedding (clears them)
        encoded = state.encoded
        if encoded is not None and encoded[0] == state.n_events and encoded[1] == state.seq:
            return encoded[2]
        raw = self._tag + encode_snapshot(state.snapshot())
        state.encoded = (state.n_events, state.seq, raw)
        return raw

    def compact(self, state: TokenState, now: float) -> bytes | None:
        # an idle token frozen: its windows are empty, every wallet an 8-byte id
        frozen = state.freeze(now)
        return None if frozen is None else self._tag + frozen

    def decode(self, raw: bytes) -> TokenState:
        if raw[:_VERSION_BYTES] != self._tag:
            raise StaleState("state of another feature-set version")
        try:
            snapshot = decode_snapshot(raw[_VERSION_BYTES:])
        except msgspec.DecodeError as exc:  # a layout this code does not read
            raise StaleState(f"unreadable features state: {exc}") from exc
        return TokenState.restore(self.manager.layout, snapshot)


def invalid_reason(trade: TradeInput | None) -> str | None:
    """Why a token event cannot be folded in, or None."""
    if trade is None:
        return "not a trade or creation"
    if not (trade.v_sol > 0.0 and trade.v_tokens > 0.0):
        return f"non-positive reserves (vSol={trade.v_sol}, vTokens={trade.v_tokens})"
    if trade.lamports < 0 or trade.tokens < 0:
        return "negative amount"
    return None
