"""Fault injection for the simulated PumpPortal socket: what a real feed must survive."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Switches for the faults the server injects; all off by default."""

    #: drop every connection (no close frame) every this many seconds
    drop_every_s: float | None = None
    #: share of data frames replaced by a malformed one
    malformed_rate: float = 0.0
    #: share of data frames sent twice
    duplicate_rate: float = 0.0
    #: share of data frames held back by a random extra latency (later frames queue behind)
    delay_rate: float = 0.0
    delay_max_s: float = 0.5
    #: share of data frames followed by a hostile frame (:func:`hostile`) of ``hostile_kinds``
    hostile_rate: float = 0.0
    hostile_kinds: tuple[str, ...] = ()
    #: seed of the fault generator (independent of the market's)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("malformed_rate", "duplicate_rate", "delay_rate", "hostile_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.drop_every_s is not None and self.drop_every_s <= 0:
            raise ValueError(f"drop_every_s must be > 0, got {self.drop_every_s}")
        unknown = set(self.hostile_kinds) - set(HOSTILE_KINDS)
        if unknown:
            raise ValueError(f"unknown hostile kinds {sorted(unknown)}; known: {HOSTILE_KINDS}")

    @property
    def active(self) -> bool:
        return bool(
            self.malformed_rate or self.duplicate_rate or self.delay_rate or self.hostile_rate
        )

    @property
    def hostile_classes(self) -> tuple[str, ...]:
        return self.hostile_kinds or HOSTILE_DEFAULT


#: what a proxy in front of the socket sends when it misbehaves
_NOT_JSON = (
    "<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>",
    "ping",
    "undefined",
    "\x00\x01garbage\xff",
)
_NUMERIC_FIELDS = (
    "solAmount",
    "tokenAmount",
    "vSolInBondingCurve",
    "marketCapSol",
    "vTokensInBondingCurve",
    "initialBuy",
    "newTokenBalance",
)
_REQUIRED_FIELDS = ("mint", "txType", "signature", "vSolInBondingCurve", "traderPublicKey")


def malform(frame: dict, text: str, rng: random.Random) -> tuple[str, str]:
    """Return ``(kind, text)``: a broken version of ``frame`` (encoded as ``text``)."""
    kind = rng.choice(("truncated", "wrong_type", "missing_field", "not_json"))
    if kind == "truncated":
        return kind, text[: rng.randint(1, max(1, len(text) - 2))]
    if kind == "not_json":
        return kind, rng.choice(_NOT_JSON)
    broken = dict(frame)
    if kind == "wrong_type":
        present = [f for f in _NUMERIC_FIELDS if f in broken]
        if present:
            field = rng.choice(present)
            broken[field] = rng.choice(("NaN", "12abc", None, [1, 2], {"v": 1}))
        else:
            broken["txType"] = 7
    else:
        present = [f for f in _REQUIRED_FIELDS if f in broken]
        del broken[rng.choice(present)]
    return kind, json.dumps(broken, separators=(",", ":"))


#: classes of hostile frames: each one a way a frame has broken a feed
HOSTILE_KINDS = (
    # a string field (known or unknown) far longer than the protocol's values
    "long_field",
    "long_extra_field",
    # nesting deeper than any decoder's recursion
    "deep_nesting",
    # a control frame (message / errors) of megabytes
    "huge_control",
    # numbers outside the curve's physical range, or not numbers at all
    "bad_number",
    # reserves each in range but together off the bonding curve
    "inconsistent_curve",
    # a key twice with different values (routed by one, decoded by the other)
    "duplicate_key",
    # a NUL character in the mint (no Postgres text can hold it)
    "nul_in_mint",
    # a frame over the client's frame size limit (4 MiB)
    "oversize",
)
#: every class but ``oversize``, which also ends the connection in most clients
HOSTILE_DEFAULT = tuple(k for k in HOSTILE_KINDS if k != "oversize")
#: prefix of every hostile frame's signature: a stored one is found by it
HOSTILE_SIGNATURE = "hostile"

_STRING_FIELDS = (
    "signature",
    "mint",
    "traderPublicKey",
    "bondingCurveKey",
    "pool",
    "name",
    "symbol",
    "uri",
)
_NESTING = 1_000
_OVERSIZE = 2**22 + 1024


def hostile(frame: dict, serial: int, rng: random.Random, kinds=HOSTILE_DEFAULT) -> tuple[str, str]:
    """Return ``(kind, text)``: a hostile frame modelled on ``frame``.

    Its signature starts with :data:`HOSTILE_SIGNATURE` and ``serial`` (unless the long
    field is the signature itself, which then starts with them), so it never collides
    with a market frame and a stored one can be told apart.
    """
    kind = rng.choice(kinds)
    signature = f"{HOSTILE_SIGNATURE}{serial}"
    bad = dict(frame, signature=signature)
    encode = json.dumps
    if kind == "long_field":
        field = rng.choice([f for f in _STRING_FIELDS if f in frame] or ["signature"])
        length = rng.choice((10_000, 100_000, 1_000_000))
        bad[field] = (signature + "x" if field == "signature" else "") + "A" * length
        return kind, encode(bad)
    if kind == "long_extra_field":
        bad["memo" + str(serial % 7)] = "B" * rng.choice((10_000, 100_000, 1_000_000))
        return kind, encode(bad)
    if kind == "deep_nesting":
        depth = _NESTING + rng.randint(0, 100)
        text = encode(bad)
        return kind, text[:-1] + ',"extra":' + "[" * depth + "]" * depth + "}"
    if kind == "huge_control":
        field = rng.choice(("message", "errors"))
        return kind, encode({field: "C" * rng.randint(1_000_000, 4_000_000)})
    if kind == "bad_number":
        present = [f for f in _NUMERIC_FIELDS if f in bad]
        field = rng.choice(present)
        bad[field] = rng.choice(
            (-5.0, 1e308, -1e308, 1e-300, 0.0, 2**64, float("inf"), float("nan"), "1e309")
        )
        return kind, encode(bad)
    if kind == "inconsistent_curve":
        bad["vSolInBondingCurve"] = 1e308
        bad["vTokensInBondingCurve"] = 1e-300
        return kind, encode(bad)
    if kind == "duplicate_key":
        text = encode(bad)
        other = "sell" if frame.get("txType") == "buy" else "buy"
        return kind, text[:-1] + f',"txType":"{other}"}}'
    if kind == "nul_in_mint":
        bad["mint"] = str(frame.get("mint", "")) + "\x00"
        return kind, encode(bad)
    if kind == "oversize":
        bad["memo"] = "D" * _OVERSIZE
        return kind, encode(bad)
    raise ValueError(f"unknown hostile kind {kind!r}")
