"""``pumpflow dead-letters``: see what a service could not process, and why; put it back.

Lists a service's dead letters (the bus keeps them) without removing them, or with
``--move FILE`` appends them to a JSONL file and only then removes them, so a crash
half way leaves each letter in the queue, in the file, or in both, never in neither.

``--redrive`` puts them back on the bus once their cause is fixed (all, or those of
``--reason``/``--type``), to the service alone, and only then removes them;
``--redrive-from FILE`` puts back the letters a ``--move`` saved in FILE (the file
stays as it is). ``--dry-run`` counts what would go back. A redriven event is
applied once by the service however often it is redriven (see
``pumpflow.common.bus.redrive``). A batch of events the broker dead-lettered whole is
listed, moved and redriven as a letter per event, in order, each with its reason. A
keyless event goes back to its group's shared queue where the group takes them shared
(declared here as every process declares it: ``pumpflow.common.runtime.topology``); a
group taking them on each replica's own queues has none, so it stays, and the command
says why.

A token event the feed's store refused goes back to the store instead, with its
original seq and time, and is published once (``pumpflow.feed.redrive``); one its
store still refuses stays dead with the reason of the attempt, and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pumpflow.common.runtime.arguments import count
from pumpflow.common.runtime.settings import CommonSettings, SettingsError
from pumpflow.common.text import counted

# the bus is imported where a letter is read or moved: every pumpflow command registers
# this one, and the bus package brings its metrics (prometheus-client) with it
if TYPE_CHECKING:
    from pumpflow.common.bus.abc import DeadLetter, EventBus
    from pumpflow.common.events import Event
    from pumpflow.common.storage import RedriveWrite, TokenEventStore
    from pumpflow.feed.redrive import StoredEventRedrive

BATCH = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dead-letters",
        help="list a service's dead letters with their reasons, or move them to a file",
    )
    parser.add_argument("service", help="the consuming service, e.g. features")
    parser.add_argument("--limit", type=count, default=20, help="how many to list (20)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--move", type=Path, metavar="FILE", help="append all of them to FILE (JSONL), then remove"
    )
    action.add_argument(
        "--redrive",
        action="store_true",
        help="put them back on the bus for the service (all, or --reason/--type), then remove",
    )
    action.add_argument(
        "--redrive-from",
        type=Path,
        metavar="FILE",
        help="put back the letters of the service a --move saved in FILE",
    )
    parser.add_argument("--reason", help="redrive only letters whose reason contains this text")
    parser.add_argument("--type", dest="event_type", help="redrive only events of this type")
    parser.add_argument(
        "--dry-run", action="store_true", help="count what a redrive would put back; move nothing"
    )
    parser.set_defaults(handler=dead_letters_command)


def letter_record(letter: DeadLetter) -> dict:
    """A JSON-safe record of a dead letter; the body as text when it is UTF-8."""
    try:
        body: dict = {"body": letter.body.decode("utf-8")}
    except UnicodeDecodeError:
        body = {"body_base64": base64.b64encode(letter.body).decode()}
    return {
        "service": letter.service,
        "reason": letter.reason,
        "event_type": letter.event_type,
        "key": letter.key,
        **body,
        "headers": letter.headers,
    }


def record_letter(record: dict) -> DeadLetter:
    """The dead letter of a record :func:`letter_record` wrote."""
    from pumpflow.common.bus.abc import DeadLetter

    if "body" in record:
        body = record["body"].encode("utf-8")
    else:
        body = base64.b64decode(record["body_base64"])
    return DeadLetter(
        service=record["service"],
        reason=record["reason"],
        body=body,
        event_type=record.get("event_type"),
        key=record.get("key"),
        headers=record.get("headers") or {},
    )


def read_letters(path: Path, service: str) -> list[DeadLetter]:
    """The letters of ``service`` saved in ``path`` by ``--move``, one per event (a
    record may hold a batch the broker dead-lettered whole)."""
    from pumpflow.common.bus.batches import letter_events

    letters = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                letter = record_letter(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a dead-letter record: {exc!r}") from None
            if letter.service == service:
                letters.extend(letter_events(letter))
    return letters


def _show(letter: DeadLetter, out: TextIO) -> None:
    body = letter.body[:160].decode("utf-8", errors="replace")
    print(f"- {letter.event_type or '?'} key={letter.key or '-'}: {letter.reason}", file=out)
    print(f"    {body}{'...' if len(letter.body) > 160 else ''}", file=out)


async def list_letters(bus: EventBus, service: str, limit: int, out: TextIO) -> int:
    letters = await bus.dead_letters(service, limit=limit, remove=False)
    for letter in letters:
        _show(letter, out)
    print(f"{counted(len(letters), 'dead letter')} shown for {service} (none removed)", file=out)
    return len(letters)


def _append(path: Path, letters: Sequence[DeadLetter]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for letter in letters:
            handle.write(json.dumps(letter_record(letter)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


async def move_letters(bus: EventBus, service: str, path: Path) -> int:
    """Append every dead letter of ``service`` to ``path``, then remove it; return the count."""
    moved = 0
    while True:
        peeked = await bus.dead_letters(service, limit=BATCH, remove=False)
        if not peeked:
            return moved
        _append(path, peeked)
        taken = await bus.dead_letters(service, limit=len(peeked))
        # FIFO makes these the letters just saved; save any other that came first
        saved = [(d.body, d.reason) for d in peeked]
        extra = [d for d in taken if (d.body, d.reason) not in saved]
        if extra:
            _append(path, extra)
        moved += len(taken)


class _StoreOnDemand:
    """The token event store, opened at its first use: only a refused row needs it."""

    def __init__(self, settings: CommonSettings):
        self.settings = settings
        self._pool = None

    def rejects(self, exc: BaseException) -> bool:
        from pumpflow.common.storage import TokenEventStore

        return TokenEventStore.rejects(exc)

    async def _store(self) -> TokenEventStore:
        from pumpflow.common.db.pool import create_pool
        from pumpflow.common.storage import TokenEventStore

        if self._pool is None:
            settings = self.settings
            self._pool = await create_pool(
                settings.postgres_dsn,
                settings.namespace,
                max_size=2,
                command_timeout=settings.postgres_command_timeout_s,
            )
        return TokenEventStore(self._pool)

    async def store_redriven(self, event: Event, frame: bytes | str | None = None) -> RedriveWrite:
        return await (await self._store()).store_redriven(event, frame)

    async def mark_redrive_published(self, event_id: str) -> None:
        await (await self._store()).mark_redrive_published(event_id)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


def _feed_restorer(store: _StoreOnDemand, bus: EventBus) -> StoredEventRedrive | None:
    """What stores again the token events the feed's store refused (only the feed
    dead-letters them), or None where the feed is not installed (another service's
    image)."""
    try:
        from pumpflow.feed.redrive import StoredEventRedrive
    except ModuleNotFoundError:
        return None
    return StoredEventRedrive(store, bus)


async def _run(args: argparse.Namespace, settings: CommonSettings, out: TextIO) -> int:
    import aiormq

    from pumpflow.common.bus.factory import create_bus
    from pumpflow.common.bus.redrive import LetterFilter, redrive, redrive_letters
    from pumpflow.common.runtime.topology import declare_groups, groups_of
    from pumpflow.common.runtime.wiring import bus_config

    letters = None
    if args.redrive_from is not None:
        try:
            letters = read_letters(args.redrive_from, args.service)
        except OSError as exc:
            print(f"pumpflow dead-letters: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"pumpflow dead-letters: {exc}", file=sys.stderr)
            return 2
    # an operator's command says at once that the broker is away, where a service waits
    bus = create_bus(replace(bus_config(settings), connect_attempts=1))
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)  # the line below says it
    try:
        await bus.start()
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        await bus.close()
        print(f"pumpflow dead-letters: cannot connect to RabbitMQ: {exc}", file=sys.stderr)
        return 1
    store = _StoreOnDemand(settings)
    code = 0
    try:
        if not await bus.keeps_dead_letters_of(args.service):
            # a typo would read (and leave behind) an empty store of its own
            print(f"pumpflow dead-letters: no dead letters are kept for {args.service!r} in "
                  f"namespace {settings.namespace!r}: no such service has consumed there",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.redrive or letters is not None:
            deployed = groups_of(settings.consumer_group_names)
            if args.service in deployed:
                # the bus puts a keyless letter back where the group's declaration says
                # its keyless events go: its shared queues, or none
                await declare_groups(bus, {args.service: deployed[args.service]})
            select = LetterFilter(reason=args.reason, event_type=args.event_type)
            restorer = _feed_restorer(store, bus) if args.service == "feed" else None
            if args.service == "feed" and restorer is None:
                print(
                    "pumpflow dead-letters: the feed's letters are redriven where the feed is "
                    "installed (its image: docker compose exec feed pumpflow dead-letters feed "
                    "--redrive)",
                    file=sys.stderr,
                )
                return 2
            if letters is None:
                count = await redrive(
                    bus, args.service, select=select, dry_run=args.dry_run, restorer=restorer
                )
            else:
                count = await redrive_letters(
                    bus, args.service, letters, select=select, dry_run=args.dry_run,
                    restorer=restorer,
                )  # fmt: skip
            print(count.summary(args.service), file=out)
            if restorer is not None and (
                restorer.stored or restorer.published or restorer.done_before
            ):
                print(f"refused token events: {restorer.summary()}", file=out)
            for reason in count.refusals:
                print(f"- refused again: {reason}", file=out)
            for reason in count.keyless_reasons:
                print(f"- left: {reason}", file=out)
            code = 1 if count.refused else 0
        elif args.move is not None:
            moved = await move_letters(bus, args.service, args.move)
            print(
                f"moved {counted(moved, 'dead letter')} of {args.service} to {args.move}", file=out
            )
        else:
            await list_letters(bus, args.service, args.limit, out)
    finally:
        await store.close()
        await bus.close()
    return code


def dead_letters_command(args: argparse.Namespace) -> int:
    redriving = args.redrive or args.redrive_from is not None
    if not redriving and (args.reason or args.event_type or args.dry_run):
        print(
            "pumpflow dead-letters: --reason, --type and --dry-run go with a redrive",
            file=sys.stderr,
        )
        return 2
    try:
        settings = CommonSettings.load(service="cli")
    except SettingsError as exc:
        print(f"pumpflow dead-letters: {exc}", file=sys.stderr)
        return 2
    if settings.transport == "memory":
        print(
            "pumpflow dead-letters: the memory transport keeps dead letters inside the running "
            "process; set PUMPFLOW_TRANSPORT=rabbitmq to read a deployment's",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_run(args, settings, sys.stdout))
