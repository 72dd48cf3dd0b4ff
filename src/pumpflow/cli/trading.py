"""``pumpflow trading halt|resume|state``: the kill switch, from a shell.

Talks to a trading replica's HTTP API (``--url``, default the local one) with the
bearer token of ``PUMPFLOW_API_TOKEN``. Any replica takes it: the state is stored in
the ledger, applied at once by the replica that trades and read by the others; a halt
outlives restarts until a resume. A halt given to the trading replica while Postgres is
away applies there at once and is stored once Postgres is back (said so, exit status
3); given to a stand-by then, it applies nowhere (exit status 1: halt the trading
replica). A resume is refused meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys

from pumpflow.cli.api import (
    DEFAULT_URL,
    api_token,
    failure,
    get_json,
    http_url,
    post_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trading",
        help="the kill switch: halt or resume entries, or show the trading state",
        description=(
            "Halt entries at once (exits go on), resume them, or show the state, through "
            "a trading replica's HTTP API; the token comes from PUMPFLOW_API_TOKEN."
        ),
    )
    parser.add_argument(
        "action",
        choices=("halt", "resume", "state"),
        help="halt: no new entries (exits go on); resume: enter again; state: show it",
    )
    parser.add_argument("--reason", default=None, help="why (kept with the state)")
    parser.add_argument(
        "--url",
        type=http_url,
        default=os.environ.get("PUMPFLOW_TRADING_URL", DEFAULT_URL),
        help=f"a trading replica's HTTP address (PUMPFLOW_TRADING_URL, {DEFAULT_URL})",
    )
    parser.set_defaults(handler=trading_command)


def trading_command(args: argparse.Namespace) -> int:
    url = args.url
    try:
        if args.action == "state":
            body = get_json(f"{url}/state")
        else:
            token = api_token("trading")
            if not token:
                return 2
            reason = args.reason or f"{args.action} (CLI)"
            body = post_json(f"{url}/{args.action}", {"reason": reason}, token)
    except OSError as exc:
        print(failure("trading", url, exc), file=sys.stderr)
        return 1
    print(f"trading is {body['state']} ({body['reason'] or 'no reason'}); role {body['role']}")
    if body.get("stored") is False:
        print(f"pumpflow trading: {body['detail']}", file=sys.stderr)
        # applied by the replica that trades, or by none (a stand-by applies nothing)
        return 3 if body["role"] == "active" else 1
    return 0
