"""Metric families registered once per registry, however many objects use them."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

F = TypeVar("F")

#: registry -> name -> its families; by the registry itself, not its id, which a
#: registry made after it is gone may be given
_families: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, object]] = (
    weakref.WeakKeyDictionary()
)


def families(name: str, build: Callable[[CollectorRegistry], F], registry=None) -> F:
    """The families ``build`` registers on ``registry`` (default: the global one), built once.

    Several replicas of a service in one process (tests, the embedded run) share them,
    where registering a family twice would fail.
    """
    registry = registry if registry is not None else REGISTRY
    built = _families.setdefault(registry, {})
    found = built.get(name)
    if found is None:
        found = built[name] = build(registry)
    return found  # type: ignore[return-value]


__all__ = ["CollectorRegistry", "families"]
