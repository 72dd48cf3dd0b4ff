"""The model service: feature vectors in, ``model.prediction`` out, A/B arms, drift.

The :class:`~pumpflow.common.model.processor.ModelProcessor` (the scoring policy and
the arms) on the library's :class:`~pumpflow.common.consumer.KeyedStatefulConsumer`:

- Consumes ``features.updated`` (the vector is in the event) and ``token.lifecycle``;
  publishes one ``model.prediction`` per arm scoring a token (live arm, then shadows),
  keyed by mint, sequenced per mint, caused by the vector's event.
- Each delivered batch is prepared before its tokens' work runs: the vectors the policy
  will score are scored in one onnxruntime call per model, on the event loop (a
  batch of a few hundred rows takes about a millisecond: a thread hop would cost
  more than it frees, see docs/benchmarks.md). Every vector of the live feature set
  also feeds each served model's :class:`~pumpflow.common.model.drift.DriftMonitor`,
  whose transitions go out as ``model.drift`` once per crossing in the deployment
  (logged by the replica announcing them, with the feature, its PSI and the card's
  training rows its reference was taken from): the
  features announced drifting are kept in Postgres (in the state store in a run without
  a database: see :mod:`pumpflow.model.announced` for what a store that lost its
  contents forgets), a transition another replica announced already is
  not announced again, and a monitor starts from what was announced (a restart does
  not announce a drift again, and announces its recovery).
- Live performance: every prediction (shadows too) is followed to its label by a
  :class:`~pumpflow.common.model.performance.LabelTracker` fed the prices of the
  vectors in each token's order; labels released go into a
  :class:`~pumpflow.common.model.performance.RollingPerformance` (AUC, precision at
  the threshold, Brier per model and arm), exported as metrics every second: when
  they are stored, those new to the store once stored (one stored already, or one
  refused and dropped, is not counted again). The windows are the deployment's, not
  this replica's: every round of the monitor adds the labels counted here to the
  windows shared in the state store (:mod:`pumpflow.model.live`), every
  ``model_live_read_s`` it reads every replica's back (the gauges in between: the
  last read and this replica's labels since), and ``GET /models/{id}/performance``
  answers from the same figures (read then if the last read is older, so polling it
  costs a read per ``model_live_read_s`` at most; ``?fresh=true`` reads them before
  answering, so any replica gives the same figures). Labels
  waiting for their horizon are kept in each token's keyed state, so they are stored
  with its effects and survive a restart or a rebalance: the partition's next owner
  releases them at their horizon, each once. Released ones are stored with the vector
  they scored (:mod:`pumpflow.model.labels`: Postgres when the run has a database)
  before the tokens' states without them are (the keyed consumer's ``before_write``,
  waited out as the states' write is): a crash leaves a label in its token's state
  (released again by the next owner, stored once) or stored, never neither. The shared
  windows outlive a replica's restart; when the state store holds none (it restarted
  empty, before a replica's start or under running ones: its epoch tells, looked at
  every ``model_live_read_s``), one replica fills them from the stored labels, so a
  label released again is counted once. A replica that dies loses from the shared
  windows what it counted since its last round (they stay stored).
- Automatic refits: every ``model_refit_check_s`` each served model is checked
  against the :class:`~pumpflow.common.model.refit.RefitPolicy`; a refit due runs
  :meth:`~pumpflow.common.model.manager.ModelManager.update_model` on the model's
  newest stored labels, on a thread, by one replica at a time, which first deletes the
  model's labels older than the policy's ``kept_rows`` (no refit reads them; the store
  stays bounded). A candidate better on
  the held-out slice by more than ``model_refit_min_gain`` is written to the registry
  (``model_registry_dir``), stored with its refit (as kept until then) and stored as
  the serving, the refit then marked swapped; this replica then serves it (each
  prediction names the version that made it), the other replicas follow and a restart
  keeps it; a failure before leaves the serving one served here as everywhere, and the
  refit recorded as kept. The serving names the refitted model by
  its content hash: a replica whose disk lacks the file (another machine, a container
  restarted on an empty disk) writes it into its own registry from the stored refit
  before loading it. Every refit decided is stored (``model_refits``), logged and
  counted (``pumpflow_model_refits``, by outcome and reason:
  :mod:`pumpflow.model.outcomes`); then, still under the refit's lock, the model's
  older refits are pruned with this replica's files of them (:mod:`pumpflow.model.pruning`;
  the newest ``model_refit_keep`` and the served models are kept). A refit that decides
  nothing (refused: too few rows, one class, a held-out score NaN, the serving model
  expired, training's refusal; or failed: an error, a dependency away) is stored too
  (``model_refits_undecided``, the newest ``model_refit_keep`` of each model), logged and
  counted by its reason; the serving model goes on, and the next try of the model comes
  ``model_refit_min_interval_s`` after it, on every replica.
- The serving (which model file under which id, the arm table) is shared by the
  replicas through the state store (``model:serving``): a change through the HTTP API
  is applied at once here, stored, counted (``pumpflow_model_serving_changes``, by the
  replica that made it) and followed by the other replicas within
  ``model_serving_refresh_s``. No restart, and no delivery is dropped: a table or a
  model is swapped whole between two tokens' steps; a model the serving no longer names
  is unloaded once no arm routes to it (logged by each replica). Each replica logs the
  routing it takes (at its start and on each change of the arms or of an arm's model:
  every arm's model id, version and share). The shares place new tokens: a token stays
  with the live arm that first scored it (kept in its keyed state, so over a restart and
  a rebalance too) until that arm is removed or made a shadow, and is then placed by
  its hash against the live arms left (``pumpflow_model_tokens_reassigned``).
- HTTP: ``GET /models`` (cards), ``POST /models`` (load), ``DELETE /models/{id}``
  (unload a model no arm serves; ``?version=`` unloads it only if that version serves),
  ``GET /arms``, ``PUT /arms``, ``PUT /arms/weights``, ``POST /arms/{name}/promote``,
  ``DELETE /arms/{name}`` (its share goes to the live arms left in proportion to their
  weights, or ``{"weights": {...}}`` sets theirs in the same change; its tokens go to
  the live arms left by their hash),
  ``GET /models/{id}/performance`` (the card's held-out figures, what was scored,
  and the live figures per arm, read at most ``model_live_read_s`` ago unless
  ``?fresh=true``), ``GET /models/{id}/drift`` (the PSI now, the states, the
  transitions, the reference they are measured against (the card's version and training
  window), the thresholds, and ``warming_up`` while the market observed is too young to judge, until
  ``judged_from``), ``GET /scoring``, ``GET /refits``
  (``?model_id=&limit=``: the newest refits tried by any replica, decided or not, with
  their outcome and reason). Mutating routes need the bearer token
  (``PUMPFLOW_API_TOKEN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import Clock
from pumpflow.common.consumer import ConsumerMetrics, KeyedStatefulConsumer
from pumpflow.common.dependencies import transient_dependency
from pumpflow.common.events import Event, ModelDrift, ModelPrediction, make_event
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import CardError, ModelError, ModelManager
from pumpflow.common.model.arms import DEFAULT_SALT, Arm, ArmError, ArmTable
from pumpflow.common.model.card import Task, decode_card, vector_rows
from pumpflow.common.model.drift import DriftMonitor
from pumpflow.common.model.manager import LabelledRows, ServedModel
from pumpflow.common.model.performance import LabelTracker, ResolvedLabel, RollingPerformance
from pumpflow.common.model.processor import ModelProcessor, ScoringState
from pumpflow.common.model.refit import RefitPolicy
from pumpflow.common.model.registry import ModelRegistry, card_path, read_card
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.announced import DriftAnnouncements, PostgresDriftAnnouncements
from pumpflow.model.labels import (
    LabelStore,
    MemoryLabelStore,
    PostgresLabelStore,
    StoredRefit,
    UndecidedRefit,
    definition_key,
    model_hash,
)
from pumpflow.model.live import StoreOutcomes
from pumpflow.model.metrics import ModelServiceMetrics
from pumpflow.model.outcomes import attempts, decided, detail_of, undecided
from pumpflow.model.pruning import PrunedRefit, RefitPruner, refit_pruner
from pumpflow.model.settings import ModelSettings

log = logging.getLogger("pumpflow.model")

#: the store key of the serving all replicas follow
SERVING_KEY = "model:serving"
#: the store key a replica holds while it changes the serving, and how long it may
#: (a change loads a model file at most): one change at a time across the replicas,
#: each made on the serving the one before stored
CHANGING_KEY = "model:serving:changing"
CHANGING_TTL_S = 30.0
#: the store key a replica holds while it fills the empty shared windows of the live
#: figures from the stored labels, and how long it may
FILLING_KEY = "model:live:filling"
FILLING_TTL_S = 60.0
#: the store's epoch the shared windows were last filled for: a replica finding the
#: store lost its contents fills them unless another did for that epoch already
FILLED_KEY = "model:live:filled"


def _in_order(data: LabelledRows, names: tuple[str, ...], order: tuple[str, ...]):
    """Stored rows (``names`` order) in a model's input ``order``; NaN where absent."""
    at = {name: i for i, name in enumerate(names)}
    columns = [data.rows[:, at[n]] if n in at else np.full(len(data.rows), np.nan) for n in order]
    return LabelledRows(
        rows=np.column_stack(columns),
        labels=data.labels,
        time=data.time,
        token=data.token,
        source=data.source,
    )


