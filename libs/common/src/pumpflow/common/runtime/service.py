"""What a service is to the runtime: a thin wiring of domain classes to the bus.

The runtime (``pumpflow.common.runtime.runner``) builds the :class:`ServiceContext`
from settings (distributed) or shares one in-memory context between all services
(embedded), starts the service, serves its HTTP app, and on SIGTERM calls
:meth:`Service.stopping`, stops consuming, drains in-flight handlers and calls
:meth:`Service.stop`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.clock import Clock
from pumpflow.common.consumer import KeyedConsumerConfig, KeyedStatefulConsumer
from pumpflow.common.keyed import KeyedProcessor
from pumpflow.common.runtime.settings import CommonSettings

if TYPE_CHECKING:
    import asyncpg
    from fastapi import APIRouter

    from pumpflow.common.state.abc import StateStore


@dataclass(frozen=True, kw_only=True)
class ServiceContext:
    """Collaborators handed to a service."""

    settings: CommonSettings
    bus: EventBus
    clock: Clock
    #: shared state (Redis when distributed, in-process when embedded); None if unused
    store: StateStore | None = None
    #: Postgres pool; None when the service or the run has no database; a
    #: ``BackgroundPool`` (failing as Postgres away until open) when it is optional
    db: asyncpg.Pool | None = None

    @property
    def source(self) -> str:
        return self.settings.source

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"pumpflow.{self.settings.service}")

    def keyed_consumer(
        self, processor: KeyedProcessor, config: KeyedConsumerConfig, **options: Any
    ) -> KeyedStatefulConsumer:
        """The keyed stateful consumer of ``processor`` on this context's bus, store and clock.

        ``options`` go to :class:`KeyedStatefulConsumer` (views, hooks, metrics).
        """
        if self.store is None:
            raise RuntimeError(f"the {self.settings.service} service needs a state store")
        return KeyedStatefulConsumer(
            processor,
            config,
            bus=self.bus,
            store=self.store,
            clock=self.clock,
            source=self.source,
            **options,
        )


class Service(ABC):
    """A pumpflow service.

    Registered as an entry point in group ``pumpflow.services`` (name = service name),
    so the launcher finds every installed service without importing them by name, and
    its settings class under the same name in group ``pumpflow.settings``, which the
    check of the environment reads without importing the service
    (:mod:`pumpflow.common.runtime.discovery`).
    The runtime builds it as ``cls(cls.settings_class.load(service=cls.name))``.
    """

    name: ClassVar[str]
    settings_class: ClassVar[type[CommonSettings]] = CommonSettings
    #: which shared resources the runtime must connect (and check in /readyz)
    needs_store: ClassVar[bool] = False
    needs_db: ClassVar[bool] = False
    #: the dependencies (``redis``, ``postgres``: pumpflow.common.dependencies' names)
    #: the service works on without, degraded: /readyz shows them away, and waits for
    #: them, without turning not ready
    optional_dependencies: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: CommonSettings):
        self.settings = settings

    @abstractmethod
    async def start(self, ctx: ServiceContext) -> None:
        """Load state, subscribe to the bus, start background work."""

    def stopping(self) -> None:  # noqa: B027 (most services note nothing)
        """Note what stopping leaves, while the service still holds its partitions: the
        runtime (distributed on SIGTERM, or embedded at the end) calls it before the bus
        stops consuming and hands them over, and before :meth:`stop`."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop background work and checkpoint state; the bus is drained already."""

    def router(self) -> APIRouter | None:
        """Extra HTTP routes of this service (mutating ones guarded by the token)."""
        return None

    async def status(self) -> dict[str, Any]:
        """Service-specific readiness details; raise or return {"ready": False} if not ready."""
        return {}
