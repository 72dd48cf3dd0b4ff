"""``pumpflow serve <service>``, ``pumpflow services``, ``pumpflow settings <service>``."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys

from pumpflow.common.runtime.discovery import (
    UnknownServiceError,
    installed_services,
    load_service,
    load_settings,
)
from pumpflow.common.runtime.logging import redact_value
from pumpflow.common.runtime.settings import SettingsError, setting_text


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run one service as a process (settings from PUMPFLOW_* variables)"
    )
    serve.add_argument("service", help="service name, see `pumpflow services`")
    serve.set_defaults(handler=serve_command)

    services = subparsers.add_parser(
        "services", help="list the installed services, or describe one in full"
    )
    services.add_argument(
        "service", nargs="?", help="describe this service (imports it; the list imports none)"
    )
    services.set_defaults(handler=services_command)

    settings = subparsers.add_parser(
        "settings", help="show a service's settings: variables, values, defaults, meaning"
    )
    settings.add_argument(
        "service", help="service name, see `pumpflow services` (or notify, pumpflow notify's)"
    )
    settings.add_argument("--json", action="store_true", help="print JSON")
    settings.set_defaults(handler=settings_command)


def _load(load, name: str):
    """``load(name)``, or None after saying no service has that name."""
    try:
        return load(name)
    except UnknownServiceError as exc:
        print(f"pumpflow: {exc}", file=sys.stderr)
        return None


def serve_command(args: argparse.Namespace) -> int:
    service_cls = _load(load_service, args.service)
    if service_cls is None:
        return 2
    from pumpflow.common.runtime.runner import run_service

    return asyncio.run(run_service(service_cls))


def services_command(args: argparse.Namespace) -> int:
    found = installed_services()
    if args.service is not None:
        return describe_service(args.service, found)
    if not found:
        print("no services installed")
        return 0
    for name in sorted(found):
        # the package's description (its Service class's first line, by a test): a
        # service imported whole costs most of a second
        dist = found[name].dist
        summary = dist.metadata["Summary"] if dist is not None else ""
        print(f"{name:<12} {found[name].value:<40} {summary}")
    return 0


def describe_service(name: str, found: dict) -> int:
    """Print the service ``name``'s entry point, its Service class's docstring and its
    module's (what it consumes, publishes and serves)."""
    try:
        service_cls = _load(load_service, name)
    except Exception as exc:  # a broken package: say why, as the list cannot
        print(f"pumpflow: cannot load {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if service_cls is None:
        return 2
    print(f"{name:<12} {found[name].value}")
    for doc in (service_cls, sys.modules.get(service_cls.__module__)):
        text = inspect.getdoc(doc) if doc is not None else None
        if text:
            print()
            print(text)
    return 0


def describe_settings(service: str, settings_cls) -> list[dict]:
    """Every setting of the service ``service`` (its settings class ``settings_cls``):
    variable, current value, default, description."""
    # what the runtime passes itself, over the environment: the service's name
    fixed = {"service": service}
    current = settings_cls.load(**fixed)
    variables = settings_cls.variables()
    rows = []
    for name, field in settings_cls.model_fields.items():
        variable = variables[name]
        description = field.description or ""
        if name in fixed:
            default = fixed[name]
            description += f" (the runtime sets it to {fixed[name]!r}, over {variable})"
        elif field.default_factory is not None:
            default = "(computed)"
        else:
            default = redact_value(name, field.default)
        rows.append(
            {
                "variable": variable,
                "value": redact_value(name, getattr(current, name)),
                "default": default,
                "description": description,
            }
        )
    return rows


def settings_command(args: argparse.Namespace) -> int:
    if args.service == "notify":
        # no service, and run beside them: its settings are checked the same way
        from pumpflow.cli.notify import NotifySettings

        settings_cls = NotifySettings
    else:
        settings_cls = _load(load_settings, args.service)
    if settings_cls is None:
        return 2
    try:
        rows = describe_settings(args.service, settings_cls)
    except SettingsError as exc:
        print(f"pumpflow: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = max(len(r["variable"]) for r in rows)
    for row in rows:
        print(f"{row['variable']:<{width}}  {_shown(row['value'])}")
        print(f"{'':<{width}}  default {_shown(row['default'])}; {row['description']}")
    said = settings_cls.load(service=args.service).start_line()
    if said is not None:
        print(said)
    return 0


def _shown(value) -> str:
    """A setting's value as its variable takes it; ``(empty)`` for none."""
    return setting_text(value) or "(empty)"
