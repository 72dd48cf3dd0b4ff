from __future__ import annotations

import asyncio
import base64
import fcntl
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import AliasChoices, Field

from pumpflow.cli import main as cli_main
from pumpflow.cli import serve as serve_module
from pumpflow.cli.delegated import DELEGATED
from pumpflow.cli.output import READER_GONE
from pumpflow.common.bus import Subscription, partition_of
from pumpflow.common.clock import WallClock
from pumpflow.common.consumer import KeyedConsumerConfig, KeyedStatefulConsumer
from pumpflow.common.events import Event, SystemShutdown, encode_event, make_event
from pumpflow.common.keyed import InvalidInput
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.runtime.topology import declare_groups, groups_of
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing import (
    AppliedSeqs,
    eventually,
    free_port,
    migrations_split_at_fills_altered,
)

POSTGRES_DSN = os.environ.get(
    "PUMPFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
PUMPFLOW = Path(sys.executable).with_name("pumpflow")


class WidgetSettings(CommonSettings):
    widget_count: int = Field(3, ge=1, description="how many widgets")
    wallet_private_key: str | None = Field(None, description="wallet key for live trading")
    widget_url: str = Field(
        "ws://widgets",
        validation_alias=AliasChoices("WIDGET_URL", "widget_url"),
        description="read without the prefix",
    )


class Widget(Service):
    """Makes widgets for the tests."""

    name = "widget"
    settings_class = WidgetSettings

    async def start(self, ctx: ServiceContext) -> None:
        pass

    async def stop(self) -> None:
        pass


class FakeDistribution:
    def __init__(self, summary: str):
        self.metadata = {"Summary": summary}


class FakeEntryPoint:
    def __init__(self, name: str, target, summary: str = ""):
        self.name = name
        self.value = f"tests.fake:{name}"
        self.dist = FakeDistribution(summary)
        self._target = target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def fake_services(monkeypatch):
    found = {"widget": FakeEntryPoint("widget", Widget, "Makes widgets for the tests.")}

    def load_service(name):
        if name not in found:
            raise serve_module.UnknownServiceError(f"no service named {name!r} (installed: widget)")
        return found[name].load()

    monkeypatch.setattr(serve_module, "installed_services", lambda: dict(found))
    monkeypatch.setattr(serve_module, "load_service", load_service)
    monkeypatch.setattr(
        serve_module, "load_settings", lambda name: load_service(name).settings_class
    )
    # its settings are known to the check of the environment, beside the real services'
    installed = cli_main.service_settings()
    monkeypatch.setattr(
        cli_main, "service_settings", lambda: {**installed, "widget": WidgetSettings}
    )
    return found


def test_every_subcommand_module_registers_itself():
    parser = cli_main.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"run", "migrate", "serve", "services", "settings"} <= set(commands)
    for module_name in cli_main.COMMAND_MODULES:
        assert module_name.startswith("pumpflow.cli.")


#: the service packages an image may leave out: each image installs the library, the
#: CLI and its own service alone (deploy/Dockerfile)
SERVICE_PACKAGES = (
    "pumpflow.feed", "pumpflow.features", "pumpflow.activity", "pumpflow.model",
    "pumpflow.trading", "pumpflow.exit", "pumpflow.simulator",
)  # fmt: skip


