"""Redrive: put a service's dead letters back once their cause is fixed.

A letter is redriven when its body is an event (a raw input frame dead-lettered by
the feed is not: it stays): the event goes back to the service that dead-lettered it,
and to no other (:meth:`EventBus.redeliver`), marked ``redriven``, and only then leaves
the dead letters. So a crash half way leaves each letter redriven, still dead, or
both; a letter redriven twice is applied once, since the keyed consumer applies a
redriven event only for a seq its key refused, and forgets that seq as it applies it
(``pumpflow.common.consumer``). A keyless event goes back to its group's shared queue
of its lane where the group takes them shared (``Subscription.shared_keyless``: the bus
must know it, as the group's declaration tells it); a group taking them on each
replica's own queues has none to put it back on, so its keyless letters stay, and the
count says why.

A letter whose content goes back elsewhere than to a service's queue (a token event
the feed's store refused goes back to the store, then out to every consumer) is put
back by a :class:`LetterRestorer` that claims it. One it cannot put back yet (its
cause is not fixed) stays dead, with the reason of this attempt: dead-lettered again
behind the letters this redrive offers, then removed from its old place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from pumpflow.common.bus.abc import DeadLetter, EventBus, NotRedeliverable
from pumpflow.common.events import Event, EventValidationError, decode_event
from pumpflow.common.text import counted


@dataclass(frozen=True, slots=True, kw_only=True)
class LetterFilter:
    """Which dead letters to redrive; every letter without a condition."""

    #: a text the letter's reason contains
    reason: str | None = None
    #: the letter's event type, exactly
    event_type: str | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reason is not None and self.reason not in letter.reason:
            return False
        return self.event_type is None or letter.event_type == self.event_type


@dataclass(slots=True, kw_only=True)
class RedriveCount:
    """What a redrive did (or, on a dry run, would do)."""

    dry_run: bool = False
    #: letters the filter selected
    matched: int = 0
    #: selected letters put back (on a dry run: that would be)
    redriven: int = 0
    #: selected letters whose body is no event (raw input): they stay
    not_events: int = 0
    #: selected keyless events of a group taking them on each replica's own queues (no
    #: queue of the group to go back to): they stay
    keyless: int = 0
    #: why those stay, each reason once
    keyless_reasons: list[str] = field(default_factory=list)
    #: letters the filter passed over
    passed_over: int = 0
    #: claimed letters refused again (their cause is not fixed): they stay
    refused: int = 0
    #: the reasons of those refusals, in order
    refusals: list[str] = field(default_factory=list)

    def summary(self, service: str) -> str:
        verb = "would redrive" if self.dry_run else "redrove"
        line = f"{verb} {counted(self.redriven, 'dead letter')} of {service}"
        if self.matched:
            line += f" ({self.matched} matched"
            if self.not_events:
                line += f", {counted(self.not_events, 'not an event', 'not events')}, left"
            if self.keyless:
                line += f", {self.keyless} keyless, left"
            if self.refused:
                line += f", {self.refused} refused again, left"
            line += ")"
        return f"{line}; {self.passed_over} not matched"


def redrivable(letter: DeadLetter) -> Event | None:
    """The event to put back for ``letter``, or None when its body is no event."""
    try:
        event = decode_event(letter.body)
    except EventValidationError:
        return None
    return msgspec.structs.replace(event, redriven=True)


class LetterRestorer(Protocol):
    """Puts back the letters it claims somewhere other than a service's queue."""

    def claims(self, letter: DeadLetter) -> bool:
        """True for a letter this restorer puts back."""
        ...

    async def restore(self, letter: DeadLetter) -> str | None:
        """Put ``letter``'s content back, at most once however often; None once it is
        back, else why it is refused still (the letter stays dead)."""
        ...


class _Redrive:
    def __init__(
        self,
        bus: EventBus,
        service: str,
        select: LetterFilter,
        dry_run: bool,
        restorer: LetterRestorer | None,
        *,
        in_store: bool,
    ):
        self.bus = bus
        self.service = service
        self.select = select
        self.restorer = restorer
        #: the letters come from the bus's store (else from a file, which stays as is)
        self.in_store = in_store
        self.count = RedriveCount(dry_run=dry_run)

    async def offer(self, letter: DeadLetter) -> bool:
        """Put ``letter`` back if selected and redrivable; True once it is back."""
        count = self.count
        if not self.select.matches(letter):
            count.passed_over += 1
            return False
        count.matched += 1
        if self.restorer is not None and self.restorer.claims(letter):
            return await self._restore(letter, self.restorer)
        event = redrivable(letter)
        if event is None:
            count.not_events += 1
            return False
        try:
            if count.dry_run:
                self.bus.check_redeliverable(self.service, event)
            else:
                await self.bus.redeliver(self.service, event)
        except NotRedeliverable as refusal:
            count.keyless += 1
            if str(refusal) not in count.keyless_reasons:
                count.keyless_reasons.append(str(refusal))
            return False
        count.redriven += 1
        return not count.dry_run

    async def _restore(self, letter: DeadLetter, restorer: LetterRestorer) -> bool:
        count = self.count
        if count.dry_run:
            count.redriven += 1
            return False
        refused = await restorer.restore(letter)
        if refused is None:
            count.redriven += 1
            return True
        count.refused += 1
        count.refusals.append(refused)
        if not self.in_store:
            return False
        await self.bus.dead_letter(
            letter.body,
            service=letter.service,
            reason=refused,
            event_type=letter.event_type,
            key=letter.key,
            headers=letter.headers,
        )
        return True


async def redrive(
    bus: EventBus,
    service: str,
    *,
    select: LetterFilter | None = None,
    dry_run: bool = False,
    restorer: LetterRestorer | None = None,
) -> RedriveCount:
    """Put ``service``'s selected dead letters back; a dry run only counts them."""
    run = _Redrive(bus, service, select or LetterFilter(), dry_run, restorer, in_store=True)
    await bus.take_dead_letters(service, run.offer)
    return run.count


async def redrive_letters(
    bus: EventBus,
    service: str,
    letters: Iterable[DeadLetter],
    *,
    select: LetterFilter | None = None,
    dry_run: bool = False,
    restorer: LetterRestorer | None = None,
) -> RedriveCount:
    """Put back selected letters kept elsewhere (a file of moved letters) for ``service``.

    A letter refused again stays in the file only (the file is left as it is).
    """
    run = _Redrive(bus, service, select or LetterFilter(), dry_run, restorer, in_store=False)
    for letter in letters:
        await run.offer(letter)
    return run.count
