"""The README and docs/ say what the code does: commands, flags, settings, metrics."""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

import pytest

from pumpflow.cli.delegated import DELEGATED
from pumpflow.cli.main import build_parser
from pumpflow.cli.notify import NotifySettings
from pumpflow.cli.serve import describe_settings
from pumpflow.common.runtime.discovery import installed_services, load_service, load_settings
from pumpflow.common.runtime.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: what users read: the README and docs/ (benchmarks.md is figures, the catalogue generated)
DOCS = {
    name: (ROOT / name).read_text()
    for name in ("README.md", "docs/architecture.md", "docs/reliability.md", "docs/market.md")
}
#: the code a named variable or metric must appear in
CODE = "\n".join(
    path.read_text()
    for folder in ("src", "libs", "services", "tests")
    for path in (ROOT / folder).rglob("*.py")
    if path.resolve() != Path(__file__).resolve()
)


def test_the_first_code_block_is_make_run_and_make_test():
    first = re.search(r"^```[^\n]*\n(.*?)^```", README, re.S | re.M)
    assert first is not None
    assert first.group(1).splitlines() == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)


def settings_table() -> dict[str, str]:
    """README's settings table: variable -> documented default."""
    rows = {}
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`PUMPFLOW_"):
            continue
        names = re.findall(r"`([A-Z_]+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(" / ")]
        assert len(names) == len(defaults), line
        rows.update(zip(names, defaults, strict=True))
    return rows


def shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_settings_table_gives_real_variables_and_their_defaults():
    table = settings_table()
    assert len(table) >= 15
    fields = {f"PUMPFLOW_{n.upper()}": field for n, field in CommonSettings.model_fields.items()}
    # a service's own settings (trading's live ones), where the common ones do not say
    for service in installed_services():
        for name, field in load_service(service).settings_class.model_fields.items():
            fields.setdefault(f"PUMPFLOW_{name.upper()}", field)
    for variable, default in table.items():
        assert variable in fields, f"README names {variable}, which no setting reads"
        field = fields[variable]
        if field.default_factory is None:
            assert shown(field.default) == default, variable


@pytest.mark.parametrize("service", sorted(installed_services()))
def test_pumpflow_settings_shows_every_value_that_is_not_a_secret(service, monkeypatch):
    for variable in ("PUMPFLOW_API_TOKEN", "PUMPPORTAL_API_KEY"):
        monkeypatch.setenv(variable, "s3cret-value")
    rows = describe_settings(service, load_settings(service))
    assert not [r for r in rows if "s3cret" in str(r["value"])]
    # a number or a flag is never masked, whatever its name (feed_max_keys_per_message)
    masked = [
        r["variable"]
        for r in rows
        if r["value"] == "***" and not r["variable"].endswith(("_TOKEN", "_KEY", "_URL"))
    ]
    assert not masked, masked


def test_every_config_file_example_names_real_tables_and_settings(tmp_path):
    from pumpflow.common.runtime.settings import check_config_file

    examples = re.findall(r"^```toml\n(.*?)^```", README, re.S | re.M)
    assert examples
    services = {name: load_service(name).settings_class for name in installed_services()}
    for number, text in enumerate(examples):
        path = tmp_path / f"example{number}.toml"
        path.write_text(text)
        check_config_file(path, services)


def setting_variables() -> set[str]:
    """Every setting's environment variable, of every service and of ``pumpflow notify``."""
    variables = {
        row["variable"]
        for s in installed_services()
        for row in describe_settings(s, load_settings(s))
    }
    return variables | {f"PUMPFLOW_{name.upper()}" for name in NotifySettings.model_fields}


def test_every_variable_the_docs_name_is_read_by_the_code():
    settings = setting_variables()
    for doc, text in DOCS.items():
        for variable in set(re.findall(r"\b(?:PUMPFLOW|PUMPPORTAL)_[A-Z0-9_]*", text)):
            if variable.endswith("_"):  # PUMPFLOW_FEED_HISTORY_*, PUMPFLOW_<NAME>
                assert any(s.startswith(variable) for s in settings), (doc, variable)
            else:
                # a setting, or a variable read directly (PUMPFLOW_REPORTS_DIR)
                assert variable in settings or f'"{variable}"' in CODE, (doc, variable)


