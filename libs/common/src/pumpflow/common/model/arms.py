"""A/B arms: which model's score of a token reaches trading, and which only shadow it.

An :class:`ArmTable` holds arms, each a model id with a weight. A new token's live arm
is a stable hash of its mint: the first 8 bytes of BLAKE2b over the table's salt and the
mint, read as a fraction in [0, 1), placed against the live arms' cumulative weights
in the table's order. The same mint lands in the same arm under the same table in every
replica and process (Python's ``hash()`` is salted per process).

A token an arm scored stays with that arm for the rest of its life
(:meth:`ArmTable.route_for`, given the arm its scorer kept): an A/B comparison reads
each token's predictions as one arm's, so the weights place new tokens only. Changing
them (a weight at 0 included: the arm takes no new token and keeps its own) moves no
token already scored; a new salt reshuffles new tokens only. A token leaves its arm
when the arm does: removed (:meth:`ArmTable.without_arm`), or made a shadow by a
promotion (which goes on scoring it, marked shadow). It is then placed as a new token
is, by its hash against the arms left: the same place in every replica and after any
restart.

Shadow arms score every token a live arm scores; their predictions are marked
shadow, so trading ignores them while their performance is measured beside the live
arms'. A table is immutable: a change (weights, a promotion, an arm added or removed)
is a new table with the next revision, swapped in whole, so a prediction is routed by
the old table or the new one, never by a mix.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping

import msgspec

#: the salt of tables that name none: experiments that must reshuffle tokens set their own
DEFAULT_SALT = "pumpflow-arms-1"
_SCALE = float(1 << 64)
#: routes remembered per table: a day of launches (about 22k, docs/market.md) fits
PLACED_KEPT = 50_000


class ArmError(ValueError):
    """An arm table that cannot route tokens (names the arm at fault)."""


class UnknownArm(ArmError):
    """An arm the table does not hold."""


class Arm(msgspec.Struct, frozen=True, kw_only=True):
    """One arm: the model that scores its tokens, its share of tokens, shadow or live."""

    name: str
    model_id: str
    #: share of the live tokens (relative to the other live arms); ignored for a shadow
    weight: float = 1.0
    #: scores every token, its predictions marked shadow (never traded on)
    shadow: bool = False


def mint_fraction(mint: str, salt: str = DEFAULT_SALT) -> float:
    """The mint's stable place in [0, 1) under ``salt``."""
    digest = hashlib.blake2b(mint.encode(), digest_size=8, key=salt.encode()).digest()
    return int.from_bytes(digest, "big") / _SCALE


class _Placed(dict):
    """Mints' routes, each placed on first use; the newest ``PLACED_KEPT`` at most (all
    forgotten at once beyond that)."""

    __slots__ = ("_place",)

    def __init__(self, place):
        super().__init__()
        self._place = place

    def __missing__(self, mint: str) -> tuple[Arm, ...]:
        if len(self) >= PLACED_KEPT:
            self.clear()
        found = self[mint] = self._place(mint)
        return found


