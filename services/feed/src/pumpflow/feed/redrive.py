"""Token events the store refused: dead-lettered with what a redrive needs, stored again.

The recorder dead-letters a row Postgres refused as the frame it came in (the body,
byte for byte) with the event's identity in a header (:data:`STORED_EVENT_HEADER`:
id, source, time, receipt and seq). Once the cause is fixed (a migration, or an
operator who edited the frame in a file of moved letters), ``pumpflow dead-letters
feed --redrive`` (or ``--redrive-from FILE``) hands each such letter to
:class:`StoredEventRedrive`, which

1. decodes the frame as the feed does and gives the event its original identity (its
   seq and time, never new ones);
2. stores it (``TokenEventStore.store_redriven``): idempotent on signature and
   txType, and recorded as redriven, so the feed's outbox never republishes it;
3. publishes it, marked ``redriven``, when it has a seq and its redrive did not
   publish it yet, then records that it did.

Order: the mint's later events went out long ago. Each consumer counted a gap at
the refused seq and keeps it as missing (``pumpflow.common.consumer.keyed``), so the
late event is applied once, counted as reordered; a consumer rebuilding the key from
the store finds it in its place. A crash between two steps leaves the letter dead,
and the next redrive does what is left: stored once (the row and the record of its
redrive are one transaction), published until the broker confirmed it and the record
says so. A crash between the confirm and the record publishes it again, with its
original id and seq: the first copy took the seq off the consumers' missing ones, so
they drop this one as a duplicate (counted in ``republished``).

A letter is refused again (it stays dead, with the reason of the attempt) when its
frame does not decode, the store refuses the row still, or another event of its mint
holds its seq (a feed restarted after the refusal gave that seq again: publishing
both, consumers would drop one). The recorder keeps each refused seq in the store
(``record_refusal``), so a restarted feed numbers the mint above it; the check
guards what was refused before that record existed.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from pumpflow.common.bus.abc import DeadLetter, EventPublisher
from pumpflow.common.events import Event, make_event
from pumpflow.common.pumpportal import decode_token_frame
from pumpflow.common.storage import RedriveWrite

#: the identity of a token event the store refused (JSON of :class:`StoredIdentity`)
STORED_EVENT_HEADER = "x-pumpflow-stored-event"


class StoredIdentity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a refused event was besides its frame."""

    id: str
    source: str
    time: float
    seq: int | None = None
    received_at: float | None = None


class RedriveStore(Protocol):
    def rejects(self, exc: BaseException) -> bool: ...

    async def store_redriven(
        self, event: Event, frame: bytes | str | None = None
    ) -> RedriveWrite: ...

    async def mark_redrive_published(self, event_id: str) -> None: ...


def refusal_reason(event: Event, exc: BaseException | None) -> str:
    """Why the store refused ``event``, naming it."""
    return (f"store refused {event.type} {event.id} (mint {event.key!s:.60}, seq "
            f"{event.seq}): {type(exc).__name__}: {exc}")  # fmt: skip


def refused_headers(event: Event) -> dict[str, str]:
    """The headers of a refused event's dead letter: its identity."""
    identity = StoredIdentity(
        id=event.id,
        source=event.source,
        time=event.time,
        seq=event.seq,
        received_at=event.received_at,
    )
    return {STORED_EVENT_HEADER: msgspec.json.encode(identity).decode()}


def refused_event(letter: DeadLetter) -> Event:
    """The event of a refused row's letter, with its identity; ValueError naming the fault."""
    try:
        identity = msgspec.json.decode(letter.headers[STORED_EVENT_HEADER], type=StoredIdentity)
    except (KeyError, msgspec.DecodeError) as exc:
        raise ValueError(f"header {STORED_EVENT_HEADER}: {exc}") from None
    payload = decode_token_frame(letter.body)
    event = make_event(
        payload,
        source=identity.source,
        time=identity.time,
        seq=identity.seq,
        event_id=identity.id,
        received_at=identity.received_at,
    )
    if letter.key is not None and event.key != letter.key:
        raise ValueError(
            f"mint: the frame's mint {event.key!r} is not the letter's {letter.key!r} "
            "(its seq belongs to the letter's mint)"
        )
    return msgspec.structs.replace(event, redriven=True)


class StoredEventRedrive:
    """Stores refused token events again and publishes them once (a ``LetterRestorer``)."""

    def __init__(self, store: RedriveStore, publisher: EventPublisher):
        self.store = store
        self.publisher = publisher
        #: rows stored by this redrive
        self.stored = 0
        #: events published by this redrive
        self.published = 0
        #: letters whose event was stored and published before (an earlier redrive)
        self.done_before = 0
        #: events published again: an earlier redrive stored them and was interrupted
        #: before it recorded their publication (which may have happened)
        self.republished = 0

    def claims(self, letter: DeadLetter) -> bool:
        return STORED_EVENT_HEADER in letter.headers

    async def restore(self, letter: DeadLetter) -> str | None:
        """Store and publish the letter's event; None once done, else why it is refused."""
        try:
            event = refused_event(letter)
        except ValueError as exc:
            return f"redrive: not restorable: {exc}"
        try:
            written = await self.store.store_redriven(event, letter.body)
        except Exception as exc:
            if not self.store.rejects(exc):
                raise  # the store is unwell: the letter stays, the command fails
            return refusal_reason(event, exc)
        if written.seq_taken_by is not None:
            return (
                f"redrive: seq {event.seq} of mint {event.key} is stored for another event "
                f"({written.seq_taken_by}); {event.id} cannot go out with it"
            )
        self.stored += written.inserted
        if not written.stored:
            # another event holds its signature and txType: what the frame said is stored
            self.done_before += 1
            return None
        if event.seq is None or written.published:
            self.done_before += not written.inserted
            return None
        await self.publisher.publish(event)
        self.published += 1
        self.republished += not written.inserted
        await self.store.mark_redrive_published(event.id)
        return None

    def summary(self) -> str:
        again = (f" ({self.republished} again after an interrupted redrive: consumers drop "
                 "the copy by seq)" if self.republished else "")  # fmt: skip
        return (f"{self.stored} stored, {self.published} published{again}, "
                f"{self.done_before} done before")  # fmt: skip
