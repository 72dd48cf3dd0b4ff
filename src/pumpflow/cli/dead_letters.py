"""``pumpflow dead-letters``: see what a service could not process, and why.

Lists a service's dead letters (the bus keeps them) without removing them, or with
``--move FILE`` appends them to a JSONL file and only then removes them, so a crash
half way leaves each letter in the queue, in the file, or in both, never in neither.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pumpflow.common.bus.abc import DeadLetter, EventBus
from pumpflow.common.runtime.settings import CommonSettings, SettingsError

BATCH = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dead-letters",
        help="list a service's dead letters with their reasons, or move them to a file",
    )
    parser.add_argument("service", help="the consuming service, e.g. features")
    parser.add_argument("--limit", type=int, default=20, help="how many to list (20)")
    parser.add_argument(
        "--move", type=Path, metavar="FILE", help="append all of them to FILE (JSONL), then remove"
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


def _show(letter: DeadLetter, out: TextIO) -> None:
    body = letter.body[:160].decode("utf-8", errors="replace")
    print(f"- {letter.event_type or '?'} key={letter.key or '-'}: {letter.reason}", file=out)
    print(f"    {body}{'...' if len(letter.body) > 160 else ''}", file=out)


async def list_letters(bus: EventBus, service: str, limit: int, out: TextIO) -> int:
    letters = await bus.dead_letters(service, limit=limit, remove=False)
    for letter in letters:
        _show(letter, out)
    print(f"{len(letters)} dead letter(s) shown for {service} (none removed)", file=out)
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


async def _run(args: argparse.Namespace, settings: CommonSettings, out: TextIO) -> int:
    from pumpflow.common.bus.factory import create_bus
    from pumpflow.common.runtime.wiring import bus_config

    bus = create_bus(bus_config(settings))
    await bus.start()
    try:
        if args.move is not None:
            moved = await move_letters(bus, args.service, args.move)
            print(f"moved {moved} dead letter(s) of {args.service} to {args.move}", file=out)
        else:
            await list_letters(bus, args.service, args.limit, out)
    finally:
        await bus.close()
    return 0


def dead_letters_command(args: argparse.Namespace) -> int:
    try:
        settings = CommonSettings.load(service="cli")
    except SettingsError as exc:
        print(f"pumpflow: {exc}", file=sys.stderr)
        return 2
    if settings.transport == "memory":
        print(
            "pumpflow: the memory transport keeps dead letters inside the running process; "
            "set PUMPFLOW_TRANSPORT=rabbitmq to read a deployment's",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_run(args, settings, sys.stdout))
