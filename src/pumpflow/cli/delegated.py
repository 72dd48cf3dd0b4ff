"""Subcommands whose parsers live with the service that owns them.

``pumpflow record|replay ...`` run the feed's CLI and ``pumpflow sim ...`` the
simulator's, with the rest of the command line passed through unchanged, so each
option is defined once, beside the code it drives.
"""

from __future__ import annotations

import argparse
import importlib

#: pumpflow subcommand -> (module with ``main(argv, prog=)`` and ``build_parser(prog)``,
#: argv prefix, the owner's program name under ``pumpflow``, help)
DELEGATED = {
    "record": (
        "pumpflow.feed.cli",
        ["record"],
        "pumpflow",
        "record a PumpPortal-protocol stream to Postgres or JSONL (see: pumpflow record -h)",
    ),
    "replay": (
        "pumpflow.feed.cli",
        ["replay"],
        "pumpflow",
        "replay recorded events in time order to JSONL or the bus (pumpflow replay -h)",
    ),
    "sim": (
        "pumpflow.simulator.cli",
        [],
        "pumpflow sim",
        "market simulator: serve, dataset, load, calibrate (see: pumpflow sim -h)",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (_, _, _, help_text) in DELEGATED.items():
        parser = subparsers.add_parser(name, help=help_text, add_help=False)
        parser.add_argument("argv", nargs=argparse.REMAINDER)
        parser.set_defaults(handler=run_delegated, delegated=name)


def run_delegated(args: argparse.Namespace) -> int:
    return delegate(args.delegated, args.argv)


def delegate(name: str, argv: list[str]) -> int:
    """Run delegated command ``name`` with its own arguments ``argv``."""
    module, prefix, prog, _ = DELEGATED[name]
    return int(importlib.import_module(module).main([*prefix, *argv], prog=prog) or 0)
