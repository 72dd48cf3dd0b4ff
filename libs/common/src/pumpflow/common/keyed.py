"""Per-key processors: the pure domain half of a stateful service.

A processor says what one event, or one timer, does to the state of one key (a mint)
and what follows from it; :class:`~pumpflow.common.consumer.KeyedStatefulConsumer`
(infrastructure) does the rest: per-key order on the worker pool, dedup against the
stored tracking record, group commit of state, tracking record and outbox in one
write, per-key seq of what is published, restore and drop as partitions move, timers
on the owner only, and a TTL when a key retires.

A processor never touches a bus, a store or a clock of its own. What it wants done
it asks of :class:`Effects`, which the consumer carries out after the state is stored.
"""

from __future__ import annotations

from typing import Final, Protocol, TypeVar

from pumpflow.common.events import Event, Payload

S = TypeVar("S")


class Unchanged:
    """The type of :data:`UNCHANGED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


#: what :meth:`KeyedProcessor.apply` returns for an event that changed nothing: the
#: state is as it was (not touched in place) and the apply asked for no effect
UNCHANGED: Final = Unchanged()


class InvalidInput(ValueError):
    """An event the processor cannot apply; the consumer dead-letters it with this reason.

    The key's state stays as it was and the event's seq counts as applied, so the
    stream of the key goes on.
    """


class StaleState(ValueError):
    """Stored state this processor cannot read (another feature-set version, say).

    The consumer starts the key from :meth:`KeyedProcessor.initial` and keeps its
    tracking record, so seqs go on where they were.
    """


class Effects(Protocol):
    """What an apply or a fire may ask for; carried out once the state is stored."""

    @property
    def key(self) -> str:
        """The key being processed."""

    @property
    def now(self) -> float:
        """The consumer's time of the key's partition: the market's as far as the
        partition has applied it (the latest event time of the market's types), moving on
        with the clock while nothing newer comes, never past the clock, never back; the
        clock's, live. Always finite: before any time is known, the event's own (see
        :mod:`pumpflow.common.consumer.keyed`). Event time is on the event."""

    @property
    def more(self) -> bool:
        """A later event of this key, of the same type and publisher, follows at once
        (the same delivery batch), and is no duplicate of it or of what the key applied.
        (Should that event be refused or fail, the key's next event announces.)

        A processor whose announcements are snapshots of the key (the latest supersedes
        the others) may leave the announcement to the last of them.
        """

    def emit(self, payload: Payload, *, time: float) -> None:
        """Publish ``payload`` keyed by this key, with the key's next seq, after storing."""

    def set_timer(self, at: float) -> None:
        """Call :meth:`KeyedProcessor.fire` for this key once both the clock and the
        consumer's time (:attr:`now`) reach ``at``.

        One timer per key: a new one replaces the last. Timers are stored with the
        state and run only on the replica that owns the key's partition.
        """

    def cancel_timer(self) -> None:
        """Drop this key's timer."""

    def set_priority(self, priority: int) -> None:
        """Run this key's work at ``priority`` from now on (higher first)."""

    def retire(self, ttl_s: float) -> None:
        """Drop the key from memory once stored; its record expires after ``ttl_s``.

        An event for the key within that time loads the record again.
        """


class KeyedProcessor(Protocol[S]):
    """Pure per-key logic run by the keyed stateful consumer."""

    def initial(self, key: str) -> S:
        """State of a key never seen before."""

    def apply(self, state: S, event: Event, effects: Effects) -> S | Unchanged:
        """Apply ``event`` to the key's state; return the state (the same object or new).

        Return :data:`UNCHANGED` when the event changed nothing at all: no part of the
        state (not even in place) and no effect asked for. The consumer then need not
        store the key: the event's seq is kept in memory and stored with the key's next
        change, so after a crash such an event may be applied again, which is safe only
        because it changes nothing.

        Raise :class:`InvalidInput` for an event that cannot be applied, any other
        exception for a failure; either way leave the state as it was (the consumer
        cannot undo a change made in place) and what was asked of ``effects`` is taken
        back.
        """

    def fire(self, state: S, effects: Effects) -> S:
        """The key's timer fired; return the state (a fire that raises is taken back as
        an apply's is, and its timer is spent)."""

    def encode(self, state: S) -> bytes:
        """State as bytes for the store."""

    def compact(self, state: S, now: float) -> bytes | None:
        """State of a key idle in memory as bytes :meth:`decode` reads, smaller than
        :meth:`encode` where the processor knows a compact form; None: use encode.
        ``now`` is the consumer's time (:attr:`Effects.now`)."""

    def decode(self, raw: bytes) -> S:
        """State from :meth:`encode` bytes; raise :class:`StaleState` if it cannot be read."""
