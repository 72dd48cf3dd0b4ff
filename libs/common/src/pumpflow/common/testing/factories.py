"""Events for tests: the feed's token events on the real curve, and valid payloads of any type."""

from __future__ import annotations

import hashlib
import types
import typing
import uuid
from typing import Any

import msgspec

from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import Clock
from pumpflow.common.curve import CurveState, quote_buy, quote_buy_tokens, quote_sell
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    Payload,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    make_event,
)
from pumpflow.common.features import FeatureManager

#: event time of a factory's first event unless told otherwise (2023-11-14T22:13:20Z)
START = 1_700_000_000.0
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class TokenEvents:
    """Builds token.created / token.trade / token.migrated events as the feed publishes them.

    Payloads are valid and consistent: every trade moves the token's bonding curve
    (reserves, market cap, amounts from :mod:`pumpflow.common.curve`) and each trader's
    balance. Each mint gets its own seq from 1, as the feed numbers them. Times come
    from ``clock`` when given, else start at ``start`` and move on ``step`` seconds per
    event; any call may pin ``time`` (and ``seq``, for gap and duplicate tests).
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        start: float = START,
        step: float = 1.0,
        source: str = "feed/test",
        prefix: str = "Mint",
    ):
        self.clock = clock
        self.now = start
        self.step = step
        self.source = source
        self.prefix = prefix
        self.seq = Sequencer()
        self.curves: dict[str, CurveState] = {}
        self.holdings: dict[tuple[str, str], float] = {}
        self._mints = 0
        self._signatures = 0
        # signatures unique across factories too: stores may key trades by them
        self._tag = uuid.uuid4().hex[:10]

    def mint(self) -> str:
        """A mint address no other call of this factory returns (``Mint3<8 chars>pump``).

        The hashed middle spreads consecutive mints over the partitions as real ones are.
        """
        self._mints += 1
        digest = hashlib.sha256(f"{self.prefix}/{self._mints}".encode()).digest()
        return f"{self.prefix}{self._mints}{''.join(_BASE58[b % 58] for b in digest[:8])}pump"

    def balance(self, mint: str, trader: str) -> float:
        """Tokens of ``mint`` the trader holds after the events built so far."""
        return self.holdings.get((mint, trader), 0.0)

    def created(
        self,
        mint: str | None = None,
        *,
        sol: float = 0.5,
        trader: str = "creator",
        time: float | None = None,
        seq: int | None = None,
        **fields: Any,
    ) -> Event:
        """A token's creation with a first buy of ``sol`` by its creator (``trader``)."""
        mint = mint or self.mint()
        quote = quote_buy(CurveState(), sol)
        self.curves[mint] = quote.after
        self.holdings[(mint, trader)] = quote.tokens
        payload = {
            "signature": self._signature(),
            "mint": mint,
            "traderPublicKey": trader,
            "txType": "create",
            "initialBuy": quote.tokens,
            "solAmount": quote.sol - quote.fee,
            "bondingCurveKey": f"curve-{mint}",
            "vTokensInBondingCurve": quote.after.v_tokens,
            "vSolInBondingCurve": quote.after.v_sol,
            "marketCapSol": quote.after.market_cap_sol,
            "name": f"Token {mint[:8]}",
            "symbol": mint[:4].upper(),
            "uri": f"https://example.invalid/{mint}.json",
            "pool": "pump",
        }
        return self._event(TokenCreated(**{**payload, **fields}), mint, time, seq)

    def trade(
        self,
        mint: str,
        trader: str = "trader",
        *,
        buy: bool = True,
        sol: float = 0.3,
        tokens: float | None = None,
        time: float | None = None,
        seq: int | None = None,
        **fields: Any,
    ) -> Event:
        """A buy of ``sol`` SOL (or of ``tokens``), or a sale of ``tokens`` (default: all held).

        A mint this factory did not create trades on a fresh curve.
        """
        curve = self.curves.get(mint) or CurveState()
        held = self.balance(mint, trader)
        if buy:
            quote = quote_buy(curve, sol) if tokens is None else quote_buy_tokens(curve, tokens)
            held += quote.tokens
            moved = quote.sol - quote.fee  # what reached the curve
        else:
            quote = quote_sell(curve, held if tokens is None else tokens)
            held = max(0.0, held - quote.tokens)
            moved = quote.sol + quote.fee  # what left the curve
        self.curves[mint] = quote.after
        self.holdings[(mint, trader)] = held
        payload = {
            "signature": self._signature(),
            "mint": mint,
            "traderPublicKey": trader,
            "txType": "buy" if buy else "sell",
            "tokenAmount": quote.tokens,
            "solAmount": moved,
            "newTokenBalance": held,
            "bondingCurveKey": f"curve-{mint}",
            "vTokensInBondingCurve": quote.after.v_tokens,
            "vSolInBondingCurve": quote.after.v_sol,
            "marketCapSol": quote.after.market_cap_sol,
            "pool": "pump",
        }
        return self._event(TokenTrade(**{**payload, **fields}), mint, time, seq)

    def buy(self, mint: str, trader: str = "trader", sol: float = 0.3, **options: Any) -> Event:
        return self.trade(mint, trader, buy=True, sol=sol, **options)

    def sell(
        self, mint: str, trader: str = "trader", tokens: float | None = None, **options: Any
    ) -> Event:
        return self.trade(mint, trader, buy=False, tokens=tokens, **options)

    def migrated(
        self,
        mint: str,
        *,
        pool: str = "pump-amm",
        time: float | None = None,
        seq: int | None = None,
    ) -> Event:
        """The token left its curve for ``pool``."""
        payload = TokenMigrated(signature=self._signature(), mint=mint, txType="migrate", pool=pool)
        return self._event(payload, mint, time, seq)

    def _signature(self) -> str:
        self._signatures += 1
        return f"sig-{self._tag}-{self._signatures}"

    def _event(self, payload: Payload, mint: str, time: float | None, seq: int | None) -> Event:
        if time is None:
            if self.clock is not None:
                time = self.clock.now()
            else:
                time = self.now
                self.now += self.step
        if seq is None:
            seq = self.seq.next(mint)
        else:
            self.seq.restore({mint: seq})
        # as the feed stamps them: received when they happened
        return make_event(payload, source=self.source, time=time, seq=seq, received_at=time)


