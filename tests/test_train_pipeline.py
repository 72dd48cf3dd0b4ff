"""`pumpflow train` end to end on a small simulated market: dataset file or Postgres in,
ONNX with its card out, ONNX predictions equal to native ones, the same bytes every time
(the shipped default model is rebuilt the same way: ``pumpflow train --default``)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex

import numpy as np
import pytest

from pumpflow.cli import main as cli_main
from pumpflow.cli.train import (
    DEFAULT_SIM_START,
    DEFAULT_SKIP_MINUTES,
    _dataset,
    build_default,
    database_events,
    dataset_file_events,
    files_dataset,
)
from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import ModelManager, encode_card, prepare_inputs, read_model
from pumpflow.common.model.labels import DEFAULT_CLASSIFICATION
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.training import TrainConfig, split_by_time, train
from pumpflow.simulator.dataset import load_dataset, write_dataset
from pumpflow.simulator.market import Market, MarketConfig

START = 1_767_225_600.0
MINUTES = 5.0


@pytest.fixture(scope="module")
def market_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "market.jsonl"
    write_dataset(Market(MarketConfig(seed=21)), path, duration_s=MINUTES * 60.0, start_epoch=START)
    return path


def train_command(market_file, out) -> list[str]:
    return [
        "train",
        "--dataset",
        str(market_file),
        "--trees",
        "25",
        "--seed",
        "3",
        "--created-at",
        "2026-01-01T00:00:00Z",
        "--out",
        str(out),
    ]


def test_train_from_a_dataset_file_gives_onnx_equal_to_native(market_file, tmp_path, capsys):
    out = tmp_path / "a" / "entry.onnx"
    assert cli_main.main(train_command(market_file, out)) == 0
    printed = capsys.readouterr().out
    assert "ONNX and native agree" in printed and "baseline auc" in printed
    model, card = read_model(out)
    assert card.feature_set_version == FeatureManager().version
    assert card.label == DEFAULT_CLASSIFICATION
    assert card.training.end < card.training.start + MINUTES * 60.0
    # the held-out rows start after every training label's horizon: split by time
    assert card.training.end + card.label.horizon_s <= START + MINUTES * 60.0
    assert 0.0 < card.held_out.model["auc"] <= 1.0 and "auc" in card.held_out.baseline

    # independently: the served ONNX model against the native model refitted the same way
    dataset = files_dataset([str(market_file)], DEFAULT_CLASSIFICATION, progress=False)
    trained = train(dataset, TrainConfig(n_estimators=25, seed=3), created_at=card.created_at)
    # trained again: the same bytes, model and card
    assert trained.model == model
    assert encode_card(trained.card) == out.with_name("entry.card.json").read_bytes()
    _, held_out = split_by_time(dataset, 0.3)
    rows = held_out.features.copy()
    rows[::7, 3] = np.nan  # missing values take the branch training sent them down
    rows[::11, 5] = np.inf
    manager = ModelManager(None, FeatureManager(), clock=ReplayClock(card.created_at))
    manager.load_model("entry", out, "classification")
    served = manager.predict_batch("entry", rows)
    native = trained.native.predict_proba(prepare_inputs(rows))[:, 1]
    np.testing.assert_allclose(served, native, rtol=0, atol=1e-5)
    assert served.std() > 0.01  # it discriminates


def _hinted_backtest(printed: str) -> list[str]:
    """The backtest command of train's "use it:" line, as a shell would split it."""
    [use] = [line for line in printed.splitlines() if line.startswith("use it:")]
    return shlex.split(use.removeprefix("use it: pumpflow ").partition(" compares")[0])


