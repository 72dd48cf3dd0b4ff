"""The ``pumpflow`` command.

Each subcommand lives in its own module listed in :data:`COMMAND_MODULES`; a module
defines ``register(subparsers)``, which adds its parser and sets ``handler`` (a
function taking the parsed arguments and returning the exit code). Adding a
subcommand is one new module and one line here. A command whose reader leaves early
(``| head``) ends quietly (:mod:`pumpflow.cli.output`).

Before any command the config file and the ``PUMPFLOW_`` variables are checked against
every setting of the services installed here (and ``pumpflow notify``'s): a key or a
variable that names none stops it with exit status 2, one line naming it.
``--config-file`` goes before the command or among its own options; a delegated
command's options are its owner's, so there it goes before the command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pumpflow.cli import output
from pumpflow.cli.api import URL_VARIABLES
from pumpflow.cli.delegated import DELEGATED, delegate
from pumpflow.cli.report import REPORTS_DIR_ENV
from pumpflow.common.runtime.arguments import UsageError
from pumpflow.common.runtime.settings import (
    CONFIG_FILE_VARIABLE,
    CommonSettings,
    SettingsError,
    check_environment,
)

COMMAND_MODULES = (
    "pumpflow.cli.run",
    "pumpflow.cli.backtest",
    "pumpflow.cli.migrate",
    "pumpflow.cli.prune",
    "pumpflow.cli.serve",
    "pumpflow.cli.delegated",
    "pumpflow.cli.dead_letters",
    "pumpflow.cli.train",
    "pumpflow.cli.trading",
    "pumpflow.cli.model",
    "pumpflow.cli.stop",
    "pumpflow.cli.sell",
    "pumpflow.cli.notify",
    "pumpflow.cli.catalogue",
    "pumpflow.cli.report",
)


#: ``PUMPFLOW_`` variables the CLI reads itself, no setting's
CLI_VARIABLES = (REPORTS_DIR_ENV, *URL_VARIABLES.values())


CONFIG_FILE_FLAG = "--config-file"


def _config_file_options(*, given_after: bool) -> argparse.ArgumentParser:
    """The ``--config-file`` option, a parent of the top parser and of each command's.
    Given after the command it is left unset unless given, so as not to hide the one
    given before."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        CONFIG_FILE_FLAG,
        metavar="FILE",
        default=argparse.SUPPRESS if given_after else None,
        help=f"TOML file of settings, [common] and one table per service, under the "
        f"environment's (sets {CONFIG_FILE_VARIABLE} for the services this starts)",
    )
    return parent


class _Command(argparse.ArgumentParser):
    """A command's parser: it takes ``--config-file`` among the command's options too."""

    def __init__(self, *args, parents: Sequence[argparse.ArgumentParser] = (), **kwargs):
        super().__init__(*args, parents=[*parents, _config_file_options(given_after=True)],
                         **kwargs)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pumpflow",
        description="pumpflow: trade newly created pump.fun tokens (services, runs, tools)",
        # --config-file applies only as use_config_file reads it: a prefix of it
        # (--config) taken for it here would leave the file out without a word
        allow_abbrev=False,
        parents=[_config_file_options(given_after=False)],
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="<command>", required=True, parser_class=_Command
    )
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def use_config_file(argv: list[str]) -> list[str]:
    """Take ``--config-file FILE`` off the front of ``argv`` into the environment (so the
    processes this starts read it too) and check the file against every service. Given
    more than once, the last one applies, as with any flag."""
    while True:
        if argv[:1] == [CONFIG_FILE_FLAG] and len(argv) >= 2:
            os.environ[CONFIG_FILE_VARIABLE], argv = argv[1], argv[2:]
        elif argv and argv[0].startswith(f"{CONFIG_FILE_FLAG}="):
            os.environ[CONFIG_FILE_VARIABLE], argv = argv[0].partition("=")[2], argv[1:]
        else:
            break
    path = os.environ.get(CONFIG_FILE_VARIABLE)
    if path:
        apply_config_file(path)
    return argv


