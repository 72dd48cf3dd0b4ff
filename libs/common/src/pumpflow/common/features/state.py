"""Per-token incremental state: the O(1)-per-event primitives every feature reads.

The feature set decides which primitives exist (a :class:`Layout`: the sliding
windows, EWMA decays, RSI periods); each token then keeps one compact
:class:`TokenState`. Windows use event time. Sums are kept in integer lamports, so a
window's running sum is exact and equals the batch path's prefix-sum difference bit
for bit; the same float operations in the same order make the rest equal too.

A window contains the events with ``time > now - window``; the event just before
its left edge gives the window's reference price (the first event's price while the
token is younger than the window).

Idle tokens: once every window is empty a token can be frozen into one compact
``bytes`` (:meth:`TokenState.freeze`, the checkpoint encoding itself) and thawed on
its next trade. Frozen, each wallet that traded the token is an 8-byte id (the
64-bit BLAKE2b digest of its address, :func:`wallet_id`) next to what it bought; a
thawed token matches a returning wallet by that id. Two different wallets of one
token with the same id would count as one trader: with ``n`` wallets the odds are
about ``n**2 / 2**65`` (3e-14 for 1,000 wallets; under 1e-6 over a year of every
pump.fun token even at 1,000 wallets each), and a freeze that would merge two wallets
it already knows is refused.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from hashlib import blake2b

import msgspec

from pumpflow.common.features.inputs import TradeInput


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Which primitives the tokens keep (derived from the registered features)."""

    #: sliding windows in seconds, ascending
    windows: tuple[float, ...] = ()
    #: windows that also track their largest buy (monotonic deque)
    max_windows: tuple[float, ...] = ()
    #: EWMA weights of squared returns (volatility)
    ewma_alphas: tuple[float, ...] = ()
    #: RSI periods (Wilder smoothing of per-trade gains and losses)
    rsi_periods: tuple[int, ...] = ()
    #: per EWMA, (1 - alpha, alpha); per RSI period, (1 - 1/period, 1/period): the same
    #: floats each trade would compute, computed once
    ewma_weights: tuple[tuple[float, float], ...] = field(init=False, repr=False, compare=False)
    rsi_weights: tuple[tuple[float, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weights = tuple((1.0 - alpha, alpha) for alpha in self.ewma_alphas)
        object.__setattr__(self, "ewma_weights", weights)
        weights = tuple((1.0 - 1.0 / period, 1.0 / period) for period in self.rsi_periods)
        object.__setattr__(self, "rsi_weights", weights)
        if tuple(sorted(set(self.windows))) != self.windows:
            raise ValueError("windows must be unique and ascending")
        if any(w <= 0 for w in self.windows):
            raise ValueError("windows must be > 0 seconds")
        if not set(self.max_windows) <= set(self.windows):
            raise ValueError("max_windows must be among the windows")
        if any(not 0.0 < a <= 1.0 for a in self.ewma_alphas):
            raise ValueError("EWMA alphas must be in (0, 1]")
        if any(p < 1 for p in self.rsi_periods):
            raise ValueError("RSI periods must be >= 1")

    def window_index(self, window: float) -> int:
        return self.windows.index(window)

    def max_index(self, window: float) -> int:
        return self.max_windows.index(window)


# Per-window slots in TokenState.wstate (flat list, WSLOTS entries per window): the
# first row inside the window (absolute trade index), lamports bought and sold in it,
# first-time traders in it, and its reference price.
LEFT, BUY, SELL, NEW, REF = range(5)
WSLOTS = 5
_LEFT, _BUY, _SELL, _NEW, _REF = LEFT, BUY, SELL, NEW, REF


def slot(k: int, field: int) -> int:
    """Index of ``field`` (LEFT, BUY, ...) of window ``k`` in ``TokenState.wstate``."""
    return k * WSLOTS + field


def _ids_to_bytes(ids: array) -> bytes:
    if sys.byteorder != "little":
        ids = array("Q", ids)
        ids.byteswap()
    return ids.tobytes()


def _ids_from_bytes(raw: bytes) -> array:
    ids = array("Q")
    ids.frombytes(raw)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids


def wallet_id(wallet: str) -> int:
    """A wallet's 8-byte id: the unsigned 64-bit BLAKE2b digest of its address."""
    return int.from_bytes(blake2b(wallet.encode(), digest_size=8).digest(), "little")


class StateSnapshot(msgspec.Struct, array_like=True, frozen=True):
    """The checkpoint of one TokenState (msgspec-encodable).

    Fields after ``maxq`` were added later and default, so older checkpoints decode.
    """

    scalars: tuple[float, ...]
    ints: tuple[int, ...]
    creator: str | None
    #: lamports bought per wallet known by its address
    traders: dict[str, int]
    wstate: list[int | float]
    ewma: list[float]
    rsi: list[float]
    base: int
    buf_time: list[float]
    buf_buy: list[int]
    buf_sell: list[int]
    buf_new: list[int]
    buf_price: list[float]
    maxq: list[list[tuple[float, int]]]
    #: wallets known by their :func:`wallet_id` (little-endian uint64s) ...
    trader_ids: bytes = b""
    #: ... and the lamports each bought, in the same order
    trader_buys: list[int] = []
    #: per-mint seq of the last token event applied (0 if unknown)
    seq: int = 0
    #: retired by its lifecycle (a late trade lets it go again)
    retired: bool = False


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(StateSnapshot)


def encode_snapshot(snapshot: StateSnapshot, *, exact: bool = False) -> bytes:
    """msgpack bytes of a snapshot; ``exact`` sizes the allocation to the content
    (the encoder's own output keeps its growth headroom: worth a copy when kept)."""
    if not exact:
        return _snapshot_encoder.encode(snapshot)
    buffer = bytearray()  # per call: managers may freeze in several threads
    _snapshot_encoder.encode_into(snapshot, buffer)
    return bytes(buffer)


def decode_snapshot(raw: bytes) -> StateSnapshot:
    return _snapshot_decoder.decode(raw)


class TokenState:
    """Incremental primitives of one token; ``apply`` is O(1) amortised per trade."""

    __slots__ = (
        "base",
        "buf_buy",
        "buf_new",
        "buf_price",
        "buf_sell",
        "buf_time",
        "creator",
        "creator_balance",
        "creator_sold",
        "encoded",
        "ewma",
        "first_price",
        "first_time",
        "hashed",
        "largest_buy",
        "last_return",
        "last_time",
        "layout",
        "max_trader_buy",
        "maxq",
        "n_events",
        "peak_price",
        "prev_time",
        "price",
        "retired",
        "rsi",
        "seq",
        "total_buy",
        "total_sell",
        "traders",
        "unsettled",
        "v_sol",
        "v_tokens",
        "wstate",
    )

    def __init__(self, layout: Layout, *, creator: str | None = None):
        self.layout = layout
        self.n_events = 0
        self.first_time = 0.0
        self.last_time = 0.0
        self.prev_time = 0.0
        self.price = 0.0
        self.first_price = 0.0
        self.peak_price = 0.0
        self.last_return = 0.0
        self.v_sol = 0.0
        self.v_tokens = 0.0
        #: lamports bought per trader: by address, or by wallet_id if carried over a freeze
        self.traders: dict[str | int, int] = {}
        #: True when some traders are keyed by wallet_id
        self.hashed = False
        self.seq = 0
        #: retired by its lifecycle: a late trade lets it go again
        self.retired = False
        self.total_buy = 0
        self.total_sell = 0
        self.max_trader_buy = 0
        self.largest_buy = 0
        self.creator = creator
        self.creator_balance = 0.0
        self.creator_sold = False
        self.wstate: list = [0, 0, 0, 0, 0.0] * len(layout.windows)
        self.ewma = [0.0] * len(layout.ewma_alphas)
        # avg gain, avg loss per period
        self.rsi = [0.0, 0.0] * len(layout.rsi_periods)
        self.base = 0
        self.buf_time: list[float] | None = None
        self.buf_buy: list[int] | None = None
        self.buf_sell: list[int] | None = None
        self.buf_new: list[int] | None = None
        self.buf_price: list[float] | None = None
        self.maxq: list[deque] | None = None
        #: trades folded in since the windows last moved (see :meth:`fold`)
        self.unsettled = 0
        #: (n_events, seq, bytes) of the last checkpoint a keeper encoded (see :meth:`shed`)
        self.encoded: tuple[int, int, bytes] | None = None

    # ----------------------------------------------------------------------------------
    # The hot path.

    def apply(self, trade: TradeInput) -> None:
        """Fold one trade into the state (trades of a token must come in order)."""
        self.fold(trade)
        self.settle()

    def fold(self, trade: TradeInput) -> None:
        """Fold one trade in but leave the windows where they are until :meth:`settle`.

        Folding a run of trades and settling once gives the state that applying each
        gives (window sums are integers, each window's reference is the price before its
        new left edge, a largest-buy queue pops the same entries); readers settle first.
        """
        t, is_buy, lamports, _tokens, trader, new_balance, v_sol, v_tokens = trade
        price = v_sol / v_tokens
        layout = self.layout
        if self.n_events == 0:
            self.first_time = t
            self.last_time = t
            self.prev_time = t
            self.first_price = price
            self.peak_price = price
            if self.creator is None:
                self.creator = trader
            wstate = self.wstate
            for k in range(len(layout.windows)):
                wstate[k * WSLOTS + _REF] = price
        else:
            if t < self.last_time:
                # Arrival stamps can step back by a hair; windows need monotone time.
                t = self.last_time
            self.prev_time = self.last_time
            self.last_time = t
            r = price / self.price - 1.0
            self.last_return = r
            r2 = r * r
            ewma = self.ewma
            for k, (keep, alpha) in enumerate(layout.ewma_weights):
                ewma[k] = keep * ewma[k] + alpha * r2
            if layout.rsi_periods:
                gain = r if r > 0.0 else 0.0
                loss = -r if r < 0.0 else 0.0
                rsi = self.rsi
                for k, (b, a) in enumerate(layout.rsi_weights):
                    rsi[2 * k] = b * rsi[2 * k] + a * gain
                    rsi[2 * k + 1] = b * rsi[2 * k + 1] + a * loss
            if price > self.peak_price:
                self.peak_price = price
        self.n_events += 1
        self.price = price
        self.v_sol = v_sol
        self.v_tokens = v_tokens

        traders = self.traders
        bought = traders.get(trader)
        if bought is None and self.hashed:
            # Known from before a freeze? Then re-key it by address.
            bought = traders.pop(wallet_id(trader), None)
        is_new = bought is None
        if is_new:
            bought = 0
        if is_buy:
            bought += lamports
            self.total_buy += lamports
            if bought > self.max_trader_buy:
                self.max_trader_buy = bought
            if lamports > self.largest_buy:
                self.largest_buy = lamports
            buy, sell = lamports, 0
        else:
            self.total_sell += lamports
            buy, sell = 0, lamports
        traders[trader] = bought
        if trader == self.creator:
            self.creator_balance = new_balance
            if not is_buy:
                self.creator_sold = True

        if not layout.windows:
            return
        if self.buf_time is None:
            self._new_buffers()
        self.buf_time.append(t)
        self.buf_buy.append(buy)
        self.buf_sell.append(sell)
        self.buf_new.append(1 if is_new else 0)
        self.buf_price.append(price)
        if is_buy and self.maxq:
            for q in self.maxq:
                while q and q[-1][1] <= lamports:
                    q.pop()
                q.append((t, lamports))
        self.unsettled += 1

    def settle(self) -> None:
        """Move the windows over the trades folded since they last moved."""
        pending = self.unsettled
        if not pending:
            return
        self.unsettled = 0
        buf_time = self.buf_time
        buf_buy = self.buf_buy
        buf_sell = self.buf_sell
        buf_new = self.buf_new
        if pending == 1:
            buy = buf_buy[-1]
            sell = buf_sell[-1]
            new = buf_new[-1]
        else:
            buy = sum(buf_buy[-pending:])
            sell = sum(buf_sell[-pending:])
            new = sum(buf_new[-pending:])
        t = buf_time[-1]
        windows = self.layout.windows
        base = self.base
        wstate = self.wstate
        for k, window in enumerate(windows):
            at = k * WSLOTS
            wstate[at + _BUY] += buy
            wstate[at + _SELL] += sell
            if new:
                wstate[at + _NEW] += new
            cutoff = t - window
            i = wstate[at + _LEFT] - base
            if buf_time[i] <= cutoff:
                # times never step back (fold clamps them), so the first row still inside
                # is found by bisection; the sums are of integers, in any order exact
                end = bisect_right(buf_time, cutoff, i)
                if end == i + 1:
                    wstate[at + _BUY] -= buf_buy[i]
                    wstate[at + _SELL] -= buf_sell[i]
                    wstate[at + _NEW] -= buf_new[i]
                else:
                    wstate[at + _BUY] -= sum(buf_buy[i:end])
                    wstate[at + _SELL] -= sum(buf_sell[i:end])
                    wstate[at + _NEW] -= sum(buf_new[i:end])
                wstate[at + _REF] = self.buf_price[end - 1]
                wstate[at + _LEFT] = end + base
        maxq = self.maxq
        if maxq:
            for k, window in enumerate(self.layout.max_windows):
                q = maxq[k]
                cutoff = t - window
                while q and q[0][0] <= cutoff:
                    q.popleft()
        # The longest window has the leftmost edge; drop what it no longer needs.
        drop = wstate[(len(windows) - 1) * WSLOTS + _LEFT] - base
        if drop > 32 and drop * 2 > len(buf_time):
            del buf_time[:drop], buf_buy[:drop], buf_sell[:drop]
            del buf_new[:drop], self.buf_price[:drop]
            self.base = base + drop

    def _new_buffers(self) -> None:
        self.buf_time = []
        self.buf_buy = []
        self.buf_sell = []
        self.buf_new = []
        self.buf_price = []
        self.maxq = [deque() for _ in self.layout.max_windows]
        self.base = self.n_events - 1
        for k in range(len(self.layout.windows)):
            self.wstate[k * WSLOTS + _LEFT] = self.base

    # ----------------------------------------------------------------------------------
    # Reads.

    def window_max_buy(self, k: int) -> int:
        if not self.maxq:
            return 0
        q = self.maxq[k]
        return q[0][1] if q else 0

    @property
    def unique_traders(self) -> int:
        return len(self.traders)

    # ----------------------------------------------------------------------------------
    # Memory and checkpoints.

    def idle(self, now: float) -> bool:
        """True once every window is empty at ``now`` (any time after the last trade
        when the layout has no windows)."""
        windows = self.layout.windows
        return self.n_events > 0 and now - self.last_time > (windows[-1] if windows else 0.0)

    def shed(self, now: float) -> bool:
        """Drop the window buffers once every window is empty at ``now``; True if shed.

        Equivalent to the next trade evicting everything: sums go to zero and each
        window's reference price becomes the last price.
        """
        windows = self.layout.windows
        if self.buf_time is None or not windows or not self.idle(now):
            return False
        self.unsettled = 0  # every window ends empty, as if settled
        self.encoded = None  # the one change that leaves n_events as it was
        wstate = self.wstate
        for k in range(len(windows)):
            at = k * WSLOTS
            wstate[at + _LEFT] = self.n_events
            wstate[at + _BUY] = 0
            wstate[at + _SELL] = 0
            wstate[at + _NEW] = 0
            wstate[at + _REF] = self.price
        self.buf_time = self.buf_buy = self.buf_sell = self.buf_new = self.buf_price = None
        self.maxq = None
        self.base = self.n_events
        return True

    def freeze(self, now: float) -> bytes | None:
        """The idle state as compact bytes (its checkpoint, every wallet by id).

        None if the token is not idle at ``now``, or if two of its wallets share an id
        (or an amount does not fit in 64 bits): it then stays as it is, exact.
        """
        if not self.idle(now):
            return None
        self.shed(now)
        try:
            return encode_snapshot(self.snapshot(compact=True), exact=True)
        except (ValueError, OverflowError, msgspec.EncodeError):
            return None

    @classmethod
    def thaw(cls, layout: Layout, frozen: bytes) -> TokenState:
        """The state :meth:`freeze` gave (or any checkpoint of this layout)."""
        return cls.restore(layout, decode_snapshot(frozen))

    def snapshot(self, *, compact: bool = False) -> StateSnapshot:
        """The state as a StateSnapshot; ``compact`` keys every wallet by id.

        Raises ValueError (compact only) if two wallets would share an id.
        """
        self.settle()
        scalars = (
            self.first_time,
            self.last_time,
            self.prev_time,
            self.price,
            self.first_price,
            self.peak_price,
            self.last_return,
            self.v_sol,
            self.v_tokens,
            self.creator_balance,
        )
        ints = (
            self.n_events,
            self.total_buy,
            self.total_sell,
            self.max_trader_buy,
            self.largest_buy,
            int(self.creator_sold),
        )
        traders = self.traders
        ids = b""
        buys: list[int] = []
        if compact:
            keys = array("Q", (k if type(k) is int else wallet_id(k) for k in traders))
            if len(set(keys)) != len(keys):
                raise ValueError("two wallets of the token share an id")
            ids = _ids_to_bytes(keys)
            buys = list(traders.values())
            traders = {}
        elif self.hashed:
            by_id = [(k, v) for k, v in traders.items() if type(k) is int]
            ids = _ids_to_bytes(array("Q", (k for k, _ in by_id)))
            buys = [v for _, v in by_id]
            traders = {k: v for k, v in traders.items() if type(k) is str}
        shed = self.buf_time is None
        return StateSnapshot(
            scalars=scalars,
            ints=ints,
            creator=self.creator,
            traders=traders,
            wstate=self.wstate,
            ewma=self.ewma,
            rsi=self.rsi,
            base=self.base,
            buf_time=[] if shed else self.buf_time,
            buf_buy=[] if shed else self.buf_buy,
            buf_sell=[] if shed else self.buf_sell,
            buf_new=[] if shed else self.buf_new,
            buf_price=[] if shed else self.buf_price,
            maxq=[] if shed else [list(q) for q in self.maxq],
            trader_ids=ids,
            trader_buys=buys,
            seq=self.seq,
            retired=self.retired,
        )

    @classmethod
    def restore(cls, layout: Layout, snap: StateSnapshot) -> TokenState:
        """Rebuild a state from its snapshot (the layout must be the one it was taken with)."""
        state = cls(layout)
        if len(snap.wstate) != len(state.wstate) or len(snap.ewma) != len(state.ewma):
            raise ValueError("snapshot was taken with another feature layout")
        (
            state.first_time,
            state.last_time,
            state.prev_time,
            state.price,
            state.first_price,
            state.peak_price,
            state.last_return,
            state.v_sol,
            state.v_tokens,
            state.creator_balance,
        ) = snap.scalars
        (
            state.n_events,
            state.total_buy,
            state.total_sell,
            state.max_trader_buy,
            state.largest_buy,
            creator_sold,
        ) = snap.ints
        state.creator_sold = bool(creator_sold)
        state.creator = snap.creator
        state.traders = dict(snap.traders)
        if snap.trader_ids:
            ids = _ids_from_bytes(snap.trader_ids)
            if len(ids) != len(snap.trader_buys):
                raise ValueError("snapshot has trader ids and amounts of different lengths")
            state.traders.update(zip(ids, snap.trader_buys, strict=True))
            state.hashed = True
        state.seq = snap.seq
        state.retired = snap.retired
        # Window left edges and counts are ints, the rest floats: keep msgspec's types.
        state.wstate = [
            int(v) if (i % WSLOTS) in (_LEFT, _BUY, _SELL, _NEW) else float(v)
            for i, v in enumerate(snap.wstate)
        ]
        state.ewma = list(snap.ewma)
        state.rsi = list(snap.rsi)
        state.base = snap.base
        if snap.buf_time or snap.maxq:
            state.buf_time = list(snap.buf_time)
            state.buf_buy = list(snap.buf_buy)
            state.buf_sell = list(snap.buf_sell)
            state.buf_new = list(snap.buf_new)
            state.buf_price = list(snap.buf_price)
            state.maxq = [deque((float(t), int(v)) for t, v in q) for q in snap.maxq]
        return state


def rsi_value(avg_gain: float, avg_loss: float) -> float:
    """RSI (0-100) from Wilder averages; 50 with no movement, 100 with no losses."""
    if avg_loss == 0.0:
        return 100.0 if avg_gain > 0.0 else 50.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
