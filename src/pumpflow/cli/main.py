"""The ``pumpflow`` command.

Each subcommand lives in its own module listed in :data:`COMMAND_MODULES`; a module
defines ``register(subparsers)``, which adds its parser and sets ``handler`` (a
function taking the parsed arguments and returning the exit code). Adding a
subcommand is one new module and one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pumpflow.cli.delegated import DELEGATED, delegate

COMMAND_MODULES = (
    "pumpflow.cli.run",
    "pumpflow.cli.backtest",
    "pumpflow.cli.migrate",
    "pumpflow.cli.serve",
    "pumpflow.cli.delegated",
    "pumpflow.cli.dead_letters",
    "pumpflow.cli.train",
    "pumpflow.cli.trading",
    "pumpflow.cli.stop",
    "pumpflow.cli.catalogue",
    "pumpflow.cli.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pumpflow",
        description="pumpflow: trade newly created pump.fun tokens (services, runs, tools)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # the owner's parser reads every option, -h included
        return delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
