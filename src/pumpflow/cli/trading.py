"""``pumpflow trading halt|resume|state|acknowledge|limits``: the kill switch, from a
shell, the acknowledgement of the live wallet's unbooked trades, and the risk limits.

Talks to a trading replica's HTTP API (``--url``, default the local one) with the
bearer token of ``PUMPFLOW_API_TOKEN``. Any replica takes a halt, so the kill switch
needs no search for the replica trading: that one applies it at once; a stand-by (or a
replica another took over from) stores it in the ledger, and the replica trading, named
in what is printed, applies it on its next round (within a tick, a second by default);
when that replica is late renewing its lease (dead, say), what is printed says instead
that whichever replica takes trading next starts halted, and when at the latest.
A halt outlives restarts until a resume. A halt stored late (given while Postgres was
away, retried) after a newer resume halts trading again: resume again if so. Only the
replica trading takes a resume or an acknowledgement: the others refuse them (409,
exit status 1, one line naming the replica that holds trading when known: give it
there; when that replica is late renewing its lease, when trading passes to a stand-by:
give it to the one ``state`` names then). A halt given to the replica trading while
Postgres is away applies at once and is stored once Postgres is back (said so, exit
status 3); given to a stand-by then, it applies nowhere until stored (exit status 1:
halt the replica trading). A resume is refused meanwhile.

While the broker takes no publication (short of memory or disk it blocks every
publisher; or it does not answer), the replica trading still answers within
``trading_halt_store_wait_s``: a halt applied and stored, a resume stored and applied
(or, behind a round of the replica that waits for the broker, applied right after it),
their announcement (``trading.state``) not published yet. One line on stderr says so
and why, exit status 4 (:data:`~pumpflow.cli.api.UNPUBLISHED`): it goes out once the
broker takes it, in order with what the replica published before it.

``state`` also says who executes orders (live: real money, or paper), what is held and
what it made (``/pnl``), and lists the limits exceeded now, if any (``/limits``: a live
order's late fill, booked past its limit check).

``acknowledge`` forgets the live wallet's trades that matched no order (listed in
``unbooked_wallet_trades`` of ``/orders``), those named by ``--signature`` or all, once
the operator has seen to them; it prints those left.

``limits`` shows the risk limits an operator may change, each with its value and where
it comes from (the settings, or the operator: why and when); ``--set NAME=VALUE``
(repeatable; VALUE a number, or ``true``/``false`` for ``add_to_positions``, sent as
JSON's) sets them over the settings, ``--reset`` puts the settings' back (all;
``--reset NAME``, repeatable: those named alone). Only the
replica trading takes a change (409, exit status 1, naming the holder, elsewhere); it
applies from the next decision, is stored in the ledger for a restart or a take-over,
and sells nothing: an exposure over a limit lowered is listed exceeded and refuses the
entries that would add to it.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
from datetime import UTC, datetime

from pumpflow.cli.api import (
    UNPUBLISHED,
    api_token,
    failure,
    get_json,
    post_json,
    replica_url_argument,
    send_json,
)
from pumpflow.common.text import counted

#: what ``state`` says of the executor a replica's ``/state`` names
EXECUTOR_LINES = {
    "live": "orders executed LIVE: real money through the trade API",
    "paper": "orders executed on paper: no money moves",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trading",
        help="the kill switch (halt, resume), the trading state, the risk limits "
        "(limits) and the live wallet's unbooked trades (acknowledge)",
        description=(
            "Halt entries at once (exits go on), resume them, show the state, show or "
            "change the risk limits, or acknowledge the live wallet's unbooked trades, "
            "through a trading replica's "
            "HTTP API; the token comes from PUMPFLOW_API_TOKEN. Exit status 0 done; 1 "
            "refused, not applied anywhere, or no answer; 2 without the token, or a flag "
            "refused (one its action does not take, a --set that is no NAME=VALUE; nothing "
            "sent); 3 a halt "
            "applied by the replica trading and not stored yet (Postgres away); 4 a halt or "
            "resume stored and not announced yet, the broker taking no publication "
            "(blocking publishers, short of memory or disk, or not answering): it goes out "
            "once the broker takes it."
        ),
    )
    parser.add_argument(
        "action",
        choices=("halt", "resume", "state", "acknowledge", "limits"),
        help="halt: no new entries (exits go on; any replica takes it); resume: enter "
        "again (the replica trading only); state: show it; acknowledge: forget unbooked "
        "wallet trades seen to (the replica trading only); limits: show the risk limits, "
        "or change them (--set, --reset; the replica trading only)",
    )
    parser.add_argument(
        "--set",
        action="append",
        dest="limits",
        metavar="NAME=VALUE",
        help="limits: set a risk limit over its setting (repeatable), e.g. "
        "max_concurrent_positions=2, reentry_cooldown_s=300, add_to_positions=false",
    )
    parser.add_argument(
        "--reset",
        action="append",
        nargs="?",
        const=None,  # bare: every limit
        metavar="NAME",
        help="limits: back to the settings' limits, all; with a NAME, that one alone (repeatable)",
    )
    parser.add_argument("--reason", default=None, help="why (kept with the state)")
    parser.add_argument(
        "--signature",
        action="append",
        dest="signatures",
        help="acknowledge: the unbooked trade's signature (repeatable; default: all)",
    )
    replica_url_argument(parser, "trading")
    parser.set_defaults(handler=trading_command)


#: each flag (by its dest) beside --url, and the actions that take it
_ACTION_FLAGS = {
    "limits": ("--set", {"limits"}),
    "reset": ("--reset", {"limits"}),
    "reason": ("--reason", {"halt", "resume", "limits"}),
    "signatures": ("--signature", {"acknowledge"}),
}


def _misplaced_flag(args: argparse.Namespace) -> tuple[str, set[str]] | None:
    """The first flag given that ``args.action`` does not take, and the actions that
    take it: sent anyway, it would be dropped while the action still applies (a resume on
    the limits it was meant to change)."""
    for dest, (flag, actions) in _ACTION_FLAGS.items():
        if getattr(args, dest) is not None and args.action not in actions:
            return flag, actions
    return None


def trading_command(args: argparse.Namespace) -> int:
    url = args.url
    misplaced = _misplaced_flag(args)
    if misplaced is not None:
        flag, actions = misplaced
        print(f"pumpflow trading: {flag} does not go with {args.action} (it goes with "
              f"{' or '.join(sorted(actions))}): nothing sent", file=sys.stderr)  # fmt: skip
        return 2
    if args.action == "acknowledge":
        return acknowledge(url, args.signatures)
    if args.action == "limits":
        return limits(url, args.limits, reset=args.reset, reason=args.reason)
    exceeded: list[dict] = []
    pnl: dict | None = None
    unresolved: list[str] = []
    try:
        if args.action == "state":
            body = get_json(f"{url}/state")
            exceeded = get_json(f"{url}/limits").get("exceeded", [])
            pnl = _pnl(url)
            if body.get("executor") == "live":
                unresolved = _unresolved(url)
        else:
            token = api_token("trading")
            if not token:
                return 2
            reason = args.reason or f"{args.action} (CLI)"
            body = post_json(f"{url}/{args.action}", {"reason": reason}, token)
    except OSError as exc:
        print(failure("trading", url, exc, service="trading"), file=sys.stderr)
        return 1
    # a halt given to a replica that does not trade: its own state is not trading's, the
    # detail says which replica applies the halt, and when
    elsewhere = args.action == "halt" and body["role"] != "active"
    if body.get("source") == "ledger":
        # a stand-by's: the state in force is the holder's alone
        holder = body.get("holder") or "not known here"
        print(f"the operator's state is {body['operator_state']} "
              f"({body['operator_reason'] or 'no reason'}), as the ledger holds it; "
              f"role {body['role']}: the replica trading ({holder}) knows the state "
              "in force")  # fmt: skip
    elif (
        args.action == "resume"
        and body.get("operator_state") == "active"
        and body["state"] != "active"
    ):
        # the resume took: what still holds entries back is no operator's to lift
        print(f"resumed: the operator's halt is lifted; trading is still {body['state']} "
              f"({body['reason'] or 'no reason'}) until that clears; "
              f"role {body['role']}")  # fmt: skip
    elif not elsewhere:
        print(f"trading is {body['state']} ({body['reason'] or 'no reason'}); "
              f"role {body['role']}")  # fmt: skip
    executor = EXECUTOR_LINES.get(body.get("executor"))
    if executor is not None and args.action == "state":
        print(executor)
    if unresolved:
        print(*unresolved, sep="\n")
    if args.action in ("state", "resume"):
        # the state names one cause; these hold entries back after a resume too
        for name, breaker in (body.get("breakers") or {}).items():
            if breaker.get("tripped"):
                print(f"breaker tripped: {name} ({breaker.get('reason') or 'no reason'})")
        if body.get("daily_loss_limit_hit"):
            print("the daily loss limit is reached: trading only reduces until the next UTC day")
    if pnl is not None:
        print(*_pnl_lines(pnl), sep="\n")
    if exceeded:
        held = ", as the ledger holds them" if body.get("source") == "ledger" else ""
        # a late fill's, or a restart's with a lower limit over what was held
        print(f"limits exceeded{held} (a fill booked past its check, or a limit set lower "
              "since: no entry adding to them is admitted, and the exit sells as "
              "usual):")  # fmt: skip
        for limit in exceeded:
            print(f"  {limit['text']}")
    if body.get("stored") is False:
        print(f"pumpflow trading: {body['detail']}", file=sys.stderr)
        # applied by the replica that trades, or by none until it is stored
        return 3 if body["role"] == "active" else 1
    if elsewhere:
        print(f"halt stored: {body['detail']}")
    if body.get("announced") is False:
        # in force here, or right after the round under way: its announcement waits
        print(f"pumpflow trading: {body['detail']}", file=sys.stderr)
        return UNPUBLISHED
    return 0


def _pnl(url: str) -> dict | None:
    """The replica's ``/pnl``; None from a replica that serves none."""
    return _optional(f"{url}/pnl")


