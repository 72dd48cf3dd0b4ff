"""``pumpflow backtest``: the same stream gives the same decisions, from a seed, a
dataset file or Postgres, and configurations are compared side by side."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from html import escape
from pathlib import Path

import pytest

from pumpflow.cli.backtest import (
    RUN_CONFIG,
    ProgressBar,
    ProgressBoard,
    ProgressLine,
    Report,
    database_frames,
    dataset_frames,
    grid_configs,
    parse_grid,
    progress_for,
    run_backtest,
    run_configuration,
    simulated_frames,
)
from pumpflow.cli.main import main
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import eventually
from pumpflow.feed import socket_feed
from pumpflow.simulator.cli import main as sim_main
from pumpflow.simulator.dataset import load_dataset

SEED = 6
#: two market minutes of seed 6: about 1,100 frames, 750 predictions, two entries
MINUTES = 2.0
START = 1_700_000_000.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("backtest") / "market.jsonl"
    argv = ["dataset", "--seed", str(SEED), "--minutes", str(MINUTES), "--out", str(path),
            "--start-epoch", str(START)]  # fmt: skip
    assert sim_main(argv) == 0
    return str(path)


async def test_a_backtest_of_the_same_stream_decides_the_same_twice():
    frames = simulated_frames(SEED, MINUTES, start=START)
    progress: list[tuple[int, int]] = []
    first = await run_backtest(frames, RUN_CONFIG, progress=lambda d, t: progress.append((d, t)))
    second = await run_backtest(frames, RUN_CONFIG)
    assert first.results() == second.results()
    # the stream went through every stage: predictions, orders, fills, a book
    assert first.frames == len(frames)
    assert first.predictions > 0
    assert first.orders["requested", "buy"] > 0
    assert first.entries == first.orders["filled", "buy"] > 0
    assert first.bought_sol > 0
    assert progress[-1] == (len(frames), len(frames))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert "PnL after fees" in first.text()


class _Crawling:
    """The wall clock of a machine so slow that a minute passes between two readings."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        self.now += 60.0
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


async def test_a_slow_replay_passes_on_the_trades_of_a_token_the_feed_unsubscribed(monkeypatch):
    # a token of the stream's first second goes quiet; once activity found it inactive
    # and had the feed unsubscribe it, it trades again: within the feed's grace (10 s)
    # of the market clock, and after it. The market passes on the first trade and
    # keeps out the second on a machine slower than any
    frames = simulated_frames(SEED, MINUTES, start=START)
    decoded = [json.loads(frame) for _, frame in frames]
    mint = decoded[0]["mint"]
    trades = [d for d in decoded if d.get("txType") in ("buy", "sell")]
    other = next(d for d in reversed(trades) if d["mint"] != mint)
    again = next(d for d in reversed(trades) if d["mint"] == mint)

    def frame(at: float, trade: dict, label: str) -> tuple[float, bytes]:
        return at, json.dumps({**trade, "signature": label * 4 + trade["signature"][4:]}).encode()

    unsubscribed: list[float] = []

    async def command(event) -> None:
        if event.type == "feed.subscription" and mint in event.data.mints:
            unsubscribed.append(event.time)

    await run_backtest([*frames, frame(frames[-1][0] + 1200.0, other, "Y")], RUN_CONFIG,
                       observe=command)  # fmt: skip
    assert len(unsubscribed) == 1
    monkeypatch.setattr(socket_feed, "time", _Crawling())
    seen: list[tuple[str, str]] = []

    async def observe(event) -> None:
        if event.type in ("token.trade", "token.lifecycle") and event.data.mint == mint:
            seen.append((event.type, getattr(event.data, "signature", "")[:4]))

    returns = [frame(unsubscribed[0] + 5.0, again, "Z"), frame(unsubscribed[0] + 30.0, again, "X")]
    await run_backtest([*frames, *returns], RUN_CONFIG, observe=observe)
    assert ("token.lifecycle", "") in seen
    assert seen[-1] == ("token.trade", "ZZZZ")


async def test_a_dataset_file_replays_as_the_market_it_was_written_from(dataset):
    from_file = await run_backtest(dataset_frames(dataset), RUN_CONFIG)
    simulated = await run_backtest(simulated_frames(SEED, MINUTES, start=START), RUN_CONFIG)
    assert from_file.results() == simulated.results()
    assert from_file.entries > 0


def test_a_dataset_file_out_of_time_order_replays_in_time_order(dataset, tmp_path):
    """Two dataset files joined later one first (``cat late.jsonl early.jsonl``) are the
    market Postgres would replay from them: frames in arrival order, not a stuck clock
    running the earlier file's frames at the later one's end."""
    lines = Path(dataset).read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_bytes(b"".join(lines[half:] + lines[:half]))
    frames = dataset_frames(str(swapped))
    assert frames == dataset_frames(dataset)
    assert [t for t, _ in frames] == sorted(t for t, _ in frames)


def test_a_dataset_is_written_with_the_launch_rate_a_backtest_simulates(tmp_path):
    """``--launches`` says the same in ``pumpflow sim dataset`` as in ``pumpflow backtest``."""
    path = tmp_path / "busy.jsonl"
    argv = ["sim", "dataset", "--seed", str(SEED), "--minutes", "0.5", "--launches", "90",
            "--out", str(path), "--start-epoch", str(START)]  # fmt: skip
    assert main(argv) == 0
    simulated = simulated_frames(SEED, 0.5, launches_per_minute=90, start=START)
    assert dataset_frames(str(path)) == simulated
    assert simulated != simulated_frames(SEED, 0.5, start=START)


async def test_frames_recorded_in_postgres_are_the_dataset_s(dataset, pg_pool, postgres_dsn,
                                                             namespace):  # fmt: skip
    await load_dataset(dataset, TokenEventStore(pg_pool))
    recorded = await database_frames(postgres_dsn, namespace, None, None)
    assert sorted(recorded) == sorted(dataset_frames(dataset))


def test_a_postgres_window_is_in_its_source():
    """Two windows of one schema are two streams: their reports and documents tell them
    apart."""
    from pumpflow.common.runtime.arguments import postgres_source

    assert postgres_source("live", None, None) == "postgres live"
    assert postgres_source("live", START, None) == "postgres live, from 2023-11-14 22:13:20 UTC"
    assert postgres_source("live", START, START + 3600) == (
        "postgres live, from 2023-11-14 22:13:20 UTC to 2023-11-14 23:13:20 UTC"
    )
    assert postgres_source("live", None, START) == "postgres live, to 2023-11-14 22:13:20 UTC"


@pytest.mark.parametrize("command", [["backtest", "--quiet"], ["train"], ["replay"]])
def test_a_window_that_ends_before_it_starts_is_refused_not_replayed_empty(command, capsys):
    """Alike by every command reading a Postgres window: run, it reads as an empty history."""
    said = refused([*command, "--start", str(START + 60), "--end", str(START)], capsys)
    assert said == (
        f"pumpflow {command[0]}: --end (2023-11-14 22:13:20 UTC) is not after --start "
        "(2023-11-14 22:14:20 UTC): the window holds nothing to replay\n"
    )


