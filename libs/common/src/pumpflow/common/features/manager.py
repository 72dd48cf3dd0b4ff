"""FeatureManager: declared features, computed incrementally per event or over a history.

Usage (live path)::

    from pumpflow.common.features import FeatureManager

    manager = FeatureManager()                      # the default feature set
    manager.update_feature_history(event)           # token.created / token.trade event
    vector = manager.generate_features(mint)        # FeatureVector (names, values, version)
    vector.as_dict()["trades_per_minute"]
    state = manager.token(mint)                     # TokenState: last_time, price, ...

``update_feature_history`` is O(1) amortised per trade; ``generate_features`` reads the
declared features in dependency order from the token's state (as of its last trade,
in event time). Windowed features of the default set: ``return_{10,30,60,300}s``,
``buy_volume_sol_*``, ``sell_volume_sol_*``, ``buy_share_60s``, ``trades_per_minute``
(60 s), ``new_traders_60s``, ``largest_buy_sol_60s``; plus ``unique_traders``,
``time_since_last_trade``, ``time_since_launch``, ``ewma_volatility``, ``rsi_14``,
``drawdown_from_peak``, ``price``, ``market_cap_sol``, ``curve_progress``, creator and
concentration features. ``manager.names`` lists them; ``manager.version`` is the
feature-set version.

``manager.values(state)`` is one generated function per feature set (~1.5 us for the
default set). ``manager.shed_idle(now)`` freezes tokens idle longer than the longest
window into compact bytes (~300 B plus ~13 B per wallet); they thaw on their next
trade or read, exactly as they were.

Batch path: ``manager.compute_batch(TradeHistory.from_events(events))`` returns an
(n_trades x n_features) array whose row i equals ``generate_features`` after trade i.

Caching is infrastructure: :class:`~pumpflow.common.state.feature_cache.FeatureCache`
keeps each token's latest vector (``FeatureVector.fields()`` is its store hash).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import msgspec
import numpy as np

from pumpflow.common.events import Event, Payload
from pumpflow.common.features.batch import BatchState, TradeHistory
from pumpflow.common.features.definitions import (
    EXPRESSION_GLOBALS,
    FeatureDef,
    FeatureDefinitionError,
    check_definition,
    default_feature_set,
    feature_set_version,
    layout_for,
    resolve_order,
)
from pumpflow.common.features.inputs import TradeInput, trade_input
from pumpflow.common.features.state import Layout, TokenState, decode_snapshot, encode_snapshot


class FeatureVector(msgspec.Struct, frozen=True, kw_only=True):
    """One token's features at one point, with the feature-set version they belong to."""

    mint: str
    version: str
    #: per-mint seq of the last token event included (0 if unknown)
    seq: int
    #: event time of the last trade included
    time: float
    names: tuple[str, ...]
    values: tuple[float, ...]
    #: seq of the features.updated event that carried it (0: not published)
    out_seq: int = 0
    #: clock time it was cached at (0.0: unknown)
    updated_at: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values, strict=True))

    def fields(self) -> dict[str, float | int | str]:
        """The vector as the fields of its store hash: one per feature plus META_FIELDS."""
        fields: dict[str, float | int | str] = dict(zip(self.names, self.values, strict=True))
        fields["version"] = self.version
        fields["seq"] = self.seq
        fields["out_seq"] = self.out_seq
        fields["time"] = self.time
        fields["updated_at"] = self.updated_at
        return fields


#: fields of a cached features hash that are not feature values
META_FIELDS = ("version", "seq", "out_seq", "time", "updated_at")

_PLACEHOLDER = re.compile(r"\$(\d+)")


