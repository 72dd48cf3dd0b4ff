"""``pumpflow trading`` and ``pumpflow stop``: what they say of the kill switch and the
graceful exit.

A local fake of a trading replica's HTTP API on 127.0.0.1 answers as the service does
(``services/trading/tests/test_kill_switch.py`` tests those answers)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pumpflow.cli.api import UNPUBLISHED
from pumpflow.cli.main import build_parser
from pumpflow.cli.run import NOT_FLAT
from pumpflow.common.events import ExitLine
from pumpflow.common.exit import GracefulExitSummary
from pumpflow.common.testing.servers import free_port, local_app

TOKEN = "cli-token"
START = 1_700_000_000.0
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


#: a limit a late fill left exceeded, as ``/limits`` lists it
EXCEEDED = {
    "limit": "token_exposure",
    "mint": "MintX",
    "value": 0.9703,
    "cap": 0.5,
    "excess": 0.4703,
    "text": "the exposure of MintX 0.9703 SOL over its limit 0.5000 SOL by 0.4703 SOL",
}


def limits_route(exceeded: list[dict], source: str = "book") -> Route:
    async def limits(request: Request) -> JSONResponse:
        return JSONResponse({"source": source, "exceeded": exceeded, "reservations": []})

    return Route("/limits", limits)


def replica(
    role: str, halt: dict, *, resume_status: int = 200, resume: dict | None = None
) -> Starlette:
    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"state": "active", "reason": "", "role": role})

    async def halted(request: Request) -> JSONResponse:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        body = {"state": "halted", "reason": (await request.json())["reason"], "role": role}
        return JSONResponse({**body, **halt}, status_code=200 if halt["stored"] else 202)

    async def resumed(request: Request) -> JSONResponse:
        if resume_status != 200:
            return JSONResponse({"detail": "not resumed: Postgres is away"}, resume_status)
        if resume is not None:
            return JSONResponse(resume, 202 if resume["announced"] is False else 200)
        return JSONResponse({"state": "active", "reason": "resumed", "role": role})

    return Starlette(
        routes=[
            Route("/state", state),
            limits_route([]),
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


#: the replica trading's answers while the broker takes no publication
UNANNOUNCED_HALT = {
    "stored": True,
    "announced": False,
    "detail": "halted in this replica at once; stored, so other replicas and a restart keep "
    "it; its announcement (trading.state) is not published yet: RabbitMQ has not confirmed "
    "it; it goes out once the broker takes it",
}
UNANNOUNCED_RESUME = {
    "state": "halted",
    "reason": "test",
    "role": "active",
    "announced": False,
    "detail": "resume stored; not applied in this replica yet: the round under way comes "
    "first, and RabbitMQ has not confirmed it; it applies and is announced right after",
}


async def test_a_resume_held_back_by_a_breaker_says_it_took_and_what_still_holds(
    monkeypatch, capsys
):
    """The operator's halt is lifted, a breaker still halts entries: said as a resume
    that took, with the breaker, not as a halt (exit status 0)."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    stale = "feed lag 12.0s (token.trade)"
    held = {
        "state": "halted",
        "reason": f"stale: {stale}",
        "role": "active",
        "operator_state": "active",
        "operator_reason": "resumed (CLI)",
        "announced": True,
        "breakers": {"stale": {"tripped": True, "reason": stale}, "feed": {"tripped": False}},
    }
    async with local_app(replica("active", STORED, resume=held)) as base:
        assert await pumpflow_trading(base, "resume") == 0
    said = capsys.readouterr().out
    assert said == (
        f"resumed: the operator's halt is lifted; trading is still halted (stale: {stale}) "
        f"until that clears; role active\nbreaker tripped: stale ({stale})\n"
    ), said