def refused(argv: list[str], capsys) -> str:
    """What ``pumpflow`` says on stderr refusing ``argv`` as bad input: with status 2 and
    before anything ran (nothing on stdout)."""
    assert main(argv) == 2
    said = capsys.readouterr()
    assert said.out == ""
    return said.err


EAGER = "eager=trading_min_score=0.5,trading_reject_creator_sold=false"


STRICT = "strict=trading_min_score=0.6,trading_reject_creator_sold=true"
#: takes half at +10%: sells within two market minutes, where the base holds
LADDER = "ladder=exit_take_profit=[[0.1,0.5]]"


def test_two_configurations_run_on_the_same_stream_in_one_table(dataset, tmp_path, capsys):
    results = tmp_path / "results.json"
    status = main([
        "backtest", "--dataset", dataset, "--quiet", "--config", "base", "--config", STRICT,
        "--json", str(results),
    ])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "backtest 'base'" in out and "backtest 'strict'" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows] == ["config", "base", "strict"]
    # the base (pumpflow run's settings) enters; the service's defaults (score 0.6 and the
    # creator-sold filter) do not here
    base, strict = rows[1].split("|"), rows[2].split("|")
    assert int(base[3]) > 0
    assert int(strict[3]) == 0
    # the same, for machines: the base, and each configuration what it changes over it
    document = json.loads(results.read_text())
    assert document["source"] == dataset
    assert document["base"] == RUN_CONFIG
    configs = {c["name"]: c for c in document["configurations"]}
    assert list(configs) == ["base", "strict"]
    assert configs["base"]["settings"] == {}
    assert configs["strict"]["settings"] == {
        "trading_min_score": 0.6, "trading_reject_creator_sold": True
    }  # fmt: skip
    base_results, strict_results = configs["base"]["results"], configs["strict"]["results"]
    assert base_results["entries"] == base_results["orders"]["buy"]["filled"] == int(base[3])
    assert base_results["bought_sol"] > 0
    assert strict_results["entries"] == strict_results["orders"]["buy"]["requested"] == 0
    assert strict_results["entries_skipped"]["creator sold"] > 0
    assert "creator sold" not in base_results["entries_skipped"]
    # one stream: both saw the same frames and the model scored the same
    assert base_results["frames"] == strict_results["frames"] == document["frames"]
    assert base_results["predictions"] == strict_results["predictions"] > 0
    # the text says why a configuration did not enter, as the document does
    said = out.split("backtest 'strict'")[1].split("\n| ")[0]
    assert f"creator sold x{strict_results['entries_skipped']['creator sold']}" in said
    assert "breakers tripped: none" in said


def test_a_configuration_without_settings_is_the_plain_backtest(dataset, tmp_path):
    """Every configuration lays its settings over the plain backtest's: one that sets
    nothing gives its results, so a comparison's differences are the settings changed."""
    plain, same = tmp_path / "plain.json", tmp_path / "same.json"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--json", str(plain)]) == 0
    assert main(["backtest", "--dataset", dataset, "--quiet", "--config", "same",
                 "--json", str(same)]) == 0  # fmt: skip
    (run,) = json.loads(plain.read_text())["configurations"]
    (alike,) = json.loads(same.read_text())["configurations"]
    assert run["results"]["entries"] > 0
    assert alike["results"] == run["results"]


def test_a_configuration_s_own_setting_wins_over_the_base(dataset, tmp_path):
    out = tmp_path / "results.json"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--config",
                 "careful=trading_reject_creator_sold=true", "--json", str(out)]) == 0  # fmt: skip
    (careful,) = json.loads(out.read_text())["configurations"]
    skipped = careful["results"]["entries_skipped"]
    # its own filter holds where the base (pumpflow run's) lets it go
    assert skipped["creator sold"] > 0
    # and the base's entry score where it sets none (the service's is 0.6)
    assert skipped["score # < 0.5"] > 0
    assert "score # < 0.6" not in skipped


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar_with_an_eta_and_a_pipe_plain_lines():
    terminal, pipe = Terminal(), io.StringIO()
    bar = progress_for("eager", every=0.0, out=terminal)
    lines = progress_for("eager", every=0.0, out=pipe)
    assert isinstance(bar, ProgressBar) and isinstance(lines, ProgressLine)
    for progress in (bar, lines):
        for done in (0, 500, 1_000):
            progress(done, 1_000)
        progress.close()
    drawn = terminal.getvalue()
    assert "\x1b[" in drawn  # drawn in place on the terminal
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert "eager" in shown and "1000/1000 frames" in shown
    assert re.search(r"ETA \d+:\d\d:\d\d", shown)
    assert pipe.getvalue().splitlines()[-1].startswith("eager: 1,000/1,000 frames (100%)")
    assert "ETA" in pipe.getvalue() and "\x1b[" not in pipe.getvalue()