def test_the_cli_starts_with_no_service_package_installed():
    """A service's image runs ``pumpflow serve <it>``: building the parser of every
    command must import no service package, or every other image's service crashes at
    its start."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in SERVICE_PACKAGES)
    ran = subprocess.run(
        [sys.executable, "-c",
         f"import sys; {blocked}; from pumpflow.cli.main import build_parser; build_parser()"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]


def test_services_lists_installed_ones_and_details_one_on_request(fake_services, capsys):
    """The list reads the packages' descriptions, loading no service (a broken one is
    listed as the others); a service named is loaded, and described in full."""
    broken = FakeEntryPoint("broken", ImportError("no module foo"), "Breaks.")
    fake_services["broken"] = broken
    assert cli_main.main(["services"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("broken") and out[0].endswith("Breaks.")
    assert out[1].startswith("widget") and "Makes widgets for the tests." in out[1]

    assert cli_main.main(["services", "widget"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("widget       tests.fake:widget")
    assert "Makes widgets for the tests." in out
    assert cli_main.main(["services", "broken"]) == 1
    assert "cannot load broken: ImportError: no module foo" in capsys.readouterr().err
    assert cli_main.main(["services", "nope"]) == 2
    assert "no service named 'nope' (installed: widget)" in capsys.readouterr().err


def test_a_service_named_is_described_by_its_module(capsys):
    """Its details: the Service class's docstring, then its module's, which says what it
    consumes, publishes and serves."""
    from pumpflow.trading import service

    assert cli_main.main(["services", "trading"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trading      pumpflow.trading.service:TradingService\n")
    assert service.TradingService.__doc__ in out
    assert service.__doc__.splitlines()[0] in out


def test_settings_shows_variables_defaults_descriptions_and_hides_secrets(
    fake_services, monkeypatch, capsys
):
    monkeypatch.setenv("PUMPFLOW_WIDGET_COUNT", "5")
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", "very-secret-token")
    monkeypatch.setenv("PUMPFLOW_WALLET_PRIVATE_KEY", "very-secret-wallet")
    monkeypatch.setenv("PUMPFLOW_POSTGRES_DSN", "postgresql://app:very-secret-pw@db/x")
    assert cli_main.main(["settings", "widget", "--json"]) == 0
    output = capsys.readouterr().out
    assert "very-secret" not in output
    rows = {row["variable"]: row for row in json.loads(output)}
    assert rows["PUMPFLOW_WIDGET_COUNT"] == {
        "variable": "PUMPFLOW_WIDGET_COUNT",
        "value": 5,
        "default": 3,
        "description": "how many widgets",
    }
    assert rows["PUMPFLOW_API_TOKEN"]["value"] == "***"
    assert rows["PUMPFLOW_WALLET_PRIVATE_KEY"]["value"] == "***"
    assert rows["PUMPFLOW_POSTGRES_DSN"]["value"] == "postgresql://app:***@db/x"
    assert rows["PUMPFLOW_SERVICE"]["value"] == "widget"
    assert rows["PUMPFLOW_REPLICA"]["default"] == "(computed)"
    assert rows["WIDGET_URL"]["default"] == "ws://widgets"
    assert "PUMPFLOW_WIDGET_URL" not in rows

    assert cli_main.main(["settings", "widget"]) == 0
    text = capsys.readouterr().out
    assert "very-secret" not in text
    assert re.search(r"PUMPFLOW_WIDGET_COUNT\s+5\n\s+default 3; how many widgets", text)


def test_settings_shows_pumpflow_notify_s_as_a_service_s_secrets_masked(monkeypatch, capsys):
    """``pumpflow notify`` runs beside the services with settings of its own: an operator
    checks them where a service's are checked, the webhook's secret masked."""
    monkeypatch.setenv("PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL", "http://127.0.0.1:9/very-secret")
    monkeypatch.setenv("PUMPFLOW_NOTIFY_INTERVAL_S", "5")
    assert cli_main.main(["settings", "notify", "--json"]) == 0
    output = capsys.readouterr().out
    assert "very-secret" not in output
    rows = {row["variable"]: row for row in json.loads(output)}
    assert rows["PUMPFLOW_NOTIFY_INTERVAL_S"]["value"] == 5.0
    assert rows["PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL"]["value"] == "***"
    assert rows["PUMPFLOW_NOTIFY_PROMETHEUS_URL"]["default"] == "http://127.0.0.1:9090"


def test_settings_shows_the_service_name_the_runtime_sets_as_its_default(
    fake_services, monkeypatch, capsys
):
    # the runtime loads a service's settings with its own name, over the environment
    monkeypatch.setenv("PUMPFLOW_SERVICE", "elsewhere")
    assert cli_main.main(["settings", "widget", "--json"]) == 0
    row = {r["variable"]: r for r in json.loads(capsys.readouterr().out)}["PUMPFLOW_SERVICE"]
    assert row["value"] == row["default"] == "widget"
    assert "the runtime sets it to 'widget', over PUMPFLOW_SERVICE" in row["description"]

    assert cli_main.main(["settings", "widget"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"PUMPFLOW_SERVICE\s+widget\n\s+default widget;", text)


def test_settings_with_a_bad_value_names_the_variable(fake_services, monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_WIDGET_COUNT", "0")
    assert cli_main.main(["settings", "widget"]) == 2
    assert "PUMPFLOW_WIDGET_COUNT" in capsys.readouterr().err


def test_config_file_sets_services_settings_under_the_environment(monkeypatch, tmp_path, capsys):
    # main() sets the variable for the processes it starts: set it here first so that
    # monkeypatch takes it away again afterwards (delenv of an absent one records nothing)
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    monkeypatch.setenv("PUMPFLOW_LOG_LEVEL", "ERROR")
    config = tmp_path / "pumpflow.toml"
    config.write_text(
        "[common]\nlog_level = 'DEBUG'\npartitions = 8\n[trading]\ntrading_min_score = 0.45\n"
    )
    assert cli_main.main(["--config-file", str(config), "settings", "trading", "--json"]) == 0
    values = {row["variable"]: row["value"] for row in json.loads(capsys.readouterr().out)}
    assert values["PUMPFLOW_TRADING_MIN_SCORE"] == 0.45
    assert values["PUMPFLOW_PARTITIONS"] == 8
    assert values["PUMPFLOW_LOG_LEVEL"] == "ERROR"
    # the processes it starts read the same file
    assert os.environ["PUMPFLOW_CONFIG_FILE"] == str(config)

    config.write_text("[trading]\ntrading_min_score = 0.45\n[tradng]\ntrading_min_score = 1\n")
    assert cli_main.main(["--config-file", str(config), "settings", "exit"]) == 2
    assert "no service named [tradng]" in capsys.readouterr().err


def test_a_config_file_key_of_another_table_or_misspelt_is_refused_saying_which(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    config = tmp_path / "pumpflow.toml"
    config.write_text("[common]\nexit_max_hold_s = 600\n")
    assert cli_main.main(["--config-file", str(config), "settings", "exit"]) == 2
    err = capsys.readouterr().err
    assert "[common] has no setting named exit_max_hold_s (a setting of [exit])" in err, err
    config.write_text("[exit]\nexit_max_hold = 600\n")
    assert cli_main.main(["--config-file", str(config), "settings", "exit"]) == 2
    err = capsys.readouterr().err
    assert "[exit] has no setting named exit_max_hold (did you mean exit_max_hold_s?)" in err


@pytest.mark.parametrize("second", [["--config-file", "{path}"], ["--config-file={path}"]])
def test_the_last_config_file_given_applies(second, monkeypatch, tmp_path, capsys):
    """As with any flag given twice, the last one: a wrapper's default file followed by
    the operator's own must not leave the operator's out."""
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    first, last = tmp_path / "default.toml", tmp_path / "mine.toml"
    first.write_text("[common]\npartitions = 8\n")
    last.write_text("[common]\npartitions = 4\n")
    given = [word.format(path=last) for word in second]
    argv = ["--config-file", str(first), *given, "settings", "trading", "--json"]
    assert cli_main.main(argv) == 0
    values = {row["variable"]: row["value"] for row in json.loads(capsys.readouterr().out)}
    assert values["PUMPFLOW_PARTITIONS"] == 4
    assert os.environ["PUMPFLOW_CONFIG_FILE"] == str(last)


@pytest.mark.parametrize("joined", [False, True])
def test_a_config_file_after_the_command_applies_as_before_it(
    joined, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    config = tmp_path / "pumpflow.toml"
    config.write_text("[trading]\ntrading_min_score = 0.45\n")
    given = [f"--config-file={config}"] if joined else ["--config-file", str(config)]
    assert cli_main.main(["settings", "trading", *given, "--json"]) == 0
    values = {row["variable"]: row["value"] for row in json.loads(capsys.readouterr().out)}
    assert values["PUMPFLOW_TRADING_MIN_SCORE"] == 0.45
    assert os.environ["PUMPFLOW_CONFIG_FILE"] == str(config)
    # checked as one before the command is
    config.write_text("[tradng]\ntrading_min_score = 1\n")
    assert cli_main.main(["settings", "exit", *given]) == 2
    assert "no service named [tradng]" in capsys.readouterr().err


def test_a_config_file_after_a_command_another_parser_reads_says_where_it_goes(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    config = tmp_path / "pumpflow.toml"
    config.write_text("[feed]\n")
    out = tmp_path / "events.jsonl"
    argv = ["record", "--duration", "1", "--config-file", str(config), "--out", str(out)]
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "pumpflow record: --config-file goes before the command: "
        "pumpflow --config-file FILE record ...\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--config", "--config-f", "--conf"])
def test_an_abbreviated_config_file_flag_is_refused(flag, monkeypatch, tmp_path, capsys):
    """argparse would take it for --config-file, which only the front of the command line
    applies: the file's settings would be silently left out."""
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    config = tmp_path / "pumpflow.toml"
    config.write_text("[trading]\ntrading_min_score = 0.45\n")
    with pytest.raises(SystemExit) as refused:
        cli_main.main([flag, str(config), "settings", "trading", "--json"])
    assert refused.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "pumpflow: error:" in captured.err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--speed", "nan"], "argument --speed: not a finite number: 'nan'"),
        (["backtest", "--minutes", "inf"], "argument --minutes: not a finite number: 'inf'"),
        (["train", "--horizon", "NaN"], "argument --horizon: not a finite number: 'NaN'"),
        (["stop", "--timeout=-inf"], "argument --timeout: not a finite number: '-inf'"),
    ],
)
def test_a_flag_that_is_no_finite_number_is_refused_naming_it(argv, named, capsys):
    # parsed only: a run given one would run for ever
    with pytest.raises(SystemExit) as refused:
        cli_main.build_parser().parse_args(argv)
    assert refused.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["backtest", "--seed", "1", "--minutes", "-3"], "argument --minutes: must be > 0, not -3"),
        (["backtest", "--launches", "0"], "argument --launches: must be > 0, not 0"),
        (["backtest", "--every", "-1"], "argument --every: must be > 0, not -1"),
        (["run", "--duration", "-1"], "argument --duration: must be >= 0, not -1"),
        (["run", "--speed", "0"], "argument --speed: must be > 0, not 0"),
        (["run", "--launches", "-30"], "argument --launches: must be > 0, not -30"),
        (["run", "--every", "0"], "argument --every: must be > 0, not 0"),
        # the flag, not the setting it overrides (PUMPFLOW_TRADING_MIN_SCORE)
        (["run", "--min-score", "7"], "argument --min-score: must be >= 0 and <= 1, not 7"),
        (["run", "--min-score", "-0.5"], "argument --min-score: must be >= 0 and <= 1, not -0.5"),
        (["train", "--sim-minutes", "0"], "argument --sim-minutes: must be > 0, not 0"),
        (["train", "--held-out-share", "1"], "argument --held-out-share: must be > 0 and < 1"),
        (["train", "--horizon", "-120"], "argument --horizon: must be > 0, not -120"),
        (["train", "--take-profit", "0"], "argument --take-profit: must be > 0, not 0"),
        (["train", "--stop-loss", "-0.1"], "argument --stop-loss: must be > 0 and < 1"),
        (["train", "--fee-rate", "-0.01"], "argument --fee-rate: must be >= 0 and < 1"),
        (["train", "--trees", "0"], "argument --trees: must be >= 1, not 0"),
        (["train", "--trees", "2.5"], "argument --trees: not a whole number: '2.5'"),
        (["train", "--leaves", "1"], "argument --leaves: must be >= 2, not 1"),
        (["train", "--learning-rate", "0"], "argument --learning-rate: must be > 0, not 0"),
        (["train", "--valid-days", "-30"], "argument --valid-days: must be > 0, not -30"),
        (["stop", "--timeout", "0"], "argument --timeout: must be > 0, not 0"),
        (["dead-letters", "features", "--limit", "0"], "argument --limit: must be >= 1, not 0"),
    ],
)
def test_a_number_out_of_its_flags_range_is_refused_naming_the_flag_and_range(argv, named, capsys):
    # a negative count or duration would run and end in an empty result ("no frames")
    with pytest.raises(SystemExit) as refused:
        cli_main.main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert named in err[-1]
    assert err[-1].startswith(f"pumpflow {argv[0]}: error: ")


