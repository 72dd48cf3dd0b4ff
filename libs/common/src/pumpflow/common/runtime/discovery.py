"""Find installed services through their entry points.

Group ``pumpflow.services`` lists the services, each its Service class; group
``pumpflow.settings`` names, under the same name, the service's settings class alone,
so what reads settings (the check of the environment, ``pumpflow settings``) imports
none of the services and their dependencies (the bus, the database, the model).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pumpflow.common.runtime.service import Service
    from pumpflow.common.runtime.settings import CommonSettings

#: entry-point group under which each service package registers its Service class
SERVICE_ENTRY_POINTS = "pumpflow.services"
#: entry-point group under which each service package registers its settings class
SETTINGS_ENTRY_POINTS = "pumpflow.settings"


class UnknownServiceError(LookupError):
    """No installed service has this name."""


def installed_services() -> dict[str, EntryPoint]:
    """Entry points of every installed service, by service name."""
    return {ep.name: ep for ep in entry_points(group=SERVICE_ENTRY_POINTS)}


def installed_settings() -> dict[str, EntryPoint]:
    """Entry points of the installed services' settings classes, by service name."""
    return {ep.name: ep for ep in entry_points(group=SETTINGS_ENTRY_POINTS)}


def load_service(name: str) -> type[Service]:
    """The Service class registered as ``name``; UnknownServiceError names the choices."""
    from pumpflow.common.runtime.service import Service

    found = _entry_point(name, installed_services())
    service_cls = found.load()
    if not (isinstance(service_cls, type) and issubclass(service_cls, Service)):
        raise TypeError(f"entry point {found.value} of {name!r} is not a Service class")
    return service_cls


def load_settings(name: str) -> type[CommonSettings]:
    """The settings class of the service ``name``; UnknownServiceError names the choices."""
    return _settings_classes({name: _entry_point(name, installed_services())})[name]


def service_settings() -> dict[str, type[CommonSettings]]:
    """The settings class of each installed service, by service name."""
    return _settings_classes(installed_services())


def _entry_point(name: str, services: dict[str, EntryPoint]) -> EntryPoint:
    found = services.get(name)
    if found is None:
        choices = ", ".join(sorted(services)) or "none installed"
        raise UnknownServiceError(f"no service named {name!r} (installed: {choices})")
    return found


def _settings_classes(services: dict[str, EntryPoint]) -> dict[str, type[CommonSettings]]:
    """The settings class of each of ``services``: its own entry point's, else (a service
    that registers none) the one its Service class reads, the service imported whole."""
    from pumpflow.common.runtime.settings import CommonSettings

    registered = installed_settings()
    found = {}
    for name in services:
        if name not in registered:
            found[name] = load_service(name).settings_class
            continue
        settings_cls = registered[name].load()
        if not (isinstance(settings_cls, type) and issubclass(settings_cls, CommonSettings)):
            raise TypeError(
                f"entry point {registered[name].value} of {name!r} is not a settings class"
            )
        found[name] = settings_cls
    return found
