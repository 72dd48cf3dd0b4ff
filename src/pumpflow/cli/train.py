"""``pumpflow train``: train a model on recorded or simulated history, export ONNX with its card.

Sources of history (one of):

- ``--dsn``/``--schema`` (or the settings'): token events from Postgres, replayed in
  time order by the feed's DatabaseDataFeed (``--start``/``--end`` limit the window);
- ``--dataset FILE.jsonl``: dataset files the simulator wrote (``pumpflow sim dataset``)
  or recordings (``pumpflow record --out``);
- ``--sim-seeds 1,2,3``: markets simulated here, ``--sim-minutes`` each, one after
  the other from ``--sim-start-epoch``.

``--skip-minutes M`` drops the rows of the first M minutes of each source (each
simulated market, each dataset file, the Postgres window from its first event), in
training and held out alike; features and labels are still computed on the whole stream
(a row's label looks ``--horizon`` ahead, its features back to the token's launch), so
the rows kept are those of a run without the drop. Why: a source recorded from a feed's
start holds only the tokens launched since, so M minutes in no token is older than M,
and what accumulates with a token's age (time_since_launch, unique traders, largest buy,
curve progress, the 300 s volumes) sits under what a running market shows. A model
fitted on those rows has seen no market in its steady state, and its card's reference
bins, which the drift monitor holds a running feed to once its own 20-minute warm-up is
over, are the reference of a market's first minutes: the monitor flags the age, the
rates and the volumes as drifting for the training window. The default, 0, keeps every
row: a window cut out of a recording that ran on before it has no empty start, and what
a user's data holds is theirs to say.

Without a held-out source (``--held-out-dataset``, ``--held-out-seeds``) the last
``--held-out-share`` of the tokens by launch time is held out. The model and its card
go to ``--out PATH.onnx`` or into the registry folder ``--registry`` (default
``models``). Needs the model service's ``train`` extra (``pip install pumpflow-model[train]``).

The shipped default model is rebuilt, byte for byte, by::

    pumpflow train --default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pumpflow.common.model.settings import DEFAULT_FEE_RATE, DEFAULT_HORIZON_S
from pumpflow.common.runtime.arguments import (
    UsageError,
    bounded,
    check_window,
    count,
    epoch_time,
    help_text,
    positive,
    postgres_dsn,
    postgres_source,
    schema_name,
    share,
    writable,
)
from pumpflow.common.text import counted, noun_of

# the features and the models (numpy) are imported where a model is trained: every
# pumpflow command registers this one
if TYPE_CHECKING:
    from pumpflow.common.events import Event
    from pumpflow.common.model.card import LabelDefinition

DEFAULT_SIM_MINUTES = 10.0
#: ``--default``'s market minutes per seed and the first of them whose rows are dropped
#: (``--skip-minutes``): the drift monitor judges from 20 market minutes on (its
#: warm-up), when about 95% of the tokens launched in a market's first minutes have
#: gone quiet (docs/market.md, section 3) and 98% of the simulator's trades are by
#: tokens younger than 20 minutes, so the rows of minutes 20 to 40 are the steady state
#: the monitor compares with; 20 minutes of them per seed, 2.7 times the rows of a
#: 10-minute market, in some 10 CPU seconds for the five seeds
DEFAULT_MINUTES = 40.0
DEFAULT_SKIP_MINUTES = 20.0
#: 2026-01-01T00:00:00Z: simulated runs start here, one after the other
DEFAULT_SIM_START = 1_767_225_600.0
#: ``--default``: trained on simulator seeds 1-3, held out on seeds 4 and 5 (markets it
#: never saw), each in its steady state (above), model seed 1; the card is dated at the
#: data's start and valid ten years (a simulated market does not drift)
DEFAULT_ARGS = (
    "--sim-seeds",
    "1-3",
    "--held-out-seeds",
    "4,5",
    "--sim-minutes",
    f"{DEFAULT_MINUTES:g}",
    "--skip-minutes",
    f"{DEFAULT_SKIP_MINUTES:g}",
    "--seed",
    "1",
    "--created-at",
    "2026-01-01T00:00:00Z",
    "--valid-days",
    "3650",
)


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds written as ``1,2,5-7``; none (``5-3``) is refused, not taken as no source."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        try:
            seeds += range(int(low), int(high or low) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds as 1,2,5-7, not {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seed in {text!r}")
    return tuple(seeds)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on history (Postgres, dataset files or simulated markets)",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=train_command)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("history")
    source.add_argument(
        "--default",
        action="store_true",
        help="rebuild the shipped default model in place: " + " ".join(DEFAULT_ARGS),
    )
    source.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    source.add_argument(
        "--schema", type=schema_name, help="Postgres schema (default: PUMPFLOW_NAMESPACE)"
    )
    source.add_argument("--start", type=epoch_time, help="first event time (epoch s or ISO, UTC)")
    source.add_argument("--end", type=epoch_time, help="end of the window (epoch s or ISO, UTC)")
    source.add_argument(
        "--dataset", action="append", default=[], metavar="FILE.jsonl",
        help="a `pumpflow sim dataset` or `pumpflow record --out` file (repeatable)",
    )  # fmt: skip
    source.add_argument(
        "--sim-seeds", type=parse_seeds, default=(), metavar="1,2,5-7",
        help="simulate these market seeds here",
    )  # fmt: skip
    source.add_argument(
        "--sim-minutes", type=positive, default=DEFAULT_SIM_MINUTES,
        help="market minutes per simulated seed (%(default)g)",
    )  # fmt: skip
    source.add_argument(
        "--sim-start-epoch", type=epoch_time, default=DEFAULT_SIM_START,
        help="when the first simulated market starts (epoch s or ISO, UTC; 2026-01-01)",
    )  # fmt: skip
    source.add_argument(
        "--skip-minutes", type=bounded(at_least=0), default=0.0, metavar="M",
        help="drop the rows of each source's first M minutes, where a market seen from its "
        "start has only young tokens (features and labels still use them; %(default)g)",
    )  # fmt: skip
    held = parser.add_argument_group("held out")
    held.add_argument(
        "--held-out-dataset", action="append", default=[], metavar="FILE.jsonl",
        help="validate on this dataset file (repeatable)",
    )  # fmt: skip
    held.add_argument(
        "--held-out-seeds", type=parse_seeds, default=(), metavar="4,5",
        help="validate on markets of these seeds, simulated here",
    )  # fmt: skip
    held.add_argument(
        "--held-out-share", type=share, default=0.3,
        help="without a held-out source: the share of tokens, the last launched, held out (0.3)",
    )  # fmt: skip
    label = parser.add_argument_group("label")
    label.add_argument(
        "--task", choices=("classification", "regression"), default="classification",
        help="take profit before stop loss (classification), or the net return (regression)",
    )  # fmt: skip
    label.add_argument(
        "--horizon", type=positive, default=DEFAULT_HORIZON_S, metavar="S",
        help="seconds the label looks ahead (%(default)g)",
    )  # fmt: skip
    label.add_argument(
        "--take-profit", type=positive, default=None, metavar="FRACTION",
        help="net return a positive reaches before the stop loss (default: the shipped label's)",
    )  # fmt: skip
    label.add_argument(
        "--stop-loss", type=share, default=None, metavar="FRACTION",
        help="net fall that makes a negative first (default: the shipped label's)",
    )  # fmt: skip
    label.add_argument(
        "--fee-rate", type=bounded(at_least=0, below=1), default=DEFAULT_FEE_RATE,
        help="curve fee the label's net return pays per trade (%(default)g)",
    )  # fmt: skip
    model = parser.add_argument_group("model")
    model.add_argument("--model-id", default="entry", help="the model's id (entry)")
    model.add_argument(
        "--seed",
        type=int,
        default=1,
        help="LightGBM's seed, recorded on the card (1); the fit samples no rows or "
        "features, so another seed gives the same model",
    )
    model.add_argument("--trees", type=count, default=120, help="boosted trees (120)")
    model.add_argument(
        "--leaves", type=bounded(at_least=2, whole=True), default=15, help="leaves per tree (15)"
    )
    model.add_argument("--learning-rate", type=positive, default=0.05, help="boosting rate (0.05)")
    model.add_argument(
        "--valid-days",
        type=positive,
        default=30.0,
        help="days the card says the model is valid (30)",
    )
    model.add_argument(
        "--created-at",
        type=epoch_time,
        default=None,
        help="the card's creation time (default: now)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, metavar="PATH.onnx", help="write the model here, its card beside it"
    )
    out.add_argument(
        "--registry",
        type=Path,
        default=Path("models"),
        help="registry folder when no --out (default: models)",
    )


# ------------------------------------------------------------------------------ sources


def simulated_events(seed: int, minutes: float, start_epoch: float) -> list[Event]:
    from pumpflow.simulator.dataset import market_events
    from pumpflow.simulator.market import Market, MarketConfig

    return list(
        market_events(Market(MarketConfig(seed=seed)), minutes * 60.0, start_epoch=start_epoch)
    )


def dataset_file_events(path: str | Path) -> list[Event]:
    from pumpflow.simulator.dataset import dataset_events

    return [event for event, _ in dataset_events(path)]


async def database_events(
    dsn: str, schema: str, start: float | None, end: float | None
) -> list[Event]:
    """Every published token event of the window, replayed by the DatabaseDataFeed."""
    from pumpflow.common.db.pool import create_pool
    from pumpflow.common.storage import TokenEventStore
    from pumpflow.feed.database_feed import DatabaseDataFeed, ReplayConfig
    from pumpflow.feed.interface import ALL_EVENTS, FeedRecord

    pool = await create_pool(dsn, schema, max_size=2, existing=True)
    events: list[Event] = []

    async def collect(record: FeedRecord) -> None:
        events.append(record.event)

    try:
        feed = DatabaseDataFeed(TokenEventStore(pool), ReplayConfig(start=start, end=end))
        feed.register_callback(ALL_EVENTS, collect)
        await feed.run()
    finally:
        await pool.close()
    return events


# ------------------------------------------------------------------------------ training


def _dataset(
    events: Iterable[Event],
    label: LabelDefinition,
    *,
    data_end: float | None,
    source: str,
    progress: bool,
    skip_s: float = 0.0,
    start: float | None = None,
):
    """The dataset of one source; rows of its first ``skip_s`` seconds dropped, counted
    from ``start`` (default: its first event)."""
    from pumpflow.common.features import FeatureManager
    from pumpflow.model.training import build_dataset, group_by_mint

    events = list(events)
    if not events:
        raise SystemExit(f"pumpflow train: no token events in {source}")
    end = data_end if data_end is not None else max(e.time for e in events)
    rows_from = None
    if skip_s > 0:
        rows_from = (start if start is not None else min(e.time for e in events)) + skip_s
    return build_dataset(
        group_by_mint(events),
        FeatureManager(),
        label,
        data_end=end,
        source=source,
        rows_from=rows_from,
        progress=progress,
    )


def _simulated(
    seeds: Sequence[int], minutes: float, first_start: float, label, progress,
    skip_minutes: float = 0.0,
):  # fmt: skip
    """One dataset per seed, each run starting where the previous ended."""
    from pumpflow.model.training import concatenate

    parts = []
    for i, seed in enumerate(seeds):
        start = first_start + i * minutes * 60.0
        parts.append(
            _dataset(
                simulated_events(seed, minutes, start),
                label,
                data_end=start + minutes * 60.0,
                source=f"simulator seed {seed}",
                progress=progress,
                skip_s=skip_minutes * 60.0,
                start=start,
            )
        )
    names = ",".join(map(str, seeds))
    several = len(seeds) > 1
    each = f"{minutes:g} min" + (" each" if several else "")
    if skip_minutes > 0:
        each = f"minutes {skip_minutes:g}-{minutes:g}" + (" of each" if several else "")
    return concatenate(parts, source=f"simulator {noun_of(len(seeds), 'seed')} {names}, {each}")


def files_dataset(
    paths: Sequence[str | Path], label: LabelDefinition, *, progress: bool,
    skip_minutes: float = 0.0,
):  # fmt: skip
    """One dataset of simulator dataset files (each labelled up to its own last event,
    rows of its first ``skip_minutes`` dropped)."""
    from pumpflow.model.training import concatenate

    return concatenate(
        [
            _dataset(
                dataset_file_events(p),
                label,
                data_end=None,
                source=f"dataset {p}",
                progress=progress,
                skip_s=skip_minutes * 60.0,
            )
            for p in paths
        ],
        source="datasets " + ", ".join(map(str, paths)),
    )


def default_args(out: Path) -> argparse.Namespace:
    """``--default``'s arguments, the model written to ``out``."""
    parser = argparse.ArgumentParser(prog="pumpflow train")
    add_arguments(parser)
    return parser.parse_args([*DEFAULT_ARGS, "--out", str(out)])


