"""An event collector: a bus handler that records events and lets a test await them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from pumpflow.common.bus.abc import EventPublisher, EventSubscriber, Subscription
from pumpflow.common.bus.routing import resolve_types, topic_matches
from pumpflow.common.events import Event, Payload, make_event, schema_for
from pumpflow.common.testing.factories import partition_keys, sample_payload

#: what a wait matches on: an event type or topic pattern (``token.*``), or a payload class
EventType = str | type[Payload] | None

#: the default bound of a wait; generous, since it only delays a failing test
WITHIN = 10.0


def _type_name(event_type: EventType) -> str | None:
    if event_type is None or isinstance(event_type, str):
        return event_type
    return event_type.TYPE


def _matches(
    event: Event, event_type: str | None, key: str | None, where: Callable[[Event], Any] | None
) -> bool:
    if event_type is not None and event.type != event_type:
        if "*" not in event_type and "#" not in event_type:
            return False
        if not topic_matches(event_type, event.type):
            return False
    if key is not None and event.key != key:
        return False
    return where is None or bool(where(event))


def _describe(event_type: str | None, key: str | None, where: object) -> str:
    parts = [event_type or "events"]
    if key is not None:
        parts.append(f"key={key}")
    if where is not None:
        parts.append("matching the predicate")
    return " ".join(parts)


class EventCollector:
    """Records every event delivered to it, in delivery order; awaits what a test expects.

    A handler: subscribe it with :meth:`attach` (or pass it as a Subscription's handler).
    Waits are bounded and fail with an AssertionError that says what was expected and
    what arrived. For "nothing more arrives", end with :meth:`barrier`, never a sleep.
    """

    def __init__(self, name: str = "collector", *, within: float = WITHIN):
        self.name = name
        self.within = within
        self.events: list[Event] = []
        self.subscriptions: list[Subscription] = []
        self._waiters: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._markers: dict[str, asyncio.Future] = {}
        self._marker_ids: set[str] = set()

    # ------------------------------------------------------------------ receiving

    async def __call__(self, event: Event) -> None:
        if event.id in self._marker_ids:
            arrived = self._markers.pop(event.id, None)
            if arrived is not None and not arrived.done():
                arrived.set_result(event)
            return
        self.events.append(event)
        if self._waiters:
            self._check()

    def _check(self) -> None:
        for condition, future in list(self._waiters):
            if future.done():
                continue
            try:
                result = condition()
            except Exception as exc:  # the test's predicate failed: fail its wait with it
                future.set_exception(exc)
                continue
            if result:
                future.set_result(result)

    async def attach(
        self, bus: EventSubscriber, *patterns: str, service: str | None = None, **options: Any
    ) -> EventCollector:
        """Subscribe to ``patterns`` on ``bus`` as ``service`` (default: the name); return self.

        ``options`` go to :class:`Subscription` (``window``, ``partitions``, ...).
        Collectors sharing a service name on one bus share its partitions, as replicas do.
        """
        if not patterns:
            raise ValueError("attach needs at least one event type pattern")
        subscription = Subscription(
            service=service or self.name, patterns=patterns, handler=self, **options
        )
        await bus.subscribe(subscription)
        self.subscriptions.append(subscription)
        return self

    # ------------------------------------------------------------------ reading

    def of(
        self,
        event_type: EventType = None,
        *,
        key: str | None = None,
        where: Callable[[Event], Any] | None = None,
    ) -> list[Event]:
        """The recorded events of a type (or topic pattern), key and predicate, in order."""
        name = _type_name(event_type)
        return [e for e in self.events if _matches(e, name, key, where)]

    def count(self, event_type: EventType = None, *, key: str | None = None) -> int:
        return len(self.of(event_type, key=key))

    def by_key(self, event_type: EventType = None) -> dict[str | None, list[Event]]:
        """The recorded events of a type grouped by key, each group in delivery order."""
        groups: dict[str | None, list[Event]] = {}
        for event in self.of(event_type):
            groups.setdefault(event.key, []).append(event)
        return groups

    def payloads(self, event_type: EventType = None, *, key: str | None = None) -> list[Any]:
        return [e.data for e in self.of(event_type, key=key)]

    def clear(self) -> None:
        """Forget what was recorded (waits in progress go on with the events to come)."""
        self.events.clear()

    def __len__(self) -> int:
        return len(self.events)

    def summary(self, last: int = 5) -> str:
        """Counts by type and the last few events: what a failed wait reports."""
        counts = Counter(e.type for e in self.events)
        recent = ", ".join(f"{e.type} key={e.key} seq={e.seq}" for e in self.events[-last:])
        return f"{len(self.events)} recorded {dict(counts)}; last: [{recent}]"

    # ------------------------------------------------------------------ waiting

    async def _wait(self, condition: Callable[[], Any], within: float | None, what: str) -> Any:
        limit = self.within if within is None else within
        result = condition()
        if result:
            return result
        future = asyncio.get_running_loop().create_future()
        waiter = (condition, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: {what} did not arrive within {limit:g} s; {self.summary()}"
            ) from None
        finally:
            self._waiters.remove(waiter)

    async def wait_for(
        self,
        count: int = 1,
        event_type: EventType = None,
        *,
        key: str | None = None,
        where: Callable[[Event], Any] | None = None,
        within: float | None = None,
    ) -> list[Event]:
        """Wait until at least ``count`` recorded events match; return all that match.

        Events recorded before the call count too: ``wait_for(3, "token.trade")`` is
        "three trades so far". ``event_type`` may be a topic pattern or payload class.
        """
        name = _type_name(event_type)

        def enough() -> list[Event] | None:
            found = [e for e in self.events if _matches(e, name, key, where)]
            return found if len(found) >= count else None

        return await self._wait(enough, within, f"{count} x {_describe(name, key, where)}")

    async def wait_until(
        self,
        predicate: Callable[[EventCollector], Any],
        *,
        within: float | None = None,
        what: str = "the awaited condition",
    ) -> Any:
        """Wait until ``predicate(self)`` is truthy, checked as each event arrives; return it."""
        return await self._wait(lambda: predicate(self), within, what)

    async def barrier(
        self,
        publisher: EventPublisher,
        *,
        keys: Iterable[str] | None = None,
        event_type: EventType = None,
        source: str = "test/barrier",
        within: float | None = None,
    ) -> None:
        """Publish a marker per key and return once every one arrived here.

        Each partition is delivered in order, so once a key's marker arrived, whatever
        was published on its partition before it did too: "nothing more arrives" is then
        a plain assertion. Without ``keys``, one key per partition of ``publisher`` (its
        ``partitions``). The marker type is ``event_type`` or the first keyed,
        non-critical type this collector subscribed to; other subscribers of that type get
        the markers too, so pick one the services under test take harmlessly. Markers are
        not recorded.
        """
        schema = self._marker_schema(event_type)
        if schema.KEY_FIELD is None:
            keys = [None]
        elif keys is None:
            keys = partition_keys(
                getattr(publisher, "partitions", 1), prefix=f"barrier-{self.name}"
            )
        loop = asyncio.get_running_loop()
        markers = []
        for key in keys:
            event = make_event(sample_payload(schema, key), source=source, time=time.time())
            self._marker_ids.add(event.id)
            self._markers[event.id] = loop.create_future()
            markers.append(event)
        waiting = [self._markers[m.id] for m in markers]
        await publisher.publish_many(markers)
        limit = self.within if within is None else within
        _, pending = await asyncio.wait(waiting, timeout=limit)
        missing = [str(m.key) for m in markers if m.id in self._markers]
        for event in markers:
            self._markers.pop(event.id, None)
        if pending:
            raise AssertionError(
                f"{self.name}: {len(missing)} of {len(markers)} barrier markers "
                f"({schema.TYPE}) did not arrive within {limit:g} s (keys {missing[:8]}); "
                f"{self.summary()}"
            )

    def _marker_schema(self, event_type: EventType) -> type[Payload]:
        if event_type is not None:
            if isinstance(event_type, str):
                return schema_for(event_type, 1)
            return event_type
        patterns = tuple(p for s in self.subscriptions for p in s.patterns)
        versions = {s.version for s in self.subscriptions} or {1}
        schemas = [s for v in sorted(versions) for s in resolve_types(patterns, v)]
        ordered = sorted(schemas, key=lambda s: (s.CRITICAL, s.KEY_FIELD is None))
        if not ordered:
            raise ValueError(f"{self.name}: a barrier needs an event_type (nothing attached)")
        return ordered[0]