def test_configurations_running_at_once_get_a_bar_each_together_or_lines_each():
    terminal, pipe = Terminal(), io.StringIO()
    bars = ProgressBoard(["eager", "patient", "waiting"], every=0.0, out=terminal)
    lines = ProgressBoard(["eager", "patient"], every=0.0, out=pipe)
    assert not bars.drawn
    for board in (bars, lines):
        for done in (0, 500, 1_000):
            board.progress["eager"](done, 1_000)
            board.progress["patient"](done // 2, 1_000)
    assert bars.drawn  # one display: a line written now would tear it
    bars.close()
    lines.close()
    assert not bars.drawn
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    assert "1000/1000 frames" in shown and "500/1000 frames" in shown
    assert "waiting" not in shown  # a configuration appears as it starts
    said = pipe.getvalue().splitlines()
    assert said[-2].startswith("eager: 1,000/1,000 frames (100%)")
    assert said[-1].startswith("patient: 500/1,000 frames (50%)")


@pytest.mark.parametrize("given", [[], ["--config", "longer=exit_max_hold_s=1200"]])
def test_the_environment_wins_over_the_base_s_trading_settings(dataset, monkeypatch, tmp_path,
                                                               given):  # fmt: skip
    """The base is ``pumpflow run``'s settings, which yield to the environment."""
    monkeypatch.setenv("PUMPFLOW_TRADING_REJECT_CREATOR_SOLD", "true")
    out = tmp_path / "results.json"
    assert main(["backtest", "--dataset", dataset, "--quiet", *given, "--json", str(out)]) == 0
    (config,) = json.loads(out.read_text())["configurations"]
    skipped = config["results"]["entries_skipped"]
    assert skipped["creator sold"] > 0  # the environment's
    assert skipped["score # < 0.5"] > 0  # the base's, which the environment leaves
    # the document says the base that ran, the environment's setting in it
    assert json.loads(out.read_text())["base"] == {
        "trading_min_score": 0.5, "trading_reject_creator_sold": True
    }  # fmt: skip


#: the settings of a live trader's environment; the API on a port nothing answers
LIVE_ENVIRONMENT = {
    "PUMPFLOW_TRADING_EXECUTOR": "live", "PUMPFLOW_TRADING_LIVE_ENABLED": "true",
    "PUMPPORTAL_API_KEY": "the-traders-key",
    "PUMPFLOW_TRADING_LIVE_WALLET": "So11111111111111111111111111111111111111112",
    "PUMPFLOW_TRADING_LIVE_URL": "http://127.0.0.1:9/api/trade",
}  # fmt: skip


def test_a_backtest_trades_on_paper_whatever_the_environment_says(dataset, monkeypatch,
                                                                  tmp_path, capsys):  # fmt: skip
    """A live trader's environment never sends a replayed stream's orders to the trade
    API (a recording's mints are real tokens): the backtest fills them on paper."""
    for name, value in LIVE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "results.json"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--json", str(out)]) == 0
    (config,) = json.loads(out.read_text())["configurations"]
    orders = config["results"]["orders"]
    assert orders["buy"]["filled"] > 0 and not orders["buy"]["rejected"], orders
    said = capsys.readouterr()
    assert "paper" in said.out and "PUMPFLOW_TRADING_EXECUTOR=live" in said.out, said.out
    assert "trade API" not in said.out + said.err


@pytest.mark.parametrize("setting", ["trading_executor=live", "trading_live_enabled=true"])
def test_a_configuration_that_asks_for_live_trading_is_refused(dataset, setting, capsys):
    assert main(["backtest", "--dataset", dataset, "--quiet", "--config", f"x={setting}"]) == 2
    assert "trades on paper" in capsys.readouterr().err


def test_a_simulated_stream_s_launch_rate_is_in_its_source(tmp_path, capsys):
    """Two rates of one seed are two streams: their reports and documents tell them apart."""
    argv = ["backtest", "--seed", str(SEED), "--minutes", "0.5", "--launches", "90", "--quiet",
            "--json", "-", "--report", str(tmp_path / "r.html")]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["source"] == f"seed {SEED}, 0.5 minutes, 90 launches a minute"


def test_json_to_stdout_is_the_document_alone(dataset, tmp_path, capsys):
    assert main(["backtest", "--dataset", dataset, "--quiet", "--json", "-",
                 "--report", str(tmp_path / "r.html")]) == 0  # fmt: skip
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # a machine reads stdout as it is
    assert [c["name"] for c in document["configurations"]] == ["run"]
    assert "backtest 'run'" in captured.err and "report 'run'" in captured.err


@pytest.mark.parametrize(
    ("configs", "document"),
    [(["--config", "eager"], "eager.json"),
     (["--config", "eager", "--config", "patient"], "eager-patient.json")],
)  # fmt: skip
def test_the_json_document_is_refused_where_a_report_saves_its_results(
    dataset, tmp_path, capsys, configs, document
):
    # each report saves its results beside it (.json): the document would be lost
    said = refused(["backtest", "--dataset", dataset, "--quiet", *configs, "--report",
                    str(tmp_path / "eager.html"), "--json", str(tmp_path / document)],
                   capsys)  # fmt: skip
    assert re.search(r"^pumpflow backtest: --json .* the results of the report", said)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("given", "flags"),
    [
        (["--minutes", "1"], "--minutes"),
        (["--launches", "60", "--minutes", "1"], "--minutes, --launches"),
        (["--start", "1700000000", "--schema", "x"], "--schema, --start"),
    ],
)
def test_a_flag_of_another_source_is_refused_not_ignored(dataset, given, flags, capsys):
    """--minutes with a dataset would replay all of it where a minute was asked."""
    said = refused(["backtest", "--dataset", dataset, "--quiet", *given], capsys)
    assert f"pumpflow backtest: {flags}: not for --dataset" in said


def test_a_configuration_s_json_value_keeps_its_commas():
    from pumpflow.cli.backtest import check_config, parse_config

    text = 'strict=trading_name_blocklist=["scam","rug, pull"],trading_min_score=0.5'
    name, settings = parse_config(text)
    assert (name, settings) == (
        "strict", {"trading_name_blocklist": '["scam","rug, pull"]', "trading_min_score": "0.5"}
    )  # fmt: skip
    check_config(name, settings)  # the list is taken as the setting's value
    assert parse_config('a=model_arms=[{"arm":"x","weight":1}]')[1] == {
        "model_arms": '[{"arm":"x","weight":1}]'
    }


def test_a_setting_given_twice_in_one_configuration_is_refused():
    """Which of the two it ran on would be the reader's guess."""
    from pumpflow.cli.backtest import parse_config

    with pytest.raises(ValueError, match="configuration 'a': trading_min_score given twice"):
        parse_config("a=trading_min_score=0.5,exit_max_hold_s=60,trading_min_score=0.7")


def test_a_setting_no_service_has_is_refused_naming_its_configuration(dataset, tmp_path, capsys):
    said = refused(["backtest", "--dataset", dataset, "--config", "good",
                    "--config", "typo=trading_min_scor=0.5"], capsys)  # fmt: skip
    assert "configuration 'typo': no setting 'trading_min_scor'" in said
    # a table of a file, a table in it taken for a setting
    (tmp_path / "strategies.toml").write_text("[good]\n[deep]\n[deep.exit]\nexit_max_hold_s = 1\n")
    said = refused(
        ["backtest", "--dataset", dataset, "--configs", str(tmp_path / "strategies.toml")], capsys
    )
    assert "configuration 'deep': no setting 'exit'" in said


@pytest.mark.parametrize("key", ["partitions", "transport", "service"])
def test_a_setting_the_backtest_sets_itself_is_refused(dataset, key, capsys):
    said = refused(["backtest", "--dataset", dataset, "--config", f"mine={key}=4"], capsys)
    assert f"configuration 'mine': {key!r} is the backtest's own" in said


@pytest.mark.parametrize("name", ["a/b", "../up", "comparison"])
def test_a_configuration_name_that_cannot_name_its_report_is_refused_before_any_runs(
    dataset, name, tmp_path, capsys
):
    """Its report's file is named after it: a run would end without it."""
    (tmp_path / "strategies.toml").write_text(f'["{name}"]\ntrading_min_score = 0.5\n')
    for given in (["--config", f"{name}=trading_min_score=0.5"],
                  ["--configs", str(tmp_path / "strategies.toml")]):  # fmt: skip
        said = refused(["backtest", "--dataset", dataset, "--quiet", "--config", "defaults",
                        *given, "--report", str(tmp_path / "r.html")], capsys)  # fmt: skip
        assert re.search(f"configuration {re.escape(repr(name))}: .*report", said)