def test_train_says_how_to_use_the_model_and_that_works(tmp_path, capsys):
    out = tmp_path / "mine.onnx"
    argv = ["train", "--sim-seeds", "21", "--sim-minutes", "4", "--held-out-seeds", "22",
            "--trees", "5", "--out", str(out)]  # fmt: skip
    assert cli_main.main(argv) == 0
    printed = capsys.readouterr().out
    served = json.dumps({"entry": str(out)}, separators=(",", ":"))
    assert f"PUMPFLOW_MODEL_MODELS='{served}'" in printed
    # one seed each, said as one
    assert "(simulator seed 21, 4 min)\n" in printed
    assert "(simulator seed 22, 4 min)\n" in printed
    # the command as printed, on the market it was held out on: the shipped model and
    # this one, on the same settings
    command = _hinted_backtest(printed)
    assert command[:5] == ["backtest", "--seed", "22", "--minutes", "4"]
    assert f"mine=model_models={served}" in command
    report = tmp_path / "r.html"
    assert cli_main.main([*command, "--quiet", "--json", "-", "--report", str(report)]) == 0
    shipped, mine = json.loads(capsys.readouterr().out)["configurations"]
    assert (shipped["name"], mine["name"]) == ("shipped", "mine")
    assert mine["settings"] == {"model_models": {"entry": str(out)}} and not shipped["settings"]
    assert shipped["results"]["predictions"] > 0 and mine["results"]["predictions"] > 0


@pytest.mark.parametrize("where", [["--out", "/proc/nonexistent/m.onnx"],
                                   ["--registry", "/proc/nonexistent"]])  # fmt: skip