def _optional(url: str) -> dict | None:
    """The replica's answer at ``url``; None from a replica that serves none."""
    try:
        return get_json(url)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _unresolved(url: str) -> list[str]:
    """The live orders no answer settled and the wallet trades booked to no order, as
    ``/orders?state=unknown`` lists them: what an operator sees to by hand. Read from the
    ledger: while it is away, the state is shown all the same, saying so."""
    try:
        orders = _optional(f"{url}/orders?state=unknown")
    except OSError as exc:
        reason = failure("trading", url, exc, service="trading").removeprefix("pumpflow trading: ")
        return [f"orders of unknown outcome and unbooked wallet trades not read: {reason}"]
    if orders is None:
        return []
    lines = []
    if orders["orders"]:
        more = " (more: see /orders)" if orders.get("more") else ""
        lines.append(f"{counted(len(orders['orders']), 'order')} of unknown outcome{more} "
                     "(the wallet's trades settle each; none is sent again):")  # fmt: skip
        lines += [f"  {o['side']} {o['order_id']} of {o['mint']}: {o['outcome']}"
                  for o in orders["orders"]]  # fmt: skip
    unbooked = orders.get("unbooked_wallet_trades") or []
    if unbooked:
        lines.append(f"{counted(len(unbooked), 'unbooked wallet trade')} (settle each by hand, "
                     "then pumpflow trading acknowledge --signature SIG):")  # fmt: skip
        lines += [_unbooked_line(trade) for trade in unbooked]
    return lines


