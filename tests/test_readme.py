"""The README says what the code does: its first commands, its settings table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pumpflow.cli.serve import describe_settings
from pumpflow.common.runtime.discovery import installed_services, load_service
from pumpflow.common.runtime.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
    rows = describe_settings(load_service(service))
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