#: the commands reading or writing Postgres, each with what it needs besides
POSTGRES_COMMANDS = [
    ["migrate"],
    ["prune", "--keep-days", "3", "--dry-run"],
    ["report"],
    ["backtest"],
    ["train"],
    ["replay"],
    ["record", "--url", "ws://127.0.0.1:1/api/data"],
    ["sim", "load", "run.jsonl"],
]


@pytest.mark.parametrize("argv", POSTGRES_COMMANDS)
def test_a_dsn_flag_that_is_no_postgres_url_is_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as refused:
        cli_main.main([*argv, "--dsn", "notadsn"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --dsn: not a URL of postgresql:// or postgres://" in err[-1], err


@pytest.mark.parametrize("argv", POSTGRES_COMMANDS)
def test_a_schema_no_namespace_could_name_is_refused_as_its_flags_error(argv, capsys):
    """`migrate --schema Pumpflow-Test` made a schema no service could use (the namespace
    is the schema, lower case)."""
    with pytest.raises(SystemExit) as refused:
        cli_main.main([*argv, "--schema", "Pumpflow-Test"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "argument --schema: not a namespace" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("score", [-0.01, 0.0, 0.5, 1.0, 1.01])
def test_the_min_score_flag_takes_what_the_setting_takes(score, capsys):
    from pydantic import ValidationError

    from pumpflow.trading.settings import TradingSettings

    argv = ["run", "--min-score", str(score)]
    try:
        TradingSettings(trading_min_score=score)
    except ValidationError:
        with pytest.raises(SystemExit):
            cli_main.build_parser().parse_args(argv)
        assert "argument --min-score" in capsys.readouterr().err
    else:
        assert cli_main.build_parser().parse_args(argv).min_score == score


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["sim", "dataset", "--minutes", "nan"], "argument --minutes: not a finite number"),
        (["sim", "serve", "--speed", "inf"], "argument --speed: not a finite number"),
        (["replay", "--speed", "nan"], "argument --speed: not a finite number"),
        (["record", "--duration", "inf"], "argument --duration: not a finite number"),
    ],
)
def test_the_services_own_commands_refuse_a_flag_that_is_no_finite_number(argv, named, capsys):
    """``pumpflow sim|record|replay`` parse with their owners' parsers, alike."""
    module, prefix, prog, _ = DELEGATED[argv[0]]
    parser = importlib.import_module(module).build_parser(prog)
    with pytest.raises(SystemExit) as refused:
        parser.parse_args([*prefix, *argv[1:]])
    assert refused.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "config", "code", "named"),
    [
        (
            ["run", "--duration", "1", "--plain"],
            "[common]\nnamespace = 5\n",
            2,
            "pumpflow.toml: [common] namespace: Input should be a valid string",
        ),
        # values a flag overrides are checked all the same: a typo must not pass for a
        # value that applies
        (
            ["run", "--duration", "1", "--plain"],
            "[trading]\ntrading_min_score = 'high'\n",
            2,
            "pumpflow.toml: [trading] trading_min_score: Input should be a valid number",
        ),
        (
            ["run", "--duration", "1", "--plain"],
            "[common]\ntransport = 'kafka'\n",
            2,
            "pumpflow.toml: [common] transport: Input should be 'memory' or 'rabbitmq'",
        ),
        (
            ["run", "--duration", "1", "--plain", "--min-score", "0.5"],
            "[trading]\ntrading_min_score = 7\n[common]\npartitions = 0\n",
            2,
            "pumpflow.toml: [trading] trading_min_score: Input should be less than or equal to 1; "
            "[common] partitions: Input should be greater than or equal to 1",
        ),
        # a model the settings name that cannot be served: the settings' fault, not the code's
        (
            ["run", "--duration", "1", "--plain"],
            "[model]\nmodel_models = {entry = '/nonexistent/m.onnx'}\n",
            2,
            "pumpflow run: the models of the settings (model_models, model_arms) cannot be "
            "served: model 'entry': cannot read /nonexistent/m.onnx: No such file or directory",
        ),
        (
            ["backtest", "--seed", "1", "--minutes", "1", "--quiet"],
            "[model]\nmodel_models = {entry = '/dev/null'}\n",
            2,
            "pumpflow backtest: the models of the settings (model_models, model_arms) cannot be "
            "served: model card: /dev/null has no card (null.card.json beside it)",
        ),
        (
            ["backtest", "--dataset", "/nonexistent/m.jsonl"],
            None,
            2,
            "pumpflow backtest: /nonexistent/m.jsonl: No such file or directory",
        ),
        (
            ["catalogue", "--out", "/proc/nonexistent"],
            None,
            1,
            "pumpflow catalogue: /proc/nonexistent: No such file or directory",
        ),
        # the services' own commands, delegated, alike
        (
            ["sim", "dataset", "--minutes", "1", "--out", "/nonexistent/d.jsonl"],
            None,
            1,
            "pumpflow sim: /nonexistent/d.jsonl: No such file or directory",
        ),
        (
            ["sim", "load", "/nonexistent/d.jsonl"],
            None,
            2,
            "pumpflow sim: /nonexistent/d.jsonl: No such file or directory",
        ),
        # a server that does not answer (nothing listens on port 1)
        (
            ["backtest", "--dsn", "postgresql://postgres@127.0.0.1:1/test"],
            None,
            1,
            "pumpflow backtest: cannot connect: postgres unreachable: ConnectionRefusedError: "
            "[Errno 111] Connect call failed",
        ),
        (
            ["replay", "--dsn", "postgresql://postgres@127.0.0.1:1/test"],
            None,
            1,
            "pumpflow replay: cannot connect: postgres unreachable: ConnectionRefusedError: "
            "[Errno 111] Connect call failed",
        ),
        # a DSN asyncpg cannot read: the setting's fault, named, not a traceback
        (
            ["migrate"],
            "[common]\npostgres_dsn = 'notadsn'\n",
            2,
            "pumpflow.toml: [common] postgres_dsn: Value error, not a URL of "
            "postgresql:// or postgres://",
        ),
        # the first command of a deployment, whose operator must learn it is Postgres
        (
            ["migrate", "--dsn", "postgresql://postgres@127.0.0.1:1/test"],
            None,
            1,
            "pumpflow migrate: cannot connect: postgres unreachable: ConnectionRefusedError: "
            "[Errno 111] Connect call failed",
        ),
    ],
)
def test_a_bad_setting_or_file_is_one_line_naming_it_and_no_traceback(
    argv, config, code, named, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", "")
    monkeypatch.delenv("PUMPFLOW_CONFIG_FILE")
    if config is not None:
        (tmp_path / "pumpflow.toml").write_text(config)
        argv = ["--config-file", str(tmp_path / "pumpflow.toml"), *argv]
    assert cli_main.main(argv) == code
    err = capsys.readouterr().err
    assert err.strip() == err.strip().splitlines()[-1], err  # one line
    assert named in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--duration", "1", "--plain", "--report", "/"], "pumpflow run: /: Is a directory"),
        (
            ["run", "--duration", "1", "--plain", "--report", "/proc/nonexistent/r.html"],
            "pumpflow run: /proc/nonexistent: No such file or directory",
        ),
        (
            ["backtest", "--seed", "1", "--minutes", "1", "--report", "/"],
            "pumpflow backtest: /: Is a directory",
        ),
        (
            ["backtest", "--seed", "1", "--minutes", "1", "--json", "/proc/nonexistent/r.json"],
            "pumpflow backtest: /proc/nonexistent: No such file or directory",
        ),
    ],
)
def test_a_report_that_cannot_be_written_is_refused_before_the_run(argv, named, capsys):
    """The results of a run would be lost at its end: it does not start."""
    assert cli_main.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    assert captured.err.strip() == named


#: a line that looks like what ``pumpflow record --out`` writes (an event envelope) but
#: is not one: no source, no time, an empty payload
RECORDED_LINE = '{"id":"e1","type":"token.created","version":1,"data":{}}\n'


