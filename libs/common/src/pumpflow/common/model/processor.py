"""ModelProcessor: which feature vectors are scored, by which arms, as a keyed processor.

Per mint, the state is small (:class:`ScoringState`: the token's lifecycle state, the
event time of its last scored vector and how many it scored, the live arm that scored
it, and its predictions waiting for their labels,
:class:`~pumpflow.common.model.performance.TokenLabels`).
Waiting labels are stored with the token's effects, restored with its partition and
released on the owner only: on the token's next event once due, else by its timer
(one per token, at its next release); a retired token stays until its last label is
released, then goes. A label is due at its horizon and grace as the token's prices come:
when its last vector came ``lag`` seconds of the host's time (``Effects.now``) after its
event time, that much later, so the prices up to its horizon still count. On the keyed
consumer that time is the market's as far as applied (a backlog moves it no faster than
the vectors come, see :mod:`pumpflow.common.consumer.keyed`), so ``lag`` is how far the
token's vectors run behind the others'; on a plain clock, how far behind the clock. A
release is decided by the state as stored, so a label is
released once wherever its token moves (a replica that dies after releasing but before
storing the token releases it again on the next owner; the label store keeps one).

The keyed stateful consumer runs it on ``features.updated`` and ``token.lifecycle``;
each scored vector becomes one ``model.prediction`` per arm that scores the token (its
live arm, then every shadow arm, see :mod:`pumpflow.common.model.arms`), each naming the
model id and the version that scored it, keyed and sequenced per mint, caused by the
``features.updated`` event. The live arm that scored a token is kept in its state, so
it scores the token's later vectors whatever the shares become, wherever the token's
partition goes and over a restart; a token whose arm left the table (removed, or a
shadow now) is placed by the table as a new one is, and kept there (counted in
``reassigned`` by the arm it left).

The scoring policy (:class:`~pumpflow.common.model.settings.ScoringPolicy`): a
``features.updated`` is scored when

- it is the newest of the token's vectors delivered together (``Effects.more``: a
  vector is a snapshot, the newer one supersedes it);
- the token is not ``inactive`` or ``graduated`` (a ``token.lifecycle`` to either
  retires the token here; a later lifecycle state scores it again);
- its vector is of the live feature-set version (another version's is not scored:
  the models were trained on the live one);
- at least ``min_interval_s`` of event time passed since the token's last scored
  vector (leading edge: the first vector of a burst is scored, the next ones inside
  the interval are not, the first one after it is).

Micro-batching: :meth:`ModelProcessor.prepare` takes a delivered batch of many
tokens' events before their keys' work runs, picks the vectors the policy will score
(from the states held, see ``held``) and scores them in one model call per model;
:meth:`ModelProcessor.apply` then takes a vector's score from there, or scores the
vector alone when it was not prepared (a single delivery, a state not in memory, a
table or model changed meanwhile). Either way the prediction names the version that
really scored it. :meth:`ModelProcessor.settle`, told once the batch's work is over,
drops what its events did not take (a duplicate, a refused event, an apply that
raised): what is kept is the deliveries in flight, never more.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import repeat

import msgspec

from pumpflow.common.events import Event, FeaturesUpdated, ModelPrediction
from pumpflow.common.keyed import Effects, InvalidInput, StaleState
from pumpflow.common.model.arms import Arm, ArmTable
from pumpflow.common.model.card import ModelCard, vector_row, vector_rows
from pumpflow.common.model.manager import ModelError, ModelManager
from pumpflow.common.model.performance import LabelSource, LabelTracker, TokenLabels
from pumpflow.common.model.settings import ScoringPolicy

CONSUMES = ("features.updated", "token.lifecycle")
#: the types whose time is the tokens' market (the keyed consumer's ``market_types``)
MARKET_TYPES = ("features.updated",)
#: lifecycle states that retire a token here: nothing of it is scored any more
#: (a set: a lifecycle of None, none seen yet, is found absent by its hash, where a tuple
#: would compare None with each state in turn)
RETIRING = frozenset(("inactive", "graduated"))
#: why a vector is not scored (the keys of ``ModelProcessor.skipped``): a newer one of
#: its token delivered with it, its token retiring, another feature set, inside the
#: policy's interval, no arm's model scoring it
SKIP_REASONS = ("superseded", "retired", "feature_set", "interval", "no_model")
_INF = math.inf
_NAN = math.nan


class ScoringState(msgspec.Struct, kw_only=True, array_like=True, omit_defaults=True):
    """What the model service keeps of one token."""

    lifecycle: str | None = None
    #: event time of the last vector scored (valid once ``scored`` > 0)
    last_scored: float = 0.0
    scored: int = 0
    #: event time of the last prediction followed to its label (0: none yet)
    last_labelled: float = 0.0
    #: its predictions waiting for their labels (None: none)
    labels: TokenLabels | None = None
    #: whole clock seconds (rounded up) its last vector came after its event time: a label
    #: is released that much after its horizon and grace, when its prices come in a backlog
    lag: int = 0
    #: the live arm that scored it: its later vectors are that arm's while the table
    #: holds it as a live arm (None: not scored yet, or by a version that kept none)
    arm: str | None = None


#: a score: the card of the version that made it, the score, seconds of its batch's time
_Score = tuple[ModelCard, float, float]
#: what was prepared for one vector: its values packed (little-endian float64; None:
#: not kept), then each model id that scored it and its score
_Prepared = tuple


class ModelProcessor:
    """Score tokens' feature vectors with the arms' models; see the module."""

    def __init__(
        self,
        manager: ModelManager,
        arms: ArmTable,
        *,
        policy: ScoringPolicy | None = None,
        feature_set_version: str | None = None,
        labels: LabelTracker | None = None,
    ):
        self.manager = manager
        #: follows every prediction to its label (live performance); None: not measured
        self.labels = labels
        self._price_at: dict[tuple[str, ...], int | None] = {}
        self._price_names: tuple[str, ...] = ()
        self._price_at_names: int | None = None
        self.arms = arms
        self.policy = policy or ScoringPolicy()
        #: the live feature-set version (default: the manager's feature manager's)
        self.feature_set_version = feature_set_version or manager.feature_manager.version
        self._prepared: dict[str, _Prepared] = {}
        #: per arm name: the arm and card last seen scoring for it, its predictions'
        #: payload but for what each vector changes, and its labels' source
        self._made_by: dict[str, tuple[Arm, ModelCard, ModelPrediction, LabelSource]] = {}
        #: vectors not scored, by reason; predictions not made, by model id and reason
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[tuple[str, str]] = Counter()
        #: tokens scored by another live arm once theirs left the table, by the arm left
        self.reassigned: Counter[str] = Counter()
        self.prepared_rows = 0
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(ScoringState).decode

    # ---------------------------------------------------------------- batches

    def prepare(self, events: Sequence[Event], held: Callable[[str], ScoringState | None]) -> int:
        """Score the vectors of ``events`` the policy will score, one call per model.

        ``held(mint)``: the token's state if in memory (None: taken as new; a vector
        scored here that the state refuses later is dropped unused). Returns the rows
        scored.
        """
        newest = {event.key: event for event in events if event.type == "features.updated"}
        if not newest:
            return 0
        version = self.feature_set_version
        interval = self.policy.min_interval_s
        # a comprehension: fewer interpreter steps a vector than a loop appending to a list
        picked = [
            (event, state)
            for mint, event in newest.items()
            if event.data.feature_set_version == version
            and (
                (state := held(mint)) is None
                or not (
                    state.lifecycle in RETIRING
                    or (state.scored and event.time - state.last_scored < interval)
                )
            )
        ]
        if not picked:
            return 0
        scored = [event for event, _ in picked]
        table = self.arms
        arms = table.shared_route
        if arms is None:
            # as apply routes them (ArmTable.route_for inlined: a call a vector costs more)
            kept, routes = table.kept_routes.get, table.routes
            routed = [
                (state is not None and state.arm is not None and kept(state.arm))
                or routes[event.key]
                for event, state in picked
            ]
            arms = routed[0]
            alike = all(map(operator.is_, routed, repeat(arms)))
        else:
            routed, alike = [arms] * len(scored), True
        by_model: dict[str, list[Event]] = {}
        if alike and len({arm.model_id for arm in arms}) == len(arms):
            # every token routed alike (one live arm, or all on one): each model scores all
            for arm in arms:
                by_model[arm.model_id] = scored
        else:
            for event, arms in zip(scored, routed, strict=True):
                for arm in arms:
                    chosen = by_model.get(arm.model_id)
                    if chosen is None:
                        by_model[arm.model_id] = [event]
                    else:
                        chosen.append(event)
        rows = 0
        prepared = self._prepared
        following = self.labels is not None
        for model_id, chosen in by_model.items():
            try:
                card = self.manager.card(model_id)
                matrix, packed = vector_rows(list(map(_data_of, chosen)), card.feature_names)
                batch = self.manager.score_batch(model_id, matrix)
            except (ModelError, ValueError):
                continue  # each vector is then scored alone, which counts the failure
            count = len(chosen)
            scores = batch.scores.tolist()
            if len(scores) != count:
                raise ValueError(f"{len(scores)} scores for {count} vectors")
            # the rows are the vectors as sent: a label keeps its row's bytes
            vectors = packed if following and packed is not None else [None] * count
            share = batch.seconds / count
            # one entry a vector: its packed values, the model id, (card, score, seconds)
            entries = list(
                zip(
                    vectors,
                    repeat(model_id, count),
                    zip(repeat(batch.card, count), scores, repeat(share, count), strict=True),
                    strict=True,
                )
            )
            ids = list(map(_id_of, chosen))
            before = len(prepared)
            if not before or prepared.keys().isdisjoint(ids):
                # none of them prepared yet (the usual case: the first model of a batch)
                prepared.update(zip(ids, entries, strict=True))
                if len(prepared) == before + count:
                    rows += count
                    continue
                for event_id in ids:  # an id twice among them: one by one, as below
                    prepared.pop(event_id, None)
            for event_id, entry in zip(ids, entries, strict=True):
                found = prepared.get(event_id)
                if found is None:
                    prepared[event_id] = entry
                else:
                    prepared[event_id] = (entry[0] or found[0], *found[1:], *entry[1:])
            rows += count
        self.prepared_rows += rows
        return rows

    def settle(self, events: Sequence[Event]) -> None:
        """Forget what was prepared for ``events``: their delivery is over, and those not
        applied (a duplicate, a refusal, an apply that raised) never take it."""
        prepared = self._prepared
        if prepared:
            pop = prepared.pop
            for event in events:
                pop(event.id, None)

    # ---------------------------------------------------------------- KeyedProcessor

    def initial(self, key: str) -> ScoringState:
        return ScoringState()

    def apply(self, state: ScoringState, event: Event, effects: Effects) -> ScoringState:
        data = event.data
        if event.type != "features.updated" or not isinstance(data, FeaturesUpdated):
            return self._apply_other(state, event, effects)
        time = event.time
        now = effects.now
        tokens = state.labels
        price = _NAN
        live = data.feature_set_version == self.feature_set_version
        if live:
            if len(data.values) != len(data.names):
                # its values cannot be told apart: neither its price nor its row is known
                raise InvalidInput(
                    f"features.updated of {effects.key}: {len(data.names)} feature names "
                    f"but {len(data.values)} values"
                )
            if self.labels is not None:
                # every price counts for the labels pending, scored vector or not
                names = data.names
                if names is self._price_names:
                    at = self._price_at_names
                else:
                    at = self._price_at.get(names, -1)
                    if at == -1:
                        at = self._price_index(names)
                    # vectors of one features service often share their names' tuple
                    self._price_names, self._price_at_names = names, at
                if at is not None:
                    price = data.values[at]
                    if tokens is not None:
                        tokens.observe(time, price)
            # a token's vectors behind the host's time bring the prices of a horizon later
            # than it ends there: a label released by that time alone would be decided
            # without them
            lag = math.ceil(now - time) if now > time else 0
            if lag != state.lag:
                state.lag = lag  # a store into the struct costs several times a read
        else:
            lag = state.lag
        if tokens is not None and tokens.next_release + lag <= now:
            self._release_due(state, effects)
        prepared = self._prepared.pop(event.id, None)
        if effects.more:
            self.skipped["superseded"] += 1
            return state
        if state.lifecycle in RETIRING:
            self.skipped["retired"] += 1
            if state.labels is None:
                effects.retire(self.policy.retire_ttl_s)  # a late vector loaded it: let it go
            return state
        if not live:
            self.skipped["feature_set"] += 1
            return state
        policy = self.policy
        if state.scored and time - state.last_scored < policy.min_interval_s:
            self.skipped["interval"] += 1
            return state
        # a price only when labels are followed: a prediction is followed unless this
        # token's last labels cover this moment too, or no return is defined from it
        tokens = first_release = None
        if 0.0 < price < _INF and not (
            state.last_labelled and time - state.last_labelled < policy.label_interval_s
        ):
            tokens = state.labels
            if tokens is None:
                tokens = state.labels = TokenLabels()
            first_release = tokens.next_release
        mint = effects.key
        emit = effects.emit
        labels = self.labels
        made = 0
        kept = state.arm
        scored_by = None
        for arm in self.arms.route_for(mint, kept):
            model_id = arm.model_id
            if prepared is not None and prepared[1] == model_id:
                card, score, seconds = prepared[2]
            else:
                found = _prepared_score(prepared, model_id) or self._score_alone(model_id, data)
                if found is None:
                    continue
                card, score, seconds = found
            made_by = self._made_by.get(arm.name)
            if made_by is None or made_by[0] is not arm or made_by[1] is not card:
                made_by = self._made_by_arm(arm, card)
            if tokens is not None:
                labels.follow(
                    tokens,
                    time,
                    price,
                    made_by[3],
                    score,
                    data.names,
                    data.values,
                    None if prepared is None else prepared[0],
                )
            # the arm's and card's payload with this vector's fields: half the time of
            # making it from its eleven fields
            emit(
                _replace(
                    made_by[2],
                    mint=mint,
                    score=score,
                    latency_s=seconds,
                    source_seq=data.source_seq,
                ),
                time=time,
            )
            made += 1
            if not arm.shadow:
                scored_by = arm.name
        if made:
            state.last_scored = time
            state.scored += 1
            if scored_by is not None and scored_by != kept:
                # kept from its live arm's first prediction (a shadow's alone keeps none)
                if kept is not None:
                    self.reassigned[kept] += 1
                state.arm = scored_by
            if tokens is not None:
                state.last_labelled = time
                if tokens.next_release != first_release:
                    effects.set_timer(tokens.next_release + state.lag)
        else:
            self.skipped["no_model"] += 1
            if tokens is not None and not tokens.items:
                state.labels = None
        return state

    def _made_by_arm(
        self, arm: Arm, card: ModelCard
    ) -> tuple[Arm, ModelCard, ModelPrediction, LabelSource]:
        """What the predictions of ``arm`` scored by ``card`` share, kept until either
        changes."""
        label = card.label
        made_by = self._made_by[arm.name] = (
            arm,
            card,
            ModelPrediction(
                mint="",
                model_id=arm.model_id,
                arm=arm.name,
                # a vector scored is of the live version
                feature_set_version=self.feature_set_version,
                score=math.nan,
                horizon_s=label.horizon_s,
                label=label.kind,
                model_version=card.version,
                shadow=arm.shadow,
            ),
            LabelSource(arm.model_id, card.version, arm.name, label),
        )
        return made_by

    def _apply_other(self, state: ScoringState, event: Event, effects: Effects) -> ScoringState:
        """A ``token.lifecycle``: the token retires or comes back; anything else is refused."""
        kind = event.type
        if kind != "token.lifecycle":
            raise InvalidInput(f"the model service does not consume {kind}")
        state.lifecycle = event.data.state
        retiring = state.lifecycle in RETIRING
        if state.labels is not None:
            if retiring:
                state.labels.retire()  # no more prices: decided from those seen
            self._release_due(state, effects)
        if retiring and state.labels is None:
            effects.retire(self.policy.retire_ttl_s)
        return state

    def _release_due(self, state: ScoringState, effects: Effects) -> None:
        """Release the token's labels due by now; the timer at the next one's release."""
        tokens = state.labels
        if self.labels is None:
            state.labels = None  # followed by a run that measured them: not measured here
        else:
            self.labels.release(tokens, effects.key, effects.now, lag=state.lag)
            if tokens.items:
                effects.set_timer(tokens.next_release + state.lag)
                return
            state.labels = None
        effects.cancel_timer()

    def _price_index(self, names: tuple[str, ...]) -> int | None:
        """Where a vector of ``names`` holds its ``price`` feature (the price its trade
        left); None without one."""
        at = self._price_at[names] = names.index("price") if "price" in names else None
        return at

    def _score_alone(self, model_id: str, data: FeaturesUpdated) -> _Score | None:
        manager = self.manager
        try:
            card = manager.card(model_id)
            row = vector_row(data.names, data.values, card.feature_names)
            batch = manager.score_batch(model_id, row[None, :])
        except (ModelError, ValueError) as exc:
            self.failed[(model_id, type(exc).__name__)] += 1
            return None
        return batch.card, float(batch.scores[0]), batch.seconds

    def fire(self, state: ScoringState, effects: Effects) -> ScoringState:
        """The token's next label is due: release what is due; a retired token with
        nothing left waiting goes."""
        if state.labels is not None:
            self._release_due(state, effects)
        if state.lifecycle in RETIRING and state.labels is None:
            effects.retire(self.policy.retire_ttl_s)
        return state

    def encode(self, state: ScoringState) -> bytes:
        return self._encode(state)

    def compact(self, state: ScoringState, now: float) -> bytes | None:
        return None  # a dozen bytes, and the labels waiting packed already

    def decode(self, raw: bytes) -> ScoringState:
        try:
            return self._decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StaleState(f"unreadable scoring state: {exc}") from exc


_data_of = operator.attrgetter("data")
_replace = msgspec.structs.replace
_id_of = operator.attrgetter("id")


def _prepared_score(prepared: _Prepared | None, model_id: str) -> _Score | None:
    """The score ``model_id`` prepared for a vector (None: not prepared)."""
    if prepared is not None:
        for at in range(1, len(prepared), 2):
            if prepared[at] == model_id:
                return prepared[at + 1]
    return None


__all__ = [
    "CONSUMES",
    "RETIRING",
    "ModelProcessor",
    "ScoringPolicy",
    "ScoringState",
]
