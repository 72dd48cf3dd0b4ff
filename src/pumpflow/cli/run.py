"""``pumpflow run``: the embedded demo, one process, no servers needed."""

from __future__ import annotations

import argparse
import asyncio


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run pumpflow embedded in one process (in-memory bus; stops by itself)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds to run (5)")
    parser.add_argument("--tokens", type=int, default=3, help="tokens the demo creates (3)")
    parser.add_argument("--rate", type=float, default=20.0, help="trades per second (20)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (7)")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.tokens < 1 or args.rate <= 0:
        raise SystemExit("pumpflow run: --duration, --tokens and --rate must be positive")
    from pumpflow.cli.demo import run_demo

    return asyncio.run(
        run_demo(duration=args.duration, tokens=args.tokens, rate=args.rate, seed=args.seed)
    )