def _unavailable_reason(refusal: ServingError) -> str:
    """Why a stored serving cannot be served here, as counted: a model file missing
    (here and in the database), or a model or table refused."""
    return "missing" if refusal.status == 404 else "refused"


def _routing(serving: Serving) -> tuple:
    """What routes tokens in ``serving``: its model ids, arms and salt."""
    return (sorted(serving.models), serving.arms, serving.salt)


def _routing_text(serving: Serving) -> str:
    return f"models {', '.join(sorted(serving.models))}, arms " + ", ".join(
        f"{arm.name} ({arm.model_id}, " + ("shadow)" if arm.shadow else f"weight {arm.weight:g})")
        for arm in serving.arms
    )


def _card_task(model_path: str) -> Task:
    """The task the card beside ``model_path`` says: a setting names the path alone. A
    card that cannot be read says classification; opening the model says why."""
    try:
        return read_card(model_path).task
    except (OSError, CardError, ValueError):
        return "classification"


def _on_disk(model_path: str) -> bool:
    """Whether a model and its card are both at ``model_path``."""
    return Path(model_path).exists() and card_path(model_path).exists()


class ModelSource(msgspec.Struct, frozen=True, kw_only=True):
    """Where a model id's file is, and its task."""

    path: str
    task: Task = "classification"
    #: the serving revision that loaded it (the same path loaded again is a new file)
    loaded: int = 0
    #: a refitted model's content hash: a replica lacking the file writes it from the
    #: stored refit (None: a file the operator provides)
    sha256: str | None = None


class Serving(msgspec.Struct, frozen=True, kw_only=True):
    """What the replicas serve: the models by id and the arm table. Newer revision wins."""

    revision: int = 0
    models: dict[str, ModelSource]
    arms: tuple[Arm, ...]
    salt: str = DEFAULT_SALT

    def table(self) -> ArmTable:
        return ArmTable(self.arms, salt=self.salt, revision=self.revision)


_encode_serving = msgspec.json.Encoder().encode
_decode_serving = msgspec.json.Decoder(Serving).decode


class ServingError(ValueError):
    """A serving change that cannot be made; ``status`` is its HTTP answer."""

    def __init__(self, message: str, *, status: int = 409):
        self.status = status
        super().__init__(message)


class SettingsServingError(ServingError, SettingsError):
    """The settings' models or arms refused at start: theirs to mend, as a bad setting is."""


def _settings_refusal(refusal: ServingError) -> SettingsServingError:
    """The settings' models or arms refused: the settings' fault, said as such."""
    return SettingsServingError(
        f"the models of the settings (model_models, model_arms) cannot be served: {refusal}",
        status=refusal.status,
    )