def build_default(out: Path, *, progress: bool = False):
    """Rebuild the shipped default model at ``out`` (deterministic: same bytes every time)."""
    return run_training(default_args(out), progress=progress)


def unseen_stream(args: argparse.Namespace) -> list[str]:
    """``pumpflow backtest``'s flags of a stream neither the model of ``args`` nor the
    shipped one trained on: its held-out source, else a simulated seed after both's, else
    the Postgres history after the window's ``--end`` (its ``--dsn`` as ``DSN``: it may
    hold a password); a placeholder when train knows none (a file or the whole history,
    part of it held out)."""
    shipped = set(parse_seeds(DEFAULT_ARGS[DEFAULT_ARGS.index("--sim-seeds") + 1]))
    minutes = ["--minutes", f"{args.sim_minutes:g}"]
    if held := [seed for seed in args.held_out_seeds if seed not in shipped]:
        return ["--seed", str(held[0]), *minutes]
    if args.held_out_dataset:
        return ["--dataset", args.held_out_dataset[0]]
    if args.sim_seeds or args.held_out_seeds:
        return ["--seed", str(max({*args.sim_seeds, *shipped}) + 1), *minutes]
    if not args.dataset and args.end is not None:
        after = datetime.fromtimestamp(args.end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        database = (["--dsn", "DSN"] if args.dsn else []) + (
            ["--schema", args.schema] if args.schema else []
        )
        return [*database, "--start", after]
    return ["--dataset", "FILE.jsonl"]


#: the flags of the Postgres history, which the other sources would ignore
POSTGRES_FLAGS = ("schema", "start", "end")


def run_training(args: argparse.Namespace, *, progress: bool):
    from pumpflow.common.model.card import LabelDefinition
    from pumpflow.common.model.labels import DEFAULT_CLASSIFICATION, DEFAULT_REGRESSION
    from pumpflow.common.model.registry import ModelRegistry, write_model
    from pumpflow.common.runtime.settings import CommonSettings
    from pumpflow.model.training import TrainConfig, train

    if args.task == "classification":
        label = LabelDefinition(
            kind="take_profit_first",
            horizon_s=args.horizon,
            take_profit=DEFAULT_CLASSIFICATION.take_profit
            if args.take_profit is None
            else args.take_profit,
            stop_loss=DEFAULT_CLASSIFICATION.stop_loss
            if args.stop_loss is None
            else args.stop_loss,
            fee_rate=args.fee_rate,
        )
    else:
        label = LabelDefinition(
            kind=DEFAULT_REGRESSION.kind, horizon_s=args.horizon, fee_rate=args.fee_rate
        )
    sources = sum(map(bool, (args.dataset, args.sim_seeds))) + (args.dsn is not None)
    if sources > 1:
        raise SystemExit("pumpflow train: give one history source")
    if args.dataset or args.sim_seeds:
        stray = [f"--{flag}" for flag in POSTGRES_FLAGS if getattr(args, flag) is not None]
        if stray:
            source = "--dataset" if args.dataset else "--sim-seeds"
            raise UsageError(f"{', '.join(stray)}: not for {source}")
    check_window(args.start, args.end)
    trained_on = [
        *(("--held-out-seeds", seed, "--sim-seeds") for seed in args.held_out_seeds
          if seed in args.sim_seeds),
        *(("--held-out-dataset", path, "--dataset") for path in args.held_out_dataset
          if Path(path).resolve() in {Path(p).resolve() for p in args.dataset}),
    ]  # fmt: skip
    if trained_on:
        flag, source, trained_flag = trained_on[0]
        raise UsageError(
            f"{flag} {source}: trained on too ({trained_flag}): the held-out figures would "
            "be of rows the model learned"
        )
    skip = args.skip_minutes
    if args.sim_seeds and skip >= args.sim_minutes:
        raise SystemExit(
            f"pumpflow train: --skip-minutes {skip:g} drops every row of a "
            f"{args.sim_minutes:g}-minute market"
        )
    # where the model goes, before a training that may take minutes is lost at its end
    writable(args.out if args.out is not None else args.registry / "model.onnx")
    if args.sim_seeds:
        dataset = _simulated(
            args.sim_seeds, args.sim_minutes, args.sim_start_epoch, label, progress, skip
        )
    elif args.dataset:
        dataset = files_dataset(args.dataset, label, progress=progress, skip_minutes=skip)
    else:
        settings = CommonSettings.load(service="train")
        dsn = args.dsn or settings.postgres_dsn
        schema = args.schema or settings.namespace
        events = asyncio.run(database_events(dsn, schema, args.start, args.end))
        source = postgres_source(schema, args.start, args.end)
        dataset = _dataset(
            events, label, data_end=args.end, source=source, progress=progress,
            skip_s=skip * 60.0,
        )  # fmt: skip

    held_out = None
    if args.held_out_seeds:
        next_start = args.sim_start_epoch + len(args.sim_seeds) * args.sim_minutes * 60.0
        held_out = _simulated(
            args.held_out_seeds, args.sim_minutes, next_start, label, progress, skip
        )
    elif args.held_out_dataset:
        held_out = files_dataset(args.held_out_dataset, label, progress=progress, skip_minutes=skip)
    config = TrainConfig(
        model_id=args.model_id,
        task=args.task,
        seed=args.seed,
        n_estimators=args.trees,
        num_leaves=args.leaves,
        learning_rate=args.learning_rate,
        held_out_share=args.held_out_share,
        valid_days=args.valid_days,
        progress=progress,
    )
    from pumpflow.common.clock import WallClock

    created_at = args.created_at if args.created_at is not None else WallClock().now()
    trained = train(dataset, config, created_at=created_at, held_out=held_out)
    if args.out is not None:
        path = write_model(args.out, trained.model, trained.card)
    else:
        path = ModelRegistry(args.registry).register(trained.model, trained.card)
    return path, trained


def train_command(args: argparse.Namespace) -> int:
    from pumpflow.common.db.pool import NoSuchSchema
    from pumpflow.model.training import TrainingError

    if args.default:
        from pumpflow.model import DEFAULT_MODEL_PATH

        args = default_args(DEFAULT_MODEL_PATH)
    try:
        path, trained = run_training(args, progress=True)
    except NoSuchSchema as exc:  # a flag naming nothing, as a bad flag is
        print(f"pumpflow train: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"pumpflow train: {exc}", file=sys.stderr)
        return 1
    card = trained.card
    held = card.held_out
    print(f"model {card.model_id} version {card.version} -> {path}")
    print(
        f"trained on {counted(card.training.rows, 'row')} of "
        f"{counted(card.training.tokens, 'token')} "
        f"({card.training.source})"
    )
    print(
        f"held out: {counted(held.rows, 'row')} of {counted(held.tokens, 'token')} ({held.source})"
    )
    for name, value in held.model.items():
        print(f"  {name}: {value:.4f}")
    for name, value in held.baseline.items():
        print(f"  baseline {name}: {value:.4f} ({held.baseline_rule})")
    for part, figures in held.by_part.items():
        print(f"  {part}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    print(f"ONNX and native agree within {trained.max_difference:.2g}")
    served = json.dumps({card.model_id: str(Path(path).absolute())}, separators=(",", ":"))
    stream = unseen_stream(args)
    if stream[-1] == "FILE.jsonl":
        on = (
            f"on {stream[1]}, a stream it did not train on (a `pumpflow sim dataset` or "
            "`pumpflow record --out` file)"
        )
    elif "DSN" in stream:
        on = "on the history after its window (DSN: the --dsn it trained on)"
    elif "--start" in stream:
        on = "on the history after its window"
    else:
        on = "on a stream it did not train on"
    # both configurations over the same base: only the model differs between them
    print(
        f"use it: pumpflow backtest {shlex.join(stream)} --config shipped --config "
        f"'mine=model_models={served}' compares it with the shipped model {on}; "
        f"PUMPFLOW_MODEL_MODELS='{served}' ([model] model_models in a --config-file) serves "
        "it in pumpflow run and pumpflow serve model"
    )
    return 0