def apply_config_file(path: str) -> None:
    """Set ``path`` for this process and those it starts, once checked against every
    service's settings."""
    from pumpflow.common.runtime.settings import check_config_file

    os.environ[CONFIG_FILE_VARIABLE] = str(Path(path).absolute())
    check_config_file(path, service_settings())


def service_settings() -> dict[str, type[CommonSettings]]:
    """The settings class of each service installed here, by service (the services
    themselves are not imported)."""
    from pumpflow.common.runtime import discovery

    return discovery.service_settings()


def check_variables() -> None:
    """Refuse a ``PUMPFLOW_`` variable that names no setting nor one the CLI reads."""
    from pumpflow.cli.notify import NotifySettings

    check_environment({**service_settings(), "notify": NotifySettings}, others=CLI_VARIABLES)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            code = _command(argv)
        except SystemExit:
            _flush()  # argparse's help or usage
            raise
        _flush()
        return code
    except KeyboardInterrupt:  # Ctrl-C before the command began, or past its own handling
        return 130
    except BrokenPipeError as exc:
        if not output.reader_gone(exc):
            raise
        output.discard()
        return output.READER_GONE


def _command(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = use_config_file(argv)
        check_variables()
    except SettingsError as exc:
        print(f"pumpflow: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] in DELEGATED:
        # the owner's parser reads every option, -h included
        command, given = argv[0], argv[1:]
        if any(w == CONFIG_FILE_FLAG or w.startswith(f"{CONFIG_FILE_FLAG}=") for w in given):
            print(
                f"pumpflow {command}: {CONFIG_FILE_FLAG} goes before the command: "
                f"pumpflow {CONFIG_FILE_FLAG} FILE {command} ...",
                file=sys.stderr,
            )
            return 2

        def handle() -> int:
            return delegate(command, given)
    else:
        args = build_parser().parse_args(argv)
        if getattr(args, "config_file", None):  # given after the command: it applies last
            try:
                apply_config_file(args.config_file)
            except SettingsError as exc:
                print(f"pumpflow: {exc}", file=sys.stderr)
                return 2
        # the reports folder is the user's, as a flag's value is
        given = [*vars(args).values(), os.environ.get(REPORTS_DIR_ENV)]
        command = args.command

        def handle() -> int:
            return int(args.handler(args) or 0)

    try:
        return handle()
    except KeyboardInterrupt:
        return 130
    except (SettingsError, UsageError) as exc:
        # a setting from the environment, the config file or a flag, or a flag the command
        # refuses: the message names it
        print(f"pumpflow {command}: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, socket.gaierror) as exc:
        if output.reader_gone(exc):
            raise
        # a server a flag or a setting names (Postgres, RabbitMQ, a socket) does not answer
        print(f"pumpflow {command}: cannot connect: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is None or not _named(given, exc.filename):
            raise  # a file of the code's own: a defect, with its traceback
        # a file named on the command line that cannot be read or written
        print(f"pumpflow {command}: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1


def _flush() -> None:
    """Write what is still buffered for standard output here, where a reader gone ends
    the command quietly, not in the interpreter's exit (a traceback after the end)."""
    if sys.stdout is not None:  # None: started with standard output closed
        sys.stdout.flush()


def _named(given: Sequence[object], filename: str | bytes | os.PathLike) -> bool:
    """Whether ``filename`` is a path given on the command line, under one or a folder of
    one (made for it): an argument's value, or a word of a delegated command's own."""
    failed = Path(os.fsdecode(filename)).absolute()
    for value in given:
        for one in value if isinstance(value, list | tuple) else (value,):
            if isinstance(one, str | os.PathLike) and one:
                path = Path(one).absolute()
                if failed == path or path in failed.parents or failed in path.parents:
                    return True
    return False


if __name__ == "__main__":
    sys.exit(main())
