"""Services and their settings classes found through the installed packages' entry points:
a settings class read without importing its service, and a service that registers none
still has its settings read (its service imported for them)."""

from __future__ import annotations

import sys

import pytest

from pumpflow.common.runtime.discovery import (
    UnknownServiceError,
    load_service,
    load_settings,
    service_settings,
)

SETTINGS_MODULE = """
from pydantic import Field

from pumpflow.common.runtime.settings import CommonSettings


class {name}Settings(CommonSettings):
    {lower}_count: int = Field(3, description="how many")
"""

SERVICE_MODULE = """
from pumpflow.common.runtime.service import Service
from {package}_settings import {name}Settings


class {name}Service(Service):
    name = "{lower}"
    settings_class = {name}Settings

    async def start(self, ctx):
        pass

    async def stop(self):
        pass
"""


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a package (a folder on sys.path with its dist-info) of two services:
    ``gadget`` registers its settings class, ``gizmo`` does not."""
    package = f"fake_{tmp_path.name.replace('-', '_')}"
    entry_points = ["[pumpflow.services]"]
    settings_entry_points = ["[pumpflow.settings]"]
    for name, registers_settings in (("Gadget", True), ("Gizmo", False)):
        lower, module = name.lower(), f"{package}_{name.lower()}"
        fields = {"package": f"{package}_{lower}", "name": name, "lower": lower}
        (tmp_path / f"{module}_settings.py").write_text(SETTINGS_MODULE.format(**fields))
        (tmp_path / f"{module}_service.py").write_text(SERVICE_MODULE.format(**fields))
        entry_points.append(f"{lower} = {module}_service:{name}Service")
        if registers_settings:
            settings_entry_points.append(f"{lower} = {module}_settings:{name}Settings")
    info = tmp_path / f"{package}-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    info.joinpath("entry_points.txt").write_text(
        "\n".join([*entry_points, "", *settings_entry_points, ""])
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


def test_a_registered_settings_class_is_read_without_importing_its_service(installed):
    found = service_settings()
    assert found["gadget"].__name__ == "GadgetSettings"
    assert found["gadget"].variables()["gadget_count"] == "PUMPFLOW_GADGET_COUNT"
    assert f"{installed}_gadget_service" not in sys.modules
    assert load_settings("gadget") is found["gadget"]
    # the service, once loaded, reads that very class
    assert load_service("gadget").settings_class is found["gadget"]


def test_a_service_without_a_settings_entry_point_has_its_settings_read_from_it(installed):
    found = service_settings()
    assert found["gizmo"] is load_service("gizmo").settings_class
    assert found["gizmo"].__name__ == "GizmoSettings"
    assert load_settings("gizmo") is found["gizmo"]


def test_the_settings_of_no_installed_service_are_refused_naming_the_installed(installed):
    with pytest.raises(UnknownServiceError) as refused:
        load_settings("gadgt")
    assert str(refused.value).startswith("no service named 'gadgt' (installed: ")
    assert "gadget, gizmo" in str(refused.value)
