"""Batch messages: several events of a partition in one message, and their dead letters.

A batch's body is the JSON array of its events' envelopes (an envelope alone is a JSON
object; see ``pumpflow.common.bus.rabbitmq``, Batches). A consumer takes its events
one by one, but a message the bus fails on is rejected whole, and the broker
dead-letters it whole: its letter holds every event of the batch. The dead letters a
bus hands out are one letter per event, each with the message's reason, so each can be
listed, saved and put back (in the batch's order) as if it had been dead-lettered
alone.

Only a message the broker dead-lettered from a queue (it carries ``x-death``) is read
as a batch: input given to ``EventBus.dead_letter`` (a raw frame that happens to be a
JSON array) is kept as given.
"""

from __future__ import annotations

import dataclasses

import msgspec

from pumpflow.common.bus.abc import DeadLetter
from pumpflow.common.events import EventValidationError, decode_event

#: the header the broker adds to a message it dead-letters from a queue
DEATH_HEADER = "x-death"

_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def batch_body(bodies: list[bytes]) -> bytes:
    """One message's body for several encoded events: a JSON array of them."""
    return b"[" + b",".join(bodies) + b"]"


def batch_parts(body: bytes) -> list[bytes] | None:
    """The encoded events of a batch's body, or None when the body is one event's (an
    envelope is a JSON object) or no JSON array at all (then it is malformed as one)."""
    if body[:1] != b"[":
        return None
    try:
        return [bytes(part) for part in _decoder.decode(body)]
    except msgspec.DecodeError:
        return None


def letter_events(letter: DeadLetter) -> list[DeadLetter]:
    """``letter`` as one letter per event, in order: the events of a batch message the
    broker dead-lettered whole, each with the letter's reason; else ``letter`` itself."""
    if DEATH_HEADER not in letter.headers:
        return [letter]
    parts = batch_parts(letter.body)
    if parts is None:
        return [letter]
    return [_part_letter(letter, part) for part in parts]


def _part_letter(letter: DeadLetter, body: bytes) -> DeadLetter:
    try:
        event = decode_event(body)
    except EventValidationError:
        # malformed as the consumer found it: listed with the batch's type, never redriven
        return dataclasses.replace(letter, body=body, key=None)
    return dataclasses.replace(letter, body=body, event_type=event.type, key=event.key)
