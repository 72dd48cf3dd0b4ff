"""``pumpflow sell MINT``: sell a position now, from a shell.

Asks an exit replica's HTTP API (``--url``) with the bearer token of
``PUMPFLOW_API_TOKEN`` to publish ``exit.sale_requested``; the exit replica that owns
the token's partition orders the sale as one of the position's rules would (a share of
what the rules have not ordered sold: all of it by default). Trading sells, as for any
exit order, halted or not.

Exit status: 0 the sale is ordered (its order id printed); 1 it is not (no such
position, a graceful exit sells it, all of it ordered already: the reason printed), or
the call failed; 3 the request is published and the replica asked does not own the
token's partition, or did not apply it within ``--wait``: the owner orders it, and says
so in its log and ``pumpflow_exit_sale_requests_total``; 4
(:data:`~pumpflow.cli.api.UNPUBLISHED`) the request is accepted and not published yet,
the broker taking no publication (short of memory or disk it blocks every publisher;
or it does not answer) within the replica's ``exit_publish_wait_s``: the replica
publishes it once the broker takes it and the owner orders it then (asking again would
ask for a second sale).
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
import uuid

from pumpflow.cli.api import UNPUBLISHED, api_token, failure, post_json, replica_url_argument
from pumpflow.cli.output import reader_gone
from pumpflow.common.runtime.arguments import bounded

#: exit status of a request published and not answered by the replica asked
NOT_ANSWERED = 3


def mint(text: str) -> str:
    """A ``MINT`` argument: a word, without a slash (a mint is base58); an empty one (an
    unset shell variable) or one that cannot be a path's segment is the flag's error."""
    if not text or "/" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"not a mint: {text!r}")
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sell",
        help="sell a position now (all of it, or --fraction of it)",
        description=(
            "Ask the exit service, through an exit replica's HTTP API (token from "
            "PUMPFLOW_API_TOKEN), to sell a token's position now: exit status 0 ordered, "
            "1 not ordered (the reason printed) or the call failed, 3 published and not "
            "answered by the replica asked (the owner of the token's partition orders it), "
            "4 accepted and not published yet, the broker taking no publication (blocking "
            "publishers, short of memory or disk, or not answering): it goes out once the "
            "broker takes it, do not ask again."
        ),
    )
    parser.add_argument("mint", type=mint, help="the token's mint")
    parser.add_argument(
        "--fraction",
        type=bounded(above=0.0, at_most=1.0),
        default=1.0,
        help="share of what the exit rules have not ordered sold (1: all of it)",
    )
    parser.add_argument("--position", help="only while the token's position is this id")
    parser.add_argument("--reason", default="pumpflow sell", help="why (in the exit's log)")
    replica_url_argument(parser, "exit")
    parser.add_argument(
        "--wait",
        type=bounded(at_least=0.0, at_most=60.0),
        default=5.0,
        help="seconds the replica waits for its answer (5)",
    )
    parser.set_defaults(handler=sell_command)


def sell_command(args: argparse.Namespace) -> int:
    url = args.url
    token = api_token("sell")
    if not token:
        return 2
    body = {
        "fraction": args.fraction,
        "reason": args.reason,
        "request_id": uuid.uuid4().hex,
        "wait_s": args.wait,
    }
    if args.position:
        body["position_id"] = args.position
    path = f"{url}/positions/{urllib.parse.quote(args.mint, safe='')}/sell"
    try:
        answer = post_json(path, body, token, waits_s=args.wait)
    except OSError as exc:
        if reader_gone(exc):
            raise
        print(failure("sell", url, exc, service="exit"), file=sys.stderr)
        return 1
    if answer.get("published") is False:
        print(f"pumpflow sell: {args.mint}: {answer['detail']}", file=sys.stderr)
        return UNPUBLISHED
    if "ordered" not in answer:
        print(f"pumpflow sell: {args.mint}: {answer.get('detail', answer)}", file=sys.stderr)
        return NOT_ANSWERED
    if not answer["ordered"]:
        print(f"pumpflow sell: {args.mint}: not ordered: {answer['detail']}", file=sys.stderr)
        return 1
    print(
        f"sale ordered: {answer['order_id']}, {_tokens(answer['token_amount'])} tokens of "
        f"{args.mint} (position {answer['position_id']})",
        flush=True,
    )
    return 0


def _tokens(amount: float) -> str:
    """An amount of tokens as an operator reads it: whole tokens (they run to millions),
    a fraction of one as it is."""
    return f"{amount:.0f}" if amount >= 1 else f"{amount:.6g}"