async def test_a_halt_or_resume_not_announced_yet_says_why_with_its_own_status(monkeypatch, capsys):
    """The broker takes no publication: the halt is in force and stored, the resume
    stored (and applied, or right after the round under way); their announcement goes
    out once the broker takes it: said on stderr, exit status 4."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    app = replica("active", UNANNOUNCED_HALT, resume=UNANNOUNCED_RESUME)
    async with local_app(app) as base:
        assert await pumpflow_trading(base, "halt", "--reason", "test") == UNPUBLISHED
        said = capsys.readouterr()
        assert said.out == "trading is halted (test); role active\n", said.out
        assert said.err == f"pumpflow trading: {UNANNOUNCED_HALT['detail']}\n", said.err
        assert await pumpflow_trading(base, "resume") == UNPUBLISHED
    said = capsys.readouterr()
    assert said.out == "trading is halted (test); role active\n", said.out
    assert said.err == f"pumpflow trading: {UNANNOUNCED_RESUME['detail']}\n", said.err


async def test_state_asked_of_a_stand_by_says_the_operators_state_and_the_holder(capsys):
    """A stand-by's /state is the ledger's: the operator's state, not the one in force,
    which is the holder's alone (null there)."""
    body = {
        "role": "standby",
        "source": "ledger",
        "holder": "t1:cd34",
        "state": None,
        "reason": None,
        "operator_state": "halted",
        "operator_reason": "from the desk",
    }

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(body)

    routes = [Route("/state", state), limits_route([EXCEEDED], "ledger")]
    async with local_app(Starlette(routes=routes)) as base:
        assert await pumpflow_trading(base, "state") == 0
    said = capsys.readouterr().out
    assert said == (
        "the operator's state is halted (from the desk), as the ledger holds it; "
        "role standby: the replica trading (t1:cd34) knows the state in force\n"
        "limits exceeded, as the ledger holds them (a fill booked past its check, or a "
        "limit set lower since: no entry adding to them is admitted, and the exit sells as "
        "usual):\n"
        f"  {EXCEEDED['text']}\n"
    ), said


async def test_state_prints_the_limits_exceeded_and_nothing_of_limits_when_none_is(capsys):
    """A late fill, or a limit set lower in a restart (a replica taking over with the
    positions of one before), may leave limits exceeded: ``trading state`` lists them (its
    ``/limits``), one a line, naming both causes; with none exceeded it says nothing of
    the limits."""
    total = {
        **EXCEEDED,
        "limit": "total_exposure",
        "mint": None,
        "text": "the total exposure 2.6000 SOL over its limit 2.5000 SOL by 0.1000 SOL",
    }
    exceeded: list[dict] = []

    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"state": "active", "reason": "", "role": "active"})

    routes = [Route("/state", state), limits_route(exceeded)]
    async with local_app(Starlette(routes=routes)) as base:
        assert await pumpflow_trading(base, "state") == 0
        assert capsys.readouterr().out == "trading is active (no reason); role active\n"
        exceeded += [EXCEEDED, total]
        assert await pumpflow_trading(base, "state") == 0
    assert capsys.readouterr().out == (
        "trading is active (no reason); role active\n"
        "limits exceeded (a fill booked past its check, or a limit set lower since: no "
        "entry adding to them is admitted, and the exit sells as usual):\n"
        f"  {EXCEEDED['text']}\n"
        f"  {total['text']}\n"
    )


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


