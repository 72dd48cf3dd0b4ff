"""``pumpflow backtest``: the same stream gives the same decisions, from a seed, a
dataset file or Postgres, and configurations are compared side by side."""

from __future__ import annotations

import pytest

from pumpflow.cli.backtest import (
    RUN_CONFIG,
    database_frames,
    dataset_frames,
    run_backtest,
    simulated_frames,
)
from pumpflow.cli.main import main
from pumpflow.common.storage import TokenEventStore
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
    assert first.decisions() == second.decisions()
    # the stream went through every stage: predictions, orders, fills, a book
    assert first.frames == len(frames)
    assert first.predictions > 0
    assert first.orders["requested", "buy"] > 0
    assert first.entries == first.orders["filled", "buy"] > 0
    assert first.bought_sol > 0
    assert progress[-1] == (len(frames), len(frames))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert "PnL after fees" in first.text()


async def test_a_dataset_file_replays_as_the_market_it_was_written_from(dataset):
    from_file = await run_backtest(dataset_frames(dataset), RUN_CONFIG)
    simulated = await run_backtest(simulated_frames(SEED, MINUTES, start=START), RUN_CONFIG)
    assert from_file.decisions() == simulated.decisions()
    assert from_file.entries > 0


async def test_frames_recorded_in_postgres_are_the_dataset_s(dataset, pg_pool, postgres_dsn,
                                                             namespace):  # fmt: skip
    await load_dataset(dataset, TokenEventStore(pg_pool))
    recorded = await database_frames(postgres_dsn, namespace, None, None)
    assert sorted(recorded) == sorted(dataset_frames(dataset))


def test_two_configurations_run_on_the_same_stream_in_one_table(dataset, capsys):
    status = main([
        "backtest", "--dataset", dataset, "--quiet",
        "--config", "eager=trading_min_score=0.5,trading_reject_creator_sold=false",
        "--config", "defaults",
    ])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "backtest 'eager'" in out and "backtest 'defaults'" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows] == ["config", "eager", "defaults"]
    # the eager configuration enters; the service's defaults (score 0.6) do not here
    eager, defaults = rows[1].split("|"), rows[2].split("|")
    assert int(eager[3]) > 0
    assert int(defaults[3]) == 0


def test_a_setting_no_service_has_is_refused(dataset):
    with pytest.raises(SystemExit, match="no setting 'trading_min_scor'"):
        main(["backtest", "--dataset", dataset, "--config", "typo=trading_min_scor=0.5"])


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