def test_a_configuration_name_given_twice_is_refused_naming_it(dataset, tmp_path, capsys):
    """Among many, from flags and a file, the one to rename is the one named."""
    (tmp_path / "strategies.toml").write_text("[patient]\nexit_max_hold_s = 1200\n")
    said = refused(["backtest", "--dataset", dataset, "--quiet", "--config", "base",
                    "--config", "patient=exit_max_hold_s=900",
                    "--configs", str(tmp_path / "strategies.toml")], capsys)  # fmt: skip
    assert said == "pumpflow backtest: configuration 'patient' given twice: names must differ\n"


def test_a_bad_value_in_any_configuration_is_refused_before_the_first_runs(dataset, capsys):
    said = refused(["backtest", "--dataset", dataset, "--quiet", "--config", "loose",
                    "--config", "strict=trading_min_score=7"], capsys)  # fmt: skip
    assert re.search(r"configuration 'strict': .*TRADING_MIN_SCORE.*less than", said)


@pytest.mark.parametrize("where", ["--config", "--configs", "environment", "config file"])
def test_a_bad_value_is_refused_with_the_status_of_bad_input_wherever_it_is_given(
    dataset, tmp_path, monkeypatch, capsys, where
):
    """Status 2, as argparse refuses a bad flag and pumpflow a bad setting: a script
    tells a run it called wrongly from one that failed (1)."""
    argv = ["backtest", "--dataset", dataset, "--quiet"]
    if where == "--config":
        argv += ["--config", "strict=trading_min_score=7"]
    elif where == "--configs":
        (tmp_path / "strategies.toml").write_text("[strict]\ntrading_min_score = 7\n")
        argv += ["--configs", str(tmp_path / "strategies.toml")]
    elif where == "environment":
        monkeypatch.setenv("PUMPFLOW_TRADING_MIN_SCORE", "7")
    else:
        (tmp_path / "pumpflow.toml").write_text("[trading]\ntrading_min_score = 7\n")
        monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(tmp_path / "pumpflow.toml"))
    said = refused(argv, capsys)
    assert re.search(r"(?i)trading_min_score.*less than", said)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("exit_stop_loss=0", "EXIT_STOP_LOSS"),
        ("exit_stop_loss=1", "EXIT_STOP_LOSS"),
        ("exit_max_hold_s=0", "EXIT_MAX_HOLD_S"),
        ("exit_quiet_s=-1", "EXIT_QUIET_S"),
    ],
)
def test_an_exit_rule_its_rules_cannot_run_on_is_refused_before_the_first_runs(
    dataset, capsys, setting, named
):
    """Refused as a bad value (status 2, naming the setting), not a configuration that
    fails with a traceback once its system starts."""
    said = refused(["backtest", "--dataset", dataset, "--quiet", "--config",
                    f"bad={setting}"], capsys)  # fmt: skip
    assert re.search(rf"configuration 'bad': .*{named}", said)


def test_a_model_a_configuration_cannot_serve_is_refused_before_the_first_runs(
    dataset, tmp_path, capsys
):
    """The model service would refuse it at its start: after the configurations before
    it had run, their results lost."""
    missing = tmp_path / "mine.onnx"
    argv = ["backtest", "--dataset", dataset, "--quiet", "--config", "shipped",
            "--config", f'mine=model_models={{"entry":"{missing}"}}']  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out.count("backtest '") == 0  # no configuration ran
    assert (
        f"pumpflow backtest: configuration 'mine': the models of the settings (model_models, "
        f"model_arms) cannot be served: model 'entry': cannot read {missing}: "
        "No such file or directory"
    ) in captured.err


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (None, "No such file or directory"),
        (
            "[eager\n",
            "not TOML (Expected ']' at the end of a table declaration (at line 1, column 7))",
        ),
        ("eager = 1\n", "'eager' is not a table of settings"),
        # a file of no configuration would run the base alone, as if none were given
        ("# [eager]\n", "no configuration: a table each ([patient] then exit_max_hold_s = 1200)"),
    ],
)
def test_a_configurations_file_it_cannot_read_is_named_in_one_line(dataset, tmp_path, text,
                                                                    said, capsys):  # fmt: skip
    path = tmp_path / "strategies.toml"
    if text is not None:
        path.write_text(text)
    assert refused(["backtest", "--dataset", dataset, "--quiet", "--configs", str(path)],
                   capsys) == f"pumpflow backtest: {path}: {said}\n"  # fmt: skip


def test_configurations_from_a_toml_file_join_the_table(dataset, tmp_path, capsys):
    configs = tmp_path / "strategies.toml"
    configs.write_text(
        "[eager]\ntrading_min_score = 0.5\ntrading_reject_creator_sold = false\n\n"
        "[patient]\ntrading_min_score = 0.5\ntrading_reject_creator_sold = false\n"
        "exit_max_hold_s = 1200\n"
    )
    assert main(["backtest", "--dataset", dataset, "--quiet", "--configs", str(configs),
                 "--config", "defaults"]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "config", "defaults", "eager", "patient"
    ]  # fmt: skip


async def test_each_configuration_measures_live_precision_where_its_trading_enters():
    """The model reads trading's entry score: a configuration's precision is at its own."""
    frames = simulated_frames(SEED, 4.0, start=START)
    for min_score in (0.45, 0.7):
        result = await run_backtest(frames, {**RUN_CONFIG, "trading_min_score": min_score})
        assert result.precision, "no label released to measure at"
        assert {t for _, t in result.precision.values()} == {min_score}


async def test_each_arm_s_predictions_are_counted_with_the_version_that_made_them():
    """An A/B comparison reads each arm's share of the predictions beside its figures."""
    import json

    from pumpflow.common.model import read_model
    from pumpflow.model import DEFAULT_MODEL_PATH

    version = read_model(DEFAULT_MODEL_PATH)[1].version
    arms = [{"name": "control", "model_id": "entry"}, {"name": "twin", "model_id": "twin"}]
    config = {
        **RUN_CONFIG,
        "model_models": json.dumps(
            {"entry": str(DEFAULT_MODEL_PATH), "twin": str(DEFAULT_MODEL_PATH)}
        ),
        "model_arms": json.dumps(arms),
    }
    result = await run_backtest(simulated_frames(SEED, MINUTES, start=START), config)
    models = result.results()["models"]
    control, twin = models["entry/control"], models["twin/twin"]
    assert control["predictions"] > 0 and twin["predictions"] > 0
    assert control["predictions"] + twin["predictions"] == result.predictions
    assert control["versions"] == twin["versions"] == [version]
    assert (
        f"  predictions {result.predictions:,}: entry/control {control['predictions']:,} "
        f"(version {version}), twin/twin {twin['predictions']:,} (version {version}); live AUC"
    ) in result.text()


