"""The simulated PumpPortal socket over a real connection on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections import Counter

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from pumpflow.common import pumpportal
from pumpflow.common.events import EventValidationError
from pumpflow.common.testing import eventually
from pumpflow.simulator.cli import build_parser, main
from pumpflow.simulator.faults import HOSTILE_KINDS, HOSTILE_SIGNATURE, FaultConfig
from pumpflow.simulator.market import Market, MarketConfig
from pumpflow.simulator.server import ACK_UNSUBSCRIBE_NEW_TOKEN, SimulatorServer

SPEED = 30.0


async def _server(**kwargs) -> SimulatorServer:
    kwargs.setdefault("speed", SPEED)
    server = SimulatorServer(market=Market(MarketConfig(seed=11)), **kwargs)
    await server.start()
    return server


@pytest.fixture
async def server():
    server = await _server()
    yield server
    await server.stop()


async def _recv(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 5.0))


async def _send(ws, method: str, keys=None) -> None:
    body = {"method": method}
    if keys is not None:
        body["keys"] = keys
    await ws.send(json.dumps(body))


async def _until(ws, done, within: float = 10.0) -> list[dict]:
    """Frames up to and including the first for which ``done(frame)`` holds."""
    frames = []
    async with asyncio.timeout(within):
        while True:
            frames.append(json.loads(await ws.recv()))
            if done(frames[-1]):
                return frames


def _is(message: str):
    return lambda frame: frame.get("message") == message


async def _barrier(ws) -> list[dict]:
    """Every frame queued for this connection so far (a request's reply comes after them).

    The server sends frames and replies through one queue per connection, in order; a
    no-op request's reply thus marks "now". Take the test's own replies first.
    """
    await _send(ws, "unsubscribeAccountTrade", ["barrier"])
    return (await _until(ws, _is(pumpportal.ACK_UNSUBSCRIBED_KEYS)))[:-1]


def _trades(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f.get("txType") in ("buy", "sell")]


async def _creates(ws, n: int) -> list[str]:
    mints = []
    while len(mints) < n:
        frame = await _recv(ws)
        if frame.get("txType") == "create":
            mints.append(frame["mint"])
    return mints


async def _witness_trade(server: SimulatorServer, mints: list[str]) -> dict:
    """A trade of ``mints`` broadcast from now on, seen by a funded connection of its own."""
    async with connect(server.url) as witness:
        await _send(witness, "subscribeTokenTrade", mints)
        await _until(witness, _is(pumpportal.ACK_KEYS))
        return (await _until(witness, lambda f: f.get("txType") in ("buy", "sell")))[-1]


async def test_url_and_acks(server):
    assert server.url == f"ws://127.0.0.1:{server.port}/api/data"
    async with connect(server.url) as ws:
        await _send(ws, "subscribeNewToken")
        assert await _recv(ws) == {"message": "Successfully subscribed to token creation events."}
        await _send(ws, "subscribeMigration")
        await _until(ws, _is("Subscribed to 'migration' events."))
        await _send(ws, "subscribeTokenTrade", ["x"])
        await _send(ws, "subscribeAccountTrade", ["y"])
        frames = await _until(ws, _is(pumpportal.ACK_KEYS))
        frames += await _until(ws, _is(pumpportal.ACK_KEYS))
        acks = [f for f in frames if "message" in f or "errors" in f]
        assert acks == [{"message": "Successfully subscribed to keys."}] * 2


async def test_nothing_without_subscriptions_and_only_creates_after_subscribe_new_token(server):
    async with connect(server.url) as ws:
        # tokens were created since this connection opened, yet none came to it
        async with connect(server.url) as witness:
            await _send(witness, "subscribeNewToken")
            await _creates(witness, 1)
        assert await _barrier(ws) == []
        await _send(ws, "subscribeNewToken")
        frames = await _until(ws, lambda f: f.get("txType") == "create")
        frames += await _until(ws, lambda f: f.get("txType") == "create")
        frames += await _barrier(ws)
    assert frames[0]["message"] == pumpportal.ACK_NEW_TOKEN
    data = frames[1:]
    assert len(data) >= 2
    assert {f["txType"] for f in data} == {"create"}


async def test_trades_only_for_subscribed_mints_and_unsubscribe_stops_them(server):
    async with connect(server.url) as ws:
        await _send(ws, "subscribeNewToken")
        await _recv(ws)
        mints = await _creates(ws, 5)
        await _send(ws, "unsubscribeNewToken")
        await _send(ws, "subscribeTokenTrade", mints)
        frames = await _until(ws, _is(pumpportal.ACK_KEYS))
        frames += await _until(ws, lambda f: f.get("txType") in ("buy", "sell"))
        frames += await _barrier(ws)
        assert {f["mint"] for f in _trades(frames)} <= set(mints)
        await _send(ws, "unsubscribeTokenTrade", mints)
        await _until(ws, _is(pumpportal.ACK_UNSUBSCRIBED_KEYS))
        # the mints traded on after the unsubscription: not one of those trades came here
        await _witness_trade(server, mints)
        after = await _barrier(ws)
        assert not [f for f in after if "txType" in f]


async def test_account_trades_follow_the_trader(server):
    async with connect(server.url) as ws:
        await _send(ws, "subscribeNewToken")
        await _recv(ws)
        mints = await _creates(ws, 5)
        await _send(ws, "unsubscribeNewToken")
        await _send(ws, "subscribeTokenTrade", mints)
        frames = await _until(ws, _is(pumpportal.ACK_KEYS))
        while len(_trades(frames)) < 12:
            frames.append(await _recv(ws))
        seen = _trades(frames)
        # the busiest trader (a bot's wallet, most likely) trades again within seconds
        trader = Counter(f["traderPublicKey"] for f in seen).most_common(1)[0][0]
        await _send(ws, "unsubscribeTokenTrade", mints)
        await _send(ws, "subscribeAccountTrade", [trader])
        await _until(ws, _is(pumpportal.ACK_KEYS))
        # after the ack only the trader's activity comes, on any token
        frames = await _until(ws, lambda f: "txType" in f)
        frames += await _barrier(ws)
    trades = [f for f in frames if "txType" in f]
    assert trades, "the busiest trader made no trade"
    assert all(f["traderPublicKey"] == trader for f in trades)


async def test_two_clients_see_the_same_market(server):
    async with connect(server.url) as a, connect(server.url) as b:
        await _send(a, "subscribeNewToken")
        await _send(b, "subscribeNewToken")
        await _recv(a)
        await _recv(b)
        first = await _creates(a, 4)
        second = await _creates(b, 4)
    assert first == second


async def test_error_frames(server):
    async with connect(server.url) as ws:
        await _send(ws, "unsubscribeMigration")
        assert "errors" in await _recv(ws)
        await ws.send("{not json")
        assert "errors" in await _recv(ws)
        await _send(ws, "subscribeEverything")
        assert "errors" in await _recv(ws)
        await _send(ws, "subscribeTokenTrade", [f"k{i}" for i in range(5001)])
        assert "errors" in await _recv(ws)
        await _send(ws, "subscribeTokenTrade", [f"k{i}" for i in range(5000)])
        assert await _recv(ws) == {"message": pumpportal.ACK_KEYS}


async def test_other_paths_are_not_found(server):
    with pytest.raises(InvalidStatus) as caught:
        async with connect(f"ws://127.0.0.1:{server.port}/api/other"):
            pass
    assert caught.value.response.status_code == 404


async def test_api_key_gating():
    server = await _server(require_api_key=True)
    try:
        async with connect(server.url) as ws:
            await _send(ws, "subscribeNewToken")
            await _recv(ws)
            mints = await _creates(ws, 5)
            await _send(ws, "unsubscribeNewToken")
            await _send(ws, "subscribeTokenTrade", mints)
            frames = await _until(ws, _is(pumpportal.API_KEY_REQUIRED))
            assert pumpportal.API_KEY_REQUIRED.startswith("'subscribeTokenTrade'")
            # with a key the mints trade; without one, none of their trades came here
            async with connect(server.url + "?api-key=funded") as funded:
                await _send(funded, "subscribeTokenTrade", mints)
                await _until(funded, _is(pumpportal.ACK_KEYS))
                await _until(funded, lambda f: f.get("txType") in ("buy", "sell"))
            frames += await _barrier(ws)
            assert not _trades(frames)
    finally:
        await server.stop()


async def test_a_wallet_funded_or_drained_changes_the_answer_to_the_next_trade_subscription():
    """A key whose wallet holds under 0.02 SOL (or no key, where one is required) has its
    trade subscriptions refused with PumpPortal's notice; funded, its next ones are
    acknowledged and stream on the same connection; drained, they are refused again and
    its trades stop."""
    server = await _server(require_api_key=True, unfunded_keys=("poor",))
    try:
        async with connect(server.url + "?api-key=poor") as ws, connect(server.url) as keyless:
            await _send(ws, "subscribeNewToken")
            await _recv(ws)
            mints = await _creates(ws, 3)
            await _send(ws, "unsubscribeNewToken")
            for client in (ws, keyless):
                await _send(client, "subscribeTokenTrade", mints)
                await _until(client, _is(pumpportal.API_KEY_REQUIRED))
            assert not server.is_funded("poor") and not server.is_funded("")
            assert server.is_funded("rich")

            server.fund("poor")
            await _send(ws, "subscribeTokenTrade", mints)
            await _until(ws, _is(pumpportal.ACK_KEYS))
            await _until(ws, lambda f: f.get("txType") in ("buy", "sell") and f["mint"] in mints)
            server.fund("")
            await _send(keyless, "subscribeAccountTrade", ["wallet"])
            await _until(keyless, _is(pumpportal.ACK_KEYS))

            server.fund("poor", funded=False)
            await _barrier(ws)  # what was queued while it was funded
            await _send(ws, "subscribeAccountTrade", ["wallet"])
            frames = await _until(ws, _is(pumpportal.API_KEY_REQUIRED))
            frames += await _barrier(ws)
            assert not _trades(frames)
    finally:
        await server.stop()


async def test_fund_after_funds_every_wallet_refused_so_far_once_its_time_is_up():
    """``--fund-after``: the key unfunded and the connection without a key are refused
    until then, acknowledged after, on the connections they had."""
    server = await _server(require_api_key=True, unfunded_keys=("poor",), fund_after_s=0.3)
    try:
        async with connect(server.url + "?api-key=poor") as ws, connect(server.url) as keyless:
            for client in (ws, keyless):
                await _send(client, "subscribeAccountTrade", ["wallet"])
                await _until(client, _is(pumpportal.API_KEY_REQUIRED))
            await eventually(
                lambda: server.is_funded("poor") and server.is_funded(""), what="the funding"
            )
            for client in (ws, keyless):
                await _send(client, "subscribeAccountTrade", ["wallet"])
                await _until(client, _is(pumpportal.ACK_KEYS))
    finally:
        await server.stop()


def test_serve_takes_unfunded_keys_and_a_funding_time():
    parsed = build_parser().parse_args(
        ["serve", "--unfunded-key", "a", "--unfunded-key", "b", "--fund-after", "90"]
    )
    assert parsed.unfunded_key == ["a", "b"] and parsed.fund_after == 90.0
    assert build_parser().parse_args(["serve"]).fund_after is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--fund-after", "-1"])


def test_serve_on_a_port_another_holds_says_so_in_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)], prog="pumpflow sim") == 1
    err = capsys.readouterr().err
    assert f"pumpflow sim serve: cannot listen on 127.0.0.1:{port}: " in err
    assert "in use" in err
    assert len(err.strip().splitlines()) == 1


async def test_drop_connections_closes_without_a_close_frame(server):
    async with connect(server.url) as ws:
        await _send(ws, "subscribeNewToken")
        await _recv(ws)  # answered: the server holds the connection
        assert await server.drop_connections() == 1
        with pytest.raises(ConnectionClosedError) as caught:
            while True:
                await _recv(ws)
        assert caught.value.rcvd is None
    assert server.counters["dropped"] == 1


async def test_drop_every_drops_periodically():
    server = await _server(faults=FaultConfig(drop_every_s=0.3))
    try:
        async with connect(server.url) as ws:
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(ws.recv(), 2.0)
        assert server.counters["dropped"] >= 1
    finally:
        await server.stop()


def _valid(text: str) -> bool:
    try:
        pumpportal.decode_frame(text)
    except (EventValidationError, ValueError):
        return False
    return True


async def test_malformed_and_duplicate_frames_at_their_rates():
    faults = FaultConfig(malformed_rate=0.1, duplicate_rate=0.1, seed=5)
    server = await _server(speed=60.0, faults=faults)
    texts = []
    try:
        async with connect(server.url) as ws:
            await _send(ws, "subscribeNewToken")
            while len(texts) < 2000:
                text = await asyncio.wait_for(ws.recv(), 5.0)
                texts.append(text)
                if '"create"' in text and _valid(text):
                    await _send(ws, "subscribeTokenTrade", [json.loads(text)["mint"]])
    finally:
        await server.stop()
    data = [t for t in texts if '"message"' not in t]
    bad = sum(not _valid(t) for t in data)
    duplicates = sum(a == b for a, b in itertools.pairwise(data))
    assert 0.06 <= bad / len(data) <= 0.14
    assert 0.05 <= duplicates / len(data) <= 0.13
    assert server.counters["malformed"] >= bad
    kinds = [k for k in server.counters if k.startswith("malformed_")]
    assert len(kinds) == 4


async def test_faults_off_send_only_valid_frames(server):
    async with connect(server.url) as ws:
        await _send(ws, "subscribeNewToken")
        await _send(ws, "subscribeMigration")
        texts = [await asyncio.wait_for(ws.recv(), 5.0) for _ in range(12)]
    assert all(_valid(t) for t in texts)


async def test_speed_scales_the_market_clock():
    server = await _server(speed=20.0)
    try:
        await asyncio.sleep(1.0)
        assert 15.0 <= server.market_time <= 21.0
    finally:
        await server.stop()


async def test_more_than_200_requests_in_a_second_are_refused(server):
    async with connect(server.url) as ws:
        burst = pumpportal.MAX_MESSAGES_PER_SECOND + 20
        started = time.monotonic()
        for i in range(burst):
            await _send(ws, "subscribeTokenTrade", [f"mint{i}"])
        replies = [await _recv(ws) for _ in range(burst)]
        if time.monotonic() - started < 1.0:  # the burst fit in one window, as intended
            refused = [r for r in replies if r.get("errors", "").startswith("Rate limit")]
            assert len(refused) == 20
            assert replies[-1] == refused[-1]
            assert server.counters["rate_limited"] == 20
        # after the window, requests pass again
        await asyncio.sleep(1.05)
        await _send(ws, "subscribeNewToken")
        assert await _recv(ws) == {"message": pumpportal.ACK_NEW_TOKEN}


async def test_hostile_frames_interleave_good_ones_and_the_sent_log_lists_both(tmp_path):
    kinds = tuple(k for k in HOSTILE_KINDS if k != "oversize")
    faults = FaultConfig(hostile_rate=0.2, hostile_kinds=kinds, seed=3)
    sent_log = tmp_path / "sent.tsv"
    server = await _server(speed=60.0, faults=faults, sent_log=sent_log)
    texts = []
    try:
        async with connect(server.url, max_size=None) as ws:
            await _send(ws, "subscribeNewToken")
            while len(texts) < 600:
                texts.append(await asyncio.wait_for(ws.recv(), 5.0))
    finally:
        await server.stop()
    hostile_texts = [t for t in texts if HOSTILE_SIGNATURE in t or "CCCCCCCCCC" in t]
    good = [t for t in texts if t not in hostile_texts and '"message"' not in t]
    assert good and all(_valid(t) for t in good)
    assert 0.1 <= len(hostile_texts) / len(texts) <= 0.3
    # every class came up
    assert {k for k in server.counters if k.startswith("hostile_")} == {
        f"hostile_{k}" for k in kinds
    }
    lines = [line.split("\t") for line in sent_log.read_text().splitlines()]
    assert all(len(line) == 5 for line in lines)
    hostile_lines = [line for line in lines if line[1].startswith("hostile_")]
    # each frame the socket took is logged once, in the order sent: the log may lag the
    # reads by the frames still in its queue, or run ahead of them by those sent after
    # the last read, before the server stopped
    logged = [line[4] for line in lines if line[1] == "frame"]
    read = [json.loads(t)["signature"] for t in good]
    shared = min(len(logged), len(read))
    assert logged[:shared] == read[:shared]
    assert shared >= len(read) - 50
    assert len(hostile_lines) <= server.counters["hostile"]
    assert {line[4] for line in hostile_lines} <= {
        f"{HOSTILE_SIGNATURE}{n}" for n in range(1, server.counters["hostile"] + 1)
    }


async def test_a_reader_behind_the_fastest_market_still_gets_the_reply_to_its_request():
    # as fast as the client reads: a client that has not read for a while has its queue
    # full, and the reply to its next request still comes, after what was queued before.
    # A market of launches with hardly a trade fills it soonest
    quiet = MarketConfig(seed=11, snipers_mean=0.0, bot_share=0.0, organic_rate_per_s=0.001)
    server = SimulatorServer(market=Market(quiet), speed=0)
    await server.start()
    try:
        async with connect(server.url) as ws:
            await _send(ws, "subscribeNewToken")
            await eventually(
                lambda: server.connections and all(c.queue.full() for c in server._clients),
                30.0,
                what="a full queue",
            )
            await _send(ws, "subscribeTokenTrade", ["mint"])
            await _send(ws, "unsubscribeMigration")
            # the last: nothing follows its reply, so the connection closes at once
            await _send(ws, "unsubscribeNewToken")
            frames = await _until(ws, _is(ACK_UNSUBSCRIBE_NEW_TOKEN), within=30.0)
    finally:
        await server.stop()
    replies = [f for f in frames if "txType" not in f]
    assert replies == [
        {"message": pumpportal.ACK_NEW_TOKEN},
        {"message": pumpportal.ACK_KEYS},
        {"errors": "Method 'unsubscribeMigration' is not supported."},
        {"message": ACK_UNSUBSCRIBE_NEW_TOKEN},
    ]
