"""``pumpflow trading`` and ``pumpflow stop``: what they say of the kill switch and the
graceful exit.

A local fake of a trading replica's HTTP API on 127.0.0.1 answers as the service does
(``services/trading/tests/test_kill_switch.py`` tests those answers)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pumpflow.cli.main import build_parser
from pumpflow.common.testing.servers import free_port, local_app

TOKEN = "cli-token"
STORED = {"stored": True, "detail": "halted in this replica at once; stored"}
UNSTORED_ACTIVE = {"stored": False, "detail": "halted in this replica at once; NOT stored yet"}
UNSTORED_STANDBY = {
    "stored": False,
    "detail": "not applied here: this replica stands by; NOT stored yet: the ledger "
    "(Postgres) is unavailable (OSError: gone); stored as soon as it is back (retried "
    "meanwhile), until then the replica trading (t1:cd34) does not know of it: halt it there",
}
STORED_STANDBY = {
    "stored": True,
    "detail": "not applied here: this replica stands by; stored, so the replica trading "
    "(t1:cd34) applies it on its next round (within 1 s), and a restart keeps it",
}
UNSTORED_LEASE_LOST = {
    "stored": False,
    "detail": "halted in this replica, which has stood by since (its lease lost); NOT stored",
}


def replica(role: str, halt: dict, *, resume_status: int = 200) -> Starlette:
    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"state": "active", "reason": "", "role": role})

    async def halted(request: Request) -> JSONResponse:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        body = {"state": "halted", "reason": (await request.json())["reason"], "role": role}
        return JSONResponse({**body, **halt}, status_code=200 if halt["stored"] else 202)

    async def resumed(request: Request) -> JSONResponse:
        if resume_status != 200:
            return JSONResponse({"detail": "not resumed: Postgres is away"}, resume_status)
        return JSONResponse({"state": "active", "reason": "resumed", "role": role})

    return Starlette(
        routes=[
            Route("/state", state),
            Route("/halt", halted, methods=["POST"]),
            Route("/resume", resumed, methods=["POST"]),
        ]
    )


async def pumpflow_trading(base: str, *args: str) -> int:
    parsed = build_parser().parse_args(["trading", *args, "--url", base])
    return await asyncio.to_thread(parsed.handler, parsed)


@pytest.mark.parametrize(
    ("role", "halt", "status"),
    [
        ("active", STORED, 0),
        # applied where it trades, stored later: said, and told apart from a success
        ("active", UNSTORED_ACTIVE, 3),
        # its lease lost while the halt waited for Postgres: it took effect nowhere
        ("standby", UNSTORED_LEASE_LOST, 1),
        # a stand-by cut off from Postgres: the replica trading does not know of it
        ("standby", UNSTORED_STANDBY, 1),
        # stored by a stand-by: the replica trading, named, applies it on its next round
        ("standby", STORED_STANDBY, 0),
    ],
)
async def test_a_halts_exit_status_says_where_it_took_effect(
    monkeypatch, capsys, role, halt, status
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(replica(role, halt)) as base:
        assert await pumpflow_trading(base, "halt", "--reason", "test") == status
    said = capsys.readouterr()
    if not halt["stored"]:
        assert halt["detail"] in said.err
    elif role == "standby":
        # its own state is not trading's: not printed as if it were
        assert said.out == f"halt stored: {halt['detail']}\n", said.out
    else:
        assert said.out.startswith("trading is halted (test); role active"), said.out


async def test_a_refused_resume_a_missing_token_and_no_answer_fail(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(replica("active", STORED, resume_status=503)) as base:
        assert await pumpflow_trading(base, "resume") == 1
        assert "503" in capsys.readouterr().err
        assert await pumpflow_trading(base, "state") == 0
        monkeypatch.delenv("PUMPFLOW_API_TOKEN")
        assert await pumpflow_trading(base, "halt") == 2
    assert await pumpflow_trading(f"http://127.0.0.1:{free_port()}", "state") == 1
    assert "does not answer" in capsys.readouterr().err


def refusing(status: int, detail: str) -> Starlette:
    """A replica that answers every call with ``status`` and FastAPI's JSON of ``detail``."""

    async def refuse(request: Request) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": detail}, status, headers=headers)

    paths = ("/state", "/halt", "/resume", "/unbooked/acknowledge", "/shutdown", "/progress")
    return Starlette(routes=[Route(path, refuse, methods=["GET", "POST"]) for path in paths])