async def test_each_arm_s_entries_and_pnl_are_those_of_the_positions_its_scores_opened():
    """Promote or roll back is a question of money: each position is the arm's whose live
    prediction ordered its entry, and the arms' figures add up to the run's."""
    import json

    from pumpflow.common.model.arms import Arm, ArmTable
    from pumpflow.model import DEFAULT_MODEL_PATH

    arms = [{"name": "control", "model_id": "entry"}, {"name": "twin", "model_id": "twin"}]
    config = {
        **RUN_CONFIG,
        "model_models": json.dumps(
            {"entry": str(DEFAULT_MODEL_PATH), "twin": str(DEFAULT_MODEL_PATH)}
        ),
        "model_arms": json.dumps(arms),
    }
    result = await run_backtest(simulated_frames(SEED, 6.0, start=START), config)
    table = ArmTable(Arm(**arm) for arm in arms)
    trades = result.report_data.trades
    assert trades and {t.arm for t in trades} == {"entry/control", "twin/twin"}
    for trade in trades:
        arm = table.live_arm(trade.mint)
        assert trade.arm == f"{arm.model_id}/{arm.name}"
    by_arm = result.results()["pnl_by_arm"]
    assert sum(a["entries"] for a in by_arm.values()) == result.entries
    assert sum(a["realized_sol"] for a in by_arm.values()) == pytest.approx(result.realized_sol)
    assert sum(a["unrealized_sol"] for a in by_arm.values()) == pytest.approx(result.unrealized_sol)
    control = by_arm["entry/control"]
    assert (
        f"  by arm: entry/control {control['entries']} entries, realised "
        f"{control['realized_sol']:+.4f} SOL, open marked {control['unrealized_sol']:+.4f}"
    ) in result.text()


def test_the_reasons_for_no_order_say_a_prediction_counts_under_each_of_its_own():
    """A prediction refused for its score and its traders counts under both: the counts
    add up to more than the predictions, which the line must not leave to a guess."""
    from pumpflow.cli.console import no_order_line

    assert no_order_line({"score # < 0.5": 3, "creator sold": 2}) == (
        "predictions without an order, by reason (each under every reason it had): "
        "score # < 0.5 x3; creator sold x2"
    )


def test_the_table_names_the_arms_of_a_configuration_with_several():
    """Two arms' live figures side by side: which is which is the comparison."""
    from collections import Counter

    from pumpflow.cli.backtest import Report, comparison_table

    def report(name: str, auc: dict, precision: dict) -> Report:
        return Report(
            name=name, frames=10, seconds=1.0, cpu_s=1.0, predictions=9, orders=Counter(),
            entries=0, bought_sol=0.0, realized_sol=0.0, unrealized_sol=0.0, open_positions=0,
            closed_positions=0, wins=0, fees_sol=0.0, max_drawdown_sol=0.0, auc=auc,
            precision=precision,
        )  # fmt: skip

    ab = report("ab", {"entry/entry": (0.61, 40), "alt/alt": (0.58, 40)},
                {"entry/entry": (0.5, 0.5), "alt/alt": (0.25, 0.5)})  # fmt: skip
    one = report("one", {"entry/control": (0.7, 40)}, {"entry/control": (0.4, 0.5)})
    rows = comparison_table([ab, one]).splitlines()
    assert rows[2].endswith(
        "| entry/entry 0.610, alt/alt 0.580 | entry/entry 0.500, alt/alt 0.250 |"
    )
    assert rows[3].endswith("| 0.700 | 0.400 |")


def test_exits_by_rule_read_as_the_table_has_them():
    from collections import Counter

    from pumpflow.cli.backtest import Report, comparison_table

    report = Report(
        name="run", frames=10, seconds=1.0, cpu_s=1.0, predictions=0, orders=Counter(),
        entries=3, bought_sol=1.0, realized_sol=0.0, unrealized_sol=0.0, open_positions=0,
        closed_positions=3, wins=1, fees_sol=0.0, max_drawdown_sol=0.0,
        exits=Counter({"trailing_stop": 2, "stop_loss": 1}),
    )  # fmt: skip
    assert "  exits by rule: stop_loss 1, trailing_stop 2\n" in report.text()
    assert "| stop_loss 1, trailing_stop 2 |" in comparison_table([report])


def test_orders_without_an_outcome_at_the_streams_end_are_counted_in_flight():
    from collections import Counter

    from pumpflow.cli.backtest import Report

    orders = Counter({("requested", "buy"): 6, ("filled", "buy"): 5, ("requested", "sell"): 3,
                      ("filled", "sell"): 2, ("rejected", "sell"): 1})  # fmt: skip
    report = Report(
        name="run", frames=10, seconds=1.0, cpu_s=1.0, predictions=0, orders=orders, entries=5,
        bought_sol=1.0, realized_sol=0.0, unrealized_sol=0.0, open_positions=5,
        closed_positions=0, wins=0, fees_sol=0.0, max_drawdown_sol=0.0,
    )  # fmt: skip
    assert "buy 6 (filled 5, rejected 0, 1 in flight at the end)" in report.text()
    assert "sell 3 (filled 2, rejected 1)\n" in report.text()
    assert report.results()["orders"]["buy"]["in_flight"] == 1
    assert report.results()["orders"]["sell"]["in_flight"] == 0


def test_an_undefined_live_figure_reads_n_a_not_nan():
    from collections import Counter

    from pumpflow.cli.backtest import Report, comparison_table

    report = Report(
        name="run", frames=10, seconds=1.0, cpu_s=1.0, predictions=9, orders=Counter(),
        entries=0, bought_sol=0.0, realized_sol=0.0, unrealized_sol=0.0, open_positions=0,
        closed_positions=0, wins=0, fees_sol=0.0, max_drawdown_sol=0.0,
        auc={"entry/control": (float("nan"), 3)},
        precision={"entry/control": (float("nan"), 0.5)},
    )  # fmt: skip
    text = report.text()
    assert "live AUC entry/control n/a (3 labels)" in text
    assert "precision entry/control n/a (score >= 0.50)" in text
    assert "nan" not in text and "nan" not in comparison_table([report])


async def test_the_live_figures_are_of_every_label_of_the_stream_not_the_live_window(
    monkeypatch,
):
    """A running model's live window keeps its newest labels (2,000: minutes of a busy
    market); a backtest compares models on the labels of its whole stream."""
    from functools import partial

    from pumpflow.common.model.performance import RollingPerformance
    from pumpflow.model import service as model_service

    frames = simulated_frames(SEED, 4.0, start=START)
    whole = await run_backtest(frames, RUN_CONFIG)
    ((arm, (auc, labels)),) = whole.auc.items()
    assert 50 < labels < 2000
    monkeypatch.setattr(model_service, "RollingPerformance", partial(RollingPerformance, window=50))
    windowed = await run_backtest(frames, RUN_CONFIG)
    assert windowed.auc == {arm: (auc, labels)}
    assert windowed.selected == whole.selected and windowed.precision == whole.precision
    assert windowed.report_data.calibration == whole.report_data.calibration


