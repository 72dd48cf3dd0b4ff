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
    #: seed of the fault generator (independent of the market's)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("malformed_rate", "duplicate_rate", "delay_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.drop_every_s is not None and self.drop_every_s <= 0:
            raise ValueError(f"drop_every_s must be > 0, got {self.drop_every_s}")

    @property
    def active(self) -> bool:
        return bool(self.malformed_rate or self.duplicate_rate or self.delay_rate)


#: what a proxy in front of the socket sends when it misbehaves
_NOT_JSON = (
    "<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>",
    "ping",
    "undefined",
    "\x00\x01garbage\xff",
)
_NUMERIC_FIELDS = ("solAmount", "tokenAmount", "vSolInBondingCurve", "marketCapSol",
                   "vTokensInBondingCurve", "initialBuy", "newTokenBalance")
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
