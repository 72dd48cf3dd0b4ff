"""Argument types shared by the command lines (pumpflow's and the services' own)."""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

#: a reStructuredText role (:func: and the like), its ``~`` and its target
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def help_text(doc: str | None) -> str | None:
    """A module's docstring as its command's --help: reStructuredText's literals and
    roles (double backticks, :func: and the like) in single backticks, as the options'
    help writes a name (a role's ``~`` keeps the name's last part)."""
    if doc is None:
        return None
    doc = _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", doc)
    return doc.replace("``", "`")


class UsageError(ValueError):
    """Flags or input a command refuses: ``pumpflow`` says why and exits 2, as argparse
    does for its own and as for a bad setting."""


#: the URL schemes each server's client reads (asyncpg, aio-pika, redis-py)
POSTGRES_SCHEMES = ("postgresql", "postgres")
AMQP_SCHEMES = ("amqp", "amqps")
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: a namespace: the prefix of queues and keys, and the Postgres schema unquoted
NAMESPACE_PATTERN = r"^[a-z][a-z0-9_]*$"


def server_url(text: str, schemes: tuple[str, ...]) -> str:
    """``text``, a URL of one of ``schemes``; else ValueError naming them and the scheme
    found, never the URL (it may hold a password). A URL its client cannot read would
    otherwise pass for a server away: a service waits for it, a command ends in a
    traceback."""
    scheme = urllib.parse.urlsplit(text).scheme if "://" in text else ""
    if scheme.lower() not in schemes:
        said = ", ".join(f"{s}://" for s in schemes[:-1]) + f" or {schemes[-1]}://"
        found = f"its scheme is {scheme!r}" if scheme else "it has no scheme://"
        raise ValueError(f"not a URL of {said}: {found}")
    return text


def postgres_dsn(text: str) -> str:
    """A ``--dsn`` option: a Postgres URL."""
    try:
        return server_url(text, POSTGRES_SCHEMES)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def schema_name(text: str) -> str:
    """A ``--schema``: a namespace's, the only schemas the services use."""
    if not re.match(NAMESPACE_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"not a namespace (a lower-case letter, then lower-case letters, digits or _): {text!r}"
        )
    return text


def finite(text: str) -> float:
    """A number of an option; ``nan`` and ``inf``, which ``float`` reads, are refused (a
    NaN passes every bound check, and either can keep a run going for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def epoch_time(text: str) -> float:
    """A time of an option (a window's --start/--end): epoch seconds or an ISO 8601 date
    and time, in UTC unless it names its zone (a market's times are UTC, the machine's
    zone is no one's)."""
    try:
        epoch = finite(text)
    except argparse.ArgumentTypeError:
        pass
    else:
        try:  # a time every window, log line and report can say as a date
            datetime.fromtimestamp(epoch, UTC)
        except (OverflowError, OSError, ValueError):
            raise argparse.ArgumentTypeError(f"not a date from year 1 to 9999: {text!r}") from None
        return epoch
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an epoch time or an ISO date, not {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def utc_text(at: float) -> str:
    """An epoch time as a window's bound reads to a user: its UTC date and time."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def postgres_source(schema: str, start: float | None, end: float | None) -> str:
    """A window of the schema's history, as the commands reading it name it."""
    window = ([f"from {utc_text(start)}"] if start is not None else []) + (
        [f"to {utc_text(end)}"] if end is not None else []
    )
    return f"postgres {schema}" + (f", {' '.join(window)}" if window else "")


def check_window(start: float | None, end: float | None) -> None:
    """Refuse a ``--start``/``--end`` window that ends before it starts: read, it would
    pass for an empty history."""
    if start is not None and end is not None and end <= start:
        raise UsageError(
            f"--end ({utc_text(end)}) is not after --start "
            f"({utc_text(start)}): the window holds nothing to replay"
        )


def integer(text: str) -> int:
    """A whole number of an option."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def bounded(
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    whole: bool = False,
) -> Callable[[str], float]:
    """The type of an option whose number is meaningless out of the range given: a value
    out of it is refused with the range, as the option's one-line error (a negative
    count or duration otherwise runs and ends in an empty result that says nothing)."""
    checks = [
        (bound, word, test)
        for bound, word, test in (
            (above, ">", lambda v, b: v > b),
            (at_least, ">=", lambda v, b: v >= b),
            (below, "<", lambda v, b: v < b),
            (at_most, "<=", lambda v, b: v <= b),
        )
        if bound is not None
    ]
    allowed = " and ".join(f"{word} {bound:g}" for bound, word, _ in checks)

    def parse(text: str) -> float:
        value = integer(text) if whole else finite(text)
        if not all(test(value, bound) for bound, _, test in checks):
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text}")
        return value

    return parse


#: seconds, counts, rates and sizes that only mean something above zero
positive = bounded(above=0)
#: durations where 0 has a meaning of its own (e.g. until stopped)
non_negative = bounded(at_least=0)
#: counts of things of which there must be one at least
count = bounded(at_least=1, whole=True)
#: shares and rates of a whole, strictly between nothing and all of it
share = bounded(above=0, below=1)
#: scores and probabilities, both ends included
probability = bounded(at_least=0, at_most=1)


def writable(path: str | Path) -> Path:
    """``path``, its folder made, once a file can be written there; else the OSError
    naming it, before a command whose results it would lose at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent))
    return path
