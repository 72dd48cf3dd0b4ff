"""Datasets: JSONL round trip, the CLI, and loading into Postgres through the shared store."""

from __future__ import annotations

import json

import pytest

from pumpflow.simulator.cli import main
from pumpflow.simulator.dataset import load_dataset, market_events, read_dataset, write_dataset
from pumpflow.simulator.market import Market, MarketConfig

START = 1_760_000_000.0


def test_dataset_round_trip_keeps_every_frame_exactly(tmp_path):
    path = tmp_path / "run.jsonl"
    market = Market(MarketConfig(seed=5))
    count = write_dataset(market, path, duration_s=120.0, start_epoch=START)
    expected = list(market.frames(120.0))
    loaded = list(read_dataset(path))
    assert count == len(expected) == len(loaded) > 100
    for (t, frame), (lt, lframe) in zip(expected, loaded, strict=True):
        assert lt == pytest.approx(START + t, abs=1e-6)
        assert lframe == frame
        assert list(lframe) == list(frame)
        assert [type(v) for v in lframe.values()] == [type(v) for v in frame.values()]
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["t", "frame"]


def test_read_dataset_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 1.0, "frame": {"txType": "buy"}}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_dataset(path))


def test_cli_dataset_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        args = ["dataset", "--seed", "2", "--minutes", "1", "--out", str(out)]
        assert main([*args, "--start-epoch", str(START)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert "frames/s" in capsys.readouterr().out


def test_cli_calibrate_prints_the_report_and_passes(capsys):
    assert main(["calibrate", "--seed", "1", "--minutes", "20"]) == 0
    out = capsys.readouterr().out
    for name in (
        "graduation rate",
        "quiet within 15 min",
        "median trades",
        "median minutes",
        "average trades/s",
        "peak trades/s",
        "launches per minute",
    ):
        assert name in out


def test_cli_calibrate_fails_out_of_tolerance(capsys):
    # a launch rate far from the reference cannot give the reference trade rate
    assert main(["calibrate", "--seed", "1", "--minutes", "5", "--rate", "300"]) != 0
    assert "NO" in capsys.readouterr().out


@pytest.mark.postgres
async def test_load_into_postgres_is_idempotent(tmp_path, pg_pool):
    from pumpflow.common.storage import TokenEventStore

    path = tmp_path / "run.jsonl"
    count = write_dataset(Market(MarketConfig(seed=9)), path, duration_s=60.0, start_epoch=START)
    store = TokenEventStore(pg_pool)
    first = await load_dataset(path, store, batch_size=500)
    assert first.frames == count and first.rejected == 0
    assert first.inserted == count == await store.count()
    again = await load_dataset(path, store)
    assert again.inserted == 0
    replayed = [e async for e in store.stream()]
    assert len(replayed) == count
    assert replayed[0].time == pytest.approx(next(read_dataset(path))[0])


@pytest.mark.postgres
async def test_load_skips_and_counts_undecodable_frames(tmp_path, pg_pool):
    from pumpflow.common.storage import TokenEventStore

    path = tmp_path / "mixed.jsonl"
    write_dataset(Market(MarketConfig(seed=9)), path, duration_s=20.0, start_epoch=START)
    lines = path.read_text().splitlines()
    broken = json.loads(lines[0])
    del broken["frame"]["mint"]
    path.write_text("\n".join([json.dumps(broken), *lines[1:]]) + "\n")
    result = await load_dataset(path, TokenEventStore(pg_pool))
    assert result.rejected == 1
    assert result.inserted == len(lines) - 1


def test_market_events_are_the_frames_as_v1_events_with_per_mint_seq():
    market = Market(MarketConfig(seed=3))
    frames = list(market.frames(120))
    events = list(market_events(market, 120, start_epoch=1_700_000_000.0, source="feed/x"))
    assert len(events) == len(frames)
    for (t, frame), event in zip(frames, events, strict=True):
        assert event.time == 1_700_000_000.0 + t
        assert event.key == frame["mint"] and event.data.signature == frame["signature"]
        assert event.source == "feed/x"
    seqs: dict[str, list[int]] = {}
    for event in events:
        seqs.setdefault(event.key, []).append(event.seq)
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values())
    assert {e.type for e in events} >= {"token.created", "token.trade"}


def _write_recording(path, events) -> None:
    """Events as ``pumpflow record --out`` writes them: one envelope a line."""
    from pumpflow.common.events import encode_event

    path.write_bytes(b"".join(encode_event(e) + b"\n" for e in events))


def test_a_recording_reads_as_the_frames_of_the_events_it_recorded(tmp_path):
    from msgspec.structs import replace

    from pumpflow.simulator.dataset import dataset_events

    recorded = list(market_events(Market(MarketConfig(seed=3)), 60.0, start_epoch=START))
    # stored by the recorder without a seq (a trade of a mint not subscribed): never
    # published, so not replayed, as from Postgres
    unpublished = replace(recorded[-1], seq=None, id="unpublished", time=recorded[-1].time + 1)
    path = tmp_path / "recording.jsonl"
    _write_recording(path, [*recorded, unpublished])
    read = [event for event, _ in dataset_events(path)]
    assert [(e.time, e.data, e.seq) for e in read] == [(e.time, e.data, e.seq) for e in recorded]


def test_a_bad_line_of_a_recording_is_named_as_a_recordings(tmp_path):
    recorded = list(market_events(Market(MarketConfig(seed=3)), 5.0, start_epoch=START))
    path = tmp_path / "recording.jsonl"
    _write_recording(path, recorded[:2])
    with path.open("ab") as out:
        out.write(b'{"t": 1.0, "frame": {}}\n')
    with pytest.raises(ValueError, match=r"recording.jsonl:3: not a recorded event.*record --out"):
        list(read_dataset(path))


@pytest.mark.postgres
async def test_a_load_cut_short_by_a_malformed_line_says_what_it_stored_before(tmp_path, pg_pool):
    """The batches before the line are in Postgres: a backtest of the schema would replay
    a part of the file, so the refusal says so."""
    from pumpflow.common.storage import TokenEventStore
    from pumpflow.simulator.dataset import DatasetError

    path = tmp_path / "cut.jsonl"
    write_dataset(Market(MarketConfig(seed=9)), path, duration_s=60.0, start_epoch=START)
    lines = path.read_text().splitlines()
    assert len(lines) > 600
    path.write_text("\n".join([*lines[:600], "garbage", *lines[600:]]) + "\n")
    store = TokenEventStore(pg_pool)
    with pytest.raises(DatasetError) as refused:
        await load_dataset(path, store, batch_size=500)
    assert await store.count() == 500
    assert str(refused.value).startswith(f"{path}:601: not a dataset line: ")
    assert str(refused.value).endswith(
        "; the 500 frames before it are stored (load the mended file again: what is "
        "stored is not stored twice)"
    )
