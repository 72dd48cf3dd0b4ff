"""Routing keys, partitions and type patterns, shared by every transport."""

from __future__ import annotations

import zlib
from functools import lru_cache

from pumpflow.common.events import Event, Payload, registered

DEFAULT_PARTITIONS = 16
BROADCAST = "bcast"


def partition_of(key: str, partitions: int) -> int:
    """Stable partition of a key: crc32 of its UTF-8 bytes modulo the partition count."""
    return zlib.crc32(key.encode()) % partitions


def routing_key(event_type: str, version: int, partition: int | None) -> str:
    """``<type>.v<major>.p<NN>``, or ``<type>.v<major>.bcast`` for keyless events."""
    suffix = BROADCAST if partition is None else f"p{partition:02d}"
    return f"{event_type}.v{version}.{suffix}"


def routing_key_for(event: Event, partitions: int) -> str:
    partition = None if event.key is None else partition_of(event.key, partitions)
    return routing_key(event.type, event.version, partition)


def partition_queue(service: str, partition: int) -> str:
    return f"{service}.p{partition:02d}"


def critical_queue(service: str) -> str:
    return f"{service}.critical"


def broadcast_queue(service: str) -> str:
    """The queue of a group's ordinary keyless events, shared by its replicas (a group
    taking them shared: ``Subscription.shared_keyless``)."""
    return f"{service}.{BROADCAST}"


def _words_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_words_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _words_match(rest, words[1:])


@lru_cache(maxsize=65536)
def topic_matches(pattern: str, routing: str) -> bool:
    """AMQP topic semantics: ``*`` is one word, ``#`` is zero or more words."""
    return _words_match(tuple(pattern.split(".")), tuple(routing.split(".")))


def resolve_types(patterns: tuple[str, ...], version: int) -> list[type[Payload]]:
    """Registered schemas of ``version`` whose type matches any pattern, sorted by type."""
    found = {
        schema
        for (event_type, schema_version), schema in registered().items()
        if schema_version == version and any(topic_matches(p, event_type) for p in patterns)
    }
    return sorted(found, key=lambda s: s.TYPE)
