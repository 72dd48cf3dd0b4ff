"""``pumpflow stop``: the graceful exit of a deployment, from a shell.

Asks an exit replica's HTTP API (``--url``) with the bearer token of
``PUMPFLOW_API_TOKEN`` to publish ``system.shutdown``; the exit service then sells
every open position before its deadline. Follows the exit's progress and prints its
report (``--no-wait``: only asks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stop",
        help="graceful exit: sell every open position, then print the exit report",
        description=(
            "Publish system.shutdown through an exit replica's HTTP API (token from "
            "PUMPFLOW_API_TOKEN), follow the graceful exit and print its report."
        ),
    )
    parser.add_argument("--reason", default="pumpflow stop", help="why (kept with the exit)")
    parser.add_argument(
        "--url",
        default=os.environ.get("PUMPFLOW_EXIT_URL", DEFAULT_URL),
        help=f"an exit replica's HTTP address (PUMPFLOW_EXIT_URL, {DEFAULT_URL})",
    )
    parser.add_argument("--no-wait", action="store_true", help="do not follow the exit")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to follow the exit (300)"
    )
    parser.set_defaults(handler=stop_command)


def _call(request: urllib.request.Request) -> dict:
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stop_command(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    token = os.environ.get("PUMPFLOW_API_TOKEN")
    if not token:
        print("pumpflow stop: PUMPFLOW_API_TOKEN is not set", file=sys.stderr)
        return 2
    request = urllib.request.Request(
        f"{url}/shutdown",
        data=json.dumps({"reason": args.reason}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        _call(request)
        print(f"system.shutdown published ({args.reason})", flush=True)
        if args.no_wait:
            return 0
        until = time.monotonic() + args.timeout
        while time.monotonic() < until:
            body = _call(urllib.request.Request(f"{url}/progress"))
            if "text" in body:
                print(body["text"])
                return 0
            progress = body.get("progress")
            if progress:
                print(
                    f"  {progress['sold_out']}/{progress['positions']} sold out, "
                    f"{progress['tranches']} tranches, "
                    f"{progress['deadline_margin_s']:.1f}s to the deadline",
                    flush=True,
                )
            time.sleep(1.0)
    except urllib.error.HTTPError as exc:
        print(f"pumpflow stop: {exc.code}: {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pumpflow stop: {url} does not answer: {exc}", file=sys.stderr)
        return 1
    print("pumpflow stop: the graceful exit did not end in time", file=sys.stderr)
    return 1