class ArmTable:
    """Arms with weights; routes each mint to one live arm plus every shadow arm."""

    __slots__ = (
        "_cuts",
        "_live",
        "_routes",
        "arms",
        "kept_routes",
        "revision",
        "routes",
        "salt",
        "shadows",
        "shared_route",
    )

    def __init__(self, arms: Iterable[Arm], *, salt: str = DEFAULT_SALT, revision: int = 0):
        self.arms: tuple[Arm, ...] = tuple(arms)
        self.salt = salt
        self.revision = revision
        names = [arm.name for arm in self.arms]
        if not names:
            raise ArmError("an arm table needs at least one arm")
        if len(set(names)) != len(names) or not all(names):
            raise ArmError(f"arm names must be non-empty and distinct, got {names}")
        for arm in self.arms:
            if not (math.isfinite(arm.weight) and arm.weight >= 0.0):
                raise ArmError(
                    f"arm {arm.name!r}: weight must be finite and >= 0, not {arm.weight}"
                )
        live = [arm for arm in self.arms if not arm.shadow and arm.weight > 0.0]
        if not live:
            raise ArmError("no live arm with a positive weight: no token would be scored")
        self.shadows: tuple[Arm, ...] = tuple(arm for arm in self.arms if arm.shadow)
        self._live = tuple(live)
        total = sum(arm.weight for arm in live)
        cuts, running = [], 0.0
        for arm in live[:-1]:
            running += arm.weight
            cuts.append(running / total)
        self._cuts = cuts
        #: per live arm: it, then the shadows (what scores a mint routed to it)
        self._routes = tuple((arm, *self.shadows) for arm in live)
        #: mint -> its route, for the mints seen lately (a hash per prediction costs more)
        #: each new mint's arms (``route``), placed on first use: ``routes[mint]`` is a
        #: dict's lookup once placed, where a call of ``route`` costs a Python call
        self.routes: Mapping[str, tuple[Arm, ...]] = _Placed(self._place)
        #: arm name -> the route of the mints it scored: every arm but the shadows,
        #: whatever its weight (one at 0 keeps its mints)
        self.kept_routes: dict[str, tuple[Arm, ...]] = {
            arm.name: (arm, *self.shadows) for arm in self.arms if not arm.shadow
        }
        #: every mint's arms when all share one route (a single arm not a shadow), else
        #: None: a batch of mints is then routed without a lookup each
        self.shared_route: tuple[Arm, ...] | None = (
            self._routes[0] if len(self.kept_routes) == 1 else None
        )

    # ---------------------------------------------------------------- routing

    def live_arm(self, mint: str) -> Arm:
        """The live arm whose score of ``mint`` trading reads."""
        return self._live[bisect.bisect_right(self._cuts, mint_fraction(mint, self.salt))]

    def route(self, mint: str) -> tuple[Arm, ...]:
        """The arms that score a new ``mint``: its live arm first, then every shadow arm."""
        return self.routes[mint]

    def route_for(self, mint: str, scored_by: str | None) -> tuple[Arm, ...]:
        """The arms that score ``mint`` when the live arm named ``scored_by`` scored it
        before (None: none did): that arm while the table holds it, not as a shadow;
        else the route of a new mint."""
        if scored_by is not None:
            kept = self.kept_routes.get(scored_by)
            if kept is not None:
                return kept
        return self.routes[mint]

    def _place(self, mint: str) -> tuple[Arm, ...]:
        return self._routes[bisect.bisect_right(self._cuts, mint_fraction(mint, self.salt))]

    def shares(self) -> dict[str, float]:
        """Each live arm's expected share of tokens."""
        total = sum(arm.weight for arm in self._live)
        return {arm.name: arm.weight / total for arm in self._live}

    def model_ids(self) -> set[str]:
        return {arm.model_id for arm in self.arms}

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise UnknownArm(f"no arm {name!r} (arms: {', '.join(a.name for a in self.arms)})")

    # ---------------------------------------------------------------- changes

    def _next(self, arms: Iterable[Arm]) -> ArmTable:
        return ArmTable(arms, salt=self.salt, revision=self.revision + 1)

    def with_weights(self, weights: Mapping[str, float]) -> ArmTable:
        """The table with the named arms' weights set (the others keep theirs); at least
        one arm named (an empty change would only move the table's revision)."""
        if not weights:
            raise ArmError("no arm's weight given")
        for name in weights:
            self.arm(name)
        return self._next(
            msgspec.structs.replace(arm, weight=float(weights[arm.name]))
            if arm.name in weights
            else arm
            for arm in self.arms
        )

    def promote(self, name: str) -> ArmTable:
        """The table where arm ``name`` is live for every token and the arms live until
        now shadow it (they keep scoring, so the comparison goes on)."""
        self.arm(name)
        return self._next(
            msgspec.structs.replace(arm, shadow=False, weight=1.0)
            if arm.name == name
            else (msgspec.structs.replace(arm, shadow=True) if not arm.shadow else arm)
            for arm in self.arms
        )

    def with_arm(self, arm: Arm) -> ArmTable:
        """The table with ``arm`` added, or replacing the arm of its name."""
        if any(a.name == arm.name for a in self.arms):
            return self._next(arm if a.name == arm.name else a for a in self.arms)
        return self._next((*self.arms, arm))

    def without_arm(self, name: str) -> ArmTable:
        """The table without arm ``name``: its share of new mints goes to the live arms
        left in proportion to their weights (weights are relative), and the mints it
        scored are placed by their hash against those arms. UnknownArm if there is no
        such arm; ArmError if it is the last arm, or the only live one with a weight."""
        self.arm(name)
        if len(self.arms) == 1:
            raise ArmError(f"arm {name!r} is the last arm: a table needs one to route tokens")
        try:
            return self._next(arm for arm in self.arms if arm.name != name)
        except ArmError as exc:
            raise ArmError(f"without arm {name!r}: {exc}") from None

    # ---------------------------------------------------------------- storage

    def encode(self) -> bytes:
        return _encode_spec(_TableSpec(arms=self.arms, salt=self.salt, revision=self.revision))

    @classmethod
    def decode(cls, raw: bytes) -> ArmTable:
        try:
            spec = _decode_spec(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ArmError(f"unreadable arm table: {exc}") from None
        return cls(spec.arms, salt=spec.salt, revision=spec.revision)

    def describe(self) -> dict:
        shares = self.shares()
        return {
            "revision": self.revision,
            "salt": self.salt,
            "arms": [
                {**msgspec.to_builtins(arm), "share": shares.get(arm.name, 0.0)}
                for arm in self.arms
            ],
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ArmTable):
            return NotImplemented
        return (self.arms, self.salt, self.revision) == (other.arms, other.salt, other.revision)

    def __hash__(self) -> int:
        return hash((self.arms, self.salt, self.revision))

    def __repr__(self) -> str:
        return f"ArmTable({list(self.arms)!r}, revision={self.revision})"


class _TableSpec(msgspec.Struct, frozen=True, kw_only=True):
    arms: tuple[Arm, ...]
    salt: str = DEFAULT_SALT
    revision: int = 0


_encode_spec = msgspec.json.Encoder().encode
_decode_spec = msgspec.json.Decoder(_TableSpec).decode
