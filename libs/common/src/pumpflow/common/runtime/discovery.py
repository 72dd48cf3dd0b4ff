"""Find installed services through their entry points (group ``pumpflow.services``)."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from pumpflow.common.runtime.service import SERVICE_ENTRY_POINTS, Service


class UnknownServiceError(LookupError):
    """No installed service has this name."""


def installed_services() -> dict[str, EntryPoint]:
    """Entry points of every installed service, by service name."""
    return {ep.name: ep for ep in entry_points(group=SERVICE_ENTRY_POINTS)}


def load_service(name: str) -> type[Service]:
    """The Service class registered as ``name``; UnknownServiceError names the choices."""
    found = installed_services().get(name)
    if found is None:
        choices = ", ".join(sorted(installed_services())) or "none installed"
        raise UnknownServiceError(f"no service named {name!r} (installed: {choices})")
    service_cls = found.load()
    if not (isinstance(service_cls, type) and issubclass(service_cls, Service)):
        raise TypeError(f"entry point {found.value} of {name!r} is not a Service class")
    return service_cls