@pytest.mark.parametrize(
    ("argv", "service"),
    [
        (["trading", "halt"], "trading"),
        (["trading", "state"], "trading"),
        (["stop", "--no-wait"], "exit"),
        (["sell", "Mint1pump"], "exit"),
    ],
)
async def test_an_address_of_another_service_is_said_to_be_one(monkeypatch, capsys, argv, service):
    """The default address is every service's default port: a kill switch given there
    must not read as trading refusing it."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(Starlette(routes=[])) as base:
        parsed = build_parser().parse_args([*argv, "--url", base])
        assert await asyncio.to_thread(parsed.handler, parsed) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    variable = {"trading": "PUMPFLOW_TRADING_URL", "exit": "PUMPFLOW_EXIT_URL"}[service]
    replica = {"trading": "a trading replica", "exit": "an exit replica"}[service]
    assert err.startswith(
        f"pumpflow {argv[0]}: {base} has no such endpoint (404 Not Found): is it {replica}'s "
        f"HTTP address? (--url, {variable})"
    ), err


def another_service(name: str) -> Starlette:
    """A replica of the service ``name``: its ``/healthz``, and 404 elsewhere."""

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"alive": True, "service": name, "replica": f"{name}-1"})

    return Starlette(routes=[Route("/healthz", healthz)])


@pytest.mark.parametrize(
    ("argv", "there", "wanted", "variable"),
    [
        (["trading", "state"], "exit", "a trading replica", "PUMPFLOW_TRADING_URL"),
        (["trading", "halt"], "features", "a trading replica", "PUMPFLOW_TRADING_URL"),
        (["stop", "--no-wait"], "trading", "an exit replica", "PUMPFLOW_EXIT_URL"),
        (["sell", "MintX"], "trading", "an exit replica", "PUMPFLOW_EXIT_URL"),
    ],
)
async def test_an_address_of_another_service_is_named_as_such(
    monkeypatch, capsys, argv, there, wanted, variable
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(another_service(there)) as base:
        parsed = build_parser().parse_args([*argv, "--url", base])
        assert await asyncio.to_thread(parsed.handler, parsed) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"pumpflow {argv[0]}: {base} serves the {there} service, not {wanted}: "
        f"give --url (or {variable}) {wanted}'s address"
    ), err


#: an exit replica's answer to a shutdown the broker has not taken yet
ACCEPTED = {
    "published": False,
    "reason": "test",
    "detail": "system.shutdown (test) accepted, not published yet: RabbitMQ has not "
    "confirmed it; it goes out once the broker takes it",
}
#: what pumpflow stop adds to it, asked under the request id r1
AGAIN = "; `pumpflow stop --request-id r1` asks again as the same request"


def exit_replica(summary: GracefulExitSummary, shutdown_answer: dict | None = None) -> Starlette:
    """A fake exit replica whose graceful exit is under way at the first look at its
    progress, over with ``summary`` at the next; it answers a shutdown with
    ``shutdown_answer`` (published, by default)."""
    polls = []

    async def shutdown(request: Request) -> JSONResponse:
        if len(polls) >= 2:
            # asked again once over, as the service answers a request it applied
            report = msgspec.to_builtins(summary.report())
            applied = {"published": True, "applied": True, "detail": "applied already: over"}
            return JSONResponse({**applied, "summary": report, "text": summary.text()})
        if shutdown_answer is not None:
            return JSONResponse(shutdown_answer, 200 if shutdown_answer["published"] else 202)
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
                        "in_flight": 1,
                        "unconfirmed_tranches": 1,
                        "deadline_margin_s": 42.0,
                    }
                }
            )
        # as the exit service answers once its graceful exit is over
        report = msgspec.to_builtins(summary.report())
        return JSONResponse({"summary": report, "text": summary.text()})

    return Starlette(
        routes=[Route("/shutdown", shutdown, methods=["POST"]), Route("/progress", progress)]
    )


SOLD = ExitLine(position_id="p1", mint="MintSold", tokens_sold=1e6, sol_received=0.25,
                tranches=2, completed=True, reason="graceful")  # fmt: skip
LOST = ExitLine(position_id="p2", mint="MintLost", tokens_sold=0.0, sol_received=0.0,
                tranches=0, completed=False, reason="deadline", unconfirmed_tranches=1,
                unconfirmed_tokens=2e6)  # fmt: skip


def graceful_exit(*lines: ExitLine) -> GracefulExitSummary:
    return GracefulExitSummary(reason="test", started_at=START, finished_at=START + 62.0,
                               deadline=START + 60.0, lines=lines)  # fmt: skip


async def pumpflow_stop(base: str, *argv: str) -> int:
    parsed = build_parser().parse_args(["stop", "--url", base, "--timeout", "30", *argv])
    return await asyncio.to_thread(parsed.handler, parsed)


async def test_stop_follows_the_exit_and_says_what_is_unconfirmed(monkeypatch, capsys):
    """``pumpflow stop`` against a fake exit replica: the progress it follows names the
    positions whose sale waits for trading (none filled while trading is down: said so)
    and the tranches without an outcome, the report ends it; flat, its status is 0."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(exit_replica(graceful_exit(SOLD))) as base:
        assert await pumpflow_stop(base) == 0
    printed = capsys.readouterr()
    # the replica asked follows its own share of the positions, the report all of them
    assert (
        "1/2 of this replica's positions sold out, 3 tranches filled, 1 position's sale "
        "awaiting trading, 1 UNCONFIRMED (no outcome yet), 42.0s" in printed.out
    )
    assert printed.out.rstrip().endswith("MintSold     graceful    2 tranches     0.2500 SOL  "
                                         "slippage -")  # fmt: skip
    assert printed.err == ""


