"""Drift: how far the live feature vectors have moved from what a model was trained on.

A :class:`DriftMonitor` watches one model. Its card holds each feature's training
distribution as quantile bins plus a missing share
(:class:`~pumpflow.common.model.card.FeatureReference`); the monitor bins every live
vector the same way (:func:`~pumpflow.common.model.card.bin_index` after
:func:`~pumpflow.common.model.card.prepare_inputs`, the functions that made the
reference) and keeps the bin counts of the last ``window`` vectors. The population
stability index of a feature is ``sum((p - q) * ln(p / q))`` over its bins and the
missing bin, ``p`` the live shares and ``q`` the reference ones, both floored at
``share_floor`` so that an empty bin counts as rare rather than infinitely surprising.

Feed it every ``features.updated`` of the live feature set, not only the vectors a
scoring policy picked: the reference is every trade of every training token, and a
policy that scores only active tokens would read as drift.

Thresholds (:class:`DriftThresholds`) follow the industry conventions for PSI: under
0.1 no significant change, 0.1 to 0.25 a moderate one, over 0.25 a significant one.
A feature is *drifting* from the check its PSI reaches 0.25 until the check it is back
under 0.1; in between it keeps its state, so a PSI that hovers near one threshold does
not flap. A monitor starts with no feature drifting unless told otherwise
(:meth:`DriftMonitor.restore`: what a service announced before a restart, or another
replica did).

Window: the market trades 23 to 58 times a second (docs/market.md), one
``features.updated`` each, so 6,000 vectors are about 2 to 4 minutes of market: long
enough to span the 30 to 170 tokens launched meanwhile (16 to 42 a minute), short
enough to show a change of regime within minutes, which is as long as most tokens
live. With ``B`` bins a sample of ``N`` independent vectors from the reference itself
has a PSI of about ``(B - 1) / N`` (it is a chi-square over ``N``): 0.002 with 11 bins
and 6,000 vectors. Vectors of one token are correlated (rolling features move a little
per trade), so the effective sample is smaller, but even 300 independent vectors give
about 0.03, well under 0.1. No feature is judged before ``min_observations`` vectors
(2,000: 0.005 of noise). The PSI is recomputed every ``check_every`` vectors (500,
some 10 to 20 seconds of market), so the per-vector cost is the bin update alone.

Warm-up: PumpPortal has no history, so a feed sees the tokens launched since it
started, and ``t`` seconds after its start no token it sees is older than ``t``. The
reference holds the trades of tokens of every age (the default card's, from markets
past their first 20 minutes: a decile of them older than 551 s), so in the first
minutes the age, and every feature that accumulates with it (unique traders, largest
buy, curve progress, market cap, the 300 s volumes), sit far under it: 19 to 22 of the
default card's 29 features over 0.25 at the first check (PSI up to 3, seeds 7 to 9),
the youth of the observation, not a change of the market. No feature is judged,
drifting or recovered, until the observation has lasted ``warmup_s`` of market time
(the PSI is computed and reported meanwhile, :attr:`DriftReport.warming_up`). The
observation's start is the earliest of the clock at the first vector and, for every
vector counted, the clock then less the token's age (``age_feature``, the time since the
first event of the token the features saw; counted at the next check, so late by a
check's vectors at most): a replica started, or restarted (:meth:`DriftMonitor.restore`),
while the feed and features run on sees tokens older than the warm-up in its first
vectors and judges at its first check, where a feed started with it shows it none; a
features service restarted without its tokens' state restarts their ages, and the
accumulated features with them, so it is waited out too. It costs the largest age of
each batch counted, during the warm-up only, and needs nothing stored. A card without
the age feature waits the warm-up from its first vector.

``warmup_s`` (20 minutes): about 95% of tokens go quiet within 10 to 15 minutes of
their launch (docs/market.md, section 3), so an observation 15 minutes old has seen
every age at which all but a few survivors trade; the window is the last 6,000
vectors, up to 4.3 minutes of market at 23 trades a second, so from 20 minutes on the
windows judged hold vectors made once the observation was 15 minutes old. The
simulator's market agrees: 5% of its trades are by tokens older than 15 minutes, 2%
older than 20, and against a reference of hours of it the PSI of the age and of what
accumulates with it falls from 1 to 3 at the first check to under 0.25 by 10 to 16
minutes and to 0.15 or less by 20 (seeds 7 to 9). The price: a change of the market in
the first 20 minutes after a fresh start is flagged from the 20th minute, not before;
scoring is not held back.

Cost: O(k) per vector for k features (two counter updates each, vectorised across the
features and across the rows of a batch); memory: the window's bin of each feature (a
``window x k`` array of small integers) and the ``k x bins`` counts, whatever the
number of vectors seen.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence

import msgspec
import numpy as np

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.events import ModelDrift
from pumpflow.common.model.card import ModelCard, bin_index, prepare_inputs, vector_row
from pumpflow.common.model.settings import DriftThresholds

#: the feature holding a token's age: seconds since the first event of it the features saw
AGE_FEATURE = "time_since_launch"


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    psi: float
    drifting: bool


class DriftReport(msgspec.Struct, frozen=True, kw_only=True):
    """A model's drift at one check (or now, see :meth:`DriftMonitor.report`)."""

    model_id: str
    version: str
    #: vectors in the window the PSI was computed over
    observations: int
    #: vectors seen in all
    seen: int
    #: when the figures were computed (clock time)
    at: float
    features: tuple[FeatureDrift, ...]
    #: the observation is younger than the warm-up: no feature is judged (clock time now)
    warming_up: bool = False
    #: clock time from which features are judged (NaN before any vector): the
    #: observation's start, as far as known, plus the warm-up
    judged_from: float = math.nan

    @property
    def drifting(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.drifting)

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=math.nan)


