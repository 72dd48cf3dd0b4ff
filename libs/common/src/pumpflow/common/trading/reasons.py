"""Why an entry was refused: the text said, and its kind, by which refusals are counted.

A refusal's text says what varies from one refusal to the next (the value observed, a
name); its kind leaves that out and keeps what says what the refusal is about (the limit,
a feature's name), so refusals counted by kind stay a few keys however long trading runs.
Refusals come for most predictions and are mostly only counted: an observed one's kind
is made once per template and limits, and its text only when it is read.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=256)
def _kind(template: str, values: int, limits: tuple[tuple[str, object], ...]) -> str:
    return template.format(*("#",) * values, **dict(limits))


class Reason:
    """Why an entry was refused."""

    __slots__ = ("_limits", "_template", "_text", "_values", "kind")

    def __init__(self, text: str, kind: str):
        self._text: str | None = text
        #: the text with what varies between refusals of one kind left out (``#`` where
        #: it says an observed value)
        self.kind = kind
        self._template = ""
        self._values: tuple[str, ...] = ()
        self._limits: dict[str, object] = {}

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._template.format(*self._values, **self._limits)
        return self._text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Reason({self.text!r}, {self.kind!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reason):
            return NotImplemented
        return (self.text, self.kind) == (other.text, other.kind)

    def __hash__(self) -> int:
        return hash((self.text, self.kind))

    @classmethod
    def fixed(cls, text: str) -> Reason:
        """A reason whose text says nothing that varies between refusals: its own kind."""
        return cls(text, text)

    @classmethod
    def observed(cls, template: str, *values: str, **limits: object) -> Reason:
        """``template`` with its positional fields the observed ``values`` (formatted
        already; ``#`` in the kind) and its named ones the ``limits`` (in both)."""
        reason = cls(None, _kind(template, len(values), tuple(limits.items())))  # type: ignore[arg-type]
        reason._template, reason._values, reason._limits = template, values, limits
        return reason