@pytest.mark.parametrize(
    "argv",
    [
        ["backtest", "--dataset", "{file}"],
        ["train", "--dataset", "{file}", "--out", "{dir}/m.onnx"],
    ],
)
def test_a_broken_recording_is_one_line_naming_its_line_and_no_traceback(argv, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(RECORDED_LINE)
    argv = [a.format(file=path, dir=tmp_path) for a in argv]
    ran = subprocess.run([PUMPFLOW, *argv], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    err = ran.stderr
    assert err.strip() == err.strip().splitlines()[-1], err  # one line
    assert err.startswith(f"pumpflow {argv[0]}: {path}:1: not a recorded event: "), err
    assert "missing required field `source`" in err
    # read as the file it looks like: what one of those is
    assert "a recording's line is an event envelope, as pumpflow record --out writes" in err


@pytest.mark.postgres
async def test_a_broken_recording_is_not_loaded_and_said_in_one_line(
    pg_pool, namespace, postgres_dsn, tmp_path, capsys
):
    path = tmp_path / "events.jsonl"
    path.write_text(RECORDED_LINE)
    argv = ["sim", "load", str(path), "--dsn", postgres_dsn, "--schema", namespace]
    assert await asyncio.to_thread(cli_main.main, argv) == 2
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1].startswith(f"pumpflow sim: {path}:1: not a recorded event: ")
    ), err
    assert "Traceback" not in err


#: each command reading a dataset file ({file}), what it says its errors as
DATASET_READERS = [
    (["backtest", "--quiet", "--dataset", "{file}"], "pumpflow backtest"),
    (["train", "--dataset", "{file}", "--out", "{dir}/m.onnx"], "pumpflow train"),
    (["sim", "load", "{file}", "--dsn", "{dsn}", "--schema", "{schema}"], "pumpflow sim"),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("argv", "says"), DATASET_READERS)
@pytest.mark.parametrize(
    ("given", "named"),
    [
        ("missing.jsonl", "{file}: No such file or directory"),
        ("folder", "{file}: Is a directory"),
        ("notes.txt", "{file}:1: not a dataset line: "),
    ],
)
async def test_a_dataset_that_cannot_be_read_as_one_is_bad_input(
    argv, says, given, named, pg_pool, namespace, postgres_dsn, tmp_path, capsys
):
    """A dataset file named that is not there, a folder or no dataset is input the command
    refuses, as a flag's bad value (exit status 2): nothing in it was run or loaded."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("what to try next\n")
    path = tmp_path / given
    fill = {"file": path, "dir": tmp_path, "dsn": postgres_dsn, "schema": namespace}
    argv = [a.format(**fill) for a in argv]
    assert await asyncio.to_thread(cli_main.main, argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == err.strip().splitlines()[-1], err  # one line
    assert err.startswith(f"{says}: {named.format(file=path)}"), err


@pytest.mark.postgres
async def test_the_simulators_own_command_refuses_a_missing_dataset_as_bad_input(
    pg_pool, namespace, postgres_dsn, tmp_path
):
    path = tmp_path / "missing.jsonl"
    argv = ["load", str(path), "--dsn", postgres_dsn, "--schema", namespace]
    sim = PUMPFLOW.with_name("pumpflow-sim")
    ran = await asyncio.to_thread(
        subprocess.run, [sim, *argv], capture_output=True, text=True, timeout=120
    )
    assert (ran.returncode, ran.stderr) == (2, f"pumpflow-sim: {path}: No such file or directory\n")


@pytest.mark.parametrize(("argv", "says"), DATASET_READERS[:2])
def test_a_dataset_without_frames_runs_nothing_and_fails(argv, says, tmp_path):
    """An empty dataset is one: nothing to run on is the run's failure (exit status 1), as
    a Postgres window without frames is."""
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(SystemExit) as failed:  # a message: exit status 1
        cli_main.main([a.format(file=path, dir=tmp_path) for a in argv])
    said = failed.value.code
    assert isinstance(said, str) and said.startswith(f"{says}: no ") and str(path) in said


@pytest.mark.postgres
async def test_loading_a_dataset_without_frames_stores_nothing_and_fails(
    pg_pool, namespace, postgres_dsn, tmp_path, capsys
):
    """As a backtest or a training of it does: nothing loaded is the load's failure."""
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    argv = ["sim", "load", str(path), "--dsn", postgres_dsn, "--schema", namespace]
    assert await asyncio.to_thread(cli_main.main, argv) == 1
    assert capsys.readouterr().err == f"pumpflow sim: no frames in {path}: nothing stored\n"


@pytest.mark.postgres
@pytest.mark.parametrize(("text", "status"), [("what to try next\n", 2), ("\n", 1)])
async def test_loading_a_file_that_is_no_dataset_from_its_first_line_creates_no_schema(
    text, status, postgres_dsn, namespace, tmp_path
):
    """A file refused from its first line (or without one) loads nothing into a schema
    that was not there: none is created for it, nor migrated."""
    from pumpflow.common.testing import drop_schema, schema_exists

    path = tmp_path / "notes.jsonl"
    path.write_text(text)
    argv = ["sim", "load", str(path), "--dsn", postgres_dsn, "--schema", namespace]
    try:
        assert await asyncio.to_thread(cli_main.main, argv) == status
        assert not await schema_exists(postgres_dsn, namespace)
    finally:
        await drop_schema(postgres_dsn, namespace)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--out", "{dir}/events.jsonl"],
        ["backtest", "--quiet", "--report", "{dir}/r.html"],
        ["train", "--out", "{dir}/m.onnx"],
    ],
)
async def test_a_schema_that_holds_no_history_is_refused_not_created(
    argv, postgres_dsn, namespace, tmp_path
):
    """A typo in --schema (or PUMPFLOW_NAMESPACE) must not be migrated into an empty
    history that a command reading it reports as nothing recorded."""
    from pumpflow.common.testing import drop_schema, schema_exists

    argv = [a.format(dir=tmp_path) for a in argv] + ["--dsn", postgres_dsn, "--schema", namespace]
    try:
        ran = await asyncio.to_thread(
            subprocess.run, [PUMPFLOW, *argv], capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 2, ran.stderr  # a flag naming nothing, as a bad flag is
        last = ran.stderr.strip().splitlines()[-1]
        assert last.startswith(f"pumpflow {argv[0]}: no schema {namespace!r} in Postgres"), last
        assert "Traceback" not in ran.stderr
        assert not await schema_exists(postgres_dsn, namespace)
    finally:
        await drop_schema(postgres_dsn, namespace)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--duration", "1", "--plain", "--report", "{dir}/r.JSON"],
        ["backtest", "--seed", "1", "--minutes", "1", "--quiet", "--report", "{dir}/r.json"],
        ["report", "--results", "{dir}/saved.json", "--out", "{dir}/r.json"],
    ],
)
def test_a_report_named_as_its_results_would_be_is_refused_before_it_runs(argv, tmp_path, capsys):
    """The results are saved beside the report as .json: a report so named would be
    overwritten by them (the command saying it wrote a report, no HTML anywhere)."""
    (tmp_path / "saved.json").write_text(json.dumps({"title": "t", "source": "s"}))
    argv = [a.format(dir=tmp_path) for a in argv]
    assert cli_main.main(argv) == 2  # refused as a bad flag is
    said = capsys.readouterr()
    assert re.search(rf"^pumpflow {argv[0]}: .*r\.(json|JSON): .*\.html", said.err)
    assert said.out == ""  # nothing ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.json"]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["sim", "serve", "--speed", "-1"], "argument --speed: must be >= 0, not -1"),
        (["sim", "serve", "--malformed-rate", "2"], "argument --malformed-rate: must be >= 0"),
        (["sim", "serve", "--drop-every", "0"], "argument --drop-every: must be > 0, not 0"),
        (["sim", "serve", "--hostile-kinds", "nope"], "argument --hostile-kinds: unknown"),
        (["sim", "calibrate", "--minutes", "0"], "argument --minutes: must be > 0, not 0"),
        (["sim", "dataset", "--minutes", "-1", "--out", "x.jsonl"], "argument --minutes: must"),
        (["sim", "serve", "--rate", "0"], "argument --launches/--rate: must be > 0, not 0"),
        (["sim", "load", "x.jsonl", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["record", "--duration", "-1", "--out", "x.jsonl"], "argument --duration: must be > 0"),
        (["replay", "--speed", "0"], "argument --speed: must be > 0, not 0"),
    ],
)
def test_a_services_own_command_refuses_a_value_out_of_range_as_its_flags_error(argv, said, capsys):
    """Not a traceback from deep in the code, nor a run that records or writes nothing
    and says it did."""
    with pytest.raises(SystemExit) as refused:
        cli_main.main(argv)
    assert refused.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--duration", "1", "--plain"],
        ["backtest", "--seed", "1", "--minutes", "1", "--quiet"],
        ["backtest", "--seed", "1", "--minutes", "1", "--quiet", "--config", "a", "--config", "b"],
    ],
)
def test_a_reports_folder_that_cannot_be_written_is_refused_before_the_run(
    argv, monkeypatch, capsys
):
    """PUMPFLOW_REPORTS_DIR is the user's as a flag is: a backtest ended in a traceback
    after every configuration ran, their reports lost."""
    monkeypatch.setenv("PUMPFLOW_REPORTS_DIR", "/proc/nonexistent")
    assert cli_main.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    assert (
        captured.err.strip() == f"pumpflow {argv[0]}: /proc/nonexistent: No such file or directory"
    )