def test_a_model_that_cannot_be_written_is_refused_before_the_history_is_read(where, capsys):
    """Training takes minutes on a long history: its model must not be lost at the end."""
    argv = ["train", "--dataset", "/nonexistent/market.jsonl", *where]
    assert cli_main.main(argv) == 1
    assert "pumpflow train: /proc/nonexistent: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (["--dataset", "/nonexistent/market.jsonl", "--start", "2030-01-01"],
         "--start: not for --dataset"),
        (["--sim-seeds", "4", "--end", "2030-01-01", "--schema", "live"],
         "--schema, --end: not for --sim-seeds"),
        # held out what it trained on: in-sample figures, and a backtest hint on it
        (["--sim-seeds", "4-6", "--held-out-seeds", "6,7"],
         "--held-out-seeds 6: trained on too (--sim-seeds): the held-out figures would be "
         "of rows the model learned"),
        (["--dataset", "/data/market.jsonl", "--held-out-dataset", "/data/../data/market.jsonl"],
         "--held-out-dataset /data/../data/market.jsonl: trained on too (--dataset): the "
         "held-out figures would be of rows the model learned"),
    ],
)  # fmt: skip
def test_a_source_the_model_would_not_train_as_asked_is_refused(given, said, tmp_path, capsys):
    """A window of Postgres history given with another source, ignored, would have the
    model say it trained on the whole file or market (backtest refuses these flags
    alike); a held-out source it trained on would make its held-out figures in-sample."""
    out = tmp_path / "m.onnx"
    assert cli_main.main(["train", *given, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"pumpflow train: {said}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("sources", "stream"),
    [
        (["--sim-seeds", "3,8", "--sim-minutes", "6"], ["--seed", "9", "--minutes", "6"]),
        # the shipped model trained on seeds 1-3: a comparison on them would favour it
        (["--sim-seeds", "1,2"], ["--seed", "4", "--minutes", "10"]),
        (["--sim-seeds", "5", "--held-out-seeds", "2"], ["--seed", "6", "--minutes", "10"]),
        (["--dataset", "{market}", "--held-out-dataset", "{later}"], ["--dataset", "{later}"]),
        (["--dataset", "{market}"], ["--dataset", "FILE.jsonl"]),
        # Postgres history up to --end: what was recorded after it
        (["--schema", "live", "--end", "2026-12-01T00:00:00"],
         ["--schema", "live", "--start", "2026-12-01T00:00:00Z"]),
        (["--end", "1764547200"], ["--start", "2025-12-01T00:00:00Z"]),
        (["--dsn", "postgresql://db/x", "--end", "1764547200"],
         ["--dsn", "DSN", "--start", "2025-12-01T00:00:00Z"]),
        (["--start", "1764547200"], ["--dataset", "FILE.jsonl"]),
    ],
)  # fmt: skip
def test_train_s_hint_backtests_on_a_stream_the_model_did_not_train_on(sources, stream):
    """A backtest without a stream replays Postgres history, which a model trained on
    the simulator or a file has not got: the hint names one (a placeholder when train
    knows none)."""
    from pumpflow.cli.train import unseen_stream

    parser = cli_main.build_parser()
    files = {"market": "/data/market.jsonl", "later": "/data/later.jsonl"}
    args = parser.parse_args(["train", *(s.format(**files) for s in sources)])
    assert unseen_stream(args) == [s.format(**files) for s in stream]


def test_a_regression_model_of_the_net_return_is_trained_and_served(market_file, tmp_path):
    out = tmp_path / "ret.onnx"
    command = train_command(market_file, out)
    assert cli_main.main([*command, "--task", "regression", "--trees", "15"]) == 0
    _, card = read_model(out)
    assert card.task == "regression" and card.label.kind == "net_return"
    assert set(card.held_out.model) == {"rmse", "mae"} and "rmse" in card.held_out.baseline
    manager = ModelManager(None, FeatureManager(), clock=ReplayClock(card.created_at))
    manager.load_model("ret", out, "regression")
    rows = files_dataset([str(market_file)], card.label, progress=False).features[:50]
    assert np.isfinite(manager.predict_batch("ret", rows)).all()


def test_the_first_minutes_of_a_market_are_dropped_from_the_rows_not_from_the_labels(
    market_file, tmp_path
):
    full = files_dataset([str(market_file)], DEFAULT_CLASSIFICATION, progress=False)
    skipped = files_dataset(
        [str(market_file)], DEFAULT_CLASSIFICATION, progress=False, skip_minutes=1.0
    )
    first = min(e.time for e in dataset_file_events(market_file))
    kept = full.time >= first + 60.0
    assert 0 < len(skipped) == kept.sum() < len(full)
    # the rows kept are those of the whole stream: features from each token's launch,
    # labels looking ahead as before
    np.testing.assert_array_equal(skipped.features, full.features[kept])
    np.testing.assert_array_equal(skipped.labels, full.labels[kept])
    np.testing.assert_array_equal(skipped.time, full.time[kept])
    # tokens launched in the minutes dropped that trade on after them are kept, with
    # their launch
    assert skipped.launch.min() < first + 60.0 < skipped.time.min() + 1e-9

    # held out on another market, its first minute dropped too
    other = tmp_path / "other.jsonl"
    write_dataset(Market(MarketConfig(seed=22)), other, duration_s=180.0, start_epoch=START)
    out = tmp_path / "steady.onnx"
    command = [*train_command(market_file, out), "--held-out-dataset", str(other)]
    assert cli_main.main([*command, "--skip-minutes", "1"]) == 0
    _, card = read_model(out)
    # the reference is the training rows': none of the minutes dropped
    assert card.training.start >= first + 60.0 and card.training.rows == len(skipped)
    held_out = files_dataset([str(other)], card.label, progress=False)
    other_first = min(e.time for e in dataset_file_events(other))
    assert card.held_out.rows == (held_out.time >= other_first + 60.0).sum() < len(held_out)


def test_history_too_short_for_the_labels_horizon_is_refused_saying_so(market_file, capsys):
    """A recording of a simulator served faster than real time is such a history: its
    arrival times span a fraction of the market's."""
    argv = train_command(market_file, "/tmp/never.onnx")
    assert cli_main.main([*argv, "--horizon", "280"]) == 1
    said = capsys.readouterr().err
    assert said.startswith("pumpflow train: 0 training rows and ")
    assert re.search(
        r"the history spans 29\d s of event time, and a training row's label \(280 s ahead\) "
        r"must end before the held-out tokens launch",
        said,
    )


def test_a_skip_of_every_minute_of_a_simulated_market_is_refused():
    with pytest.raises(SystemExit, match="drops every row"):
        cli_main.main(["train", "--sim-seeds", "1", "--sim-minutes", "2", "--skip-minutes", "2"])


def test_a_source_with_no_held_out_row_gets_no_held_out_figures(tmp_path, capsys):
    """Markets simulated one after the other: the last launched tokens, held out, are all
    the second market's, and the first has no held-out figure to give."""
    out = tmp_path / "two.onnx"
    argv = ["train", "--sim-seeds", "1,2", "--sim-minutes", "3", "--trees", "5"]
    assert cli_main.main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "nan" not in captured.out and "RuntimeWarning" not in captured.err
    _, card = read_model(out)
    assert list(card.held_out.by_part) == ["simulator seed 2"]


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        # an empty range would leave no seed, and the history would come from Postgres
        ("--sim-seeds", "5-3", "no seed in '5-3'"),
        ("--sim-seeds", "x", "seeds as 1,2,5-7, not 'x'"),
        ("--held-out-seeds", "2,,3", "seeds as 1,2,5-7, not '2,,3'"),
        ("--created-at", "yesterday", "an epoch time or an ISO date, not 'yesterday'"),
    ],
)
def test_a_flag_that_names_no_seed_or_time_is_refused_in_words(flag, value, said, capsys):
    with pytest.raises(SystemExit) as refused:
        cli_main.main(["train", "--out", "/nonexistent/m.onnx", flag, value])
    assert refused.value.code == 2
    assert f"argument {flag}: {said}" in capsys.readouterr().err


