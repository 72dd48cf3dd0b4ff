"""pumpflow-feed record/replay as a user runs them: a subprocess against the simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from pumpflow.common.events import decode_event
from pumpflow.common.testing import eventually
from pumpflow.feed import cli
from pumpflow.simulator import server as simulator
from pumpflow.simulator.market import Market, MarketConfig

POSTGRES_DSN = os.environ.get(
    "PUMPFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
async def sim():
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=11, launches_per_minute=120)), speed=40.0
    )
    await server.start()
    yield server
    await server.stop()


async def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


async def test_record_to_jsonl_stops_on_sigterm_and_flushes(sim, tmp_path):
    out = tmp_path / "rec.jsonl"
    env = {**os.environ, "PUMPPORTAL_API_KEY": "k-never-shown"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pumpflow.feed.cli", "record", "--url", sim.url, "--out", str(out),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def fifty_lines() -> bool:
        return len(await _lines(out)) >= 50

    try:
        await eventually(fifty_lines, within=20, interval=0.05, what="50 events in the file")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            stderr = await proc.stderr.read()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    events = [decode_event(line) for line in await _lines(out)]
    assert len(events) >= 50
    assert any(e.type == "token.trade" for e in events)
    assert b"recorded" in stderr
    assert b"k-never-shown" not in stderr


@pytest.mark.postgres
async def test_record_for_a_duration_then_replay_from_postgres(sim, tmp_path, namespace):
    import asyncpg

    try:
        summary = await cli.record(
            url=sim.url, dsn=POSTGRES_DSN, schema=namespace, duration=1.0, backoff_initial=0.05
        )
        assert summary.events > 0 and summary.stored == summary.events
        out = tmp_path / "replay.jsonl"
        count = await cli.replay(dsn=POSTGRES_DSN, schema=namespace, out=out)
        assert count == summary.events
        events = [decode_event(line) for line in out.read_bytes().splitlines()]
        times = [e.time for e in events]
        assert times == sorted(times)
        assert all(e.source.startswith("record/") for e in events)
    finally:
        conn = await asyncpg.connect(POSTGRES_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        await conn.close()


def test_a_recording_that_never_connected_says_so_and_fails(tmp_path, capsys):
    """A script reading the exit status must not take nothing recorded for a recording."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}/api/data"  # nothing listens on it
    argv = ["record", "--url", url, "--out", str(tmp_path / "r.jsonl"), "--duration", "0.5"]
    assert cli.main(argv, prog="pumpflow") == 1
    err = capsys.readouterr().err
    assert f"pumpflow record: never connected to {url}: nothing recorded" in err


async def test_a_replay_of_a_window_with_no_event_says_so_and_fails(pg_pool, namespace, capsys):
    """As backtest and train say of it: an empty window is named, not taken for a replay."""
    argv = ["replay", "--dsn", POSTGRES_DSN, "--schema", namespace, "--start", "2020-01-01",
            "--end", "2020-01-02"]  # fmt: skip
    assert await asyncio.to_thread(cli.main, argv, prog="pumpflow") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"pumpflow replay: no events in postgres {namespace}, from 2020-01-01 00:00:00 UTC "
        "to 2020-01-02 00:00:00 UTC: nothing replayed"
    )


async def _stderr_lines(*argv: str) -> list[str]:
    """The lines ``pumpflow-feed argv`` wrote on stderr (its log's among them), once it
    has exited 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pumpflow.feed.cli", *argv, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr
    return stderr.decode().splitlines()


async def test_a_recording_says_what_it_recorded_once_and_of_one_session_in_the_singular(
    sim, tmp_path
):
    out = tmp_path / "rec.jsonl"
    said = await _stderr_lines("record", "--url", sim.url, "--out", str(out), "--duration", "1")
    [summary] = [line for line in said if "recorded" in line]
    assert summary == said[-1] and summary.endswith(", 1 session"), said


@pytest.mark.postgres
async def test_a_replay_of_one_event_says_so_once_in_the_singular(pg_pool, namespace, tmp_path):
    from pumpflow.common.storage import TokenEventStore
    from pumpflow.simulator.dataset import market_events

    created = next(market_events(Market(MarketConfig(seed=11)), 60.0, start_epoch=1.7e9))
    assert await TokenEventStore(pg_pool).write([created]) == 1
    out = tmp_path / "replay.jsonl"
    said = await _stderr_lines("replay", "--dsn", POSTGRES_DSN, "--schema", namespace,
                               "--out", str(out))  # fmt: skip
    assert [line for line in said if "replayed" in line] == ["replayed 1 event"], said