def compile_reader(
    definitions: Sequence[FeatureDef], plan: Sequence[tuple]
) -> tuple[Callable[[TokenState], list[float]], str]:
    """One function computing every feature of a state in order: ``read(state) -> list``.

    Expression readers are inlined (``$i`` becomes the i-th dependency's variable),
    callables are called with ``(state, deps)``; no per-feature loop, tuple or dict.
    """
    namespace = dict(EXPRESSION_GLOBALS)
    lines = ["def read(s):"]
    for j, (d, (incremental, _, deps)) in enumerate(zip(definitions, plan, strict=True)):
        if isinstance(incremental, str):

            def dependency(match: re.Match, deps=deps, d=d) -> str:
                i = int(match.group(1))
                if i >= len(deps):
                    raise FeatureDefinitionError(f"feature {d.name!r} reads no dependency ${i}")
                return f"v{deps[i]}"

            expression = _PLACEHOLDER.sub(dependency, incremental)
        elif callable(incremental):
            namespace[f"f{j}"] = incremental
            args = "".join(f"v{i}, " for i in deps)
            expression = f"f{j}(s, ({args}))"
        else:
            raise FeatureDefinitionError(f"feature {d.name!r} has no incremental reader")
        lines.append(f"    v{j} = {expression}  # {d.name}")
    lines.append(f"    return [{', '.join(f'v{j}' for j in range(len(plan)))}]")
    source = "\n".join(lines) + "\n"
    try:
        exec(compile(source, "<feature reader>", "exec"), namespace)
    except SyntaxError as exc:
        raise FeatureDefinitionError(f"bad feature expression: {exc.text!r}") from None
    return namespace["read"], source


