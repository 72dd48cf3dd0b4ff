"""The interactive commands (``--help``, ``settings``, ``trading state``) start without
the services' heavy dependencies: the check of the environment reads the settings
classes the ``pumpflow.settings`` entry points name, not the services, and each command
imports what it runs only once it runs."""

from __future__ import annotations

from pumpflow.common.runtime.discovery import installed_services, installed_settings


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