class ModelService(Service):
    """Score tokens' feature vectors with the arms' models; publish predictions and drift."""

    name: ClassVar[str] = "model"
    settings_class: ClassVar[type[ModelSettings]] = ModelSettings
    needs_store: ClassVar[bool] = True
    needs_db: ClassVar[bool] = True

    settings: ModelSettings

    def __init__(
        self,
        settings: ModelSettings,
        *,
        manager: ModelManager | None = None,
        registry: CollectorRegistry | None = None,
        refitter: Any = None,
        label_store: LabelStore | None = None,
    ):
        super().__init__(settings)
        # labels are stored in Postgres when asked and the run has it, else in memory
        self.needs_db = settings.model_store_labels  # type: ignore[misc]
        self._manager = manager
        #: refits models for the manager it makes (default: LightGBM like training's)
        self._refitter = refitter
        self.label_store: LabelStore | None = label_store
        self._pruner: RefitPruner | None = None
        self._to_store: list[ResolvedLabel] = []
        #: event time of each model's last refit attempt here (a failed one included)
        self._refit_tried: dict[str, float] = {}
        #: the refits this replica made, each once its outcome is served
        self.refits: list[StoredRefit] = []
        self._registry = registry
        self.metrics = ModelServiceMetrics(registry=registry)
        self.consumer_metrics = ConsumerMetrics(self.name, registry=registry)
        self.processor: ModelProcessor | None = None
        self.consumer: KeyedStatefulConsumer[ScoringState] | None = None
        self.serving: Serving | None = None
        self.drift: dict[str, DriftMonitor] = {}
        #: what each model id was loaded from here
        self._sources: dict[str, ModelSource] = {}
        self._drift_out: list[ModelDrift] = []
        #: what the deployment announced; the models whose monitor has not read it yet
        self._announced: DriftAnnouncements | PostgresDriftAnnouncements | None = None
        self._drift_unrestored: set[str] = set()
        #: counted, not yet published (a publication that failed goes on from its first)
        self._drift_unsent: list[ModelDrift] = []
        self._ctx: ServiceContext | None = None
        self._changing = asyncio.Lock()
        #: the newest stored serving this replica could not follow for a missing file
        #: (counted once)
        self._unavailable_revision = -1
        self._loops: list[asyncio.Task] = []
        self.labels: LabelTracker | None = None
        #: the partitions (owned, restored) the waiting labels were last counted over
        self._labels_counted_over: tuple[frozenset[int], frozenset[int]] | None = None
        self.performance: RollingPerformance | None = None
        self._sharing = asyncio.Lock()
        #: when the shared windows were last read (monotonic seconds)
        self._read_at = -math.inf
        self._outcomes: StoreOutcomes | None = None
        #: the state store's epoch the shared windows are known to hold the labels of
        self._store_epoch: bytes | None = None

    @property
    def manager(self) -> ModelManager:
        assert self._manager is not None, "the service has not started"
        return self._manager

    # ---------------------------------------------------------------- lifecycle

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        settings = self.settings
        if self._manager is None:
            if self._refitter is None:
                from pumpflow.model.training import LightGBMRefitter

                self._refitter = LightGBMRefitter()
            self._manager = ModelManager(
                ctx.bus,
                FeatureManager(),
                clock=ctx.clock,
                refitter=self._refitter,
                registry=ModelRegistry(
                    settings.model_registry_dir
                    or Path(tempfile.gettempdir()) / f"pumpflow-{settings.namespace}-models"
                ),
            )
        if self.label_store is None:
            self.label_store = (
                PostgresLabelStore(ctx.db)
                if ctx.db is not None and settings.model_store_labels
                else MemoryLabelStore()
            )
        self._pruner = refit_pruner(self.label_store)
        # Postgres outlives a state store restarted empty, which would forget a drift
        # whose recovery is still to come
        self._announced = (
            PostgresDriftAnnouncements(ctx.db)
            if ctx.db is not None
            else DriftAnnouncements(ctx.store)
        )
        serving = await self._start_serving()
        await self._restore_drift()
        self.labels = LabelTracker(clock=ctx.clock)
        self._labels_counted_over = None
        self._outcomes = StoreOutcomes(ctx.store)
        self.performance = RollingPerformance(
            threshold=settings.trading_min_score, shared=self._outcomes
        )
        if self.manager.live_performance is None:
            self.manager.live_performance = self.performance
        await self._start_performance()
        self.processor = ModelProcessor(
            self.manager, serving.table(), policy=self.settings.policy(), labels=self.labels
        )
        self.consumer = ctx.keyed_consumer(
            self.processor,
            self.settings.consumer_config(self.name),
            prepare=self._prepare,
            settle=self.processor.settle,
            on_published=self._count,
            metrics=self.consumer_metrics,
            before_write=self._store_released if settings.model_store_labels else None,
        )
        self._publish_arms()
        await self.consumer.start()
        self._loops = [
            asyncio.create_task(self._serving_loop(), name="model-serving"),
            asyncio.create_task(self._monitor_loop(), name="model-monitor"),
        ]
        if settings.model_refit:
            self._loops.append(asyncio.create_task(self._refit_loop(), name="model-refit"))

    async def _start_performance(self) -> None:
        """Take the shared windows; when the store holds none and labels are stored, fill
        them from the newest stored labels (one replica does, the others read them)."""
        performance = self.performance
        self._store_epoch, _ = await self._ctx.store.epoch()
        await performance.share()
        if not self.settings.model_store_labels or performance.keys():
            return

        async def fill() -> None:
            await performance.share()
            if not performance.keys():
                await self._fill_performance()

        await self._filling(fill)

    async def _filling(self, fill) -> bool:
        """Run ``fill()`` holding the filling key; False if another replica holds it (it
        fills them: read at the next round)."""
        store = self._ctx.store
        holder = f"{self._ctx.source}/{secrets.token_hex(8)}".encode()
        if not await store.set_if_absent(FILLING_KEY, holder, FILLING_TTL_S):
            return False
        try:
            await fill()
        finally:
            with contextlib.suppress(Exception):
                await store.delete_if_equal(FILLING_KEY, holder)
        return True

    async def _fill_performance(self) -> None:
        """Make the shared windows the newest stored labels, those counted here included
        (counted once stored); mark them filled for the store's epoch."""
        performance = self.performance
        await self._outcomes.clear()
        performance.clear()
        found = await self.label_store.last_labels(4 * performance.window)
        performance.extend(found)
        await performance.share()
        await self._ctx.store.set(FILLED_KEY, self._store_epoch)
        log.info("model: filled the live figures' windows from the %d newest stored labels",
                 len(found))  # fmt: skip

    async def _refill_if_lost(self) -> None:
        """Fill the shared windows again from the stored labels once the state store lost
        its contents (a Redis restarted without persistence, a flush) under the running
        replicas: else the live figures would start again from the labels released since."""
        if not self.settings.model_store_labels:
            return
        store = self._ctx.store
        epoch, _ = await store.epoch()
        if epoch == self._store_epoch:
            return

        async def fill() -> None:
            if await store.get(FILLED_KEY) != epoch:
                log.error("model: the state store lost the live figures' windows; filling them "
                          "again from the stored labels")  # fmt: skip
                self._store_epoch = epoch
                await self._fill_performance()

        if await self._filling(fill):
            self._store_epoch = epoch

    async def share_performance(self, *, read: bool = True, since: float | None = None) -> None:
        """Add the labels counted here to the shared windows; read every replica's
        (``read``), unless a read begun at ``since`` (monotonic seconds) or later is over
        already: callers waiting for a read together read once."""
        async with self._sharing:
            if read and since is not None and self._read_at >= since:
                return
            started = time.monotonic()
            await self.performance.share(read=read)
            if read:
                self._read_at = started

    def _read_due(self) -> bool:
        """Whether the shared windows were last read ``model_live_read_s`` ago or more: a
        read parses every model and arm's window on the event loop."""
        return time.monotonic() - self._read_at >= self.settings.model_live_read_s

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        for loop in self._loops:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        try:
            await self._publish_drift()
        except Exception:
            log.exception("model: %d drift events not published at the stop",
                          len(self._drift_unsent))  # fmt: skip
        with contextlib.suppress(Exception):
            # any the consumer's last commit left (it stores them before their tokens)
            self.resolve_labels()
        try:
            await self.store_labels()
        except Exception:
            log.exception("model: %d released labels not stored at the stop", len(self._to_store))
        try:
            await self.share_performance(read=False)
        except Exception:
            log.exception(
                "model: the labels counted here since the last round were not "
                "added to the shared live figures"
            )

    # ---------------------------------------------------------------- serving

    def _configured_serving(self) -> Serving:
        models = dict(self.settings.model_models) or {"entry": str(DEFAULT_MODEL_PATH)}
        if self.settings.model_arms:
            try:
                arms = tuple(msgspec.convert(a, Arm) for a in self.settings.model_arms)
            except msgspec.ValidationError as exc:
                raise SettingsServingError(f"PUMPFLOW_MODEL_ARMS: {exc}") from None
        else:
            arms = tuple(Arm(name="control" if len(models) == 1 else m, model_id=m) for m in models)
        return Serving(
            models={m: ModelSource(path=p, task=_card_task(p)) for m, p in models.items()},
            arms=arms,
        )

    async def _start_serving(self) -> Serving:
        """Serve the stored serving, or the settings' one when none is stored.

        A stored serving this replica cannot serve does not keep the service down,
        whatever the refusal: a model file missing here and not in the database (a model
        loaded through the HTTP API from a disk this replica lacks, a refit whose stored
        copy is gone), or a model refused on load (another feature set after an upgrade
        of the features, an expired model, a broken file or card, arms naming no model).
        The error names the revision and the refusal, is counted
        (``pumpflow_model_serving_unavailable``, by reason: missing or refused), and the
        settings' models are served at the stored revision, so the next change of the
        serving (a load, a refit) is followed as usual. Availability wins over the
        stored models here: a replica that is down scores nothing and its partitions'
        tokens go unscored until someone mends the serving, while the settings' models
        are the deployment's own, checked on load like any other; a replica already
        running keeps what it serves when it cannot follow a stored serving, and a
        restart does the same with what it can serve. The serving stored for the other
        replicas is left as it is. The start stops only when the settings' models are
        refused too (nothing left to serve), naming both refusals.
        """
        stored = await self._stored_serving()
        configured = self._configured_serving()
        if stored is None:
            try:
                self._apply(configured)
            except ServingError as exc:
                raise _settings_refusal(exc) from exc
            return configured
        try:
            self._apply(stored, await self._fetch_missing(stored))
        except ServingError as exc:
            refusal = exc
        else:
            if _routing(stored) != _routing(configured):
                log.warning(
                    "model: the settings' models and arms are not served: the serving stored "
                    "(revision %d, changed through the HTTP API or by a refit) wins over them "
                    "at every start; it serves %s; the settings name %s (change the serving "
                    "through the HTTP API: PUT /arms, POST /models)",
                    stored.revision,
                    _routing_text(stored),
                    _routing_text(configured),
                )
            return stored
        log.error(
            "model: cannot serve the stored serving revision %d (%s: %s); serving the "
            "settings' models",
            stored.revision,
            _unavailable_reason(refusal),
            refusal,
        )
        self.metrics.unavailable("start", _unavailable_reason(refusal))
        self._unavailable_revision = stored.revision
        fallback = msgspec.structs.replace(configured, revision=stored.revision)
        for model_id in set(self.manager.models()) - set(fallback.models):
            self._unload(model_id)
        try:
            self._apply(fallback)
        except ServingError as exc:
            raise SettingsServingError(
                f"nothing to serve: the stored serving revision {stored.revision} is refused "
                f"({refusal}), and so are the settings' models ({exc})",
                status=exc.status,
            ) from exc
        return fallback

    def _unload(self, model_id: str) -> None:
        self.manager.unload_model(model_id)
        self._sources.pop(model_id, None)
        self.drift.pop(model_id, None)
        self._drift_unrestored.discard(model_id)

    async def _fetch_missing(self, serving: Serving) -> dict[str, str]:
        """Write the refitted models ``serving`` names whose file is not here into this
        replica's registry from the stored refits; their paths here by model id.

        Found by content hash and written atomically: two replicas writing one is
        harmless. A model not stored (no database) is left to the load to report."""
        registry = self.manager.registry
        found: dict[str, str] = {}
        if registry is None or self.label_store is None:
            return found
        for model_id, source in serving.models.items():
            if (
                source.sha256 is None
                or self._sources.get(model_id) == source
                or _on_disk(source.path)
            ):
                continue
            stored = await self.label_store.model_file(source.sha256)
            if stored is None:
                continue
            model, raw_card = stored
            if model_hash(model) != source.sha256:
                log.error(
                    "model: the stored model of %s is not %s; not written", model_id, source.sha256
                )
                continue
            try:
                path = await asyncio.to_thread(registry.register, model, decode_card(raw_card))
            except (CardError, OSError, ValueError) as exc:
                log.error(
                    "model: cannot write the stored model of %s into %s: %s",
                    model_id,
                    registry.root,
                    exc,
                )
                continue
            log.info(
                "model: wrote %s (%s) from the stored refit to %s", model_id, source.sha256, path
            )
            found[model_id] = str(path)
        return found

    async def _stored_serving(self) -> Serving | None:
        raw = await self._ctx.store.get(SERVING_KEY)
        if raw is None:
            return None
        try:
            return _decode_serving(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("model: unreadable stored serving, using the settings': %s", exc)
            return None

    def check_settings_serving(self, clock: Clock) -> None:
        """Open the models of the settings as the start serves them, serving none: raise
        SettingsServingError, as the start does, if one cannot be served (a command
        refuses its settings before it runs)."""
        try:
            self._open(
                self._configured_serving(), ModelManager(None, FeatureManager(), clock=clock)
            )
        except ServingError as exc:
            raise _settings_refusal(exc) from exc

    def _open(
        self, serving: Serving, manager: ModelManager, paths: dict[str, str] | None = None
    ) -> dict[str, ServedModel]:
        """Open with ``manager`` each model ``serving`` names and is not loaded from there
        yet (from ``paths`` here by model id if given), serving none.

        Raises ServingError if a model cannot be served or the arms name a model not in
        ``serving``.
        """
        missing = {a.model_id for a in serving.arms} - set(serving.models)
        if missing:
            raise ServingError(f"arms name models not loaded: {sorted(missing)}")
        try:
            serving.table()
        except ArmError as exc:
            raise ServingError(str(exc)) from None
        opened = {}
        for model_id, source in serving.models.items():
            if self._sources.get(model_id) == source:
                continue
            path = (paths or {}).get(model_id, source.path)
            try:
                opened[model_id] = manager.open_model(model_id, path, source.task)
            except FileNotFoundError as exc:
                raise ServingError(
                    f"model {model_id!r}: cannot read {exc.filename or path}: {exc.strerror}",
                    status=404,
                ) from None
            except OSError as exc:
                raise ServingError(
                    f"model {model_id!r}: cannot read {path}: {exc.strerror}"
                ) from None
            except (ModelError, CardError, ValueError) as exc:
                raise ServingError(str(exc)) from None
        return opened

    def _apply(self, serving: Serving, paths: dict[str, str] | None = None) -> None:
        """Load what ``serving`` names and is not loaded from there yet (from ``paths``
        here by model id if given); then route by it.

        Raises ServingError (the models served and the routing unchanged) if a model
        cannot be served or the arms name a model not in ``serving``.
        """
        manager = self.manager
        # every model opened before any is served: one that cannot be leaves all as they were
        opened = self._open(serving, manager, paths)
        table = serving.table()  # _open refused one it cannot make
        before = self.serving
        rerouted = (
            before is None
            or (before.arms, before.salt) != (serving.arms, serving.salt)
            or not opened.keys().isdisjoint(table.model_ids())
        )
        for model_id, served in opened.items():
            manager.serve(model_id, served)
            card = served.card
            self._sources[model_id] = serving.models[model_id]
            self.drift[model_id] = DriftMonitor(
                card,
                model_id=model_id,
                clock=self._ctx.clock,
                thresholds=self.settings.drift_thresholds(),
            )
            self._drift_unrestored.add(model_id)
            log.info("model: serving %s version %s from %s", model_id, card.version, served.path)
        self.serving = serving
        if self.processor is not None:
            self.processor.arms = table  # swapped whole, between two tokens' steps
        if rerouted:
            routes = self._routes(table)
            log.info("model: serving revision %d routes tokens: %s", serving.revision, routes)
        # once no arm routes to them: the table swapped names none of them
        for model_id in sorted(set(before.models if before else ()) - set(serving.models)):
            if model_id in manager.models():
                version = manager.card(model_id).version
                self._unload(model_id)
                log.info(
                    "model: unloaded %s version %s at serving revision %d (no arm serves it)",
                    model_id,
                    version,
                    serving.revision,
                )

    def _routes(self, table: ArmTable) -> str:
        """Each arm of ``table`` with its model id, version and share of the live tokens."""
        shares = table.shares()
        return ", ".join(
            f"{arm.name} {arm.model_id} {self.manager.card(arm.model_id).version} "
            + ("shadow" if arm.shadow else f"{shares.get(arm.name, 0.0):.0%}")
            for arm in table.arms
        )

    async def change(self, change, kind: str = "arms") -> Serving:
        """Apply ``change(serving) -> Serving`` here, store it for every replica, count it
        as ``kind`` (:data:`~pumpflow.model.metrics.SERVING_CHANGES`); return it."""
        async with self._changing, self._changing_everywhere():
            current = await self._stored_serving()
            if current is None or current.revision < self.serving.revision:
                # a store that lost it, or holds an older one: made on this one's
                current = self.serving
            elif current.revision > self.serving.revision:
                self._apply(current, await self._fetch_missing(current))
            changed = change(current)
            changed = msgspec.structs.replace(changed, revision=current.revision + 1)
            self._apply(changed, await self._fetch_missing(changed))
            await self._ctx.store.set(SERVING_KEY, _encode_serving(changed))
            self.metrics.serving_changed(kind)
            self._publish_arms()
            return changed

    @contextlib.asynccontextmanager
    async def _changing_everywhere(self):
        """Hold the serving's change key in the store for a change (ServingError 503 if
        another replica held it for longer than a change may take): two replicas reading
        the same stored serving would each store their change as the same next revision,
        the first one lost, and each then serving its own table under that revision,
        which neither follows."""
        store = self._ctx.store
        holder = f"{self._ctx.source}/{secrets.token_hex(8)}".encode()
        deadline = time.monotonic() + CHANGING_TTL_S
        pause = 0.01
        while not await store.set_if_absent(CHANGING_KEY, holder, CHANGING_TTL_S):
            if time.monotonic() >= deadline:
                raise ServingError("another replica is changing the serving; try again", status=503)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                # left held, it runs out by its TTL
                await store.delete_if_equal(CHANGING_KEY, holder)

    async def refresh(self) -> bool:
        """Follow a newer serving another replica stored; True if it changed here. Store
        this one again if the store lost it (see :meth:`_store_again`)."""
        stored = await self._stored_serving()
        if self.serving is None:
            return False
        if stored is None or stored.revision < self.serving.revision:
            await self._store_again()
            return False
        if stored.revision == self.serving.revision:
            return False
        async with self._changing:
            if stored.revision <= self.serving.revision:
                return False  # a change here meanwhile stored a newer one
            try:
                self._apply(stored, await self._fetch_missing(stored))
            except ServingError as exc:
                log.error("model: cannot follow serving revision %d (%s): %s",
                          stored.revision, _unavailable_reason(exc), exc)  # fmt: skip
                if stored.revision != self._unavailable_revision:
                    self._unavailable_revision = stored.revision
                    self.metrics.unavailable("follow", _unavailable_reason(exc))
                return False
        self._publish_arms()
        return True

    async def _store_again(self) -> None:
        """Store the serving here if the store holds none or an older one: Redis keeps
        nothing over a restart (the deployment's runs without persistence), and a
        replica started then would serve the settings' models, and a change made there
        would be stored under a revision the replicas serving a later one never follow.
        The newest serving of the replicas is kept; the settings' (revision 0), or one
        this replica serves instead of the stored one it could not load, is not stored."""
        serving = self.serving
        if serving.revision == 0 or serving.revision == self._unavailable_revision:
            return
        async with self._changing, self._changing_everywhere():
            stored = await self._stored_serving()
            if stored is not None and stored.revision >= self.serving.revision:
                return
            serving = self.serving
            await self._ctx.store.set(SERVING_KEY, _encode_serving(serving))
        log.warning(
            "model: the store held %s; stored serving revision %d again",
            "no serving" if stored is None else f"revision {stored.revision}",
            serving.revision,
        )

    async def _serving_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_serving_refresh_s)
            try:
                await self.refresh()
                self._publish_arms()
            except Exception:
                log.exception("model: reading the shared serving failed; retrying")

    def _publish_arms(self) -> None:
        table = self.processor.arms if self.processor is not None else self.serving.table()
        shares = table.shares()
        self.metrics.arms(
            [(a.name, a.model_id, a.shadow, shares.get(a.name, 0.0)) for a in table.arms]
        )
        self.metrics.serving({m: c.version for m, c in self.manager.models().items()})
        self.metrics.refits_of(self.manager.models())

    # ---------------------------------------------------------------- per delivery

    def _prepare(self, events: Sequence[Event]) -> None:
        """Score a delivery's vectors ahead in one call per model; feed the drift monitors."""
        try:
            self.processor.prepare(events, self.consumer.state)
            if self.drift:
                self._observe_drift(events)
        except Exception:
            # each vector is scored alone when its step comes
            log.exception("model: preparing a batch failed")

    def _observe_drift(self, events: Sequence[Event]) -> None:
        live = self.processor.feature_set_version
        # a vector whose values do not match its names (refused by its step) would fail
        # the rows of every vector delivered with it
        vectors = [
            e.data
            for e in events
            if e.type == "features.updated"
            and e.data.feature_set_version == live
            and len(e.data.values) == len(e.data.names)
        ]
        if not vectors:
            return
        rows_by_order: dict[tuple[str, ...], np.ndarray] = {}
        for monitor in self.drift.values():
            order = monitor.names
            rows = rows_by_order.get(order)
            if rows is None:
                rows = rows_by_order[order] = vector_rows(vectors, order)[0]
            self._drift_out.extend(monitor.observe(rows))

    def _count(self, published: Sequence[Event]) -> None:
        metrics = self.metrics
        for event in published:
            data = event.data
            if isinstance(data, ModelPrediction):
                metrics.predicted(
                    data.arm, data.model_id, data.model_version or "", data.shadow, data.score
                )
        processor = self.processor
        metrics.sync(
            processor.skipped, processor.failed, processor.prepared_rows, processor.reassigned
        )

    async def _restore_drift(self) -> None:
        """Give the monitors made since the last call the features announced drifting."""
        for model_id in sorted(self._drift_unrestored):
            monitor = self.drift.get(model_id)
            if monitor is None:
                self._drift_unrestored.discard(model_id)
                continue
            drifting = await self._announced.drifting(model_id, monitor.names)
            if self.drift.get(model_id) is monitor:  # not replaced meanwhile
                monitor.restore(drifting)
                self._drift_unrestored.discard(model_id)

    async def _publish_drift(self) -> None:
        """Announce the monitors' transitions that change what the deployment announced;
        count and publish them. What could not be claimed (the store away) is claimed
        first next time; what could not be published, published first next time."""
        pending, self._drift_out = self._drift_out, []
        announced: list[ModelDrift] = []
        failed: Exception | None = None
        for at, transition in enumerate(pending):
            try:
                if await self._announced.claim(transition):
                    announced.append(transition)
            except Exception as exc:
                self._drift_out = pending[at:] + self._drift_out
                failed = exc
                break
        self._drift_unsent += announced
        for transition in announced:
            self._log_drift(transition)
        if failed is None:
            # once the transitions made before are claimed: a monitor made since (its model
            # reloaded) takes what its predecessor's last ones announced
            await self._restore_drift()
        self.metrics.drift([monitor.report() for monitor in self.drift.values()], announced)
        ctx = self._ctx
        while self._drift_unsent:
            payload = self._drift_unsent[0]
            await ctx.bus.publish(make_event(payload, source=ctx.source, time=ctx.clock.now()))
            del self._drift_unsent[0]
        if failed is not None:
            raise failed

    def _log_drift(self, transition: ModelDrift) -> None:
        """Log a drift announced: the feature, its PSI against the threshold crossed, and
        the reference it was compared with (the card's bins, from its training rows)."""
        monitor = self.drift.get(transition.model_id)
        reference = (
            f"the reference bins of its card, from {monitor.card.training.source}"
            if monitor is not None and monitor.card.version == transition.version
            else "the reference bins of its card"
        )
        drifting = transition.state == "drifting"
        log.log(
            logging.WARNING if drifting else logging.INFO,
            "model: %s version %s: feature %s %s: PSI %.3f %s %g over the last %s vectors "
            "against %s",
            transition.model_id,
            transition.version,
            transition.feature,
            transition.state,
            transition.psi,
            ">=" if drifting else "<",
            transition.threshold,
            f"{transition.observations:,}",
            reference,
        )

    def _hand_out(self) -> int:
        """Queue the labels released since the last call for the store, or count them
        into the rolling performance when none are stored; how many."""
        resolved = self.labels.resolve_due()
        if resolved:
            if self.settings.model_store_labels:
                # counted once stored, those new to the store only: one stored already
                # (released again by a partition's next owner when its token's state
                # was not written after it) is in the stored labels the figures start from
                self._to_store.extend(resolved)
            else:
                self.performance.extend(resolved)
        return len(resolved)

    async def _store_released(self) -> None:
        """Store the labels released so far: the keyed consumer's ``before_write``, so
        the tokens' states that no longer hold them are written after them."""
        self._hand_out()
        if self._to_store:
            await self.store_labels()

    def _routed_arms(self) -> set[tuple[str, str]]:
        """The (model id, arm name) of every arm the tokens are routed by now."""
        return {(arm.model_id, arm.name) for arm in self.processor.arms.arms}

    def resolve_labels(self) -> int:
        """Hand out the labels released (:meth:`_hand_out`: the next commit of the tokens
        stores them); export the figures. Returns the labels handed out here."""
        resolved = self._hand_out()
        performance = self.performance
        # those of the arms routed now: an arm taken out gets no more labels, and its last
        # figures would stand for ever (an alert on them firing with them)
        routed = self._routed_arms()
        self.metrics.performance(
            figures
            for key in performance.keys()
            if key in routed and (figures := performance.figures(*key)) is not None
        )
        self._recount_labels()
        self.metrics.labels(self.labels)
        return resolved

    def _recount_labels(self) -> None:
        """Count the waiting labels from the tokens held here when the partitions held
        change: a token restored with its partition or handed over with it brings or
        takes its labels without a follow or a release (a partition revoked leaves its
        keys a moment later, so only the owned ones count)."""
        consumer = self.consumer
        if consumer is None:
            return
        held = (frozenset(consumer.owned), frozenset(consumer.restored))
        if held == self._labels_counted_over:
            return
        self._labels_counted_over = held
        owned, partitions = consumer.owned, consumer.bus.partitions
        tokens = []
        for key in list(consumer.keys()):
            if partition_of(key, partitions) in owned:
                state = consumer.state(key)
                if state is not None and state.labels is not None:
                    tokens.append(state.labels)
        self.labels.recount(tokens)

    async def monitor_round(self) -> None:
        """One round of the monitor: the labels counted here added to the shared live
        figures (every replica's read back every ``model_live_read_s``), the labels
        released handed out, the figures exported, the drift published. The shared
        figures failing (the state store away, a key of theirs of the wrong kind) holds
        back neither the labels nor the drift."""
        try:
            read = self._read_due()
            if read:
                await self._refill_if_lost()
            await self.share_performance(read=read)
        except Exception:
            log.exception("model: the shared live figures failed; added next round")
        self.resolve_labels()
        await self._publish_drift()

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_monitor_s)
            try:
                await self.monitor_round()
            except Exception:
                log.exception("model: drift or live performance failed; retrying")

    async def store_labels(self) -> int:
        """Store the labels handed out since the last call and count those new to the
        store into the rolling performance; how many were new.

        A batch the store could not take (Postgres away) is kept whole for the next call:
        the commit waiting for it holds the tokens' states that would otherwise be written
        without them (so what waits here is at most what was waiting in those states). A
        batch the store refused for what it holds is stored label by label, and a label
        refused alone is dropped, logged and counted: retried, it would hold every
        commit of the service for ever."""
        pending, self._to_store = self._to_store, []
        if not pending:
            return 0
        try:
            added = await self._add(pending)
        except Exception as exc:
            if transient_dependency(exc) is not None:
                self._to_store = pending + self._to_store
                raise
            log.error("model: the label store refused %d labels (%r); storing them one by "
                      "one", len(pending), exc)  # fmt: skip
            return await self._add_apart(pending)
        except BaseException:
            # cancelled (by a stop, which stores them then, or a crash)
            self._to_store = pending + self._to_store
            raise
        self._stored(added)
        return len(added)

    async def _add(self, labels: Sequence[ResolvedLabel]) -> list[ResolvedLabel]:
        return await self.label_store.add(
            labels,
            feature_set_version=self.processor.feature_set_version,
            names=self.manager.feature_manager.names,
        )

    def _stored(self, added: list[ResolvedLabel]) -> None:
        """Count labels new to the store, in the order released."""
        self.performance.extend(added)
        self.metrics.labels_stored(len(added))

    async def _add_apart(self, labels: list[ResolvedLabel]) -> int:
        """Store ``labels`` one by one, dropping each the store refuses alone, and count
        those new; how many were new. What is not tried when the store goes away waits
        for the next call."""
        added: list[ResolvedLabel] = []
        try:
            for i, label in enumerate(labels):
                try:
                    added += await self._add((label,))
                except Exception as exc:
                    if transient_dependency(exc) is not None:
                        self._to_store = labels[i:] + self._to_store
                        raise
                    log.error(
                        "model: label of %s (%s %s, %s) refused by the store, dropped: %r",
                        label.mint,
                        label.model_id,
                        label.arm,
                        label.time,
                        exc,
                    )
                    self.metrics.label_refused()
                except BaseException:
                    self._to_store = labels[i:] + self._to_store
                    raise
        finally:
            self._stored(added)
        return len(added)

    # ---------------------------------------------------------------- refits

    async def _refit_loop(self) -> None:
        policy = self.settings.refit_policy()
        while True:
            await asyncio.sleep(policy.check_s)
            for model_id in list(self.manager.models()):
                try:
                    await self.refit_if_due(model_id)
                except Exception:
                    log.exception("model: refitting %s failed; trying again later", model_id)

    async def refit_if_due(self, model_id: str) -> StoredRefit | UndecidedRefit | None:
        """Refit ``model_id`` on its newest stored labels if the policy says so, swapping
        the refit in if it is better on the held-out slice; the refit stored, or None.

        A refit that decides nothing is stored, counted and logged as such
        (:class:`~pumpflow.model.labels.UndecidedRefit`, :mod:`pumpflow.model.outcomes`):
        a refusal is returned, a failure raised after. The next try of the model comes a
        policy interval after the last, whatever its outcome and whichever replica
        made it."""
        policy = self.settings.refit_policy()
        store = self.label_store
        card = self.manager.card(model_id)
        # what the refit is of: its rows are chosen and ordered by this card
        fitted_from = self.serving.models.get(model_id)
        of_model = (model_id, card.feature_set_version, definition_key(card.label))
        now = self._ctx.clock.now()
        last = await self._swap_recorded(await store.last_refit(model_id))
        last_undecided = await store.last_undecided(model_id)
        tried = max(
            last.at if last else -math.inf,
            last_undecided.at if last_undecided else -math.inf,
            self._refit_tried.get(model_id, -math.inf),
        )
        counts = await store.counts(
            *of_model,
            after_id=last.last_label_id if last else 0,
            at_most=policy.counted_rows,
        )
        if not policy.due(new_labels=counts.new, rows=counts.rows, since_last_s=now - tried):
            return None
        async with store.refitting(model_id) as mine:
            if not mine:
                return None  # another replica refits it
            if (
                await store.last_refit(model_id) != last
                or await store.last_undecided(model_id) != last_undecided
            ):
                return None  # another replica just tried
            self._refit_tried[model_id] = now
            rows = None
            try:
                await self.prune_labels(of_model, policy)
                data, last_id = await store.recent(*of_model, policy.window_rows)
                rows = len(data.labels)
                names = self.manager.feature_manager.names
                if tuple(card.feature_names) != tuple(names):
                    data = _in_order(data, names, card.feature_names)
                # served here only once stored as the serving, as every replica serves it:
                # a failure before (the database, the store) leaves the one serving
                # everywhere
                result = await asyncio.wrap_future(
                    self.manager.update_model(model_id, data, min_gain=policy.min_gain, swap=False)
                )
                path = sha256 = model = raw_card = None
                if result.swapped and result.path is not None:
                    path = result.path
                    # stored with the refit: every replica can write it where it runs
                    model = await asyncio.to_thread(Path(path).read_bytes)
                    raw_card = await asyncio.to_thread(card_path(path).read_bytes)
                    sha256 = model_hash(model)
                # stored as kept until its serving is: the replicas fetch the chosen model
                # from the stored refit to serve it, and a serving that cannot be stored
                # leaves it kept, as it then is everywhere
                refit = StoredRefit(
                    model_id=model_id,
                    serving_version=result.serving_version,
                    candidate_version=result.candidate_version,
                    swapped=False,
                    metric=result.metric,
                    serving_score=result.serving_score,
                    candidate_score=result.candidate_score,
                    held_out_rows=result.held_out_rows,
                    rows=rows,
                    last_label_id=last_id,
                    at=result.at,
                    path=path,
                    sha256=sha256,
                )
                await store.record_refit(refit, model=model, card=raw_card)
            except Exception as exc:
                return await self._undecided(model_id, card.version, rows, exc)
            if path is not None:
                # every replica serves it, and a restart loads it
                task = card.task

                def with_refit(serving: Serving) -> Serving:
                    if serving.models.get(model_id) != fitted_from:
                        # loaded meanwhile (here or by another replica): the refit was
                        # fitted on and compared with the model no longer served
                        raise ServingError(f"model {model_id!r} changed while it was refitted")
                    source = ModelSource(
                        path=path, task=task, loaded=serving.revision + 1, sha256=sha256
                    )
                    return msgspec.structs.replace(
                        serving, models={**serving.models, model_id: source}
                    )

                try:
                    await self.change(with_refit, "refit")
                except BaseException:
                    self._refitted(refit, "its serving could not be stored")
                    raise
                refit = msgspec.structs.replace(refit, swapped=True)
                # left kept by a failure here, the next check marks and counts it
                # (_swap_recorded); counted by whoever marks it, once
                counted = await store.record_swap(refit)
                self._refitted(
                    refit,
                    "swapped in"
                    if counted
                    else "swapped in, marked by another replica's check meanwhile",
                    counted=counted,
                )
            else:
                self._refitted(refit, "kept the serving one")
            # under the lock, the serving stored: no other replica refits or prunes it now
            await self.prune_refits(model_id)
        self.refits.append(refit)
        return refit

    def _refitted(self, refit: StoredRefit, outcome: str, *, counted: bool = True) -> None:
        if counted:
            self.metrics.refitted(refit.model_id, *decided(refit))
        log.info(
            "model: refit of %s on %d stored labels: %s %s %.4f, candidate %s %.4f on %d "
            "held out: %s",
            refit.model_id,
            refit.rows,
            refit.serving_version,
            refit.metric,
            refit.serving_score,
            refit.candidate_version,
            refit.candidate_score,
            refit.held_out_rows,
            outcome,
        )

    async def _undecided(
        self, model_id: str, serving_version: str, rows: int | None, error: Exception
    ) -> UndecidedRefit:
        """Count, log and store a refit of ``model_id`` that ended in ``error`` having
        decided nothing; return it if refused, raise ``error`` if it failed."""
        outcome, reason = undecided(error)
        refit = UndecidedRefit(
            model_id=model_id,
            serving_version=serving_version,
            outcome=outcome,
            reason=reason,
            detail=detail_of(error),
            rows=rows,
            at=self._ctx.clock.now(),
        )
        self.metrics.refitted(model_id, outcome, reason)
        log.warning(
            "model: refit of %s on %s stored labels %s (%s), %s %s serves on: %s",
            model_id,
            "no" if rows is None else rows,
            outcome,
            reason,
            model_id,
            serving_version,
            refit.detail,
        )
        try:
            await self.label_store.record_undecided(
                refit, keep=self.settings.refit_policy().keep_refits
            )
        except Exception as store_error:
            # counted and logged all the same; the next try is this replica's to time
            log.warning("model: the refit of %s that decided nothing was not stored: %r",
                        model_id, store_error)  # fmt: skip
        if outcome == "failed":
            raise error
        return refit

    async def _swap_recorded(self, refit: StoredRefit | None) -> StoredRefit | None:
        """``refit`` marked swapped if it is stored as kept while the stored serving
        serves its model (the mark failed after the serving was stored): counted then, by
        the replica whose mark it is."""
        if refit is None or refit.swapped or refit.sha256 is None:
            return refit
        stored = await self._stored_serving()
        if stored is None or all(s.sha256 != refit.sha256 for s in stored.models.values()):
            return refit
        refit = msgspec.structs.replace(refit, swapped=True)
        if await self.label_store.record_swap(refit):
            self._refitted(refit, "swapped in, marked by a later check")
        return refit

    async def prune_labels(self, of_model: tuple[str, str, str], policy: RefitPolicy) -> int:
        """Delete the stored labels of ``of_model`` (model id, feature set, definition)
        older than the newest the policy keeps; how many. A failure is logged: the refit
        goes on, and the next one prunes them."""
        try:
            deleted = await self.label_store.prune(*of_model, keep=policy.kept_rows)
        except Exception:
            log.exception(
                "model: pruning the labels of %s failed; the next refit does", of_model[0]
            )
            return 0
        if deleted:
            log.info(
                "model: pruned %d stored labels of %s (kept the newest %d)",
                deleted,
                of_model[0],
                policy.kept_rows,
            )
        return deleted

    async def prune_refits(self, model_id: str) -> list[PrunedRefit]:
        """Delete the refits of ``model_id`` the refit policy prunes, and the pruned
        models' files from this replica's registry; the refits deleted. Kept whatever
        their age: the models the stored serving names and those loaded here (one an
        operator loaded by path, a refit's file among them). A failure is logged: the
        next refit prunes them."""
        if self._pruner is None:
            return []
        try:
            stored = await self._stored_serving()
            served = {card.model_sha256 for card in self.manager.models().values()}
            if stored is not None:
                served |= {s.sha256 for s in stored.models.values() if s.sha256 is not None}
            pruned = await self._pruner.prune(model_id, self.settings.refit_policy(), served)
            registry = self.manager.registry
            # the registry files a refit under its card's model id, which a refit takes from
            # the card of the model it refits, not from the id that model is served as
            filed_as = self.manager.card(model_id).model_id
            removed = []
            for refit in pruned:
                if (
                    registry is not None
                    and refit.sha256 is not None
                    and await asyncio.to_thread(registry.remove, filed_as, refit.candidate_version)
                ):
                    removed.append(refit.candidate_version)
        except Exception:
            log.exception("model: pruning the refits of %s failed; the next refit does", model_id)
            return []
        if pruned:
            self.metrics.pruned(model_id, refits=len(pruned), files=len(removed))
            log.info(
                "model: pruned %d refits of %s (kept the newest %d and those served); "
                "removed the files of %s from %s",
                len(pruned),
                model_id,
                self.settings.model_refit_keep,
                removed or "none",
                registry and registry.root,
            )
        return pruned

    # ---------------------------------------------------------------- reads

    def models_view(self) -> dict[str, Any]:
        manager = self.manager
        # the file this replica read, not the serving's path: that names the file of the
        # replica that fitted a refit, which one on another disk wrote from the database
        return {
            model_id: {"path": str(manager.path(model_id)), "card": msgspec.to_builtins(card)}
            for model_id, card in manager.models().items()
        }

    def arms_view(self) -> dict[str, Any]:
        """The arm table routing tokens here, each arm with its model's version."""
        described = self.processor.arms.describe()
        for arm in described["arms"]:
            arm["version"] = self.manager.card(arm["model_id"]).version
        return described

    def scoring_view(self) -> dict[str, Any]:
        processor = self.processor
        return {
            "policy": {
                "min_interval_s": processor.policy.min_interval_s,
                "retire_ttl_s": processor.policy.retire_ttl_s,
            },
            "feature_set_version": processor.feature_set_version,
            "skipped": dict(processor.skipped),
            "failed": {f"{m}/{e}": n for (m, e), n in processor.failed.items()},
            "prepared_rows": processor.prepared_rows,
            "reassigned": dict(processor.reassigned),
        }

    async def status(self) -> dict[str, Any]:
        consumer = {} if self.consumer is None else self.consumer.describe()
        serving = (
            None
            if self.serving is None
            else {
                "revision": self.serving.revision,
                "models": {m: c.version for m, c in self.manager.models().items()},
                "arms": self.arms_view()["arms"] if self.processor is not None else [],
            }
        )
        return {**consumer, "serving": serving}

    def router(self):
        from fastapi import APIRouter, Body, Depends, HTTPException, Query

        from pumpflow.common.runtime.http import require_token

        api = APIRouter()
        guarded = [Depends(require_token)]

        def refused(asked: str, status: int, detail: str) -> HTTPException:
            """A change refused, logged: the running serving goes on."""
            log.warning("model: %s refused (%d): %s", asked, status, detail)
            return HTTPException(status_code=status, detail=detail)

        async def changed(asked: str, change, kind: str) -> dict[str, Any]:
            try:
                await self.change(change, kind)
            except ServingError as exc:
                raise refused(asked, exc.status, str(exc)) from None
            return {"revision": self.serving.revision, **self.arms_view()}

        def model_or_404(model_id: str):
            if model_id not in self.manager.models():
                raise HTTPException(status_code=404, detail=f"no model {model_id!r} is loaded")

        @api.get("/models")
        async def list_models() -> dict[str, Any]:
            return {"models": self.models_view()}

        @api.post("/models", dependencies=guarded)
        async def load_model(
            model_id: str = Body(...),
            path: str = Body(...),
            model_type: Task | None = Body(None),
        ) -> dict[str, Any]:
            if not model_id or not path or "\x00" in model_id + path:
                raise refused(
                    "POST /models", 422, "'model_id' and 'path' must be non-empty, without NUL"
                )

            def with_model(serving: Serving) -> Serving:
                # the revision loaded at: the same path again is a reload (a new file there)
                # the card's task unless one is given: a type given is checked against it
                source = ModelSource(
                    path=str(Path(path).resolve()),
                    task=model_type or _card_task(path),
                    loaded=serving.revision + 1,
                )
                return msgspec.structs.replace(serving, models={**serving.models, model_id: source})

            result = await changed("POST /models", with_model, "load")
            return {"card": msgspec.to_builtins(self.manager.card(model_id)), **result}

        @api.get("/arms")
        async def get_arms() -> dict[str, Any]:
            return self.arms_view()

        @api.put("/arms", dependencies=guarded)
        async def put_arms(
            arms: list[dict[str, Any]] = Body(..., embed=True),
            salt: str | None = Body(None, embed=True),
        ) -> dict[str, Any]:
            for i, arm in enumerate(arms):
                # a misspelt field would otherwise leave its default in place
                unknown = sorted(set(arm) - set(Arm.__struct_fields__))
                if unknown:
                    raise refused(
                        "PUT /arms", 422, f"arms[{i}]: no field named {', '.join(unknown)}"
                    )
            try:
                table = tuple(msgspec.convert(a, Arm) for a in arms)
                ArmTable(table)  # one that cannot route is refused as its weights are
            except (msgspec.ValidationError, ArmError) as exc:
                raise refused("PUT /arms", 422, str(exc)) from None
            return await changed(
                "PUT /arms",
                lambda s: msgspec.structs.replace(s, arms=table, salt=salt or s.salt),
                "arms",
            )

        @api.put("/arms/weights", dependencies=guarded)
        async def put_weights(
            weights: dict[str, float] = Body(..., embed=True),
        ) -> dict[str, Any]:
            def reweighted(serving: Serving) -> Serving:
                try:
                    table = serving.table().with_weights(weights)
                except ArmError as exc:
                    raise ServingError(str(exc), status=422) from None
                return msgspec.structs.replace(serving, arms=table.arms)

            return await changed("PUT /arms/weights", reweighted, "weights")

        @api.post("/arms/{name}/promote", dependencies=guarded)
        async def promote(name: str) -> dict[str, Any]:
            def promoted(serving: Serving) -> Serving:
                try:
                    table = serving.table().promote(name)
                except ArmError as exc:
                    raise ServingError(str(exc), status=404) from None
                return msgspec.structs.replace(serving, arms=table.arms)

            # the route, not the name asked: the refusal names it, quoted
            return await changed("POST /arms/{name}/promote", promoted, "promote")

        @api.delete("/arms/{name}", dependencies=guarded)
        async def remove_arm(
            name: str, weights: dict[str, float] | None = Body(None, embed=True)
        ) -> dict[str, Any]:
            """Take arm ``name`` out: its share of new tokens goes to the live arms left in
            proportion to their weights, or ``weights`` sets theirs in the same change
            (the others keep theirs); its tokens go to the live arms left by their hash.
            404: no such arm; 422: weights naming it, an unknown arm, or none; 409: the
            last arm, or no live arm with a weight left."""
            removed: list[Arm] = []

            def without(serving: Serving) -> Serving:
                table = serving.table()
                try:
                    removed.append(table.arm(name))
                except ArmError as exc:
                    raise ServingError(str(exc), status=404) from None
                if weights is not None:
                    if name in weights:
                        raise ServingError(
                            f"the weights name {name!r}, the arm removed: give those of "
                            "the arms left",
                            status=422,
                        )
                    try:
                        table = table.with_weights(weights)
                    except ArmError as exc:
                        raise ServingError(str(exc), status=422) from None
                try:
                    table = table.without_arm(name)
                except ArmError as exc:
                    raise ServingError(str(exc), status=409) from None
                return msgspec.structs.replace(serving, arms=table.arms)

            result = await changed("DELETE /arms/{name}", without, "remove_arm")
            arm = removed[-1]
            log.info(
                "model: arm %r (model %s) removed at serving revision %d: %s; %s",
                name,
                arm.model_id,
                result["revision"],
                # a shadow scores beside the live arms: no token is its own
                "a shadow, it held no token"
                if arm.shadow
                else "its tokens go to the live arms left by their hash",
                self._routes(self.processor.arms),
            )
            return {"removed": msgspec.to_builtins(arm), **result}

        @api.delete("/models/{model_id}", dependencies=guarded)
        async def unload_model(model_id: str, version: str | None = None) -> dict[str, Any]:
            """Unload model ``model_id`` (only if it serves ``version``, when given): no
            arm may serve it. 404: not loaded; 409: an arm serves it, or another version
            serves under the id."""
            unloaded: list[str] = []

            def without(serving: Serving) -> Serving:
                if model_id not in serving.models:
                    raise ServingError(f"no model {model_id!r} is loaded", status=404)
                serving_arms = [arm for arm in serving.arms if arm.model_id == model_id]
                if serving_arms:
                    raise ServingError(
                        f"model {model_id!r} is served: "
                        + "; ".join(
                            f"arm {arm.name} serves it" + (" as a shadow" if arm.shadow else "")
                            for arm in serving_arms
                        )
                        + "; remove the arm (or give it another model) first"
                    )
                card = self.manager.models().get(model_id)
                found = "unknown" if card is None else card.version
                if version is not None and version != found:
                    raise ServingError(
                        f"model {model_id!r} serves version {found}, not {version}: not unloaded"
                    )
                unloaded.append(found)
                models = {m: s for m, s in serving.models.items() if m != model_id}
                return msgspec.structs.replace(serving, models=models)

            result = await changed("DELETE /models/{model_id}", without, "unload")
            return {
                "unloaded": {"model_id": model_id, "version": unloaded[-1]},
                "models": sorted(self.manager.models()),
                **result,
            }

        @api.get("/models/{model_id}/performance")
        async def performance(model_id: str, fresh: bool = False) -> dict[str, Any]:
            """The card's held-out figures, what was scored and the live figures per arm.

            The live figures are the deployment's as last read (every
            ``PUMPFLOW_MODEL_LIVE_READ_S``, read now if that is longer ago) and this
            replica's labels since: polling costs no read in between. ``fresh=true``
            reads them now, each replica answering the same; callers asking together
            share one read. ``live_read_age_s`` says how old the read is."""
            model_or_404(model_id)
            asked = time.monotonic()
            if fresh or self._read_due():
                try:
                    await self.share_performance(since=asked)
                except Exception:
                    log.exception(
                        "model: the shared live figures could not be read; "
                        "answering with those of the last read"
                    )
            found = msgspec.to_builtins(self.manager.get_model_performance(model_id))
            # an arm taken out keeps its last figures here, told apart (the metrics drop it)
            routed = self._routed_arms()
            found["live"] = {
                arm: {**msgspec.to_builtins(figures), "routed": (model_id, arm) in routed}
                for arm, figures in self.performance.by_arm(model_id).items()
            }
            read_age = time.monotonic() - self._read_at
            found["live_read_age_s"] = read_age if math.isfinite(read_age) else None
            # this replica's: the tokens of its partitions
            found["labels_pending"] = self.labels.pending
            return found

        @api.get("/models/{model_id}/drift")
        async def drift(model_id: str) -> dict[str, Any]:
            model_or_404(model_id)
            monitor = self.drift[model_id]
            report = msgspec.to_builtins(monitor.report(fresh=True))
            report["transitions"] = [
                {"at": at, **msgspec.to_builtins(t)} for at, t in monitor.transitions
            ]
            training = monitor.card.training
            report["reference"] = {
                "version": monitor.card.version,
                "source": training.source,
                "start": training.start,
                "end": training.end,
            }
            report["thresholds"] = dataclasses.asdict(monitor.thresholds)
            return report

        @api.get("/scoring")
        async def scoring() -> dict[str, Any]:
            return self.scoring_view()

        @api.get("/refits")
        async def refits(
            model_id: str | None = None, limit: int = Query(50, ge=1, le=500)
        ) -> dict[str, Any]:
            """The newest refits tried (of ``model_id``, or of every model), newest first:
            by any replica, decided or not, each with its outcome and reason
            (:mod:`pumpflow.model.outcomes`), what it compared, and why it decided
            nothing if it did not."""
            decided_refits, undecided_refits = await self.label_store.refit_history(model_id, limit)
            listed = attempts(decided_refits, undecided_refits, limit)
            return {"refits": [msgspec.to_builtins(attempt) for attempt in listed]}

        return api
