"""Words of the messages a person reads (the CLI's lines, the reports)."""

from __future__ import annotations


def counted(count: float, noun: str, plural: str | None = None) -> str:
    """``count`` and ``noun``, plural unless the count is one: "1 position",
    "2,500 positions", "1.5 minutes"; ``plural`` for a noun not made plural by an "s"."""
    whole = isinstance(count, int) or float(count).is_integer()
    number = f"{int(count):,}" if whole else f"{count:,g}"
    return f"{number} {noun_of(count, noun, plural)}"


def noun_of(count: float, noun: str, plural: str | None = None) -> str:
    """``noun`` as ``count`` of it reads, without the count (of a list: "seed 4",
    "seeds 4,5")."""
    return noun if count == 1 else plural or noun + "s"


#: a repeated fault's line is said at its first time, then once every this many
SAY_EVERY = 1000


def due_to_say(before: int, after: int) -> bool:
    """Whether a count of a repeated fault going from ``before`` to ``after`` reaches its
    first or passes a multiple of :data:`SAY_EVERY`: the lines that say it, bounded."""
    return (before == 0 < after) or before // SAY_EVERY != after // SAY_EVERY