async def test_a_live_precision_says_how_many_labels_it_is_of():
    """A precision of 1.000 over one selected label is no precision of 1.000 over a hundred."""
    frames = simulated_frames(SEED, 4.0, start=START)
    result = await run_backtest(frames, {**RUN_CONFIG, "trading_min_score": 0.45})
    ((arm, (precision, threshold)),) = result.precision.items()
    selected, labels = result.selected[arm]
    assert labels == result.auc[arm][1] and 0 < selected <= labels
    assert (
        f"precision {arm} {precision:.3f} ({selected:,} of {labels:,} labels scored >= "
        f"{threshold:.2f})"
    ) in result.text()
    figures = result.results()["models"][arm]
    assert (figures["selected"], figures["labels"]) == (selected, labels)


def test_open_positions_no_trade_has_marked_are_said_to_be_left_out_of_the_pnl():
    from collections import Counter

    from pumpflow.cli.backtest import Report, comparison_table

    report = Report(
        name="run", frames=10, seconds=1.0, cpu_s=1.0, predictions=0, orders=Counter(),
        entries=3, bought_sol=1.0, realized_sol=0.1, unrealized_sol=0.02, open_positions=2,
        closed_positions=1, wins=1, fees_sol=0.0, max_drawdown_sol=0.0, unmarked=1,
    )  # fmt: skip
    assert "open marked +0.0200 (1 unmarked, left out), total +0.1200" in report.text()
    assert "| +0.0200 (2) (1 unmarked, left out) |" in comparison_table([report])
    assert report.results()["unmarked_positions"] == 1


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> str:
    """Some two market minutes of seed 6 as ``pumpflow record --out`` writes them."""
    from pumpflow.feed.cli import record
    from pumpflow.simulator.market import Market, MarketConfig
    from pumpflow.simulator.server import SimulatorServer

    path = tmp_path_factory.mktemp("record") / "recorded.jsonl"

    async def recorded() -> None:
        server = SimulatorServer(market=Market(MarketConfig(seed=SEED)), speed=60.0)
        await server.start()
        try:
            await record(url=server.url, out=path, duration=2.0, backoff_initial=0.05)
        finally:
            await server.stop()

    asyncio.run(recorded())
    return str(path)