class FeatureManager:
    """Registers features, keeps each token's incremental state, generates vectors."""

    def __init__(self, definitions: Sequence[FeatureDef] | None = None):
        # A token's state, or its frozen bytes while it is idle (see shed_idle).
        self._tokens: dict[str, TokenState | bytes] = {}
        self.register_features(default_feature_set() if definitions is None else definitions)

    # ----------------------------------------------------------------------------------
    # Definitions.

    def register_features(self, definitions: Iterable[FeatureDef]) -> str:
        """Replace the feature set; resolve order and layout; return the version.

        Token states are kept only if the new set needs the same primitives.
        """
        ordered = resolve_order(definitions)
        if not ordered:
            raise FeatureDefinitionError("a feature set needs at least one feature")
        clash = sorted({d.name for d in ordered}.intersection(META_FIELDS))
        if clash:
            raise FeatureDefinitionError(f"feature names {clash} are cache meta fields")
        index = {d.name: i for i, d in enumerate(ordered)}
        layout = layout_for(ordered)
        plan = []
        for d in ordered:
            kind = check_definition(d)
            incremental, batch = kind.bind(d.params, layout)
            plan.append((incremental, batch, tuple(index[dep] for dep in d.dependencies)))
        read, source = compile_reader(ordered, plan)
        if getattr(self, "layout", None) != layout:
            self._tokens.clear()
        self.definitions: tuple[FeatureDef, ...] = ordered
        self.layout: Layout = layout
        self.names: tuple[str, ...] = tuple(d.name for d in ordered)
        self.version: str = feature_set_version(ordered)
        self._plan = plan
        self._read = read
        #: the generated source of :meth:`values` (for debugging)
        self.reader_source: str = source
        return self.version

    # ----------------------------------------------------------------------------------
    # Incremental path.

    def update_feature_history(
        self,
        item: Event | Payload | TradeInput,
        *,
        mint: str | None = None,
        time: float | None = None,
        seq: int | None = None,
    ) -> TokenState | None:
        """Fold one token event into its token's state; None if it is not a trade/creation.

        Accepts an Event (time and seq from the envelope), a payload with ``time=``, or a
        ready :class:`TradeInput` with ``mint=``.
        """
        if isinstance(item, Event):
            time = item.time
            seq = item.seq
            item = item.data
        if isinstance(item, TradeInput):
            trade = item
            creator = None
            if mint is None:
                raise ValueError("a TradeInput needs mint=")
        else:
            if time is None:
                raise ValueError("a payload needs time=")
            trade = trade_input(item, time)
            if trade is None:
                return None
            mint = item.mint
            creator = trade.trader if item.TYPE == "token.created" else None
        return self.apply(mint, trade, seq, creator=creator)

    def apply(
        self, mint: str, trade: TradeInput, seq: int | None = None, *, creator: str | None = None
    ) -> TokenState:
        """Hot path: fold a ready TradeInput (no event unwrapping).

        ``creator`` names a new token's creator (default: its first trader).
        """
        state = self._tokens.get(mint)
        if state is None:
            state = self._tokens[mint] = TokenState(self.layout, creator=creator)
        elif state.__class__ is bytes:
            state = self._tokens[mint] = TokenState.thaw(self.layout, state)
        state.apply(trade)
        if seq is not None:
            state.seq = seq
        return state

    def values(self, state: TokenState) -> list[float]:
        """Feature values of a state, in ``names`` order (one generated function)."""
        state.settle()
        return self._read(state)

    def generate_features(self, mint: str) -> FeatureVector | None:
        """The token's features as of its last trade; None for an unknown token."""
        state = self.token(mint)
        if state is None or state.n_events == 0:
            return None
        state.settle()
        return FeatureVector(
            mint=mint,
            version=self.version,
            seq=state.seq,
            time=state.last_time,
            names=self.names,
            values=tuple(self._read(state)),
        )

    def token(self, mint: str) -> TokenState | None:
        """The token's state (thawed if it was frozen); None for an unknown token."""
        state = self._tokens.get(mint)
        if state is not None and state.__class__ is bytes:
            state = self._tokens[mint] = TokenState.thaw(self.layout, state)
        return state

    def last_seq(self, mint: str) -> int:
        """Per-mint seq of the last token event applied (0: none or unknown)."""
        state = self.token(mint)
        return 0 if state is None else state.seq

    @property
    def tracked(self) -> int:
        return len(self._tokens)

    @property
    def frozen(self) -> int:
        """Tokens held as frozen bytes (idle)."""
        return sum(1 for state in self._tokens.values() if state.__class__ is bytes)

    def mints(self) -> list[str]:
        return list(self._tokens)

    def drop_token(self, mint: str) -> None:
        """Forget a token's state (it went inactive or migrated)."""
        self._tokens.pop(mint, None)

    def shed_idle(self, now: float) -> int:
        """Freeze tokens idle longer than the longest window; return how many were shed.

        A frozen token is one compact ``bytes`` (every wallet as an 8-byte id, see
        :mod:`pumpflow.common.features.state`); its next trade, or any read, thaws it,
        and every feature after its next trade is exactly what it would have been. A
        token whose freeze is refused (two wallets sharing an id) only drops its window
        buffers and still counts.
        """
        tokens = self._tokens
        frozen = 0
        for mint, state in tokens.items():
            if state.__class__ is bytes or not state.idle(now):
                continue
            compact = state.freeze(now)
            if compact is not None:
                tokens[mint] = compact  # a value, not a key: iteration stays valid
            frozen += 1
        return frozen

    # ----------------------------------------------------------------------------------
    # Checkpoints.

    def snapshot(self, mint: str) -> bytes | None:
        """The token's state as bytes (with its last seq), for a checkpoint."""
        state = self._tokens.get(mint)
        if state is None:
            return None
        if state.__class__ is bytes:
            return state  # a frozen token is its checkpoint
        return encode_snapshot(state.snapshot())

    def restore(self, mint: str, raw: bytes, *, seq: int | None = None) -> TokenState:
        """Load a token's state from :meth:`snapshot` bytes (``seq`` overrides its seq)."""
        state = TokenState.restore(self.layout, decode_snapshot(raw))
        if seq is not None:
            state.seq = seq
        self._tokens[mint] = state
        return state

    # ----------------------------------------------------------------------------------
    # Batch path.

    def compute_batch(self, history: TradeHistory) -> np.ndarray:
        """Features after every trade of a history: shape (len(history), len(names))."""
        primitives = BatchState(self.layout, history)
        # Each feature writes its own contiguous row; handed out transposed.
        out = np.empty((len(self._plan), len(history)))
        for j, (_, batch, deps) in enumerate(self._plan):
            batch(primitives, tuple(out[i] for i in deps), out[j])
        return out.T