class DriftMonitor:
    """PSI of each feature of one model over a rolling window, with drift transitions.

    ``observe`` takes rows of raw feature values in the card's order (a batch, or one
    row) and returns the :class:`~pumpflow.common.events.ModelDrift` payloads of the
    features whose state changed at the check it ran, if it ran one: the service
    publishes them as ``model.drift``. They and its reports name ``model_id``, the id
    the model is served as (default: its card's; a retrain served beside its original
    under another id keeps the original's id in its card).

    ``age_feature`` names the feature holding a token's age, which tells a running
    observation from a fresh one (see the warm-up in the module docstring).
    """

    def __init__(
        self,
        card: ModelCard,
        *,
        model_id: str | None = None,
        thresholds: DriftThresholds | None = None,
        clock: Clock | None = None,
        age_feature: str = AGE_FEATURE,
    ):
        self.card = card
        self.model_id = model_id or card.model_id
        self.thresholds = thresholds or DriftThresholds()
        self.clock = clock or WallClock()
        self.names = card.feature_names
        k = len(self.names)
        self._age_column = self.names.index(age_feature) if age_feature in self.names else None
        #: the earliest clock time the observation is known to have run since
        self._observed_since = math.inf
        self._warm = self.thresholds.warmup_s == 0
        width = max((len(r.edges) for r in card.reference), default=0)
        #: the edges of every feature, padded with +inf (no value is above +inf)
        self._edges = np.full((k, width), np.inf)
        #: reference shares: value bins 0..width, then the missing bin at width + 1
        reference = np.zeros((k, width + 2))
        for j, ref in enumerate(card.reference):
            self._edges[j, : len(ref.edges)] = ref.edges
            reference[j, : len(ref.shares)] = ref.shares
            reference[j, width + 1] = ref.missing_share
        self._missing_bin = width + 1
        # bins a feature does not have (fewer edges than the widest) never hold a value
        self._used = np.zeros((k, width + 2), dtype=bool)
        for j, ref in enumerate(card.reference):
            self._used[j, : len(ref.edges) + 1] = True
        self._used[:, width + 1] = True
        self._reference = np.maximum(reference, self.thresholds.share_floor)
        self._log_reference = np.log(self._reference)
        self._offsets = np.arange(k) * (width + 2)
        window = self.thresholds.window
        self._ring = np.zeros((window, k), dtype=np.int16 if width < 32000 else np.int32)
        self._counts = np.zeros((k, width + 2), dtype=np.int64)
        self._next = 0
        self._filled = 0
        self.seen = 0
        self._since_check = 0
        #: rows observed and not counted yet (see :meth:`observe`)
        self._waiting: list[np.ndarray] = []
        self._waiting_rows = 0
        self._drifting = np.zeros(k, dtype=bool)
        self._psi = np.full(k, math.nan)
        self._checked_at = math.nan
        #: the latest transitions, oldest first: (clock time, payload)
        self.transitions: deque[tuple[float, ModelDrift]] = deque(maxlen=self.thresholds.history)

    # ----------------------------------------------------------------------------------

    def bins(self, rows: np.ndarray) -> np.ndarray:
        """The reference bin of each value of raw rows (n x k); missing values' bin last."""
        inputs = prepare_inputs(rows).astype(np.float64)
        if inputs.shape[1] != len(self.names):
            raise ValueError(
                f"model {self.model_id!r} has {len(self.names)} features per row, "
                f"got {inputs.shape[1]}"
            )
        bins = bin_index(self._edges, inputs)
        bins[np.isnan(inputs)] = self._missing_bin
        return bins

    def observe(self, rows: np.ndarray) -> list[ModelDrift]:
        """Count rows of raw feature values (n x k, card order); transitions if checked.

        Rows wait, as given, until the next check, a read of the window or a window's
        worth of them, then are binned and counted at once: the counts, the PSI and the
        transitions are those of counting each call's rows as it came, at a fraction of
        the cost for the one-row calls of a live stream.
        """
        width = np.shape(rows)[-1] if np.ndim(rows) else 1
        if width != len(self.names):
            raise ValueError(
                f"model {self.model_id!r} has {len(self.names)} features per row, got {width}"
            )
        n = len(rows)
        if not self.seen:
            self._observed_since = min(self._observed_since, self.clock.now())
        window = len(self._ring)
        if self._waiting_rows + n >= window:
            self._count_waiting()
        if n >= window:
            self._add(rows)
        else:
            self._waiting.append(rows)
            self._waiting_rows += n
        self.seen += n
        self._since_check += n
        if self._since_check >= self.thresholds.check_every:
            return self.check()
        return []

    def _count_waiting(self) -> None:
        waiting = self._waiting
        if waiting:
            rows = waiting[0] if len(waiting) == 1 else np.concatenate(
                [np.atleast_2d(r) for r in waiting]
            )  # fmt: skip
            self._waiting = []
            self._waiting_rows = 0
            self._add(rows)

    def _add(self, rows: np.ndarray) -> None:
        """Bin and count ``rows`` into the window (fewer than a window, or a reset)."""
        if not self._warm:
            self._observe_ages(rows)
        bins = self.bins(rows)
        window = len(self._ring)
        if len(bins) >= window:
            bins = bins[-window:]
            self._counts[:] = 0
            self._filled = 0
            self._next = 0
        n = len(bins)
        positions = (self._next + np.arange(n)) % window
        replaced = max(0, self._filled + n - window)
        if replaced:
            # before the ring is full the empty slots come first: the overwritten are last
            self._count(self._ring[positions[n - replaced :]], -1)
        self._ring[positions] = bins
        self._count(bins, +1)
        self._next = int((self._next + n) % window)
        self._filled = min(window, self._filled + n)

    def _observe_ages(self, rows: np.ndarray) -> None:
        """Move the observation's start back to the launch of the oldest token in ``rows``
        (by the clock now, no earlier than the vectors were made: the start is late, if
        anything, by the time rows wait to be counted)."""
        if self._age_column is None:
            return
        ages = np.asarray(rows, dtype=np.float64).reshape(-1, len(self.names))[:, self._age_column]
        ages = ages[np.isfinite(ages)]
        if ages.size:
            launched = self.clock.now() - float(ages.max())
            self._observed_since = min(self._observed_since, launched)

    def _warmed_up(self, now: float) -> bool:
        if not self._warm:
            self._warm = now - self._observed_since >= self.thresholds.warmup_s
        return self._warm

    def observe_vector(self, names: Sequence[str], values: Sequence[float]) -> list[ModelDrift]:
        """Count one vector given by feature names and values (absent names: missing)."""
        return self.observe(vector_row(names, values, self.names)[None, :])

    def _count(self, bins: np.ndarray, sign: int) -> None:
        flat = np.bincount((bins + self._offsets).ravel(), minlength=self._counts.size)
        self._counts += sign * flat.reshape(self._counts.shape)

    # ----------------------------------------------------------------------------------

    def psi(self) -> np.ndarray:
        """The PSI of each feature over the window now (NaN before any vector)."""
        self._count_waiting()
        if self._filled == 0:
            return np.full(len(self.names), math.nan)
        live = np.maximum(self._counts / self._filled, self.thresholds.share_floor)
        terms = (live - self._reference) * (np.log(live) - self._log_reference)
        return np.where(self._used, terms, 0.0).sum(axis=1)

    def check(self) -> list[ModelDrift]:
        """Compute the PSI now and return the transitions it makes (none before enough
        vectors, nor during the warm-up)."""
        self._since_check = 0
        self._psi = self.psi()
        self._checked_at = self.clock.now()
        if self._filled < self.thresholds.min_observations:
            return []
        if not self._warmed_up(self._checked_at):
            return []
        t = self.thresholds
        starts = ~self._drifting & (self._psi >= t.alert_psi)
        ends = self._drifting & (self._psi < t.recover_psi)
        self._drifting = (self._drifting | starts) & ~ends
        drifting = int(self._drifting.sum())
        out = []
        for j in np.flatnonzero(starts | ends):
            out.append(
                ModelDrift(
                    model_id=self.model_id,
                    version=self.card.version,
                    feature=self.names[j],
                    state="drifting" if starts[j] else "recovered",
                    psi=float(self._psi[j]),
                    threshold=t.alert_psi if starts[j] else t.recover_psi,
                    observations=self._filled,
                    drifting=drifting,
                )
            )
        self.transitions.extend((self._checked_at, payload) for payload in out)
        return out

    def restore(self, drifting: Iterable[str]) -> None:
        """Take the features named as drifting (announced so before, by this monitor's
        predecessor or another replica's): this monitor reports their recovery, not
        their drift again."""
        names = set(drifting)
        self._drifting |= np.array([n in names for n in self.names], dtype=bool)

    @property
    def observations(self) -> int:
        """Vectors in the window."""
        self._count_waiting()
        return self._filled

    @property
    def drifting(self) -> tuple[str, ...]:
        return tuple(n for n, d in zip(self.names, self._drifting, strict=True) if d)

    @property
    def warming_up(self) -> bool:
        """Whether the observation is younger than the warm-up now (nothing is judged)."""
        self._count_waiting()
        return not self._warmed_up(self.clock.now())

    def report(self, *, fresh: bool = False) -> DriftReport:
        """The figures of the last check (``fresh``: the PSI computed now, states unchanged);
        whether it is warming up, now."""
        warming_up = self.warming_up
        psi, at = (self.psi(), self.clock.now()) if fresh else (self._psi, self._checked_at)
        return DriftReport(
            model_id=self.model_id,
            version=self.card.version,
            observations=self._filled,
            seen=self.seen,
            at=float(at),
            features=tuple(
                FeatureDrift(name=n, psi=float(p), drifting=bool(d))
                for n, p, d in zip(self.names, psi, self._drifting, strict=True)
            ),
            warming_up=warming_up,
            judged_from=(
                self._observed_since + self.thresholds.warmup_s
                if math.isfinite(self._observed_since)
                else math.nan
            ),
        )