def base58_key(label: str, length: int = 44) -> str:
    """A key the frame decoder accepts, the same for the same label, starting with it.

    ``length`` 44 gives a public key (mint, wallet, curve), 88 a signature. The label's
    base58 characters come first, so tests and their output stay readable; a digest of
    the whole label fills the rest, so labels that differ give different keys.
    """
    head = "".join(c for c in label if c in _BASE58)[: length // 2]
    fill = ""
    counter = 0
    while len(head) + len(fill) < length:
        digest = hashlib.sha256(f"{label}/{counter}".encode()).digest()
        fill += "".join(_BASE58[b % 58] for b in digest)
        counter += 1
    return (head + fill)[:length]


def trade_frame(mint: str, i: int, *, tx_type: str = "buy", sol_amount: float = 1e-05) -> bytes:
    """The ``i``-th trade frame of token ``mint`` (a label, as :func:`base58_key` takes),
    by wallet ``w<i>`` on a curve at 1B tokens, as PumpPortal sends it."""
    return (
        b'{"signature":"%s","mint":"%s","traderPublicKey":"%s","txType":"%s",'
        b'"tokenAmount":%d.5,"solAmount":%r,"newTokenBalance":0,"bondingCurveKey":"%s",'
        b'"vTokensInBondingCurve":1000000000,"vSolInBondingCurve":32.19,"marketCapSol":32.19}'
        % (
            base58_key(f"sig-{mint}-{i}", 88).encode(),
            base58_key(mint).encode(),
            base58_key(f"w{i}").encode(),
            tx_type.encode(),
            i,
            sol_amount,
            base58_key("bc").encode(),
        )
    )


def partition_keys(partitions: int, *, prefix: str = "key") -> list[str]:
    """One key per partition, the i-th landing in partition i (``prefix-<n>``)."""
    keys: list[str | None] = [None] * partitions
    missing = partitions
    n = 0
    while missing:
        key = f"{prefix}-{n}"
        slot = partition_of(key, partitions)
        if keys[slot] is None:
            keys[slot] = key
            missing -= 1
        n += 1
    return keys  # type: ignore[return-value]


def sample_payload(schema: type[Payload], key: str | None = None, **fields: Any) -> Payload:
    """A valid payload of ``schema``: its key field set to ``key``, required fields filled.

    Token events are built by :class:`TokenEvents` (consistent curve figures); for
    other types a string is its field's name, a number 1, a Literal its first value.
    ``fields`` override any field.
    """
    if schema is TokenCreated:
        event = TokenEvents(source="test/sample").created(key, **fields)
        return event.data
    if schema is TokenTrade:
        return TokenEvents(source="test/sample").trade(key or "sample", **fields).data
    if schema is TokenMigrated:
        return TokenEvents(source="test/sample").migrated(key or "sample").data
    values: dict[str, Any] = {}
    key_field = getattr(schema, "KEY_FIELD", None)
    for info in msgspec.structs.fields(schema):
        if info.name in fields or not info.required:
            continue
        if info.name == key_field:
            values[info.name] = key if key is not None else "sample"
        else:
            values[info.name] = _sample(info.type, info.name)
    return schema(**{**values, **fields})


def _sample(annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return args[0]
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in args if a is not type(None)), name)
    if origin is tuple or annotation is tuple:
        return ()
    if annotation is bool:
        return False
    if annotation is int:
        return 1
    if annotation is float:
        return 1.0
    if annotation is str:
        return name
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return sample_payload(annotation)  # type: ignore[arg-type]
    raise TypeError(f"no sample value for field {name!r} of type {annotation!r}")


class FeatureUpdates:
    """The ``features.updated`` the features service publishes for each token event.

    Folds token events into a FeatureManager (the same fold as the service) and wraps
    the vector after each, sequenced per mint, caused by the token event: input for
    services that consume features without running the features service.
    """

    def __init__(self, *, source: str = "features/test"):
        self.manager = FeatureManager()
        self.source = source
        self._seq = Sequencer()

    def updated(self, event: Event) -> Event | None:
        """The update ``event`` gives (None for an event that is not a creation or trade)."""
        state = self.manager.update_feature_history(event)
        if state is None:
            return None
        manager = self.manager
        payload = FeaturesUpdated(
            mint=event.key,
            feature_set_version=manager.version,
            source_seq=event.seq or 0,
            names=manager.names,
            values=tuple(manager.values(state)),
        )
        return make_event(
            payload,
            source=self.source,
            time=event.time,
            seq=self._seq.next(event.key),
            cause=event,
        )

    def of(self, events) -> list[Event]:
        """The updates a stream of token events gives, in order."""
        return [u for e in events if (u := self.updated(e)) is not None]
