"""``pumpflow sell``: what it asks an exit replica and what its exit status says.

A local fake of an exit replica's HTTP API on 127.0.0.1 answers as the service does
(``services/exit/tests/test_sale_requests.py`` tests those answers)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pumpflow.cli.main import build_parser
from pumpflow.common.testing.servers import local_app

TOKEN = "cli-token"
MINT = "Mint1abcpump"
ORDERED = {
    "request_id": "x",
    "mint": MINT,
    "ordered": True,
    "order_id": "pos-1:rule:3",
    "position_id": "pos-1",
    "token_amount": 12345.0,
}
REFUSED = {"request_id": "x", "mint": MINT, "ordered": False, "detail": "no position held"}
PUBLISHED = {
    "request_id": "x",
    "mint": MINT,
    "published": True,
    "detail": "published; not applied here within the wait",
}
UNPUBLISHED = {
    "request_id": "x",
    "mint": MINT,
    "published": False,
    "detail": "the sale request accepted, not published yet: RabbitMQ has not confirmed it",
}


def replica(answer: dict, status: int, asked: list[dict]) -> Starlette:
    async def sell(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"detail": "missing or wrong bearer token"}, 401)
        asked.append({"mint": request.path_params["mint"], **(await request.json())})
        return JSONResponse(answer, status_code=status)

    return Starlette(routes=[Route("/positions/{mint}/sell", sell, methods=["POST"])])


async def pumpflow_sell(base: str, *args: str) -> int:
    parsed = build_parser().parse_args(["sell", *args, "--url", base])
    return await asyncio.to_thread(parsed.handler, parsed)


@pytest.mark.parametrize(
    ("answer", "status", "code", "said"),
    [
        (ORDERED, 200, 0, "sale ordered: pos-1:rule:3, 12345 tokens of Mint1abcpump"),
        # a token's amounts run to millions: whole tokens, not an exponent
        (
            {**ORDERED, "token_amount": 1132030.4},
            200,
            0,
            "sale ordered: pos-1:rule:3, 1132030 tokens of Mint1abcpump",
        ),
        (
            {**ORDERED, "token_amount": 0.25},
            200,
            0,
            "sale ordered: pos-1:rule:3, 0.25 tokens of Mint1abcpump",
        ),
        (REFUSED, 200, 1, "pumpflow sell: Mint1abcpump: not ordered: no position held"),
        (PUBLISHED, 202, 3, "pumpflow sell: Mint1abcpump: published; not applied here"),
        # the broker takes no publication: the replica publishes it once it does
        (
            UNPUBLISHED,
            202,
            4,
            "pumpflow sell: Mint1abcpump: the sale request accepted, not "
            "published yet: RabbitMQ has not confirmed it",
        ),
    ],
)
async def test_its_exit_status_says_whether_the_sale_is_ordered(
    monkeypatch, capsys, answer, status, code, said
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    asked: list[dict] = []
    async with local_app(replica(answer, status, asked)) as base:
        assert await pumpflow_sell(base, MINT, "--fraction", "0.5", "--position", "pos-1") == code
    out = capsys.readouterr()
    assert said in (out.out if code == 0 else out.err)
    [body] = asked
    assert body["mint"] == MINT and body["fraction"] == 0.5 and body["position_id"] == "pos-1"
    assert body["reason"] == "pumpflow sell" and body["wait_s"] == 5.0
    # an id of its own, so that the request, asked again with it, sells once
    assert len(body["request_id"]) == 32


async def test_a_wrong_token_a_missing_one_and_a_bad_share_are_said(monkeypatch, capsys):
    asked: list[dict] = []
    async with local_app(replica(ORDERED, 200, asked)) as base:
        monkeypatch.setenv("PUMPFLOW_API_TOKEN", "wrong")
        assert await pumpflow_sell(base, MINT) == 1
        assert "refused the bearer token (401 unauthorized)" in capsys.readouterr().err
        monkeypatch.delenv("PUMPFLOW_API_TOKEN")
        assert await pumpflow_sell(base, MINT) == 2
        assert "PUMPFLOW_API_TOKEN is not set" in capsys.readouterr().err
    assert asked == []
    for share in ("0", "1.5", "half"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["sell", MINT, "--fraction", share])
        assert "--fraction" in capsys.readouterr().err


async def test_the_cli_waits_as_long_as_it_asks_the_replica_to(monkeypatch, capsys):
    """``--wait`` goes up to 60 s: the call must outlast the replica's wait, or a sale the
    replica orders late in it is said to have failed (exit status 1)."""
    from pumpflow.cli import api

    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    # the call's own allowance, made shorter than the wait asked (10 s against up to 60)
    monkeypatch.setattr(api, "TIMEOUT_S", 0.5)

    async def sell(request: Request) -> JSONResponse:
        body = await request.json()
        # the replica answers late in the wait it was given, as a busy owner does
        await asyncio.sleep(body["wait_s"] / 2)
        return JSONResponse(ORDERED)

    app = Starlette(routes=[Route("/positions/{mint}/sell", sell, methods=["POST"])])
    async with local_app(app) as base:
        assert await pumpflow_sell(base, MINT, "--wait", "2") == 0, capsys.readouterr().err
    assert "sale ordered: pos-1:rule:3" in capsys.readouterr().out


@pytest.mark.parametrize("mint", ["", " ", "Mint/1"])
def test_a_mint_no_token_can_have_is_refused_before_asking(capsys, mint):
    # an unset shell variable (pumpflow sell $MINT) would otherwise ask for no route
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["sell", mint])
    assert refused.value.code == 2
    assert f"argument mint: not a mint: {mint!r}" in capsys.readouterr().err
