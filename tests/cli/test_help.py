"""Every ``pumpflow`` command, nested ones and the delegated ones too, has a ``--help``
that names it as typed, and its options say what they do, the shared ones alike."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from pumpflow.cli.delegated import DELEGATED
from pumpflow.cli.main import build_parser, main


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def delegated_parser(name: str) -> argparse.ArgumentParser:
    """The owner's parser that ``pumpflow name`` runs."""
    module, prefix, prog, _ = DELEGATED[name]
    parser = importlib.import_module(module).build_parser(prog)
    for word in prefix:
        parser = subcommands(parser)[word]
    return parser


def commands() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command line that reaches a parser, to its parser."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for name, sub in subcommands(parser).items():
            walk((*path, name), delegated_parser(name) if name in DELEGATED and not path else sub)

    walk((), build_parser())
    return found


COMMANDS = commands()


def test_the_walk_reaches_nested_and_delegated_commands():
    assert {("backtest",), ("catalogue",), ("sim", "serve"), ("record",), ("replay",)} <= set(
        COMMANDS
    )
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "pumpflow")
def test_help_works_and_names_the_command_as_typed(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.match(rf"usage: {re.escape(' '.join(('pumpflow', *path)))}\b", out), out[:200]
    parser = COMMANDS[path]
    undocumented = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert not undocumented, f"pumpflow {' '.join(path)}: no help for {undocumented}"


#: options several commands share, and what each one's help must say
SHARED = {"--dsn": "PUMPFLOW_POSTGRES_DSN", "--schema": "PUMPFLOW_NAMESPACE"}


def test_shared_options_mean_the_same_everywhere():
    seen = {option: 0 for option in SHARED}
    for path, parser in COMMANDS.items():
        for action in parser._actions:
            for option in set(action.option_strings) & set(SHARED):
                seen[option] += 1
                assert SHARED[option] in (action.help or ""), (path, option, action.help)
    assert all(count >= 3 for count in seen.values()), seen


#: reStructuredText of a module's docstring: ``x``, :func:`x` and the like
_MARKUP = re.compile(r"``|:[a-z]+:`")


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "pumpflow")
def test_help_reads_as_plain_text_not_the_docstring_s_markup(path, capsys):
    """A description taken from a module's docstring shows ``pumpflow-sim`` as
    `pumpflow-sim`, as the options' help writes a command."""
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    out = capsys.readouterr().out
    assert not _MARKUP.findall(out), [line for line in out.splitlines() if _MARKUP.search(line)]


def test_a_docstring_s_roles_read_as_their_names():
    from pumpflow.common.runtime.arguments import help_text

    assert help_text("``a`` (:func:`~pkg.mod.f`, :mod:`pkg.mod`)") == "`a` (`f`, `pkg.mod`)"


def test_the_command_list_names_every_trading_action(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    line = listing.split(" trading ", 1)[1].split(" model ", 1)[0]
    for action in ("halt", "resume", "state", "limits", "acknowledge"):
        assert action in line, (action, line)