@pytest.mark.parametrize(
    ("argv", "status", "detail", "said"),
    [
        (["trading", "halt"], 401, "missing or wrong bearer token",
         "refused the bearer token (401 unauthorized): it is missing or wrong; set "
         "PUMPFLOW_API_TOKEN to the service's own PUMPFLOW_API_TOKEN"),
        (["stop", "--no-wait"], 401, "missing or wrong bearer token",
         "refused the bearer token (401 unauthorized)"),
        (["trading", "resume"], 503,
         "not resumed: the ledger (Postgres) is unavailable (OSError: gone); trading stays",
         "cannot do it now (503: unavailable): not resumed: the ledger (Postgres) is "
         "unavailable (OSError: gone); trading stays"),
        (["trading", "state"], 503, "trading is starting: waiting for postgres",
         "cannot do it now (503: unavailable): trading is starting: waiting for postgres"),
        (["stop"], 503, "not started", "cannot do it now (503: unavailable): not started"),
        (["trading", "resume"], 409,
         "resume not recorded: this replica (t2:ab12) does not hold trading (it stands by); "
         "t1:cd34 holds it: give it there",
         "refused it (409 Conflict): resume not recorded: this replica (t2:ab12) does not "
         "hold trading (it stands by); t1:cd34 holds it: give it there"),
        (["trading", "acknowledge"], 409,
         "acknowledge not recorded: this replica (t1:cd34) does not hold trading (another "
         "replica took over); t2:ab12 holds it: give it there",
         "refused it (409 Conflict): acknowledge not recorded: this replica (t1:cd34) does "
         "not hold trading (another replica took over); t2:ab12 holds it: give it there"),
        (["trading", "halt"], 403,
         "mutating endpoints are disabled: a token must be configured (PUMPFLOW_API_TOKEN)",
         "refused it (403 Forbidden): mutating endpoints are disabled: a token must be "
         "configured (PUMPFLOW_API_TOKEN)"),
    ],
)  # fmt: skip
async def test_a_refusal_is_one_line_in_words_not_the_services_json(
    monkeypatch, capsys, argv, status, detail, said
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(refusing(status, detail)) as base:
        parsed = build_parser().parse_args([*argv, "--url", base])
        assert await asyncio.to_thread(parsed.handler, parsed) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"pumpflow {argv[0]}: {base} {said}")
    assert "{" not in err


async def test_stop_follows_the_exit_and_says_what_is_unconfirmed(monkeypatch, capsys):
    """``pumpflow stop`` against a fake exit replica: the progress it follows names the
    tranches without an outcome, the report ends it."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    polls = []

    async def shutdown(request: Request) -> JSONResponse:
        return JSONResponse({"published": True})

    async def progress(request: Request) -> JSONResponse:
        polls.append(1)
        if len(polls) < 2:
            return JSONResponse(
                {
                    "progress": {
                        "sold_out": 1,
                        "positions": 2,
                        "tranches": 3,
                        "unconfirmed_tranches": 1,
                        "deadline_margin_s": 42.0,
                    }
                }
            )
        return JSONResponse({"text": "graceful exit (test): 2 positions, 1 sold out"})

    app = Starlette(
        routes=[Route("/shutdown", shutdown, methods=["POST"]), Route("/progress", progress)]
    )
    async with local_app(app) as base:
        parsed = build_parser().parse_args(["stop", "--url", base, "--timeout", "30"])
        assert await asyncio.to_thread(parsed.handler, parsed) == 0
    out = capsys.readouterr().out
    assert "1/2 sold out, 3 tranches, 1 UNCONFIRMED (no outcome yet), 42.0s" in out
    assert out.rstrip().endswith("graceful exit (test): 2 positions, 1 sold out")


@pytest.mark.parametrize("command", ["trading state", "stop"])
@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8005", "ftp://127.0.0.1/"])
def test_a_url_that_is_no_http_address_is_refused_naming_it(command, url, capsys):
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([*command.split(), "--url", url])
    assert refused.value.code == 2
    assert f"argument --url: not an http(s) URL: {url!r}" in capsys.readouterr().err


async def test_acknowledge_forgets_the_unbooked_trades_named_and_lists_those_left(
    monkeypatch, capsys
):
    """``pumpflow trading acknowledge``: the signatures given (all, none given) go to the
    replica with the token; what is left is listed."""
    trades = {
        "sig1": {"signature": "sig1", "mint": "MintA", "side": "buy", "tokens": 1e6, "sol": 0.4},
        "sig2": {"signature": "sig2", "mint": "MintB", "side": "sell", "tokens": 2e6, "sol": 0.1,
                 "order_id": "p1:exit:1"},
    }  # fmt: skip

    async def acknowledge(request: Request) -> JSONResponse:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        named = (await request.json())["signatures"]
        gone = list(trades) if named is None else [s for s in named if s in trades]
        for signature in gone:
            del trades[signature]
        left = list(trades.values())
        return JSONResponse({"acknowledged": len(gone), "unbooked_wallet_trades": left})

    app = Starlette(routes=[Route("/unbooked/acknowledge", acknowledge, methods=["POST"])])
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(app) as base:
        assert await pumpflow_trading(base, "acknowledge", "--signature", "sig1") == 0
        out = capsys.readouterr().out
        assert out.startswith("1 unbooked wallet trades acknowledged; 1 left\n")
        said = "sell sig2: 2e+06 tokens of MintB, 0.1 SOL (sale p1:exit:1, its position closed)"
        assert said in out
        assert "sig1" not in out
        assert await pumpflow_trading(base, "acknowledge") == 0
        assert capsys.readouterr().out == "1 unbooked wallet trades acknowledged; 0 left\n"
        monkeypatch.delenv("PUMPFLOW_API_TOKEN")
        assert await pumpflow_trading(base, "acknowledge") == 2