def _unbooked_line(trade: dict) -> str:
    whose = f" (sale {trade['order_id']}, its position closed)" if trade.get("order_id") else ""
    return (f"  {trade['side']} {trade['signature']}: {trade['tokens']:g} tokens of "
            f"{trade['mint']}, {trade['sol']:g} SOL{whose}")  # fmt: skip


def _pnl_lines(pnl: dict) -> list[str]:
    """What is held and what it made, as ``/pnl`` says (the ledger's from a stand-by,
    which has no marks: the unrealised PnL is the holder's)."""
    ledger = " (the ledger's)" if pnl.get("source") == "ledger" else ""
    unrealized = pnl.get("unrealized_pnl_sol")
    marked = f", unrealised {unrealized:+.4f} SOL" if unrealized is not None else ""
    return [
        f"{counted(pnl['open_positions'], 'position')} open, "
        f"{pnl['exposure_sol']:.4f} SOL in tokens; {pnl['closed_positions']} closed{ledger}",
        f"PnL after fees: realised {pnl['realized_pnl_sol']:+.4f} SOL{marked} "
        f"(fees {pnl['fees_sol']:.4f} SOL); capital {pnl['capital_sol']:.4f} SOL",
    ]


def acknowledge(url: str, signatures: list[str] | None) -> int:
    """Forget the unbooked trades ``signatures`` (all when None); print those left."""
    token = api_token("trading")
    if not token:
        return 2
    try:
        body = post_json(f"{url}/unbooked/acknowledge", {"signatures": signatures}, token)
    except OSError as exc:
        print(failure("trading", url, exc, service="trading"), file=sys.stderr)
        return 1
    left = body["unbooked_wallet_trades"]
    acknowledged = counted(body["acknowledged"], "unbooked wallet trade")
    print(f"{acknowledged} acknowledged; {len(left):,} left")
    for trade in left:
        print(_unbooked_line(trade))
    return 0