def test_a_recording_backtests_as_the_stream_it_recorded(recording, tmp_path):
    from pumpflow.common.events import decode_event
    from pumpflow.report.results import load

    with open(recording, "rb") as lines:
        published = [e for e in map(decode_event, lines) if e.seq is not None]
    assert len(published) > 300
    # the frames replayed are the published events', in their order at their times
    frames = dataset_frames(recording)
    assert [t for t, _ in frames] == [e.time for e in published]
    out, report = tmp_path / "results.json", tmp_path / "report.html"
    argv = ["backtest", "--dataset", recording, "--quiet", "--json", str(out), "--report",
            str(report)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["configurations"][0]["results"]
    assert results["frames"] == len(published)
    assert results["predictions"] > 0
    # every token the recording saw created went through the pipeline
    created = {e.key for e in published if e.type == "token.created"}
    assert load(report.with_suffix(".json")).lifecycle["new"] == len(created) > 0
    # and the same recording decides the same again
    again = asyncio.run(run_backtest(frames, RUN_CONFIG))
    assert again.results() == results


def test_configurations_compare_exit_ladders(tmp_path):
    """The exit's take-profit ladder is a setting: a configuration that takes half at
    +10% sells where the base's ladder (first step +50%) holds."""
    out = tmp_path / "results.json"
    assert main(["backtest", "--seed", str(SEED), "--minutes", str(MINUTES), "--quiet",
                 "--config", "base", "--config", LADDER, "--json", str(out),
                 "--report", str(tmp_path / "r.html")]) == 0  # fmt: skip
    base, ladder = (c["results"] for c in json.loads(out.read_text())["configurations"])
    assert base["orders"]["sell"]["requested"] == 0
    assert ladder["orders"]["sell"]["filled"] > 0
    assert ladder["realized_sol"] != base["realized_sol"]
    assert ladder["entries"] == base["entries"] > 0
    # the ladder's partial sales by their rule, though no position closed on it
    assert base["sales_by_rule"] == {}
    stepped = ladder["sales_by_rule"]["take_profit_1"]
    assert stepped["sales"] > 0 and stepped["realized_sol"] > 0, ladder["sales_by_rule"]
    assert "take_profit_1" not in ladder["exits"]
    assert sum(s["realized_sol"] for s in ladder["sales_by_rule"].values()) == pytest.approx(
        ladder["realized_sol"], abs=1e-6
    )


def test_the_report_gives_the_base_s_settings_as_the_command_line_takes_them(dataset, tmp_path):
    """``trading_reject_creator_sold=false``, not Python's ``False``, which a reader would
    copy into a --config it then refuses."""
    report = tmp_path / "r.html"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--report", str(report)]) == 0
    page = report.read_text()
    assert "trading_min_score=0.5, trading_reject_creator_sold=false (pumpflow run" in page
    assert "=False" not in page
    # one configuration has nothing to compare with
    assert sorted(p.name for p in tmp_path.glob("*.html")) == ["r.html"]


def test_a_configuration_s_page_gives_the_figures_of_its_text_report(dataset, tmp_path, capsys):
    """The page a quant keeps of a run says what the terminal said of the model's arms."""
    from html import unescape

    report = tmp_path / "r.html"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--report", str(report)]) == 0
    text = next(line for line in capsys.readouterr().out.splitlines() if "live AUC" in line)
    rows = dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", unescape(report.read_text())))
    assert text == (
        f"  predictions {rows['predictions']}; live AUC {rows['live AUC']}; "
        f"precision {rows['precision']}"
    )


def test_two_configurations_get_one_page_comparing_them(dataset, tmp_path, capsys):
    report = tmp_path / "r.html"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--config", "base",
                 "--config", LADDER, "--report", str(report)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    compared = tmp_path / "r-comparison.html"
    assert f"comparison: {compared}" in out
    assert f"report 'base': {tmp_path / 'r-base.html'}" in out
    page = compared.read_text()
    # the text table's header and rows, cell for cell
    header, *rows = [line.strip("|").split("|") for line in out.splitlines()
                     if line.startswith("| ")]  # fmt: skip
    assert "".join(f"<th>{escape(c.strip())}</th>" for c in header) in page
    assert [row[0].strip() for row in rows] == ["base", "ladder"]
    for row in rows:
        assert "<tr>" + "".join(f"<td>{escape(c.strip())}</td>" for c in row) + "</tr>" in page
    # what each changes over the base
    assert "trading_min_score=0.5, trading_reject_creator_sold=false (pumpflow run" in page
    assert "<td>base changes</td><td>nothing</td>" in page
    assert "<td>ladder changes</td><td>exit_take_profit=[[0.1,0.5]]</td>" in page
    # one curve each, named in the legend: the base, which sold nothing, flat at zero
    (plot,) = re.findall(r'<figure class="plot" id="equity">.*?</figure>', page)
    assert plot.count("<polyline") == 2
    assert ">base</text>" in plot and ">ladder</text>" in plot
    # self-contained
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_the_json_document_gives_each_configuration_s_settings_as_they_ran(dataset, tmp_path):
    """Typed as the services read them, from a flag's text as from a TOML file's values."""
    (tmp_path / "strategies.toml").write_text(
        "[filed]\ntrading_min_score = 0.55\ntrading_reject_creator_sold = true\n"
        "exit_take_profit = [[0.3, 0.5]]\nexit_stop_loss = ''\n"
    )
    out = tmp_path / "results.json"
    flagged = "flagged=trading_min_score=0.55,trading_reject_creator_sold=true,"
    flagged += "exit_take_profit=[[0.3,0.5]],exit_stop_loss="
    assert main(["backtest", "--dataset", dataset, "--quiet", "--config", flagged,
                 "--configs", str(tmp_path / "strategies.toml"), "--json", str(out),
                 "--report", str(tmp_path / "r.html")]) == 0  # fmt: skip
    flag, filed = (c["settings"] for c in json.loads(out.read_text())["configurations"])
    assert flag == filed
    assert filed == {
        "trading_min_score": 0.55,
        "trading_reject_creator_sold": True,
        "exit_take_profit": [[0.3, 0.5]],
        "exit_stop_loss": None,
    }
    # and the reports as --config takes them
    page = (tmp_path / "r-filed.html").read_text()
    assert "exit_take_profit=[[0.3,0.5]], exit_stop_loss=" in page


def test_the_help_gives_the_simulated_markets_defaults(capsys):
    """--minutes and --launches say what a simulated market takes without them."""
    from pumpflow.simulator.market import MarketConfig

    with pytest.raises(SystemExit):
        main(["backtest", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    launches = MarketConfig(seed=1).launches_per_minute
    assert f"--launches LAUNCHES --seed: token launches per market minute ({launches:g})" in said
    assert "--minutes MINUTES --seed: market minutes (10)" in said


# ------------------------------------------------------------------ workers and grids

#: makes the run of a configuration named ``broken`` raise, in this process and in its
#: workers alike (Python imports ``sitecustomize`` as it starts, from PYTHONPATH first)
BREAKING = """
import pumpflow.cli.backtest as backtest

real = backtest.run_backtest


async def run_backtest(frames, config=None, *, name="run", **kwargs):
    if name == "broken":
        raise RuntimeError("the broken configuration's failure")
    return await real(frames, config, name=name, **kwargs)


backtest.run_backtest = run_backtest
"""


def _ran(document: dict) -> list[tuple[str, dict, dict]]:
    """(name, settings, results) of each configuration of a results document, in order:
    what equal inputs give equal, timings apart."""
    return [(c["name"], c["settings"], c["results"]) for c in document["configurations"]]


def test_two_workers_give_the_reports_one_process_gives(dataset, tmp_path, capsys):
    """Run at once in two workers, each configuration decides as it does alone here, and
    the reports come in the order given, with the progress of each."""
    documents = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs-{jobs}.json"
        argv = ["backtest", "--dataset", dataset, "--config", LADDER, "--config", "base",
                "--jobs", jobs, "--every", "0.01", "--json", str(out),
                "--report", str(tmp_path / jobs / "r.html")]  # fmt: skip
        assert main(argv) == 0
        said = capsys.readouterr()
        assert said.out.index("backtest 'ladder'") < said.out.index("backtest 'base'")
        for name in ("ladder", "base"):
            assert re.search(rf"^{name}: [\d,]+/[\d,]+ frames \(100%\)", said.err, re.M)
            assert (tmp_path / jobs / f"r-{name}.html").exists()
        assert (tmp_path / jobs / "r-comparison.html").exists()
        documents[jobs] = json.loads(out.read_text())
    one, two = documents["1"], documents["2"]
    assert _ran(two) == _ran(one)
    assert [name for name, _, _ in _ran(two)] == ["ladder", "base"]
    # they did something to compare: the ladder sold where the base holds
    ladder, base = (results for _, _, results in _ran(one))
    assert ladder["orders"]["sell"]["filled"] > 0 == base["orders"]["sell"]["requested"]
    assert one["failed"] == two["failed"] == []


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_configuration_that_fails_is_named_and_the_others_reports_land(dataset, tmp_path, jobs):
    (tmp_path / "sitecustomize.py").write_text(BREAKING)
    out = tmp_path / "results.json"
    ran = subprocess.run(
        [str(Path(sys.executable).with_name("pumpflow")), "backtest", "--dataset", dataset,
         "--quiet", "--jobs", jobs, "--config", "base", "--config", "broken", "--config",
         LADDER, "--json", str(out), "--report", str(tmp_path / "r.html")],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert ran.returncode == 1, ran.stderr
    assert (
        "pumpflow backtest: configuration 'broken' failed: RuntimeError: the broken "
        "configuration's failure"
    ) in ran.stderr
    assert ran.stderr.splitlines()[-1] == "pumpflow backtest: 1 configuration failed: broken"
    assert ran.stdout.index("backtest 'base'") < ran.stdout.index("backtest 'ladder'")
    rows = [line.split("|")[1].strip() for line in ran.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["config", "base", "ladder"]
    document = json.loads(out.read_text())
    assert [c["name"] for c in document["configurations"]] == ["base", "ladder"]
    (broken,) = document["failed"]
    assert broken["name"] == "broken" and broken["settings"] == {}
    assert broken["error"] == "RuntimeError: the broken configuration's failure"
    assert sorted(p.name for p in tmp_path.glob("*.html")) == [
        "r-base.html", "r-comparison.html", "r-ladder.html"
    ]  # fmt: skip


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_quiet_backtest_says_its_reports_and_nothing_on_stderr(tmp_path, jobs):
    """--quiet leaves what was asked: the feed's warnings of a trade of a mint it left
    (seed 2's sixth minute has one) are not said once per configuration on stderr."""
    ran = subprocess.run(
        [str(Path(sys.executable).with_name("pumpflow")), "backtest", "--seed", "2",
         "--minutes", "6", "--quiet", "--jobs", jobs, "--config", "a=", "--config", "b=",
         "--report", str(tmp_path / "r.html")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    assert "backtest 'a'" in ran.stdout and "backtest 'b'" in ran.stdout


def test_a_report_crosses_from_a_worker_whole():
    """What a worker sends back is the report it made, its HTML report's data too."""
    frames = simulated_frames(SEED, 0.5, start=START)
    report = run_configuration(frames, "base", RUN_CONFIG)
    assert isinstance(report, Report)
    sent = pickle.loads(pickle.dumps(report))
    assert sent == report and sent.text() == report.text()


def _group_gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


async def _until_both_run(proc: asyncio.subprocess.Process) -> None:
    """Read ``proc``'s progress lines until configuration a's or b's shows a worker on it."""
    seen = ""
    while not re.search(r"^[ab]: [\d,]+/", seen, re.M):
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, seen
        seen += line.decode()


#: runs the command after it with SIGINT's default action, as a terminal starts it (a
#: suite run in a shell's background inherits it ignored, and so would the command)
AS_IN_A_TERMINAL = (
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
)  # fmt: skip


async def test_ctrl_c_stops_the_workers_at_once_without_their_tracebacks(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        *AS_IN_A_TERMINAL, str(Path(sys.executable).with_name("pumpflow")), "backtest",
        "--seed", str(SEED), "--minutes", "30", "--jobs", "2", "--every", "0.1", "--config",
        "a", "--config", "b", "--report", str(tmp_path / "r.html"),
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        await _until_both_run(proc)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole group
        err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        await asyncio.wait_for(proc.wait(), 30)
        stopped = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert stopped < 5
    await eventually(lambda: _group_gone(proc.pid), within=10, what="no worker left behind")


async def test_the_workers_end_when_the_backtest_is_killed():
    """Killed, the backtest cannot stop its workers: they see it gone and end, not left
    behind running or waiting for a configuration for ever."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("pumpflow")), "backtest", "--seed", str(SEED),
        "--minutes", "30", "--jobs", "2", "--every", "0.1", "--config", "a", "--config", "b",
        "--config", "c", "--json", "-", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        await _until_both_run(proc)
        await eventually(lambda: _workers_of(proc.pid), what="the workers")
        proc.kill()
        await proc.wait()
        await eventually(lambda: _group_gone(proc.pid), within=60, what="no worker left behind")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _workers_of(session: int) -> list[int]:
    """The backtest workers of ``session``: the processes in it its leader did not start
    itself (the forkserver did)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        pid, parent, sid = int(stat.parent.name), int(fields[1]), int(fields[3])
        if sid == session and session not in (pid, parent):
            workers.append(pid)
    return workers


async def test_a_worker_killed_fails_its_configuration_alone():
    """Out of memory or killed, a worker takes its configuration with it, named; the
    other configurations still run and report."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("pumpflow")), "backtest", "--seed", str(SEED),
        "--minutes", "10", "--jobs", "2", "--every", "0.1", "--config", "a", "--config", "b",
        "--json", "-", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        await _until_both_run(proc)
        workers = await eventually(lambda: _workers_of(proc.pid), what="the workers")
        os.kill(workers[0], signal.SIGKILL)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 1, err
    document = json.loads(out)
    (died,) = document["failed"]
    assert died["error"] == "its worker died (exit code -9)"
    assert f"configuration '{died['name']}' failed: its worker died (exit code -9)" in err
    (other,) = document["configurations"]
    assert {other["name"], died["name"]} == {"a", "b"}
    assert other["results"]["entries"] > 0


def test_a_grid_runs_every_point_of_its_product_named_by_its_values():
    grids = [parse_grid("trading_min_score=0.5,0.6"),
             parse_grid("exit_max_hold_s=600,1200,1800")]  # fmt: skip
    points = grid_configs(grids, [])
    assert [name for name, _ in points] == [
        f"trading_min_score={score},exit_max_hold_s={hold}"
        for score in ("0.5", "0.6") for hold in ("600", "1200", "1800")
    ]  # fmt: skip
    assert points[1][1] == {"trading_min_score": "0.5", "exit_max_hold_s": "1200"}
    # over each configuration given, in turn
    over = grid_configs(grids[:1], [("patient", {"exit_max_hold_s": 1200}), ("base", {})])
    assert over == [
        ("patient,trading_min_score=0.5", {"exit_max_hold_s": 1200, "trading_min_score": "0.5"}),
        ("patient,trading_min_score=0.6", {"exit_max_hold_s": 1200, "trading_min_score": "0.6"}),
        ("base,trading_min_score=0.5", {"trading_min_score": "0.5"}),
        ("base,trading_min_score=0.6", {"trading_min_score": "0.6"}),
    ]
    # a list setting's values keep their commas; an empty value is one (as in --config)
    assert parse_grid("exit_take_profit=[[0.1,0.5]],[[0.3,1]],") == (
        "exit_take_profit", ["[[0.1,0.5]]", "[[0.3,1]]", ""]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("grids", "configs", "why"),
    [
        (["trading_min_score="], [], "--grid trading_min_score: no values"),
        (["trading_min_score"], [], "--grid 'trading_min_score': KEY=V1,V2,..."),
        (["trading_min_score=0.5,,0.6"], [], "configuration 'trading_min_score=': "),
        (["trading_min_score=0.5,0.5"], [], "--grid trading_min_score: 0.5 given twice"),
        (["exit_stale_after_s=,300,"], [],
         "--grid exit_stale_after_s: '' given twice"),
        (["trading_min_score=0.5,0.6", "trading_min_score=0.7"], [],
         "--grid trading_min_score: given twice"),
        (["trading_min_score=0.5,0.6"], ["--config", "hi=trading_min_score=0.7"],
         "configuration 'hi' sets trading_min_score, which --grid sweeps"),
        ([f"exit_max_hold_s={','.join(str(s) for s in range(100, 117))}",
          f"trading_min_score={','.join(f'0.{n}' for n in range(10, 26))}"], [],
         "--grid: 272 configurations, more than 256"),
        (["trading_min_score=0.5,high"], [], "configuration 'trading_min_score=high'"),
        (["no_such_setting=1,2"], [], "no setting 'no_such_setting'"),
    ],
)  # fmt: skip
def test_a_grid_it_cannot_run_as_meant_is_refused_before_any_runs(
    dataset, capsys, grids, configs, why
):
    said = refused(["backtest", "--dataset", dataset, "--quiet", *configs,
                    *(w for g in grids for w in ("--grid", g))], capsys)  # fmt: skip
    assert said.startswith("pumpflow backtest: ") and why in said, said


def test_a_grid_s_points_are_compared_in_one_table(dataset, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["backtest", "--dataset", dataset, "--quiet", "--grid",
                 "trading_min_score=0.5,0.99", "--grid", "exit_take_profit=[[0.1,0.5]],",
                 "--json", str(out), "--report", str(tmp_path / "r.html")]) == 0  # fmt: skip
    names = [
        "trading_min_score=0.5,exit_take_profit=[[0.1,0.5]]",
        "trading_min_score=0.5,exit_take_profit=",
        "trading_min_score=0.99,exit_take_profit=[[0.1,0.5]]",
        "trading_min_score=0.99,exit_take_profit=",
    ]
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]  # fmt: skip
    assert rows == ["config", *names]
    configs = json.loads(out.read_text())["configurations"]
    assert [c["name"] for c in configs] == names
    # typed as the services read them
    assert configs[0]["settings"] == {"trading_min_score": 0.5, "exit_take_profit": [[0.1, 0.5]]}
    assert configs[1]["settings"]["exit_take_profit"] in ([], None)
    assert configs[0]["results"]["entries"] > 0 and configs[2]["results"]["entries"] == 0
    page = (tmp_path / "r-comparison.html").read_text()
    assert all(escape(name) in page for name in names)