def test_a_file_error_of_the_codes_own_keeps_its_traceback(monkeypatch, tmp_path):
    """A file no flag named failing is a defect, not the user's: it is raised as it is."""
    from pumpflow.cli import catalogue

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/opt/pumpflow/internal.json")

    monkeypatch.setattr(catalogue, "asyncapi_document", broken)
    with pytest.raises(FileNotFoundError):
        cli_main.main(["catalogue", "--out", str(tmp_path)])


def test_unknown_service_is_exit_2_listing_the_installed_ones(fake_services, capsys):
    assert cli_main.main(["serve", "nope"]) == 2
    assert "no service named 'nope' (installed: widget)" in capsys.readouterr().err
    assert cli_main.main(["settings", "nope"]) == 2


def test_serve_runs_the_service_class_with_run_service(fake_services, monkeypatch):
    ran = []

    async def fake_run_service(service_cls, settings=None):
        ran.append(service_cls)
        return 0

    monkeypatch.setattr("pumpflow.common.runtime.runner.run_service", fake_run_service)
    assert cli_main.main(["serve", "widget"]) == 0
    assert ran == [Widget]


def _summary_counts(stdout: str) -> dict[str, int]:
    # the last line names the report; the summary comes just before it
    *_, summary, report = stdout.strip().splitlines()
    assert summary.startswith("run over:"), stdout[-2000:]
    assert report.startswith("report: "), stdout[-2000:]
    return {
        name: int(re.search(rf"([\d,]+) {name}", summary)[1].replace(",", ""))
        for name in ("tokens", "trades", "feature updates", "predictions", "lifecycle changes")
    }