#: what ``--set NAME=VALUE`` sends for a switch's VALUE (JSON's true or false)
_SWITCHES = {"true": True, "false": False}


def _value(text: str) -> bool | int | float:
    """``--set``'s VALUE as JSON carries it: true or false, or a number (the replica
    checks it is the limit's type)."""
    if text.lower() in _SWITCHES:
        return _SWITCHES[text.lower()]
    try:
        return int(text)
    except ValueError:
        return float(text)


def _said(value: bool | float) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


def limits(
    url: str, given: list[str] | None, *, reset: list[str | None] | None, reason: str | None
) -> int:
    """Show the risk limits, or set ``given`` (NAME=VALUE) or ``reset`` them first (the
    names; None for every one)."""
    if given and reset:
        print("pumpflow trading: --set or --reset, not both", file=sys.stderr)
        return 2
    if reset and None in reset and len(reset) > 1:
        print("pumpflow trading: --reset (all) or --reset NAME (those named), not both",
              file=sys.stderr)  # fmt: skip
        return 2
    values: dict[str, bool | int | float] = {}
    for item in given or ():
        name, _, text = item.partition("=")
        try:
            values[name.strip()] = _value(text.strip())
        except ValueError:
            print(f"pumpflow trading: --set {item}: give NAME=VALUE, VALUE a number "
                  "(or true or false)", file=sys.stderr)  # fmt: skip
            return 2
    try:
        if values or reset:
            token = api_token("trading")
            if not token:
                return 2
            said = reason or ("limits reset (CLI)" if reset else "limits changed (CLI)")
            if reset:
                names = [("limit", name) for name in reset if name is not None]
                query = urllib.parse.urlencode([*names, ("reason", said)])
                body = send_json(f"{url}/limits?{query}", None, token, method="DELETE")
            else:
                body = send_json(f"{url}/limits", {**values, "reason": said}, token, method="PUT")
        else:
            body = get_json(f"{url}/limits")
    except OSError as exc:
        print(failure("trading", url, exc, service="trading"), file=sys.stderr)
        return 1
    held = " (as the ledger holds them)" if body.get("source") == "ledger" else ""
    print(f"risk limits{held}; role {body.get('role')}:")
    for name, limit in (body.get("sources") or {}).items():
        if limit["source"] == "operator":
            whence = f"the operator's ({limit['reason']}, at {_utc(limit['changed_at'])}); "
            whence += f"settings {_said(limit['settings'])}"
        else:
            whence = "the settings'"
        print(f"  {name} {_said(limit['value'])}: {whence}")
    for limit in body.get("exceeded", []):
        print(f"exceeded: {limit['text']} (no entry adding to it is admitted)")
    return 0


def _utc(at: float) -> str:
    return f"{datetime.fromtimestamp(at, UTC):%Y-%m-%dT%H:%M:%SZ}"
