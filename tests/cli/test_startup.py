"""The interactive commands (``--help``, ``services``, ``settings``, ``trading state``)
start without the services' heavy dependencies: the check of the environment reads the
settings classes the ``pumpflow.settings`` entry points name, not the services, the list
of services their packages' descriptions, and each command imports what it runs only
once it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pumpflow.common.runtime.discovery import installed_services, installed_settings

#: what the services run on (the bus, the store, the database, the HTTP server, the
#: model, training, live trading's HTTP client, the feed's socket, the metrics, the
#: features' and the models' arrays), none of which a command that only parses, lists
#: settings or calls a replica needs
HEAVY = (
    "onnxruntime",
    "lightgbm",
    "aio_pika",
    "asyncpg",
    "redis",
    "fastapi",
    "uvicorn",
    "httpx",
    "websockets",
    "prometheus_client",
    "numpy",
)

#: runs ``pumpflow`` in a fresh interpreter, its output set aside, then prints its exit
#: status and the modules it imported
RUN = """
import contextlib, io, json, sys
from pumpflow.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["services"],
        ["settings", "trading"],
        ["settings", "model"],
        ["trading", "state", "--help"],
        ["model", "remove-arm", "--help"],
    ],
    ids=" ".join,
)
def test_an_interactive_command_imports_none_of_the_services_heavy_dependencies(argv):
    result = subprocess.run(
        [sys.executable, "-c", RUN, *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ran = json.loads(result.stdout)
    assert ran["code"] == 0, result.stderr[-2000:]
    imported = {name.partition(".")[0] for name in ran["modules"]}
    assert sorted(imported & set(HEAVY)) == []


def test_every_service_package_describes_its_service_as_the_service_class_does():
    """``pumpflow services`` lists each service's package description, importing none:
    it must say what the Service class's docstring says first."""
    for name, entry_point in installed_services().items():
        service_cls = entry_point.load()
        summary = service_cls.__doc__.strip().splitlines()[0]
        assert entry_point.dist.metadata["Summary"] == summary, (name, "make install?")


def test_every_service_names_its_settings_class_in_its_own_entry_point():
    """The check of the environment and ``pumpflow settings`` read the settings entry
    points: each must name the very class the service reads."""
    services = installed_services()
    settings = installed_settings()
    assert set(settings) == set(services)
    for name, entry_point in services.items():
        service_cls = entry_point.load()
        assert service_cls.name == name
        assert settings[name].load() is service_cls.settings_class, name