async def test_stop_whose_report_leaves_positions_open_says_so_and_ends_non_zero(
    monkeypatch, capsys
):
    """A graceful exit whose report has positions not sold out: ``pumpflow stop`` prints
    the report, then says on stderr how many are left and why, with ``pumpflow run``'s
    status and words; a script can tell."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(exit_replica(graceful_exit(SOLD, LOST))) as base:
        assert await pumpflow_stop(base) == NOT_FLAT
    printed = capsys.readouterr()
    assert "MintLost" in printed.out and "NOT SOLD OUT" in printed.out
    assert printed.err == (
        "pumpflow stop: 1 position left open after the graceful exit: it ended 2.0s past "
        "its deadline (exit_deadline_s 60); its report: 1 of 2 not sold out, 1 with sales "
        "that got no outcome\n"
    )


async def test_stop_accepted_before_the_broker_took_it_says_so_and_follows_the_exit(
    monkeypatch, capsys
):
    """The broker takes no publication: the replica accepts the shutdown and publishes it
    once the broker takes it. ``--no-wait`` ends there with its own status; otherwise the
    exit is followed as usual."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with local_app(exit_replica(graceful_exit(SOLD), ACCEPTED)) as base:
        argv = ["stop", "--url", base, "--no-wait", "--request-id", "r1"]
        parsed = build_parser().parse_args(argv)
        assert await asyncio.to_thread(parsed.handler, parsed) == UNPUBLISHED
        printed = capsys.readouterr()
        assert printed.out == ""
        assert printed.err == f"pumpflow stop: {ACCEPTED['detail']}{AGAIN}\n"
        assert await pumpflow_stop(base, "--request-id", "r1") == 0
    printed = capsys.readouterr()
    assert printed.err == f"pumpflow stop: {ACCEPTED['detail']}{AGAIN}\n"
    assert "1/2 of this replica's positions sold out" in printed.out
    assert "MintSold" in printed.out


async def test_stop_whose_shutdown_the_broker_never_took_says_the_exit_did_not_begin(
    monkeypatch, capsys
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)

    async def shutdown(request: Request) -> JSONResponse:
        return JSONResponse(ACCEPTED, 202)

    async def progress(request: Request) -> JSONResponse:
        return JSONResponse({"run": None, "accepting_entries": True})

    app = Starlette(
        routes=[Route("/shutdown", shutdown, methods=["POST"]), Route("/progress", progress)]
    )
    async with local_app(app) as base:
        argv = ["stop", "--url", base, "--timeout", "0.5", "--request-id", "r1"]
        parsed = build_parser().parse_args(argv)
        assert await asyncio.to_thread(parsed.handler, parsed) == 1
    printed = capsys.readouterr()
    assert printed.err == (
        f"pumpflow stop: {ACCEPTED['detail']}{AGAIN}\n"
        "pumpflow stop: the graceful exit did not begin in time (system.shutdown was "
        "accepted before the broker took it: the replica publishes it once the broker does)\n"
    )


