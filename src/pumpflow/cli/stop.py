"""``pumpflow stop``: the graceful exit of a deployment, from a shell.

Asks an exit replica's HTTP API (``--url``) with the bearer token of
``PUMPFLOW_API_TOKEN`` to publish ``system.shutdown``; the exit service then sells
every open position before its deadline. Follows the exit's progress and prints its
report (``--no-wait``: only asks).

Each invocation is one request, under a new id it prints (``--request-id``: the id
given). Asked again under the same id (a retry after ``--timeout``, an operator unsure
the first went through), of any replica, the request is answered as the same one: the
graceful exit that applied it is followed, or its report printed once over; nothing is
published again. A new id joins the graceful exit under way, or begins the next one
once it is over.

The replica answers within ``exit_publish_wait_s`` whether ``system.shutdown`` is
published. While the broker takes no publication (short of memory or disk it blocks
every publisher; or it does not answer) the request is accepted and not published yet:
one line on stderr says so and why, the replica publishes it once the broker takes it
(asking again under the same id sends it once), and the graceful exit is followed from
then on.

Exit status: 0 the graceful exit ended with every position sold out (or closed by
trading), or with ``--no-wait`` ``system.shutdown`` is published; 1 it did not
(:data:`~pumpflow.cli.run.NOT_FLAT`, as ``pumpflow run``'s: its report has positions
left, one line on stderr says how many and why), it did not end within ``--timeout``,
or the replica refused or did not answer; 2 no API token; 4
(:data:`~pumpflow.cli.api.UNPUBLISHED`) with ``--no-wait``, accepted and not published
yet.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import msgspec

from pumpflow.cli.api import (
    UNPUBLISHED,
    api_token,
    failure,
    get_json,
    post_json,
    replica_url_argument,
)
from pumpflow.cli.output import reader_gone
from pumpflow.cli.run import NOT_FLAT, not_flat_reason
from pumpflow.common.runtime.arguments import positive
from pumpflow.common.text import counted

#: the longest request id an exit replica takes
_REQUEST_ID_MAX_CHARS = 128


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stop",
        help="graceful exit: sell every open position, then print the exit report",
        description=(
            "Publish system.shutdown through an exit replica's HTTP API (token from "
            "PUMPFLOW_API_TOKEN), follow the graceful exit and print its report. Exit "
            "status 0 when it ends with every position sold out (--no-wait: when "
            "system.shutdown is published); 1 when its report has positions left open (a "
            "line on stderr says how many and why), when it does not end within --timeout, "
            "or when the replica refuses or does not answer; 2 without the token; 4 with "
            "--no-wait when the replica accepted it and the broker has not taken it yet "
            "(blocking publishers, short of memory or disk, or not answering): it goes out "
            "once the broker takes it. Each invocation is one request under a new id, "
            "printed; asked again with --request-id and that id it is the same request, "
            "safe to repeat: the graceful exit that applied it is followed, or its report "
            "printed, and no second one begins. A new id joins the graceful exit under way, "
            "or begins the next one once it is over."
        ),
    )
    parser.add_argument("--reason", default="pumpflow stop", help="why (kept with the exit)")
    parser.add_argument(
        "--request-id",
        type=_request_id,
        default=None,
        help="the request's id, to ask again as the same request (default: a new one, printed)",
    )
    replica_url_argument(parser, "exit")
    parser.add_argument("--no-wait", action="store_true", help="do not follow the exit")
    parser.add_argument(
        "--timeout", type=positive, default=300.0, help="seconds to follow the exit (300)"
    )
    parser.set_defaults(handler=stop_command)


def _request_id(text: str) -> str:
    if not text or len(text) > _REQUEST_ID_MAX_CHARS or "\x00" in text:
        raise argparse.ArgumentTypeError(
            f"an id of 1 to {_REQUEST_ID_MAX_CHARS} characters, got {text!r:.80}"
        )
    return text


def stop_command(args: argparse.Namespace) -> int:
    url = args.url
    token = api_token("stop")
    if not token:
        return 2
    request_id = args.request_id or uuid.uuid4().hex
    again = f"pumpflow stop --request-id {request_id}"
    try:
        answer = post_json(
            f"{url}/shutdown", {"reason": args.reason, "request_id": request_id}, token
        )
        # a replica of before the answer said so: published when it answered at all
        unpublished = answer.get("published") is False
        if answer.get("applied"):
            print(answer["detail"], flush=True)
            if "summary" in answer:
                print(answer["text"], flush=True)
                return _flat_or_not(answer["summary"])
        elif unpublished:
            print(f"pumpflow stop: {answer['detail']}; `{again}` asks again as the same "
                  "request", file=sys.stderr, flush=True)  # fmt: skip
        else:
            print(f"system.shutdown published ({args.reason}); `{again}` asks again as the "
                  "same request", flush=True)  # fmt: skip
        if args.no_wait:
            return UNPUBLISHED if unpublished else 0
        begun = False
        margin = None
        until = time.monotonic() + args.timeout
        while time.monotonic() < until:
            body = get_json(f"{url}/progress")
            begun = begun or body.get("run") is not None
            if "summary" in body:
                # the replica's last exit over: this request's only if the run that
                # applied it is over, which asking again under its id says (the last run
                # may end here after this request began the next)
                mine = post_json(
                    f"{url}/shutdown", {"reason": args.reason, "request_id": request_id}, token
                )
                if "summary" in mine:
                    print(mine["text"], flush=True)
                    return _flat_or_not(mine["summary"])
            progress = body.get("progress")
            if progress:
                margin = progress.get("deadline_margin_s")
                unconfirmed = progress.get("unconfirmed_tranches") or 0
                # a sale ordered and not filled waits for trading: none fills while it
                # is down, which "0 tranches" alone would hide
                waiting = progress.get("in_flight") or 0
                print(
                    # each exit replica sells the positions of its partitions; the
                    # report at the end covers them all
                    f"  {progress['sold_out']}/{progress['positions']} of this replica's "
                    "positions sold out, "
                    f"{counted(progress['tranches'], 'tranche')} filled, "
                    + (
                        f"{waiting} position's sale awaiting trading, "
                        if waiting == 1
                        else f"{waiting} positions' sales awaiting trading, "
                        if waiting
                        else ""
                    )
                    + (f"{unconfirmed} UNCONFIRMED (no outcome yet), " if unconfirmed else "")
                    + f"{progress['deadline_margin_s']:.1f}s to the deadline",
                    flush=True,
                )
            time.sleep(1.0)
    except OSError as exc:
        if reader_gone(exc):
            raise  # what it printed is not read: not the service's failure
        print(failure("stop", url, exc, service="exit"), file=sys.stderr)
        return 1
    if unpublished and not begun:
        print("pumpflow stop: the graceful exit did not begin in time (system.shutdown was "
              "accepted before the broker took it: the replica publishes it once the broker "
              "does)", file=sys.stderr)  # fmt: skip
        return 1
    # the timeout ends the following, not the graceful exit
    until_when = f", its deadline {margin:.1f} s away" if margin is not None and margin > 0 else ""
    print(f"pumpflow stop: the graceful exit did not end within --timeout {args.timeout:g} s; "
          f"it goes on{until_when}: `{again}` follows it again", file=sys.stderr)  # fmt: skip
    return 1


def _flat_or_not(report: dict) -> int:
    """The status of a graceful exit over with ``report`` (its summary's ``exit.report``);
    what it left open said on stderr."""
    from pumpflow.common.events import ExitReport
    from pumpflow.common.exit import GracefulExitSummary

    summary = GracefulExitSummary.from_report(msgspec.convert(report, type=ExitReport))
    not_flat = not_flat_reason(summary.positions_left, summary)
    if not_flat is None:
        return 0
    print(f"pumpflow stop: {not_flat}", file=sys.stderr, flush=True)
    return NOT_FLAT
