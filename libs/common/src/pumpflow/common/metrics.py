"""Metric families registered once per registry, however many objects use them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

F = TypeVar("F")

_families: dict[tuple[int, str], object] = {}


def families(name: str, build: Callable[[CollectorRegistry], F], registry=None) -> F:
    """The families ``build`` registers on ``registry`` (default: the global one), built once.

    Several replicas of a service in one process (tests, the embedded run) share them,
    where registering a family twice would fail.
    """
    registry = registry if registry is not None else REGISTRY
    key = (id(registry), name)
    found = _families.get(key)
    if found is None:
        found = _families[key] = build(registry)
    return found  # type: ignore[return-value]


__all__ = ["CollectorRegistry", "families"]