@pytest.mark.slow
def test_the_shipped_default_model_is_rebuilt_byte_for_byte_from_steady_markets(tmp_path):
    path, trained = build_default(tmp_path / "entry.onnx")
    assert path.read_bytes() == DEFAULT_MODEL_PATH.read_bytes()
    card_file = DEFAULT_MODEL_PATH.with_name("entry.card.json")
    assert path.with_name("entry.card.json").read_bytes() == card_file.read_bytes()
    # no row of a market's first minutes, where every token is young, trained on or in
    # the reference the drift monitor compares a running market with
    assert trained.card.training.start >= DEFAULT_SIM_START + DEFAULT_SKIP_MINUTES * 60.0
    assert f"minutes {DEFAULT_SKIP_MINUTES:g}-" in trained.card.held_out.source


@pytest.mark.postgres
async def test_a_postgres_window_with_no_event_is_named_not_taken_for_an_empty_history(
    market_file, pg_pool, postgres_dsn, namespace, capsys
):
    from pumpflow.common.storage import TokenEventStore

    await load_dataset(market_file, TokenEventStore(pg_pool))
    argv = ["train", "--dsn", postgres_dsn, "--schema", namespace, "--start", "2020-01-01",
            "--end", "2020-01-02", "--out", str(market_file.with_name("m.onnx"))]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        await asyncio.to_thread(cli_main.main, argv)
    assert str(refused.value) == (
        f"pumpflow train: no token events in postgres {namespace}, "
        "from 2020-01-01 00:00:00 UTC to 2020-01-02 00:00:00 UTC"
    )


@pytest.mark.postgres
async def test_postgres_history_through_the_database_feed_gives_the_same_rows(
    market_file, pg_pool, postgres_dsn, namespace
):
    from pumpflow.common.storage import TokenEventStore

    await load_dataset(market_file, TokenEventStore(pg_pool))
    from_db = _dataset(
        await database_events(postgres_dsn, namespace, None, None),
        DEFAULT_CLASSIFICATION,
        data_end=None,
        source="postgres",
        progress=False,
    )
    from_file = _dataset(
        dataset_file_events(market_file),
        DEFAULT_CLASSIFICATION,
        data_end=None,
        source="file",
        progress=False,
    )
    assert from_db.mints == from_file.mints
    np.testing.assert_array_equal(from_db.features, from_file.features)
    np.testing.assert_array_equal(from_db.labels, from_file.labels)