async def test_stop_past_its_timeout_says_the_exit_goes_on_and_how_to_follow_it(
    monkeypatch, capsys
):
    """``--timeout`` ends the following, not the graceful exit: the operator is told it
    goes on, until when, and the command that follows it again, the same request."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)

    async def shutdown(request: Request) -> JSONResponse:
        return JSONResponse({"published": True})

    async def progress(request: Request) -> JSONResponse:
        under_way = {"sold_out": 0, "positions": 2, "tranches": 0, "in_flight": 2,
                     "deadline_margin_s": 41.5}  # fmt: skip
        return JSONResponse({"run": {"run_id": "x"}, "progress": under_way})

    app = Starlette(
        routes=[Route("/shutdown", shutdown, methods=["POST"]), Route("/progress", progress)]
    )
    async with local_app(app) as base:
        argv = ["stop", "--url", base, "--timeout", "0.5", "--request-id", "r1"]
        parsed = build_parser().parse_args(argv)
        assert await asyncio.to_thread(parsed.handler, parsed) == 1
    assert capsys.readouterr().err == (
        "pumpflow stop: the graceful exit did not end within --timeout 0.5 s; it goes on, "
        "its deadline 41.5 s away: `pumpflow stop --request-id r1` follows it again\n"
    )


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
        assert out.startswith("1 unbooked wallet trade acknowledged; 1 left\n")
        said = "sell sig2: 2e+06 tokens of MintB, 0.1 SOL (sale p1:exit:1, its position closed)"
        assert said in out
        assert "sig1" not in out
        assert await pumpflow_trading(base, "acknowledge") == 0
        assert capsys.readouterr().out == "1 unbooked wallet trade acknowledged; 0 left\n"
        monkeypatch.delenv("PUMPFLOW_API_TOKEN")
        assert await pumpflow_trading(base, "acknowledge") == 2


async def test_state_names_the_breakers_tripped_and_the_daily_loss_under_a_halt(capsys):
    """The state's reason is one cause: under an operator's halt, a breaker tripped (the
    feed silent, say) or the day's loss limit keeps trading from entering after a resume
    too; the operator deciding to resume reads them here."""
    body = {
        "state": "halted",
        "reason": "shutdown: stop",
        "role": "active",
        "daily_loss_limit_hit": True,
        "breakers": {
            "curve": {"tripped": False, "reason": ""},
            "stale": {"tripped": True, "reason": "86 of 101 active tokens silent for over 30s"},
        },
    }

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(body)

    async with local_app(Starlette(routes=[Route("/state", state), limits_route([])])) as base:
        assert await pumpflow_trading(base, "state") == 0
    assert capsys.readouterr().out == (
        "trading is halted (shutdown: stop); role active\n"
        "breaker tripped: stale (86 of 101 active tokens silent for over 30s)\n"
        "the daily loss limit is reached: trading only reduces until the next UTC day\n"
    )


async def test_state_says_what_is_held_and_the_pnl(capsys):
    """``trading state`` is the status an operator reads from a shell (in a container of
    the compose stack the only one): besides the state, what is held and what it made,
    from ``/pnl``, the replica's book or, from a stand-by, the ledger's."""
    pnl = {
        "role": "active",
        "source": "book",
        "open_positions": 3,
        "closed_positions": 35,
        "exposure_sol": 0.78894,
        "realized_pnl_sol": 2.12645,
        "unrealized_pnl_sol": -0.0123,
        "fees_sol": 0.40729,
        "capital_sol": 12.12645,
    }

    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"state": "active", "reason": "", "role": "active"})

    async def pnl_route(request: Request) -> JSONResponse:
        return JSONResponse(pnl)

    routes = [Route("/state", state), limits_route([]), Route("/pnl", pnl_route)]
    async with local_app(Starlette(routes=routes)) as base:
        assert await pumpflow_trading(base, "state") == 0
        assert capsys.readouterr().out == (
            "trading is active (no reason); role active\n"
            "3 positions open, 0.7889 SOL in tokens; 35 closed\n"
            "PnL after fees: realised +2.1265 SOL, unrealised -0.0123 SOL (fees 0.4073 SOL); "
            "capital 12.1265 SOL\n"
        )
        pnl.update(source="ledger", unrealized_pnl_sol=None, open_positions=0, exposure_sol=0)
        assert await pumpflow_trading(base, "state") == 0
    # a stand-by has no marks: the unrealised PnL is the holder's
    assert capsys.readouterr().out == (
        "trading is active (no reason); role active\n"
        "0 positions open, 0.0000 SOL in tokens; 35 closed (the ledger's)\n"
        "PnL after fees: realised +2.1265 SOL (fees 0.4073 SOL); capital 12.1265 SOL\n"
    )


@pytest.mark.parametrize(
    ("executor", "line"),
    [("live", "orders executed LIVE: real money through the trade API"),
     ("paper", "orders executed on paper: no money moves")],
)  # fmt: skip
async def test_state_says_whether_trading_is_live(capsys, executor, line):
    async def state(request: Request) -> JSONResponse:
        return JSONResponse(
            {"state": "active", "reason": "", "role": "active", "executor": executor}
        )

    async with local_app(Starlette(routes=[Route("/state", state), limits_route([])])) as base:
        assert await pumpflow_trading(base, "state") == 0
    assert capsys.readouterr().out == f"trading is active (no reason); role active\n{line}\n"


async def test_live_state_lists_the_orders_of_unknown_outcome_and_the_unbooked_trades(capsys):
    """After a timeout or a hand trade, ``trading state`` is where a live operator looks:
    it names the orders whose outcome no answer gave and the wallet trades booked to no
    order, with the signatures ``acknowledge --signature`` takes."""
    unknown = {
        "order_id": "p7:entry",
        "mint": "MintA",
        "side": "buy",
        "state": "unknown",
        "outcome": "no answer from the trade API within 5 s",
        "signature": None,
    }
    unbooked = {"signature": "sig9", "mint": "MintB", "side": "buy", "tokens": 3e6,
                "sol": 0.2, "candidates": []}  # fmt: skip
    asked: list[dict] = []

    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"state": "active", "reason": "", "role": "active",
                             "executor": "live"})  # fmt: skip

    ledger_away: list[bool] = []

    async def orders(request: Request) -> JSONResponse:
        asked.append(dict(request.query_params))
        if ledger_away:
            return JSONResponse({"detail": "the ledger (Postgres) is unavailable"}, 503)
        return JSONResponse({"count": 1, "more": False, "orders": [unknown],
                             "unbooked_wallet_trades": [unbooked]})  # fmt: skip

    routes = [Route("/state", state), limits_route([]), Route("/orders", orders)]
    async with local_app(Starlette(routes=routes)) as base:
        assert await pumpflow_trading(base, "state") == 0
    assert asked == [{"state": "unknown"}]
    assert capsys.readouterr().out == (
        "trading is active (no reason); role active\n"
        "orders executed LIVE: real money through the trade API\n"
        "1 order of unknown outcome (the wallet's trades settle each; none is sent again):\n"
        "  buy p7:entry of MintA: no answer from the trade API within 5 s\n"
        "1 unbooked wallet trade (settle each by hand, then pumpflow trading acknowledge "
        "--signature SIG):\n"
        "  buy sig9: 3e+06 tokens of MintB, 0.2 SOL\n"
    )
    # the state is read all the same while the ledger is away
    ledger_away.append(True)
    async with local_app(Starlette(routes=routes)) as base:
        assert await pumpflow_trading(base, "state") == 0
    out = capsys.readouterr().out
    assert out.startswith("trading is active (no reason); role active\n")
    assert "not read: " in out and "the ledger (Postgres) is unavailable" in out, out


def limits_replica(seen: list[tuple[str, dict | None]], *, status: int = 200) -> Starlette:
    """A replica's ``/limits``: shown, set or reset, as the service answers (see
    ``services/trading/tests/test_operator_limits.py``); ``seen``: what it was asked."""
    operator = {"source": "operator", "settings": 5, "reason": "a bad day",
                "changed_at": START}  # fmt: skip
    settings = {"source": "settings", "settings": 0.5, "reason": None, "changed_at": None}

    async def answer(request: Request) -> JSONResponse:
        body = await request.json() if request.method == "PUT" else None
        asked = dict(request.query_params)
        if "limit" in asked:
            asked["limit"] = request.query_params.getlist("limit")
        seen.append((request.method, body or asked))
        if request.method != "GET":
            assert request.headers["authorization"] == f"Bearer {TOKEN}"
            if status != 200:
                return JSONResponse({"detail": "limits change not recorded: t1:cd34 holds it"},
                                    status)  # fmt: skip
        return JSONResponse({
            "role": "active",
            "source": "book",
            "sources": {
                "max_concurrent_positions": {"value": 1, **operator},
                "max_total_exposure_fraction": {"value": 0.5, **settings},
                "add_to_positions": {"value": False, **operator, "settings": True},
                "reentry_cooldown_s": {"value": 0.0, **settings, "settings": 0.0},
            },
            "exceeded": [{**EXCEEDED, "limit": "positions", "text": "2 positions held or "
                          "entered, over their limit 1 by 1"}],
        })  # fmt: skip

    return Starlette(routes=[Route("/limits", answer, methods=["GET", "PUT", "DELETE"])])


async def test_limits_shows_each_limits_source_and_sets_or_resets_them(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    seen: list = []
    async with local_app(limits_replica(seen)) as base:
        assert await pumpflow_trading(base, "limits") == 0
        out = capsys.readouterr().out
        assert "max_concurrent_positions 1: the operator's (a bad day, at 2023-11-14T22:13:20Z)" \
            "; settings 5" in out, out  # fmt: skip
        assert "max_total_exposure_fraction 0.5: the settings'" in out
        assert "add_to_positions false: the operator's (a bad day, at 2023-11-14T22:13:20Z)" \
            "; settings true" in out, out  # fmt: skip
        assert "reentry_cooldown_s 0: the settings'" in out
        assert "exceeded: 2 positions held or entered, over their limit 1 by 1" in out
        argv = ("limits", "--set", "max_concurrent_positions=2", "--set",
                "max_total_exposure_fraction=0.3", "--set", "add_to_positions=False",
                "--set", "reentry_cooldown_s=90", "--reason", "calmer")  # fmt: skip
        assert await pumpflow_trading(base, *argv) == 0
        assert await pumpflow_trading(base, "limits", "--reset") == 0
        argv = ("limits", "--reset", "max_concurrent_positions", "--reset",
                "max_daily_loss_fraction", "--reason", "calmer")  # fmt: skip
        assert await pumpflow_trading(base, *argv) == 0
        assert "max_concurrent_positions 1: the operator's" in capsys.readouterr().out
    assert seen == [
        ("GET", {}),
        ("PUT", {"max_concurrent_positions": 2, "max_total_exposure_fraction": 0.3,
                 "add_to_positions": False, "reentry_cooldown_s": 90, "reason": "calmer"}),
        ("DELETE", {"reason": "limits reset (CLI)"}),
        ("DELETE", {"limit": ["max_concurrent_positions", "max_daily_loss_fraction"],
                    "reason": "calmer"}),
    ]  # fmt: skip
    assert seen[1][1]["add_to_positions"] is False  # JSON's false, not 0


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("--reset", "--reset", "max_risk_per_trade"), "--reset (all) or --reset NAME"),
        (("--set", "max_risk_per_trade=0.01", "--reset", "max_risk_per_trade"),
         "--set or --reset, not both"),
    ],
)  # fmt: skip
async def test_a_limits_reset_all_and_by_name_or_with_a_set_is_refused_unsent(
    monkeypatch, capsys, argv, said
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    seen: list = []
    async with local_app(limits_replica(seen)) as base:
        # the flags' error, as argparse's own: not a refusal by the replica (1)
        assert await pumpflow_trading(base, "limits", *argv) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err
    assert seen == []


async def test_a_limits_change_refused_or_without_a_token_fails(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    seen: list = []
    async with local_app(limits_replica(seen, status=409)) as base:
        assert await pumpflow_trading(base, "limits", "--set", "max_risk_per_trade=0.01") == 1
        err = capsys.readouterr().err
        assert "409" in err and "t1:cd34 holds it" in err and err.count("\n") == 1, err
        assert await pumpflow_trading(base, "limits", "--set", "max_risk_per_trade=lots") == 2
        assert "VALUE a number (or true or false)" in capsys.readouterr().err
        assert await pumpflow_trading(base, "limits", "--set", "add_to_positions=no") == 2
        assert "--set add_to_positions=no: give NAME=VALUE" in capsys.readouterr().err
        monkeypatch.delenv("PUMPFLOW_API_TOKEN")
        assert await pumpflow_trading(base, "limits", "--reset") == 2
    assert [method for method, _ in seen] == ["PUT"]


def recording(seen: list[str]) -> Starlette:
    """A replica that records every request it is sent and answers none usefully."""

    async def answer(request: Request) -> JSONResponse:
        seen.append(f"{request.method} {request.url.path}")
        return JSONResponse({"detail": "not expected"}, 500)

    paths = ("/state", "/limits", "/pnl", "/halt", "/resume", "/unbooked/acknowledge")
    return Starlette(routes=[Route(p, answer, methods=["GET", "POST", "PUT", "DELETE"])
                             for p in paths])  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        # a resume that dropped the limit asked with it would trade on the old limits
        (("resume", "--set", "max_concurrent_positions=1"), "--set"),
        (("halt", "--reset"), "--reset"),
        (("state", "--set", "max_risk_per_trade=0.01"), "--set"),
        (("halt", "--signature", "5xSig"), "--signature"),
        (("limits", "--signature", "5xSig"), "--signature"),
        (("acknowledge", "--set", "max_concurrent_positions=1"), "--set"),
        (("acknowledge", "--reason", "seen to"), "--reason"),
        (("state", "--reason", "looking"), "--reason"),
    ],
)
async def test_a_flag_the_action_does_not_take_is_refused_unsent(monkeypatch, capsys, argv, flag):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    seen: list[str] = []
    async with local_app(recording(seen)) as base:
        assert await pumpflow_trading(base, *argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} does not go with {argv[0]}" in err and err.count("\n") == 1, err
    assert seen == []


async def test_stop_prints_its_own_exits_report_not_the_last_one_the_replica_ended(
    monkeypatch, capsys
):
    """The replica asked ends the last graceful exit (its report in /progress) after this
    request began the next: that report is not this request's. ``pumpflow stop`` asks
    again under its request id, which the service answers with the run that applied it,
    and prints that run's report once it is over."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    last = GracefulExitSummary(reason="the last one", started_at=START - 120.0,
                               finished_at=START - 60.0, deadline=START, lines=(SOLD,))  # fmt: skip
    mine = graceful_exit(SOLD, LOST)
    polls: list[int] = []
    asked: list[str] = []

    async def shutdown(request: Request) -> JSONResponse:
        asked.append((await request.json())["request_id"])
        if len(asked) == 1:
            return JSONResponse({"published": True})
        over = len(polls) >= 3
        answer = {"published": True, "applied": True,
                  "detail": f"applied already: {'over' if over else 'under way'}"}  # fmt: skip
        if over:
            answer |= {"summary": msgspec.to_builtins(mine.report()), "text": mine.text()}
        return JSONResponse(answer)

    async def progress(request: Request) -> JSONResponse:
        polls.append(1)
        if len(polls) == 1:  # the last exit ended here after the request was made
            return JSONResponse({"summary": msgspec.to_builtins(last.report()),
                                 "text": last.text()})  # fmt: skip
        if len(polls) == 2:
            progress = {"sold_out": 0, "positions": 2, "tranches": 0, "in_flight": 0,
                        "unconfirmed_tranches": 0, "deadline_margin_s": 50.0}  # fmt: skip
            return JSONResponse({"progress": progress})
        return JSONResponse({"summary": msgspec.to_builtins(mine.report()), "text": mine.text()})

    app = Starlette(routes=[Route("/shutdown", shutdown, methods=["POST"]),
                            Route("/progress", progress)])  # fmt: skip
    async with local_app(app) as base:
        assert await pumpflow_stop(base, "--request-id", "r1") == NOT_FLAT
    printed = capsys.readouterr()
    assert "the last one" not in printed.out, printed.out
    assert "MintLost" in printed.out and "NOT SOLD OUT" in printed.out
    assert set(asked) == {"r1"}