def test_every_metric_the_docs_name_is_exported():
    declared = set(re.findall(r"[\"'](pumpflow_[a-z0-9_]+)[\"']", CODE))
    for doc, text in DOCS.items():
        for metric in set(re.findall(r"\bpumpflow_[a-z0-9_]+", text)):
            # a counter is declared without the _total it is exported with
            assert metric in declared or metric.removesuffix("_total") in declared, (doc, metric)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices if actions else {}


def check_command(words: list[str]) -> None:
    """``pumpflow WORDS``: each subcommand exists and each --flag is one of its parsers'."""
    chain = [build_parser()]
    rest = list(words)
    while rest:
        word = rest.pop(0)
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            action = next(
                (
                    p._option_string_actions[flag]
                    for p in reversed(chain)
                    if flag in p._option_string_actions
                ),
                None,
            )
            assert action is not None, f"`pumpflow {' '.join(words)}`: no {flag}"
            if action.nargs != 0 and "=" not in word and rest:
                rest.pop(0)  # the flag's value
            continue
        choices = subcommands(chain[-1])
        if word in DELEGATED and chain[-1] is chain[0]:
            module, prefix, prog, _ = DELEGATED[word]
            chain.append(importlib.import_module(module).build_parser(prog))
            rest[:0] = prefix
        elif word in choices:
            chain.append(choices[word])
        elif choices and not word.startswith("<"):  # <command>: any of them
            raise AssertionError(f"`pumpflow {' '.join(words)}`: no subcommand {word}")


def test_every_command_the_docs_name_exists_with_its_flags():
    commands = []
    for text in DOCS.values():
        fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
        for block in fenced:
            commands += re.findall(r"(?:^|\s|/)pumpflow ([^#\n]*)", block, re.M)
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        commands += re.findall(r"`pumpflow ([^`]+)`", prose)
    assert len(commands) > 30
    for command in commands:
        check_command(command.replace("&", " ").split())


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    for doc, text in DOCS.items():
        for target in re.findall(r"(?:^|`)make ([a-z]+)", text, re.M):
            assert target in targets, (doc, target)


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_the_service_table_lists_what_each_service_consumes_and_publishes(doc):
    """The table of services against the deployed topology (the catalogue's source):
    ``order.*`` stands for every ``order`` event, exit's control consumer is exit's."""
    from pumpflow.cli.catalogue import consumer_groups
    from pumpflow.common.events import registered
    from pumpflow.common.runtime.topology import PUBLISHERS

    types = {event_type for event_type, _ in registered()}

    def expanded(cell: str) -> set[str]:
        named = {name.strip() for name in cell.split(",")}
        return {
            t
            for name in named
            for t in types
            if t == name or (name.endswith(".*") and t.startswith(name[:-1]))
        } | {name for name in named if not name.endswith(".*")}

    groups = consumer_groups()
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| ([^|]+) \| ([^|]+) \|$", DOCS[doc], re.M)
    table = {
        service: (expanded(consumes), expanded(publishes))
        for service, consumes, publishes in rows
        if service in PUBLISHERS
    }
    assert set(table) == set(PUBLISHERS)
    for service, (consumes, publishes) in table.items():
        deployed = set(groups[service]) | set(groups.get(f"{service}-control", ()))
        assert consumes == deployed, service
        assert publishes == set(PUBLISHERS[service]), service


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, spaces as hyphens,
    punctuation dropped."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(
            r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), re.M
        )
    }


def test_every_link_of_the_docs_leads_to_a_file_and_a_heading_there():
    broken = []
    for name, text in DOCS.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (ROOT / name).parent / path if path else ROOT / name
            if not linked.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif (
                anchor
                and linked.suffix == ".md"
                and anchor not in heading_anchors(linked.read_text())
            ):
                broken.append(f"{name}: {target} (no such heading)")
    assert not broken, broken