def test_run_flows_a_simulated_market_through_the_embedded_services_and_stops_by_itself(
    reports_dir,
):
    result = subprocess.run(
        [
            str(PUMPFLOW),
            "run",
            "--duration",
            "6",
            "--speed",
            "20",
            "--launches",
            "60",
            "--every",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "services: feed, features, activity, model" in result.stdout
    # the report, unasked, in the reports folder (the tests' own: PUMPFLOW_REPORTS_DIR)
    report = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.parent == reports_dir and report.name.startswith("run-seed7-"), report
    assert "<svg" in report.read_text() and report.with_suffix(".json").exists()
    status = [line for line in result.stdout.splitlines() if "trade subscriptions" in line]
    assert len(status) >= 2
    counts = _summary_counts(result.stdout)
    # 6 s at 20x is two market minutes: ~120 launches, their trades, features and states
    assert counts["tokens"] >= 40
    assert counts["trades"] > counts["tokens"]
    # features.updated follows every token's trades (a token's trades delivered together
    # are announced once, by the last; it may lag the last few at shutdown)
    assert counts["feature updates"] >= counts["tokens"] * 0.9
    assert counts["lifecycle changes"] >= counts["tokens"]
    # the model scores a token's first vector at least, unless it was retired by then
    assert counts["predictions"] >= counts["tokens"] * 0.5


def _endless_run(*options: str) -> subprocess.Popen:
    """``pumpflow run`` until interrupted, its output piped."""
    return subprocess.Popen(
        [str(PUMPFLOW), "run", "--duration", "0", "--speed", "20", "--every", "1", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen, text: str, seen: str = "", lines: int = 500) -> str:
    """``seen`` and the lines ``proc`` prints up to the one with ``text`` (within
    ``lines``: an endless run that never prints it fails instead of running on)."""
    for _ in range(lines):
        if text in seen:
            return seen
        line = proc.stdout.readline()
        assert line, seen[-3000:] + proc.stderr.read()
        seen += line
    assert text in seen, seen[-3000:]
    return seen


def test_a_ctrl_c_before_the_command_begins_is_status_130_without_a_traceback(monkeypatch, capsys):
    """Pressed while the CLI still imports and builds its parser (a second or so)."""

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["backtest", "--help"]) == 130
    assert capsys.readouterr().err == ""


def test_run_stops_cleanly_on_ctrl_c():
    proc = _endless_run()
    try:
        first = proc.stdout.readline()
        assert first.startswith("pumpflow embedded:"), first + proc.stderr.read()
        # the first status line (what the run saw so far); a buy may come before it
        status = _read_until(proc, "trade subscriptions")
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert _summary_counts(first + status + rest)["tokens"] > 0


def test_a_second_ctrl_c_stops_the_runs_end_at_once_with_status_130(tmp_path):
    """The first Ctrl-C begins the graceful exit; one more while the run ends (the exit,
    the report, the teardown) ends the process: one line says what it cut short, 130."""
    # the report a pipe nobody reads: the run's end cannot get past its writing before the
    # second Ctrl-C, however late this test reads the run's output and sends it
    report = tmp_path / "r.html"
    os.mkfifo(report)
    proc = _endless_run("--report", str(report))
    try:
        seen = _read_until(proc, "trade subscriptions")
        proc.send_signal(signal.SIGINT)
        # trading halts on system.shutdown: the graceful exit has begun
        _read_until(proc, "TRADING trading.state: state='halted'", seen)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    [said] = [line for line in err.splitlines() if "second interrupt" in line]
    assert re.fullmatch(r"pumpflow run: a second interrupt cut the .+ short: .+", said), said


@pytest.mark.parametrize(
    ("given", "named"),
    [("/proc/nonexistent/s.json", "/proc/nonexistent: No such file or directory"),
     ("{dir}", "{dir}: Is a directory")],
)  # fmt: skip
def test_sim_serve_refuses_a_stats_file_it_cannot_write_before_it_serves(given, named, tmp_path):
    """Not at the end of a session, its counters lost: as a bad flag is (exit status 2)."""
    argv = ["sim", "serve", "--port", str(free_port()), "--stats-out", given.format(dir=tmp_path)]
    server = subprocess.Popen(
        [str(PUMPFLOW), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        said = server.stdout.readline()  # "serving ..." once it serves, "" as it exits
    finally:
        if server.poll() is None:
            server.terminate()
        _, err = server.communicate(timeout=30)
    assert said == ""
    assert server.returncode == 2
    assert err == f"pumpflow sim serve: --stats-out {named.format(dir=tmp_path)}\n"


def test_pumpflow_record_takes_a_simulated_stream_from_pumpflow_sim_serve(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [str(PUMPFLOW), "sim", "serve", "--port", str(port), "--speed", "20", "--seed", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "events.jsonl"
    try:
        result = subprocess.run(
            [
                str(PUMPFLOW),
                "record",
                "--url",
                f"ws://127.0.0.1:{port}/api/data",
                "--out",
                str(out),
                "--duration",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in out.read_text().splitlines()]
    types = {event["type"] for event in events}
    assert {"token.created", "token.trade"} <= types
    # the per-mint seq the feed assigns starts at the creation and has no holes
    by_mint: dict[str, list[int]] = {}
    for event in events:
        by_mint.setdefault(event["key"], []).append(event["seq"])
    created = {event["key"] for event in events if event["type"] == "token.created"}
    assert created
    for mint, seqs in by_mint.items():
        # a mint created before the recording began (a migration) starts anywhere
        first = 1 if mint in created else seqs[0]
        assert seqs == list(range(first, first + len(seqs)))


def test_delegated_commands_show_their_owners_help():
    result = subprocess.run(
        [str(PUMPFLOW), "replay", "-h"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "--speed" in result.stdout and "--mint" in result.stdout


def _read_then_leave(
    argv: list[str], lines: int, *, unbuffered: bool = False
) -> tuple[subprocess.Popen, list[str], str]:
    """Run ``pumpflow argv`` into a pipe whose reader takes ``lines`` lines, then closes it
    (0: before anything is printed), as ``| head`` does; the process, the lines read and
    what it said on stderr. ``unbuffered``: with PYTHONUNBUFFERED, each write goes out
    at once."""
    read, write = os.pipe()
    # the pipe holds less than the commands print: they write on only as it is read
    fcntl.fcntl(read, fcntl.F_SETPIPE_SZ, 4096)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [str(PUMPFLOW), *argv], stdout=write, stderr=subprocess.PIPE, text=True, env=env
    )
    os.close(write)
    got = b""
    try:
        while got.count(b"\n") < lines:
            chunk = os.read(read, 64)
            assert chunk, got.decode() + proc.stderr.read()
            got += chunk
    finally:
        os.close(read)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc, got.decode().splitlines()[:lines], err


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    ("argv", "lines", "first"),
    [
        (["settings", "feed"], 1, "PUMPFLOW_SERVICE"),
        (["settings", "feed"], 0, None),
        (["--help"], 0, None),
        # a delegated command's own parser
        (["sim", "--help"], 0, None),
    ],
)
def test_a_reader_that_leaves_early_ends_the_command_quietly(argv, lines, first, unbuffered):
    proc, got, err = _read_then_leave(argv, lines, unbuffered=unbuffered)
    assert err == ""
    if unbuffered and "--help" in argv:
        # argparse drops a failed write of its help itself, and exits as it would have
        assert proc.returncode == 0
    else:
        assert proc.returncode == READER_GONE
    if first is not None:
        assert got[0].startswith(first), got


def test_a_reader_that_leaves_early_stops_a_run_as_ctrl_c_does():
    proc, got, err = _read_then_leave(
        ["run", "--duration", "0", "--speed", "20", "--every", "1", "--plain"], 2
    )
    assert got[0].startswith("pumpflow embedded:"), got
    # the services log on stderr; nothing of the output gone
    assert "Broken pipe" not in err and "Traceback" not in err, err[-3000:]
    assert proc.returncode == READER_GONE, err[-3000:]


@pytest.mark.parametrize(
    "command",
    ["settings feed", "run --duration 1 --speed 20 --plain --report {tmp}/r.html"],
    ids=["settings", "run"],
)
def test_a_command_started_with_its_output_closed_runs_as_before(command, tmp_path):
    # no standard output at all (>&-): print writes nothing, and nothing fails
    result = subprocess.run(
        ["sh", "-c", f"exec '{PUMPFLOW}' {command.format(tmp=tmp_path)} >&-"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_servers_broken_pipe_is_still_said_while_the_output_is_read(
    fake_services, monkeypatch, capsys
):
    def broken(name):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(serve_module, "load_settings", broken)
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reader, open(write, "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert cli_main.main(["settings", "widget"]) == 1
        monkeypatch.undo()
        assert reader is not None
    assert "pumpflow settings: cannot connect: [Errno 32] Broken pipe" in capsys.readouterr().err


async def test_dead_letters_are_listed_without_loss_then_moved_to_a_file(
    tmp_path, rabbitmq_harness, process_stack
):
    bus = await rabbitmq_harness.bus("feed/t", partitions=2)
    rabbitmq_harness.delete_after(["feed"])
    await bus.dead_letter(b'{"txType": "buy", "mint": 7}', service="feed", reason="bad mint")
    await bus.dead_letter(b"\xff\xfe not utf-8", service="feed", reason="not JSON")
    process_stack.configure(partitions=2)

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return process_stack.run("dead-letters", "feed", *argv)

    listed = await asyncio.to_thread(cli)
    assert listed.returncode == 0, listed.stderr
    assert "bad mint" in listed.stdout and "not JSON" in listed.stdout
    assert "2 dead letters shown" in listed.stdout
    moved_to = tmp_path / "dead.jsonl"
    moved = await asyncio.to_thread(cli, "--move", str(moved_to))
    assert moved.returncode == 0, moved.stderr
    records = [json.loads(line) for line in moved_to.read_text().splitlines()]
    assert [r["reason"] for r in records] == ["bad mint", "not JSON"]
    assert records[0]["body"] == '{"txType": "buy", "mint": 7}'
    assert base64.b64decode(records[1]["body_base64"]) == b"\xff\xfe not utf-8"
    assert await bus.dead_letters("feed", remove=False) == []


#: ``pumpflow`` as another service's image has it: without the feed's code
WITHOUT_THE_FEED = (
    "import sys; sys.modules['pumpflow.feed.redrive'] = None; "
    "from pumpflow.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


async def test_dead_letters_are_read_and_redriven_where_the_feed_is_not_installed(
    rabbitmq_harness, process_stack
):
    """A service's image holds that service alone: `docker compose exec features
    pumpflow dead-letters features` lists and redrives without the feed's package, and
    redriving the feed's letters there says where to run it instead of a traceback."""
    bus = await rabbitmq_harness.bus("features/t", partitions=2)
    rabbitmq_harness.delete_after(["features", "feed"])
    await bus.dead_letter(b'{"not": "an event"}', service="features", reason="bad body")
    await bus.dead_letter(b'{"txType": "buy"}', service="feed", reason="bad mint")
    process_stack.configure(partitions=2)

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_THE_FEED, "dead-letters", *argv],
            env=process_stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = await asyncio.to_thread(cli, "features")
    assert listed.returncode == 0, listed.stderr
    assert "bad body" in listed.stdout and "1 dead letter shown" in listed.stdout
    counted = await asyncio.to_thread(cli, "features", "--redrive", "--dry-run")
    assert counted.returncode == 0, counted.stderr
    assert "Traceback" not in counted.stderr
    feed = await asyncio.to_thread(cli, "feed", "--redrive", "--dry-run")
    assert feed.returncode == 2, feed.stderr
    assert feed.stderr == (
        "pumpflow dead-letters: the feed's letters are redriven where the feed is "
        "installed (its image: docker compose exec feed pumpflow dead-letters feed "
        "--redrive)\n"
    )
    assert len(await bus.dead_letters("feed", remove=False)) == 1


async def test_dead_letters_of_a_service_that_never_consumed_are_refused_and_not_created(
    rabbitmq_harness, process_stack
):
    bus = await rabbitmq_harness.bus("feed/t", partitions=2)
    process_stack.configure(partitions=2)
    typo = await asyncio.to_thread(process_stack.run, "dead-letters", "featurs")
    assert typo.returncode == 2
    assert typo.stderr.strip() == (
        f"pumpflow dead-letters: no dead letters are kept for 'featurs' in namespace "
        f"'{bus.namespace}': no such service has consumed there"
    )
    assert not await bus.keeps_dead_letters_of("featurs")  # and none was made


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--reason", "x"], "--reason, --type and --dry-run go with a redrive"),
        (
            ["--redrive-from", "/nonexistent/letters.jsonl"],
            "/nonexistent/letters.jsonl: No such file or directory",
        ),
    ],
)
def test_dead_letters_refusals_name_the_command_as_every_others_do(flags, said, capsys):
    """Not "pumpflow: [Errno 2] No such file or directory: '...'"."""
    assert cli_main.main(["dead-letters", "features", *flags]) == 2
    assert capsys.readouterr().err == f"pumpflow dead-letters: {said}\n"


async def test_dead_letters_with_rabbitmq_away_is_one_line_and_exit_1(process_stack):
    port = free_port()
    process_stack.configure(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
    # an operator's command says so at once, where a service waits for the broker
    away = await asyncio.to_thread(process_stack.run, "dead-letters", "features", timeout=60)
    assert away.returncode == 1, away.stderr
    assert away.stderr.count("\n") == 1, away.stderr
    assert away.stderr.startswith("pumpflow dead-letters: cannot connect to RabbitMQ: ")
    assert str(port) in away.stderr


async def test_dead_letters_on_a_vhost_the_broker_lacks_is_one_line_with_its_reason(
    process_stack, namespace, amqp_url
):
    vhost = f"{namespace}-missing"
    process_stack.configure(amqp_url=urlunsplit(urlsplit(amqp_url)._replace(path=f"/{vhost}")))
    refused = await asyncio.to_thread(process_stack.run, "dead-letters", "features", timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"NOT_ALLOWED - vhost {vhost} not found" in refused.stderr, refused.stderr
    assert "the AMQP URL's vhost" in refused.stderr, refused.stderr


async def test_a_batch_dead_lettered_whole_is_listed_and_redriven_event_by_event(
    tmp_path, rabbitmq_harness, process_stack, namespace, token_events
):
    """A message of several events the broker dead-lettered whole (the bus could not
    store its event's letter) is listed and redriven as one letter per event, in order;
    so is such a batch a move saved to a file as one record."""
    bus = await rabbitmq_harness.bus("batch/t", partitions=2)
    rabbitmq_harness.delete_after(["batches"])

    async def dlq_down(*args, **kwargs):
        raise ConnectionError("DLQ publish failed")

    bus._to_dlq = dlq_down
    fixed = False
    got: list[Event] = []

    async def handler(event: Event) -> None:
        if not fixed:
            raise RuntimeError("not yet")
        got.append(event)

    await bus.subscribe(
        Subscription(service="batches", patterns=("token.trade",), handler=handler, max_attempts=1)
    )
    process_stack.configure(partitions=2)

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return process_stack.run("dead-letters", "batches", *argv)

    sent = [token_events.trade("mintBatch", seq=seq) for seq in range(1, 5)]
    await bus.publish_many(sent)  # one message: one key, one partition

    async def dead() -> bool:
        return len(await bus.dead_letters("batches", remove=False)) == len(sent)

    await eventually(dead, 10, what="the batch's letters")
    listed = await asyncio.to_thread(cli)
    assert listed.returncode == 0, listed.stderr
    shown = [line for line in listed.stdout.splitlines() if line.startswith("- ")]
    queue = f"{namespace}.batches.p{partition_of('mintBatch', 2):02d}"
    assert shown == [f"- token.trade key=mintBatch: broker: rejected from {queue}"] * 4
    assert "4 dead letters shown" in listed.stdout
    fixed = True
    redriven = await asyncio.to_thread(cli, "--redrive")
    assert redriven.returncode == 0, redriven.stderr
    assert "redrove 4 dead letters of batches" in redriven.stdout
    await eventually(lambda: len(got) == len(sent), 10, what="the batch redriven")
    assert [e.id for e in got] == [e.id for e in sent]
    assert await bus.dead_letters("batches", remove=False) == []

    # the record a move made of the whole batch's letter
    saved = tmp_path / "dead.jsonl"
    record = {
        "service": "batches",
        "reason": "broker: rejected from the partition queue",
        "event_type": None,
        "key": None,
        "body": "[" + ",".join(encode_event(e).decode() for e in sent) + "]",
        "headers": {"x-death": "[{'reason': 'rejected'}]"},
    }
    saved.write_text(json.dumps(record) + "\n")
    from_file = await asyncio.to_thread(cli, "--redrive-from", str(saved), "--type", "token.trade")
    assert from_file.returncode == 0, from_file.stderr
    assert "redrove 4 dead letters of batches" in from_file.stdout
    await eventually(lambda: len(got) == 2 * len(sent), 10, what="the saved batch redriven")
    assert [e.id for e in got[len(sent) :]] == [e.id for e in sent]


async def test_a_keyless_letter_goes_back_to_a_group_taking_them_shared_and_stays_elsewhere(
    rabbitmq_harness, process_stack
):
    """A system.shutdown trading dead-lettered (its cause since fixed) goes back to
    trading's shared critical queue, which the group's declaration tells the command:
    the replica consuming applies it. The exit service's control group takes it on each
    replica's own queue, gone with the replica: its letter stays, and the command says
    why."""
    bus = await rabbitmq_harness.bus("trading/t", partitions=2)
    rabbitmq_harness.delete_after(["trading", "exit-control"])
    groups = groups_of(["trading", "exit-control"])
    fixed = False
    applied: list[Event] = []

    async def trading(event: Event) -> None:
        if event.type == "system.shutdown" and not fixed:
            raise RuntimeError("the ledger refuses the halt")
        applied.append(event)

    async def never(event: Event) -> None:
        raise RuntimeError("exit-control refuses it")

    await declare_groups(bus, groups)
    await bus.subscribe(
        Subscription(service="trading", patterns=groups["trading"], handler=trading,
                     shared_keyless=True, max_attempts=1)
    )  # fmt: skip
    await bus.subscribe(
        Subscription(service="exit-control", patterns=groups["exit-control"], handler=never,
                     max_attempts=1)
    )  # fmt: skip
    process_stack.configure(partitions=2)
    stop = make_event(SystemShutdown(reason="operator"), source="exit/t", time=time.time())
    await bus.publish(stop)

    async def dead(service: str) -> bool:
        return len(await bus.dead_letters(service, remove=False)) == 1

    for service in groups:
        await eventually(lambda s=service: dead(s), 10, what=f"the letter of {service}")
    fixed = True
    redriven = await asyncio.to_thread(process_stack.run, "dead-letters", "trading", "--redrive")
    assert redriven.returncode == 0, redriven.stderr
    assert "redrove 1 dead letter of trading" in redriven.stdout
    await eventually(lambda: applied, 10, what="the shutdown redriven")
    assert [(e.id, e.redriven) for e in applied] == [(stop.id, True)]
    assert await bus.dead_letters("trading", remove=False) == []

    left = await asyncio.to_thread(process_stack.run, "dead-letters", "exit-control", "--redrive")
    assert left.returncode == 0, left.stderr
    assert left.stdout.splitlines() == [
        "redrove 0 dead letters of exit-control (1 matched, 1 keyless, left); 0 not matched",
        "- left: system.shutdown is keyless and exit-control takes its keyless events on "
        "each replica's own queues, which go with their replica: no queue of exit-control "
        "holds them to put it back on (a group taking them on queues its replicas share, "
        "shared_keyless, has one)",
    ]
    listed = await asyncio.to_thread(process_stack.run, "dead-letters", "exit-control")
    assert "1 dead letter shown for exit-control" in listed.stdout, listed.stderr
    assert [(e.id, e.redriven) for e in applied] == [(stop.id, True)]


class _SeqsProcessor(AppliedSeqs):
    """Keeps the seqs a mint applied; refuses the trades of ``rogue`` until fixed."""

    def __init__(self) -> None:
        self.fixed = False

    def apply(self, state: list[int], event, effects) -> list[int]:
        if event.data.traderPublicKey == "rogue" and not self.fixed:
            raise InvalidInput("rogue trader")
        return super().apply(state, event, effects)


async def test_dead_letters_are_redriven_once_their_cause_is_fixed_and_applied(
    tmp_path, rabbitmq_harness, process_stack, namespace, redis_url, token_events
):
    bus = await rabbitmq_harness.bus("keyed/t", partitions=2)
    rabbitmq_harness.delete_after(["redrive"])
    store = RedisStateStore(url=redis_url, namespace=namespace)
    processor = _SeqsProcessor()
    consumer = KeyedStatefulConsumer(
        processor,
        KeyedConsumerConfig(service="redrive", patterns=("token.trade",)),
        bus=bus,
        store=store,
        clock=WallClock(),
        source="redrive/t",
    )
    await consumer.start()
    process_stack.configure(partitions=2)

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return process_stack.run("dead-letters", "redrive", *argv)

    try:
        mints = ("mintApump", "mintBpump")
        for mint in mints:
            await bus.publish_many(
                [
                    token_events.trade(mint, seq=1),
                    token_events.trade(mint, "rogue", seq=2),
                    token_events.trade(mint, seq=3),
                ]
            )

        async def applied(mint: str) -> list[int]:
            await consumer.flush()
            return consumer.state(mint) or []

        async def dead(count: int) -> bool:
            return len(await bus.dead_letters("redrive", remove=False)) >= count

        await eventually(lambda: dead(2), 10, what="two dead letters")
        for mint in mints:
            assert await applied(mint) == [1, 3]

        dry = await asyncio.to_thread(cli, "--redrive", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would redrive 2 dead letters of redrive" in dry.stdout
        saved = tmp_path / "dead.jsonl"
        moved = await asyncio.to_thread(cli, "--move", str(saved))
        assert moved.returncode == 0, moved.stderr

        processor.fixed = True  # the cause, fixed
        from_file = await asyncio.to_thread(
            cli, "--redrive-from", str(saved), "--type", "token.trade"
        )
        assert from_file.returncode == 0, from_file.stderr
        assert "redrove 2 dead letters" in from_file.stdout
        for mint in mints:
            await eventually(
                lambda m=mint: _equals(applied(m), [1, 3, 2]), 10, what=f"{mint} redriven"
            )
        # a second redrive of the same file is a duplicate for the consumer
        again = await asyncio.to_thread(cli, "--redrive-from", str(saved))
        assert "redrove 2 dead letters" in again.stdout
        for mint in mints:
            await bus.publish(token_events.trade(mint, seq=4))
            await eventually(
                lambda m=mint: _equals(applied(m), [1, 3, 2, 4]), 10, what=f"{mint} seq 4"
            )
        assert await bus.dead_letters("redrive", remove=False) == []
    finally:
        await consumer.stop()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def _equals(value, expected) -> bool:
    return await value == expected


@pytest.mark.postgres
async def test_migrate_blocked_by_a_running_replica_s_transaction_names_it_and_goes_through(
    namespace, caplog
):
    """``pumpflow migrate`` during an upgrade: a replica of the previous version holds a
    transaction on the table the new migration alters; the command names it, and
    applies the migration once it commits."""
    import asyncpg

    from pumpflow.cli.migrate import apply
    from pumpflow.common.db import migrate as migrate_module
    from pumpflow.common.testing import drop_schema

    conn = await asyncpg.connect(POSTGRES_DSN)
    holder = await asyncpg.connect(
        POSTGRES_DSN, server_settings={"application_name": "pumpflow trading/old"}
    )
    applying: asyncio.Task | None = None
    try:
        released, pending = migrations_split_at_fills_altered()
        await migrate_module.migrate(conn, namespace, migrations=released)
        holding = holder.transaction()
        await holding.start()
        await holder.fetch(f'SELECT * FROM "{namespace}".fills')
        applying = asyncio.create_task(apply(POSTGRES_DSN, namespace))
        pid = holder.get_server_pid()
        await eventually(
            lambda: any(
                f"pid {pid} (pumpflow trading/old" in r.getMessage() for r in caplog.records
            ),
            what="a line naming the replica that blocks the migration",
        )
        await holding.commit()
        assert await asyncio.wait_for(applying, 60) == [m.version for m in pending]
    finally:
        if applying is not None:
            applying.cancel()
        await holder.close()
        await conn.close()
        await drop_schema(POSTGRES_DSN, namespace)


@pytest.mark.parametrize(
    "given",
    ["1700000000", "2023-11-14T22:13:20Z", "2023-11-14 22:13:20", "2023-11-14T23:13:20+01:00"],
)
@pytest.mark.parametrize("command", ["backtest", "train", "replay"])
def test_every_command_with_a_window_takes_the_same_times(command, given, monkeypatch):
    from pumpflow.feed.cli import build_parser as feed_parser

    # a time without a zone is UTC, as the market's, whatever the machine's zone
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        parser = feed_parser() if command == "replay" else cli_main.build_parser()
        args = parser.parse_args([command, "--start", given, "--end", given])
    finally:
        monkeypatch.undo()
        time.tzset()
    assert args.start == args.end == 1_700_000_000.0


@pytest.mark.parametrize("given", ["99999999999999", "-99999999999999"])
@pytest.mark.parametrize(
    "argv",
    [
        ["backtest", "--start"],
        ["train", "--end"],
        ["train", "--sim-start-epoch"],
        ["prune", "--before"],
        ["replay", "--start"],
        ["sim", "dataset", "--out", "d.jsonl", "--start-epoch"],
    ],
)
def test_a_time_no_date_can_say_is_refused_as_its_flags_error(argv, given, capsys):
    """`backtest --start 99999999999999` ended in "year 3170843 is out of range"."""
    with pytest.raises(SystemExit) as refused:
        cli_main.main([*argv, given])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"argument {argv[-1]}: not a date from year 1 to 9999: '{given}'" in err, err


@pytest.mark.parametrize("given", ["1700000000", "2023-11-14T22:13:20Z", "2023-11-14 22:13:20"])
@pytest.mark.parametrize(
    ("argv", "attribute"),
    [
        (["train", "--sim-start-epoch"], "sim_start_epoch"),
        (["sim", "dataset", "--out", "d.jsonl", "--start-epoch"], "start_epoch"),
    ],
)
def test_every_simulated_markets_start_takes_the_same_times(argv, attribute, given):
    """The market a dataset is written from starts as train's does: `--start-epoch
    2026-01-01`, not only its epoch seconds."""
    from pumpflow.simulator.cli import build_parser as sim_parser

    parser = sim_parser("pumpflow sim") if argv[0] == "sim" else cli_main.build_parser()
    args = parser.parse_args([*argv[1:], given] if argv[0] == "sim" else [*argv, given])
    assert getattr(args, attribute) == 1_700_000_000.0


def test_settings_shows_values_as_the_environment_takes_them(monkeypatch, capsys):
    """A list setting reads as the JSON its variable takes, a switch as true/false, and a
    setting that is off as empty: what is shown can be given back as it is."""
    monkeypatch.setenv("PUMPFLOW_EXIT_TAKE_PROFIT", "[[0.3, 0.5]]")
    monkeypatch.setenv("PUMPFLOW_EXIT_STOP_LOSS", "")
    assert cli_main.main(["settings", "exit"]) == 0
    text = capsys.readouterr().out
    assert re.search(
        r"PUMPFLOW_EXIT_TAKE_PROFIT\s+\[\[0\.3,0\.5\]\]\n\s+default \[\[0\.5,0\.25\],", text
    )
    assert re.search(r"PUMPFLOW_EXIT_STOP_LOSS\s+\(empty\)\n\s+default 0\.3;", text)
    assert "(0.5, 0.25)" not in text and "None" not in text


WALLET = "HDypasvYsG5MuABAfaTf78FVYMmYedcbefZ7pxWEhVQV"


@pytest.mark.parametrize(
    ("environment", "last"),
    [
        ({}, "trading on paper: orders fill on the curve, no money moves"),
        (
            {"PUMPFLOW_TRADING_EXECUTOR": "live"},
            "trading would not start: the live executor is chosen but not enabled: set "
            "PUMPFLOW_TRADING_LIVE_ENABLED=true to trade real money",
        ),
        (
            {
                "PUMPFLOW_TRADING_EXECUTOR": "live",
                "PUMPFLOW_TRADING_LIVE_ENABLED": "true",
                "PUMPPORTAL_API_KEY": "a-key-never-shown",
                "PUMPFLOW_TRADING_LIVE_WALLET": WALLET,
            },
            "trading LIVE: orders go to https://pumpportal.fun/api/trade and trade real money "
            f"from the wallet {WALLET} (entry slippage 5%, priority fee 0.0001 SOL a "
            "transaction)",
        ),
    ],
)
def test_settings_of_trading_end_by_saying_whether_it_would_trade_live(
    monkeypatch, capsys, environment, last
):
    """What a trader checks before switching: the line the service would start with, or
    its refusal."""
    for name in ("PUMPPORTAL_API_KEY", "PUMPPORTAL_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert cli_main.main(["settings", "trading"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == last
    assert "a-key-never-shown" not in out
