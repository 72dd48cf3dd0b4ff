"""Why an entry was refused: the text said, and its kind, by which refusals are counted.

A refusal's text says what varies from one refusal to the next (the value observed, a
name); its kind leaves that out and keeps what says what the refusal is about (the limit,
a feature's name), so refusals counted by kind stay a few keys however long trading runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reason:
    """Why an entry was refused."""

    text: str
    #: the text with what varies between refusals of one kind left out (``#`` where it
    #: says an observed value)
    kind: str

    def __str__(self) -> str:
        return self.text

    @classmethod
    def fixed(cls, text: str) -> Reason:
        """A reason whose text says nothing that varies between refusals: its own kind."""
        return cls(text, text)

    @classmethod
    def observed(cls, template: str, *values: str, **limits: object) -> Reason:
        """``template`` with its positional fields the observed ``values`` (formatted
        already; ``#`` in the kind) and its named ones the ``limits`` (in both)."""
        return cls(
            template.format(*values, **limits),
            template.format(*("#",) * len(values), **limits),
        )
